"""Teacher samplers: n-step DDIM (eps families) / Euler (flow families) with CFG in x0 space.

One loop for both: `Schedule.ddim_step` with theta = 0 is DDIM on the VP schedule and exactly the
Euler step of the probability-flow ODE on the flow schedule (sec. 3).
Sections (sec. N) are those of fewstep/notes/conventions.md.
"""
from __future__ import annotations

import torch

from fewstep.backbones.base import Backbone, Cond
from fewstep.schedule import sampling_grid


def nfe_of(steps: int, guidance: float) -> int:
    """Network evaluations: a guided evaluation counts 2 (sec. 5)."""
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


@torch.no_grad()
def sample_student(generator: Backbone, noise: torch.Tensor, cond: Cond, grid, theta: float,
                   step_noise=None, guidance: float = 1.0) -> torch.Tensor:
    """A few-step generator's sampler: x0_i = G(x_i, t_i, c); x_{i+1} = alpha x0_i + sigma (cos theta
    eps_hat + sin theta xi_i) at t_{i+1} (sec. 3); returns the last x0-prediction.

    theta = pi/2 re-noises with fresh noise (DMD2, methods/notes/dmd2.md sec. 5.1), 0 is deterministic (CDM),
    eta pi/2 is RTDMD's CPS. `step_noise(i)` gives xi_i (per-sample seeded in the DAG).
    """
    x = noise
    x0 = noise
    for i, t in enumerate(grid):
        t_vec = torch.full((x.shape[0],), float(t), device=x.device)
        x0 = generator.x0(x, t_vec, cond, guidance)
        if i + 1 < len(grid):
            xi = step_noise(i) if theta else None
            x = generator.schedule.ddim_step(x, x0, t_vec, torch.full_like(t_vec, float(grid[i + 1])),
                                             xi, theta)
    return x0
