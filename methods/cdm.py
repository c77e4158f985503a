"""CDM: Continuous-Time Distribution Matching (arXiv 2605.06376; official code byliutao/cdm at
bacc57f). A few-step student G_theta is trained by distribution matching along its own
deterministic sampling trajectories, drawn with a random length N ~ U{1..28} and random
continuous anchor times (sec. 3). Three student losses share one displacement form (sec. 4):
CA, the teacher's CFG direction at the anchor (sec. 4.2); DM, on-trajectory distribution matching
at the anchor (sec. 4.3); CDM, off-trajectory matching at a point extrapolated along the student's
own step (sec. 4.4). The fake teacher F_phi (a copy of the student) is trained with plain
denoising every iteration and merged toward the student after each step, phi <- 0.999 phi +
0.001 theta (sec. 4.1); the student updates on every second fake-teacher step (sec. 5).
Fidelity "faithful": every detail follows the official code. Sections: methods/notes/cdm.md.
"""
from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass, replace

import torch

from fewstep import losses
from fewstep.backbones.base import cond_cat
from fewstep.engine.adapt import merged_state_dict, trainable_copy
from fewstep.engine.loop import lerp_toward
from fewstep.engine.method import Method, StudentSpec, student_grid
from fewstep.options import TrainOptions, choice
from fewstep.engine.rollout import rollout
from fewstep.errors import FewstepError
from fewstep.fidelity import Deviation
from fewstep.schedule import draw_times, shift as shift_map

# Named random streams (engine context), so a test can redraw exactly what a branch drew.
S_LEN, S_ANCHORS = "cdm/schedule/len", "cdm/schedule/anchors"       # rank-synchronised
S_Z, S_INDEX, S_PROMPTS = "cdm/z", "cdm/index", "cdm/prompts"        # rank-local from here on
S_FT, S_CA, S_DM, S_CDM = "cdm/ft", "cdm/ca", "cdm/dm", "cdm/cdm"
OFFTRAJ_MODES = ("trajectory_eps", "fresh", "trajectory_xt", "share_student", "fresh_shared_t")


@dataclass
class CDMOptions(TrainOptions):
    schedule_len: tuple[int, int] = (1, 28)            # cdm.schedule.len: N ~ U{lo..hi}
    schedule_range: tuple[float, float] = (0.25, 0.95)  # cdm.schedule.range: inner anchors u ~ U[lo, hi]
    schedule_shift: float | None = None                # flow shift of the anchors; None: the teacher's
    fixed_schedule: tuple[float, ...] | None = None    # cdm.fixed_schedule: anchors u (1.0 first)
    generator_grid: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)  # inference anchors u (sec. 6.2)
    ca_w: float = 7.0                                  # cdm.ca.w, used as-is (omega = 1 + w)
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)   # cdm.loss.weights (CA, DM, CDM)
    ft_ema_from_student: float = 0.999                 # cdm.ft.ema_from_student m (1.0: no merge)
    norm_floor: float = 0.1                            # cdm.norm_floor
    t_clamp: tuple[float, float] = (0.02, 0.98)        # clamp of every teacher / off-trajectory time
    offtraj_mode: str = choice(*OFFTRAJ_MODES)         # cdm.offtraj.mode (only the first runs)
    offtraj_t_sampler: str = choice("uniform", "uniform_capped")  # cdm.offtraj.t_sampler
    generator_every: int = 2                           # student when (step + 1) % r == 0 (sec. 5)
    # the paper's names
    ALIASES = {"update_ratio": "generator_every", "student_anchors": "generator_grid"}
    RANGES = {"generator_every": "[1, inf)", "ft_ema_from_student": "[0, 1]", "norm_floor": "(0, inf)",
              "ca_w": "[0, inf)"}


# The official training recipe (the paper's presets and the toy one); CDM's own options are
# CDMOptions' defaults. The EMA ticks once per student step, decay min(0.999, (1 + n) / (10 + n)).
# Each network's LR scheduler steps after that network's own optimiser step (the official
# training script), so the warm-up counts that network's updates.
RECIPE = {"lr": 1e-5, "critic_lr": 5e-6, "weight_decay": 1e-4, "betas": (0.9, 0.999),
          "grad_clip": 1.0, "warmup": 100, "ema_decay": 0.999, "ema_warmup": True,
          "ema_on": "generator_update", "lr_schedule_on": "update"}
# The SD3 config as launched (sec. 6.1): 4001 iterations (about 2000 student updates) of 16
# prompts per GPU on 8 GPUs, bf16 mixed precision, seed 42. Its schedulers are prepared by
# Accelerate, which ticks them once per process per step: the 100-tick warm-up from LR 0
# (lambda s / 100) lasts 12.5 updates of each network; warmup_ticks = 8 keeps that at any world size.
PAPER = {**RECIPE, "steps": 4001, "global_batch": 128, "warmup_ticks": 8, "warmup_start": "zero",
         "bf16": True, "seed": 42}
PRESETS = {
    "cdm-sd3-paper": {**PAPER, "schedule_shift": 3.0},
    "cdm-sdxl-ext": {**PAPER},         # [EXT] integer anchors k = round(999 u)
    "cdm-sit-ext": {**PAPER, "ca_w": 0.0, "schedule_shift": 1.0},  # [EXT] CA off by default
    # Toy teachers are sampled with CFG 2 (w = 1); short schedules keep a CPU iteration cheap. lr
    # 1e-4 collapsed the toy students (no 1/2 in the loss, three branches); 2e-5 is twice the
    # paper's. 301 iterations: SDXL's toy FID 70.4 [66.6, 74.6] at 301, 81.6 at 401 (same seeds).
    # 16 per iteration on one process; a warm-up of 20 updates of each network, from lr / 20.
    "toy": {**RECIPE, "batch": 16, "steps": 301, "lr": 2e-5, "critic_lr": 1e-5, "warmup": 20,
            "ca_w": 1.0, "schedule_len": (1, 8), "checkpoint_every": 200},
}

# The fidelity ledger (fewstep/fidelity.py): each option's official value (an entry marks a run
# that changes it, e.g. the toy preset), then the fixed choices where the harness differs.
CONFIG, SCRIPT = "official config module (sd3())", "official training script"
FIDELITY = (
    Deviation("steps", 4001, "the toy world trains 301 iterations on a CPU", CONFIG),
    Deviation("global_batch", 128, "the toy world trains 16 per iteration on one process",
              CONFIG + ": 16 per GPU on 8 GPUs (README launch)"),
    Deviation("lr", 1e-5, "toy: 2e-5 (1e-4 collapsed the toy students)", CONFIG),
    Deviation("critic_lr", 5e-6, "toy: 1e-5, half the toy student's as in the paper", CONFIG),
    Deviation("warmup", 100, "toy: 20 updates of its 150 student updates", "official config module"),
    Deviation("warmup_ticks", 8, "Accelerate ticks a prepared scheduler once per process per "
              "step (8 processes): the official warm-up lasts 12.5 updates; the toy world "
              "ticks once per update", SCRIPT + " (accelerator.prepare of its schedulers)"),
    Deviation("warmup_start", "zero", "toy: fewstep's rule, lr / warmup at the first update",
              "official model-utility module (create_lr_lambda: step / warmup)"),
    Deviation("lr_schedule_on", "update", "each scheduler steps after its own optimiser", SCRIPT),
    Deviation("schedule_len", (1, 28), "toy: U{1..8} keeps a CPU iteration cheap", CONFIG),
    Deviation("ca_w", 7.0, "SiT [EXT]: 0 (CA off; 0.5 is SiT's usual CFG 1.5); toy: 1 (the toy "
              "teachers are sampled with CFG 2)", CONFIG + " (loss.cfg.guidance_scale)"),
    Deviation("offtraj_t_sampler", "uniform", "`uniform_capped` is what the unused upper bound "
              "seems to intend (sec. 9)", "official losses module"),
    Deviation("schedule_shift", 3.0, "the SD3 model's shift, applied inside the pipeline's "
              "scheduler; SDXL/SiT [EXT] use their own", "official pipeline module"),
    Deviation("anchor random stream", "Python's process-global RNG (agrees across ranks only "
              "under identical seeding and consumption)", "one rank-synchronised generator gives "
              "N and the anchors to every rank (sec. 8 item 8)", SCRIPT,
              ours="rank-synchronised named stream"),
    Deviation("trainable weight precision", "bf16 (pipeline loaded in bf16, FSDP2 full shard)",
              "updates of 1e-5 relative size vanish in bf16; the harness trains fp32 masters "
              "under bf16 autocast (uncertain whether the official bf16 is deliberate, sec. 9)",
              SCRIPT, ours="fp32 master weights, bf16 autocast"),
)


# -- random continuous schedule (sec. 3) -----------------------------------------------------------
def draw_fractions(ctx, len_range, u_range) -> torch.Tensor:
    """Anchors u (float64, descending, 1.0 first): N ~ U{len_range}, N-1 values u ~ U[u_range],
    both from the rank-synchronised generator, so every rank rolls out the same schedule (CDM
    sec. 8 item 8: the official code relies on identically seeded global RNGs)."""
    n = int(ctx.randint(len_range[0], len_range[1], 1, S_LEN, shared=True)[0])
    u = ctx.uniform(n - 1, u_range[0], u_range[1], S_ANCHORS, shared=True).cpu()
    return torch.cat([torch.ones(1, dtype=torch.float64), u.sort(descending=True).values])


def anchor_times(schedule, u: torch.Tensor, shift: float = 1.0) -> list[float]:
    """Anchor fractions -> times: flow t = shift(u) (applied inside the official pipeline's
    scheduler, sec. 8 item 1); discrete VP integer anchors k = round(999 u), t = k / 999."""
    if schedule.kind == "flow":
        return [float(t) for t in shift_map(u, shift)]
    return [float(schedule.t_of_k(k)) for k in torch.round(999 * u).long()]


# -- backward simulation (sec. 3) ------------------------------------------------------------------
# The recorded trajectory at each sample's index i: x_i at t_i, the x0-prediction made there
# x0_next = x0_{i+1}, and eps_hat_i (v_i = eps_hat_i - x0_{i+1} on flow); x_final = x_N.
Anchor = namedtuple("Anchor", "index x t x0_next eps x_final")


@torch.no_grad()
def backward_simulation(generator, z: torch.Tensor, cond, times: list[float], index) -> Anchor:
    """Deterministic DDIM/Euler run of the student with CFG 1 from pure noise through `times`,
    then a final step to t = 0 (sec. 3); keeps only each sample's own anchor i (memory)."""
    pick = {"x": torch.zeros_like(z), "x0": torch.zeros_like(z), "eps": torch.zeros_like(z)}

    def record(k, x, x0, t):
        here = losses.per_sample(index == k, z)
        for key, value in (("x", x), ("x0", x0), ("eps", generator.schedule.eps_from_x0(x, x0, t))):
            pick[key] = torch.where(here, value.to(z.dtype), pick[key])

    x_final = rollout(generator, z, cond, [*times, 0.0], len(times), visit=record).x
    t_i = torch.tensor(times, device=z.device, dtype=torch.float32)[index]
    return Anchor(index, pick["x"], t_i, pick["x0"], pick["eps"], x_final)


# -- the shared displacement form (sec. 4) ---------------------------------------------------------
def normaliser(a: torch.Tensor, x0_g: torch.Tensor, floor: float) -> torch.Tensor:
    """nu(a) = max(mean_CHW |a - sg(x0_G)| + 1e-8, floor), per sample, broadcastable."""
    nu = losses.mean_chw((a.double() - x0_g.detach().double()).abs()) + 1e-8
    return losses.per_sample(nu.clamp_min(floor), a)


def dm_delta(p_real, p_fake, x0_g, floor: float) -> torch.Tensor:
    """Delta_DM = (D_T(c) - D_F(c)) / nu(D_T(c)) (sec. 4.3; also Delta_CDM, 4.4)."""
    return (p_real.double() - p_fake.double()) / normaliser(p_real, x0_g, floor)


def ca_delta(p_cond, p_uncond, x0_g, w: float, floor: float) -> torch.Tensor:
    """Delta_CA = w (D_T(c) - D_T(null)) / nu(D_T(c)), w as-is, not w - 1 (sec. 4.2, 8 item 2)."""
    return w * (p_cond.double() - p_uncond.double()) / normaliser(p_cond, x0_g, floor)


class CDM(Method):
    """Student G_theta ("generator") and fake teacher F_phi ("critic"), both copies of the teacher."""

    name = "cdm"
    fidelity = "faithful"
    Options = CDMOptions
    PRESETS = PRESETS
    ledger = FIDELITY

    def __init__(self, teacher, options, ctx):
        if options.fixed_schedule is not None:  # YAML overrides arrive as lists
            options = replace(options, fixed_schedule=tuple(map(float, options.fixed_schedule)))
        validate(options)
        super().__init__(teacher, options, ctx)
        self._generator = trainable_copy(teacher, options)
        # F_phi: the student at init (sec. 2), full weights; checkpointed like the student
        self.critic = trainable_copy(teacher, checkpointing=options.grad_checkpointing)
        self.discrete = teacher.schedule.kind != "flow"
        self.shift = grid_shift(teacher, options)

    def plan(self, step):
        """Fake teacher every iteration, the student every generator_every-th (sec. 5)."""
        return ["critic"] + (["generator"] if (step + 1) % self.opt.generator_every == 0 else [])

    @classmethod
    def sampler(cls, teacher, options) -> StudentSpec:  # deterministic, no guidance (sec. 5)
        grid = student_grid(teacher, options.generator_grid, grid_shift(teacher, options))
        return StudentSpec(grid, theta=0.0, guidance=1.0)

    def after_update(self, net):
        """phi <- m phi + (1 - m) theta over the floating-point state after each fake-teacher
        step (sec. 4.1); the critic holds full weights, so LoRA adapters are merged first."""
        if net == "critic" and self.opt.ft_ema_from_student < 1.0:
            student = self.generator.denoiser
            theta = merged_state_dict(student) if self.opt.lora_rank > 0 else student.state_dict()
            lerp_toward(self.critic.denoiser, theta, self.opt.ft_ema_from_student, copy_others=False)

    def loss(self, net, scratch):
        return self.student_loss(scratch) if net == "generator" else self.fake_teacher_loss(scratch)

    def trajectory(self, scratch: dict):
        """(Anchor, prompts, times), drawn once per iteration (sec. 3), shared by every branch."""
        if "anchor" not in scratch:
            times = self.schedule_times()
            batch = self.ctx.prompts(self.opt.batch, S_PROMPTS)
            z = self.ctx.randn((len(batch), *self.teacher.latent_shape), S_Z)
            index = self.ctx.randint(0, len(times) - 1, len(batch), S_INDEX)
            scratch["anchor"] = backward_simulation(self.generator, z, batch.cond, times, index)
            scratch["batch"], scratch["times"] = batch, times
        return scratch["anchor"], scratch["batch"], scratch["times"]

    def schedule_times(self) -> list[float]:
        """This iteration's anchor times (sec. 3); a fixed schedule goes through the sampler
        grid's own map, so it reproduces the student's sampler exactly (SDXL: k = 499, 249, where
        round(999 u) would give 500, 250)."""
        opt = self.opt
        if opt.fixed_schedule is not None:
            return student_grid(self.teacher, opt.fixed_schedule, self.shift)
        u = draw_fractions(self.ctx, opt.schedule_len, opt.schedule_range)
        return anchor_times(self.teacher.schedule, u, self.shift)

    def levels(self, n: int, stream: str, hi=1.0) -> torch.Tensor:
        """Per-sample times U(0, hi) clamped to t_clamp (sec. 4), hi a float or (B,) bounds;
        discrete VP: k = floor(1000 u) with DMD2's range rule, t = k / 999 [EXT]."""
        bound = torch.as_tensor(hi, dtype=torch.float64, device=self.ctx.device)
        return draw_times(self.ctx, n, stream, 0.0, 1.0, self.opt.t_clamp, bound=bound,
                          grid=1000 if self.discrete else None)

    # -- fake teacher (sec. 4.1) -------------------------------------------------------------------
    def fake_teacher_loss(self, scratch):
        """Unweighted denoising of sg(x0_{i+1}) on the native target (v on flow, eps on SDXL)."""
        anchor, batch, times = self.trajectory(scratch)
        x0 = anchor.x0_next.detach()
        tau = self.levels(len(x0), S_FT + "/tau")
        eps = self.ctx.randn_like(x0, S_FT + "/eps")
        loss = losses.denoising_loss(self.critic, x0, eps, tau, batch.cond)
        return loss, {"N": len(times), "t_i": anchor.t.mean()}

    # -- student (sec. 4.2-4.5) --------------------------------------------------------------------
    def student_loss(self, scratch):
        """The weighted branches; each evaluates x0_G = G_theta(x_in, t_in, c) anew, with gradient
        (sec. 8 item 9); a branch of weight 0 costs no network evaluation."""
        anchor, batch, _ = self.trajectory(scratch)
        w_ca, w_dm, w_cdm = self.opt.loss_weights
        total, stats = 0.0, {}
        branches = (("ca", w_ca if self.opt.ca_w != 0 else 0.0, self.branch_ca),
                    ("dm", w_dm, self.branch_dm), ("cdm", w_cdm, self.branch_cdm))
        for name, weight, branch in branches:
            if weight == 0:
                continue
            loss, delta = branch(anchor, batch.cond)
            total = total + weight * loss
            stats[f"loss_{name}"] = loss.detach()
            stats[f"delta_{name}"] = losses.finite_or_zero(delta).abs().mean()
        if not stats:
            raise FewstepError("cdm: every student loss is off (loss_weights, ca_w); nothing to train")
        return total, stats

    def teacher_point(self, x0_g, tau, stream: str):
        """x_tau = alpha(tau) sg(x0_G) + sigma(tau) eps, fresh eps (sec. 8 item 5)."""
        eps = self.ctx.randn_like(x0_g, stream + "/eps")
        return self.teacher.schedule.add_noise(x0_g.detach(), eps, tau)

    def branch_ca(self, anchor: Anchor, cond):
        """CA at the anchor, tau ~ U(0, t_i) clamped (sec. 4.2, 8 item 3)."""
        x0_g = self.generator.x0(anchor.x, anchor.t, cond)
        tau = self.levels(len(x0_g), S_CA + "/tau", hi=anchor.t.double())
        x_tau = self.teacher_point(x0_g, tau, S_CA)
        with torch.no_grad():
            both = cond_cat([cond, self.teacher.null(cond)])
            p_c, p_u = self.teacher.x0(torch.cat([x_tau, x_tau]), torch.cat([tau, tau]), both).chunk(2)
        delta = ca_delta(p_c, p_u, x0_g, self.opt.ca_w, self.opt.norm_floor)
        return losses.displacement_loss(x0_g, delta), delta

    def branch_dm(self, anchor: Anchor, cond):
        """On-trajectory DM at the anchor (x_i, t_i), tau ~ U(0, 1) clamped (sec. 4.3)."""
        x0_g = self.generator.x0(anchor.x, anchor.t, cond)
        return self.matching(x0_g, cond, S_DM)

    def branch_cdm(self, anchor: Anchor, cond):
        """Off-trajectory DM at x' = alpha(t') x0_{i+1} + sigma(t') eps_hat_i, the DDIM step from
        anchor i to an independent t' (sec. 4.4, 6.2); on flow exactly x_i + (t' - t_i) v_i."""
        t_prime = self.offtraj_times(anchor)
        x_prime = self.teacher.schedule.add_noise(anchor.x0_next, anchor.eps, t_prime).detach()
        x0_g = self.generator.x0(x_prime, t_prime, cond)
        return self.matching(x0_g, cond, S_CDM)

    def offtraj_times(self, anchor: Anchor) -> torch.Tensor:
        """t' ~ U(0, 1) clamped, independent of t_i (faithful), or U(0, t_i) (`uniform_capped`)."""
        hi = anchor.t.double() if self.opt.offtraj_t_sampler == "uniform_capped" else 1.0
        return self.levels(len(anchor.t), S_CDM + "/t_prime", hi=hi)

    def matching(self, x0_g, cond, stream: str):
        """Delta = (D_T(c) - D_F(c)) / nu at a fresh teacher point; teacher conditional only, fake
        teacher unguided (sec. 4.3); loss mean (x0_G - sg(x0_G + Delta))^2."""
        tau = self.levels(len(x0_g), stream + "/tau")
        x_tau = self.teacher_point(x0_g, tau, stream)
        with torch.no_grad():
            p_real = self.teacher.x0(x_tau, tau, cond)
            p_fake = self.critic.x0(x_tau, tau, cond)
        delta = dm_delta(p_real, p_fake, x0_g, self.opt.norm_floor)
        return losses.displacement_loss(x0_g, delta), delta


def validate(opt: CDMOptions) -> None:
    """Clear errors for option values the harness does not run (sec. 6.2)."""
    if opt.offtraj_mode != "trajectory_eps":
        raise FewstepError(f"cdm option offtraj_mode (cdm.offtraj.mode) = {opt.offtraj_mode!r} is not "
                           "implemented in the harness; only 'trajectory_eps' (the shipped configs') is")
    lo, hi = opt.schedule_len
    if not 1 <= lo <= hi:
        raise FewstepError(f"cdm option schedule_len must satisfy 1 <= lo <= hi, got {opt.schedule_len}")
    if not 0.0 < opt.schedule_range[0] <= opt.schedule_range[1] <= 1.0:
        raise FewstepError(f"cdm option schedule_range must lie in (0, 1], got {opt.schedule_range}")
    fixed = opt.fixed_schedule
    if fixed is not None and (not fixed or float(fixed[0]) != 1.0
                              or any(a <= b for a, b in zip(fixed, fixed[1:]))):
        raise FewstepError(f"cdm option fixed_schedule must start at 1.0 (pure noise) and strictly "
                           f"decrease, got {fixed}")


def grid_shift(teacher, options) -> float:
    """The schedule shift of the student's grid: the option, else the teacher's own."""
    own = float(getattr(teacher, "shift", 1.0))
    return own if options.schedule_shift is None else options.schedule_shift
