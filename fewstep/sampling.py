"""Teacher samplers: n-step DDIM (eps families) / Euler (flow families) with CFG in x0 space.

One loop for both: `Schedule.ddim_step` with theta = 0 is DDIM on the VP schedule and exactly the
Euler step of the probability-flow ODE on the flow schedule (shared spec README section 3).
"""
from __future__ import annotations

import torch

from fewstep.backbones.base import Backbone, Cond
from fewstep.schedule import sampling_grid


def nfe_of(steps: int, guidance: float) -> int:
    """Network evaluations: a guided evaluation counts 2 (spec README section 5)."""
    return steps * (1 if guidance == 1.0 else 2)


def teacher_grid(backbone: Backbone, steps: int, shift: float = 1.0) -> torch.Tensor:
    kind = "flow" if backbone.schedule.kind == "flow" else "vp-discrete"
    return sampling_grid(steps, kind=kind, shift_s=shift)


@torch.no_grad()
def sample_ode(backbone: Backbone, noise: torch.Tensor, cond: Cond, steps: int,
               guidance: float = 1.0, shift: float = 1.0) -> torch.Tensor:
    """Deterministic n-step sampler from pure noise at t = 1; returns the final x0-prediction."""
    grid = teacher_grid(backbone, steps, shift).tolist()
    x = noise
    for t, t_next in zip(grid[:-1], grid[1:]):
        x0 = backbone.x0(x, torch.full((x.shape[0],), t), cond, guidance)
        if t_next == 0.0:
            return x0  # the last step lands on clean data: its x0-prediction is the sample
        x = backbone.schedule.ddim_step(x, x0, torch.tensor(t), torch.tensor(t_next))
    return x
