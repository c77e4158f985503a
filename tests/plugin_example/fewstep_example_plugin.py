"""An example method plugin: a two-step student regressed onto the teacher's x0-predictions, nudged
up a reward.

Shows the whole contract of a method: options (a TrainOptions dataclass), presets, the DAG inputs
it requires, networks, a loss per network and its sampler. It requires "reward", so the DAG hands
its train job the reward (the toy reward net in the toy world, distill/rewards/example_plugin in
the real one) and the engine passes the scorer in as ctx.reward. Not a distillation method worth
ranking.
"""
from dataclasses import dataclass

import torch

from fewstep.engine.adapt import trainable_copy
from fewstep.engine.method import Method, StudentSpec, student_grid
from fewstep.options import TrainOptions
from fewstep.errors import FewstepError

FRACTIONS = (1.0, 0.5)  # the student's two steps, as fractions of the time range (1 = noise)


@dataclass
class Options(TrainOptions):
    guidance: float = 2.0       # the teacher guidance the student imitates
    reward_weight: float = 0.01  # lambda of loss = mse - lambda * mean reward


class TwoStepRegression(Method):
    name = "example_plugin"
    fidelity = "plumbing"
    Options = Options
    PRESETS = {"toy": {"steps": 4, "batch": 4, "lr": 1e-4, "checkpoint_every": 2}}
    requires = ("reward",)

    def __init__(self, teacher, options, ctx):
        super().__init__(teacher, options, ctx)
        if ctx.reward is None:
            raise FewstepError("example_plugin trains on a reward: give `fewstep train --reward`")
        self._generator = trainable_copy(teacher, options)
        self.grid = student_grid(teacher, FRACTIONS)

    def loss(self, net, scratch):
        batch = self.ctx.prompts(self.opt.batch)
        x = self.ctx.randn((len(batch), *self.teacher.latent_shape), "z")
        t = torch.full((len(batch),), self.grid[0], device=x.device)
        with torch.no_grad():
            target = self.teacher.x0(x, t, batch.cond, self.opt.guidance)
        x0 = self.generator.x0(x, t, batch.cond)
        mse = torch.mean((x0 - target) ** 2)
        # the reward's gradient reaches the generator through the decoded images
        reward = torch.as_tensor(self.ctx.reward(self.teacher.decode(x0), batch.metas)).mean()
        stats = {"mse": mse.detach(), "reward": reward.detach()}
        return mse - self.opt.reward_weight * reward, stats

    @classmethod
    def sampler(cls, teacher, options):
        return StudentSpec(student_grid(teacher, FRACTIONS), theta=torch.pi / 2)
