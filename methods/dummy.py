"""dummy: a plumbing method for tests and plugins (lm-evaluation-harness style).

Not a distillation method. Its one-step generator (a teacher copy) regresses G(z) onto the
teacher's own one-step x0-prediction from the same noise, so it trains, checkpoints, samples and
scores through exactly the paths the real methods use, in seconds.
"""
from __future__ import annotations

import torch

from fewstep import losses
from fewstep.engine.adapt import trainable_copy
from fewstep.engine.method import Method, StudentSpec, student_grid
from fewstep.options import TrainOptions


class Dummy(Method):
    name = "dummy"
    fidelity = "plumbing"
    Options = TrainOptions
    PRESETS = {"toy": {"steps": 20, "batch": 8, "lr": 1e-4, "checkpoint_every": 10, "log_every": 1}}

    def __init__(self, teacher, options, ctx):
        super().__init__(teacher, options, ctx)
        self._generator = trainable_copy(teacher, options)
        self.grid = student_grid(teacher, [1.0])

    def loss(self, net, scratch):
        batch = self.ctx.prompts(self.opt.batch)
        z = self.ctx.randn((len(batch), *self.teacher.latent_shape), "z")
        t = torch.full((len(batch),), self.grid[0], device=z.device)
        with torch.no_grad():
            target = self.teacher.x0(z, t, batch.cond)
        x = self.generator.x0(z, t, batch.cond)
        return losses.native_mse(x, target), {}

    @classmethod
    def sampler(cls, teacher, options):
        return StudentSpec(student_grid(teacher, [1.0]))
