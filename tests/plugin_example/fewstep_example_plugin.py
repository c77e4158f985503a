"""An example method plugin: a two-step student regressed onto the teacher's x0-predictions.

Shows the whole contract of a method: options (a TrainOptions dataclass), presets, networks, an
update plan, a loss per network and a sampler spec. Not a distillation method worth ranking.
"""
from dataclasses import dataclass

import torch

from fewstep.engine.adapt import trainable_copy
from fewstep.engine.method import Method, StudentSpec, student_grid
from fewstep.engine.options import TrainOptions


@dataclass
class Options(TrainOptions):
    guidance: float = 2.0  # the teacher guidance the student imitates


class TwoStepRegression(Method):
    name = "example_plugin"
    fidelity = "plumbing"
    Options = Options
    PRESETS = {"toy": {"steps": 4, "batch": 4, "lr": 1e-4, "checkpoint_every": 2}}

    def __init__(self, teacher, options, ctx):
        super().__init__(teacher, options, ctx)
        self._generator = trainable_copy(teacher, options)
        self.grid = student_grid(teacher, [1.0, 0.5])

    def networks(self):
        return {"generator": self.generator.denoiser}

    def loss(self, net, scratch):
        batch = self.ctx.prompts(self.opt.batch)
        x = self.ctx.randn((len(batch), *self.teacher.latent_shape), "z")
        t = torch.full((len(batch),), self.grid[0], device=x.device)
        with torch.no_grad():
            target = self.teacher.x0(x, t, batch.cond, self.opt.guidance)
        return torch.mean((self.generator.x0(x, t, batch.cond) - target) ** 2), {}

    def student(self):
        return StudentSpec(self.grid, theta=torch.pi / 2)
