"""One rollout of a few-step generator's sampler, shared by the methods.

    rollout(generator, z, cond, grid, stop, noise=None, *, theta=0.0, step="ddim",
            last_step=None, grad=False, record=False, visit=None) -> Trajectory

From z at grid[0], step i = 0 .. stop-1 predicts x0_i = generator.x0(x_i, t_i, cond) with the
float32 time vector t_i = full((B,), grid[i]), draws xi_i = noise(i, x_i) (no draw when `noise`
is None: a deterministic step) and moves x_i to grid[i + 1] by the step rule:
  "ddim":   Schedule.ddim_step(x_i, x0_i, t_i, t_{i+1}, xi_i, theta), the engine's arithmetic
            (teacher sampling, Method.rollout, CDM);
  "kernel": Schedule.cps_step, float64 throughout, exactly x0 at t = 0 (RTDMD's CPS).
`last_step` names the final step's rule when it differs (RTDMD stage 1 warms up with "ddim" and
trains a "kernel" step). Every step runs without gradient except the last one when grad=True.
record=True keeps the states x_0 .. x_stop (states[0] is z) and, for kernel steps, each
transition's float64 mean (RTDMD's log-probs, Schedule.cps_logprob(states[i + 1], means[i])).
visit(i, x_i, x0_i, t_i) sees each prediction before the move (CDM records its anchors).
`grid` needs stop + 1 times; with stop = 0 the trajectory is z itself.

Typical noise: `lambda i, x: ctx.randn_like(x, f"{stream}/xi{i}")` (one named stream per step).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

STEPS = ("ddim", "kernel")


@dataclass
class Trajectory:
    x: torch.Tensor                                   # the state at grid[stop]
    states: list[torch.Tensor] = field(default_factory=list)  # x_0 .. x_stop when recorded
    means: list[torch.Tensor] = field(default_factory=list)   # kernel steps' means when recorded


def advance(schedule, rule: str, x, x0, t, t_next, xi, theta: float):
    """(x at t_next, the kernel step's float64 mean or None) by the named step rule."""
    if rule == "ddim":
        return schedule.ddim_step(x, x0, t, t_next, xi, theta), None
    if rule != "kernel":
        raise ValueError(f"rollout step must be one of {STEPS}, got {rule!r}")
    mean = schedule.cps_mean(x, x0, t, t_next, theta)
    return schedule.cps_step(x, x0, t, t_next, xi, theta, mean=mean), mean


def rollout(generator, z: torch.Tensor, cond, grid, stop: int,
            noise: Callable[[int, torch.Tensor], torch.Tensor] | None = None, *,
            theta: float = 0.0, step: str = "ddim", last_step: str | None = None,
            grad: bool = False, record: bool = False, visit: Callable | None = None) -> Trajectory:
    """Run the generator's sampler from z through grid[:stop + 1] (see the module docstring)."""
    schedule, x = generator.schedule, z
    out = Trajectory(z, [z] if record else [], [])
    for i in range(stop):
        last = i == stop - 1
        t = torch.full((x.shape[0],), float(grid[i]), device=x.device)
        t_next = torch.full_like(t, float(grid[i + 1]))
        xi = noise(i, x) if noise is not None else None
        with torch.set_grad_enabled(grad and last):
            x0 = generator.x0(x, t, cond)
            if visit is not None:
                visit(i, x, x0, t)
            rule = (last_step or step) if last else step
            x, mean = advance(schedule, rule, x, x0, t, t_next, xi, theta)
        if record:
            out.states.append(x)
            if mean is not None:
                out.means.append(mean)
    out.x = x
    return out
