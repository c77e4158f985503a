"""The Method base class: what a distillation method tells the engine.

A method owns its networks and losses; the engine owns the loop. Per iteration the engine asks
`plan(step)` which networks update and in which order, and for each of them calls
`loss(net, scratch)`, back-propagates into that network's parameters only, clips and steps its
optimiser, then calls `after_update(net)`. `scratch` is a dict shared by the iteration's updates
(for example the generator sample that both the generator and the critic losses use).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fewstep.backbones.base import Backbone
from fewstep.engine.context import Context
from fewstep.options import TrainOptions
from fewstep.engine.rollout import rollout


@dataclass
class StudentSpec:
    """How to sample the trained generator: t-grid, re-noising angle, guidance, NFE.

    theta: the angle of the step x_t' = alpha(t') x0 + sigma(t') (cos theta eps_hat + sin theta xi)
    (fewstep/notes/conventions.md sec. 3): 0 deterministic DDIM/Euler (CDM), pi/2 fresh re-noising (DMD2's
    multi-step sampler), eta * pi/2 for RTDMD's CPS.
    """

    grid: list[float]
    theta: float = 0.0
    guidance: float = 1.0

    @property
    def nfe(self) -> int:
        return len(self.grid) * (1 if self.guidance == 1.0 else 2)

    def to_dict(self) -> dict:
        return {"grid": list(map(float, self.grid)), "theta": float(self.theta),
                "guidance": float(self.guidance), "nfe": self.nfe}


def frozen(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def student_grid(backbone: Backbone, fractions, shift: float = 1.0) -> list[float]:
    """t-values of a few-step grid given as fractions of the time range, 1 = noise.

    Discrete VP (SDXL): k = 999 - round(1000 (1 - u)), so [1, .75, .5, .25] -> k = [999, 749, 499,
    249] (DMD2's 4-step grid; 1-step at u = 0.4 gives k = 399). Flow families: t = shift(u).
    """
    from fewstep.schedule import shift as shift_map

    sched = backbone.schedule
    if sched.kind == "flow":
        return [float(v) for v in shift_map(torch.tensor(list(fractions), dtype=torch.float64), shift)]
    ks = [999 - round(1000 * (1 - float(u))) for u in fractions]
    return [float(sched.t_of_k(k)) for k in ks]


class Method:
    """Base class. Subclasses set `name`, `Options`, `PRESETS`, and implement the hooks."""

    name = "abstract"
    # How the implementation was obtained, a property of the method (shown beside its name in
    # every table): "faithful" (from the paper and its official code; every difference from them
    # is an entry of `ledger`), "reconstructed" (no paper text or code: every guess is an option,
    # AMD), "plumbing" (not a distillation method). Where one run differs from the paper is the
    # ledger's business, a property of the run: its applicable entries are recorded in
    # student.json and marked "D" in the result tables (fewstep.fidelity).
    fidelity = "faithful"
    # The fidelity ledger: (fewstep.fidelity.Deviation, ...), the method file's FIDELITY; merged
    # down the inheritance chain (fewstep.fidelity.ledger). Printed by `fewstep methods --fidelity`.
    ledger: tuple = ()
    Options = TrainOptions
    PRESETS: dict[str, dict] = {}
    # extra DAG inputs: "pairs" (teacher ODE pairs), "reward", "real" (captioned real images;
    # toy renders in the toy world)
    requires: tuple[str, ...] = ()

    def __init__(self, teacher: Backbone, options, ctx: Context):
        self.teacher = frozen(teacher)
        self.opt = options
        self.ctx = ctx

    @classmethod
    def for_options(cls, options) -> type["Method"]:
        """The class that trains these options: the registered class itself, or (a staged method)
        the class of the stage its options name. One registered name, one preset namespace."""
        return cls

    # -- to implement ------------------------------------------------------------------------------
    def networks(self) -> dict[str, nn.Module]:
        """Trainable modules by name ("generator" first); each gets its own optimiser. The default
        is the generator's denoiser and, when the method has a `critic` backbone, the critic's."""
        nets = {"generator": self.generator.denoiser}
        if getattr(self, "critic", None) is not None:
            nets["critic"] = self.critic.denoiser
        return nets

    def plan(self, step: int) -> list[str]:
        """Networks updated at this iteration, in order (two-time-scale rules live here)."""
        return list(self.networks())

    def loss(self, net: str, scratch: dict) -> tuple[torch.Tensor, dict]:
        """(scalar loss for `net`, scalars to log)."""
        raise NotImplementedError

    def after_update(self, net: str) -> None:
        """Called after `net`'s optimiser step (CDM's fake-teacher merge)."""

    @classmethod
    def sampler(cls, teacher: Backbone, options) -> StudentSpec:
        """How a student of these options samples (grid, re-noising, guidance), from the options
        and the teacher's schedule alone: a released checkpoint is sampled with its method's
        preset through this, never with settings read from the checkpoint's folder name. It is
        the one sampler hook: training, export and `fewstep release` all read it."""
        raise NotImplementedError(f"{cls.__name__} does not define sampler(teacher, options)")

    @classmethod
    def weight_files(cls, options) -> list:
        """Files beyond the teacher a run with these options reads from the weights cache
        (fewstep.backbones.weights.WeightFile: DMD's LPIPS trunk); `fewstep weights check` lists
        them. A method that needs none keeps this default."""
        return []

    @property
    def generator(self) -> Backbone:
        return self._generator

    # -- per-network optimiser settings ------------------------------------------------------------
    def lr(self, net: str) -> float:
        if net == "generator" or self.opt.critic_lr is None:
            return self.opt.lr
        return self.opt.critic_lr

    def weight_decay(self, net: str) -> float:
        if net == "generator" or self.opt.critic_weight_decay is None:
            return self.opt.weight_decay
        return self.opt.critic_weight_decay

    # -- helpers shared by the methods -------------------------------------------------------------
    def rollout(self, z: torch.Tensor, cond, grid: list[float], stop: int, theta: float,
                stream: str) -> torch.Tensor:
        """No-grad run of the generator's sampler from z through grid[:stop]; x at grid[stop] (z
        itself when stop = 0). Step i re-noises with the named stream `{stream}/xi{i}`."""
        return rollout(self.generator, z, cond, grid, stop,
                       lambda i, x: self.ctx.randn_like(x, f"{stream}/xi{i}"), theta=theta).x


def student_spec(method: Method) -> StudentSpec:
    """How the student a method trains samples: its class's sampler on its teacher and options."""
    return type(method).sampler(method.teacher, method.opt)


RENOISE = math.pi / 2  # theta of DMD2's multi-step sampler: x_t' = F_t'(x0, fresh eps)
