"""RTDMD: Reward-Tilted Distribution Matching Distillation (arXiv 2605.26108; code Harahan/RTDMD).

Two stages in one method, chosen by the `stage` option (spec rtdmd.md):

* Stage 1, AC-DMD cold start (rtdmd.md 4). Boundary sample x_s after j ~ U{1..4} CPS steps of the
  generator (gradient on the last step only, 4.1); re-noise x_t = a x_s + sigma_ts n with the exact
  kernel; the critic fits the unbiased ambient target with weight min(1, 10 sigma_ts^2) plus
  gamma times the two-sample consistency estimator (4.2); every 10th iteration the generator gets
  the normalised DM gradient after mapping teacher and critic back to s with one CPS step that
  shares its noise (4.3), so the noise cancels. Plan per iteration: critic, then the generator on
  generator iterations (4.4).
* Stage 2, RTDMD (rtdmd.md 5). Starts from a stage-1 model folder (`init_from`): its
  generator.safetensors (the stage-1 EMA, LoRA merged) and critic.safetensors. Per iteration one
  "epoch": K-repeated prompts, 4-step CPS rollouts with prompt-deterministic noise on the
  non-selected steps (5.2), rewards from ctx.reward, advantages with global std (5.3), then one
  critic step (AC loss on the final x0, 5.6) and one generator step: PPO with the tiny clip on the
  selected steps S, AC-DMD at s = 0 (weight 1e-3) and the BP hinge relu(3 - r) (weight 1e-4) on
  the final step (5.4). With `lora_rank` > 0 a fresh LoRA is put on the merged stage-1 weights;
  with full fine-tuning (the toy world) stage 2 is simply continued full training.

Families. Everything is written against the general kernel of the shared spec README 3
(a = alpha(t)/alpha(s), sigma_ts^2 = sigma_t^2 - a^2 sigma_s^2; CPS in DDIM form). The critic
target is the ambient eps~ = (sigma_t/sigma_ts) n, turned into the family's native target through
x0~ = (x_t - sigma_t eps~)/alpha_t: on flow schedules this is exactly v* of rtdmd.md 4.2, on SDXL
it is eps~ itself (rtdmd.md 6.2). Level 0 is clean data on every family (alpha 1, sigma 0), also on
the discrete VP schedule whose k = 0 is slightly noisy. The loss weight is min(1, 10 sigma_ts^2)
on flow families and min(1, 10 sigma_ts^2/sigma_t^2) on SDXL (rtdmd.md 6.2). SDXL times are drawn
as integers k (t = k/999).

Harness choices [INT]: the critic is a full copy (LoRA, when asked for, goes on the generator
only, as in every DM method of the harness); the stage-2 loss is computed on the whole epoch at
once (the reference accumulates 16 sub-batches; the same gradient up to the sub-batch split);
"advantage exactly 0" is tested before the final renormalisation (which only shifts and scales);
when no sample survives, the epoch keeps all (the reference pads with zero-advantage samples).
"""
from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fewstep import losses
from fewstep.backbones.base import cond_cat, cond_index
from fewstep.engine.adapt import trainable_copy
from fewstep.engine.method import Method, StudentSpec, student_grid
from fewstep.engine.options import TrainOptions
from fewstep.engine.run import load_student
from fewstep.errors import FewstepError
from fewstep.noise import sample_noise


@dataclass
class RTDMDOptions(TrainOptions):
    stage: int = 1                       # 1: AC-DMD cold start (4); 2: RTDMD (5)
    init_from: str = ""                  # stage 2: the stage-1 model folder (fewstep train --out)
    teacher_guidance: float = 1.0        # omega of the teacher (both stages); critic unguided
    eta: float = 0.9                     # CPS eta, theta = eta pi/2 (3)
    generator_grid: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)  # fractions, through grid_shift
    grid_shift: float = 1.0              # SD3: 3.0 -> t = [1, .9, .75, .5]
    # stage 1 (4)
    generator_every: int = 10            # generator step when (iteration + 1) % r == 0 (4.4)
    renoise_offset: int = 10             # t ~ U[1000 s + offset, 1000] timestep units (4.1)
    renoise_clamp: tuple[int, int] = (20, 980)
    critic_weight_max: float = 10.0      # weight min(1, 10 sigma_ts^2) (4.2)
    gamma: float = 0.01                  # consistency weight (4.2; 0 switches it off)
    delta_max: int = 200                 # consistency step delta ~ U{1..200} timesteps
    # stage 2 (5)
    prompts_per_epoch: int = 32          # distinct prompts per epoch (over all ranks)
    group_size: int = 16                 # K images per prompt
    selected_steps: int = 2              # |S|, drawn from the stochastic steps {0, 1, 2}
    ppo_clip: float = 1e-5               # clip range of the ratio (calibrated to the log-prob)
    adv_clip: float = 5.0
    adv_eps: float = 1e-4
    dm_weight: float = 1e-3              # AC-DMD at s = 0 on the final step
    bp_weight: float = 1e-4              # reward back-propagation hinge
    bp_margin: float = 3.0
    # engine defaults as in the stage-1 recipe (6.1)
    batch: int = 9
    lr: float = 3e-5
    critic_lr: float | None = 3e-5
    weight_decay: float = 0.0
    critic_weight_decay: float | None = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    RANGES = {"generator_every": "[1, inf)", "group_size": "[1, inf)",
              "prompts_per_epoch": "[1, inf)", "delta_max": "[1, inf)", "gamma": "[0, inf)",
              "eta": "[0, 1]"}


# -- presets (rtdmd.md 6) ------------------------------------------------------------------------
FOUR = (1.0, 0.75, 0.5, 0.25)
STAGE1 = {"stage": 1, "eta": 0.9, "generator_every": 10, "gamma": 0.01, "delta_max": 200,
          "renoise_offset": 10, "renoise_clamp": (20, 980), "critic_weight_max": 10.0,
          "lr": 3e-5, "critic_lr": 3e-5, "weight_decay": 0.0, "critic_weight_decay": 0.0,
          "grad_clip": 1.0, "warmup": 0, "ema_decay": 0.99, "ema_every": 1, "ema_warmup": False,
          "lora_rank": 32, "lora_alpha": 64, "grad_checkpointing": True, "batch": 9,
          "steps": 15000}
STAGE2 = {"stage": 2, "eta": 0.9, "gamma": 0.01, "lr": 3e-6, "critic_lr": 3e-5,
          "weight_decay": 1e-4, "critic_weight_decay": 0.0, "grad_clip": 1.0, "warmup": 0,
          "ema_decay": 0.9, "ema_every": 8, "ema_warmup": True, "lora_rank": 32, "lora_alpha": 64,
          "grad_checkpointing": True, "selected_steps": 2, "ppo_clip": 1e-5, "adv_clip": 5.0,
          "dm_weight": 1e-3, "bp_weight": 1e-4, "bp_margin": 3.0, "steps": 1000,
          "prompts_per_epoch": 32, "group_size": 16, "batch": 2}
SD3 = {"generator_grid": FOUR, "grid_shift": 3.0, "teacher_guidance": 7.0}
SDXL = {"generator_grid": FOUR, "grid_shift": 1.0, "teacher_guidance": 8.0}
SIT = {"generator_grid": FOUR, "grid_shift": 1.0, "teacher_guidance": 1.0}
TOY = {"generator_grid": FOUR, "grid_shift": 1.0, "teacher_guidance": 2.0, "lora_rank": 0,
       "grad_checkpointing": False, "checkpoint_every": 100, "log_every": 10}
PRESETS = {
    "rtdmd-sd3-paper": {**STAGE1, **SD3},
    "rtdmd-sd3-paper-stage2": {**STAGE2, **SD3},
    "rtdmd-sdxl-ext": {**STAGE1, **SDXL},
    "rtdmd-sdxl-ext-stage2": {**STAGE2, **SDXL},
    "rtdmd-sit-ext": {**STAGE1, **SIT},
    "rtdmd-sit-ext-stage2": {**STAGE2, **SIT},
    "toy": {**STAGE1, **TOY, "steps": 400, "batch": 8, "lr": 1e-4, "critic_lr": 1e-4},
    "toy-stage2": {**STAGE2, **TOY, "steps": 50, "prompts_per_epoch": 4, "group_size": 4,
                   "batch": 16, "lr": 1e-5, "critic_lr": 1e-4, "checkpoint_every": 25},
}


# -- schedule math, general kernel (shared spec README 3; rtdmd.md 3, 4.1) -----------------------
def level(sched, t) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha(t), sigma(t)) in float64; t = 0 is clean data exactly on every family."""
    t = torch.as_tensor(t, dtype=torch.float64)
    clean = t == 0
    alpha = torch.where(clean, torch.ones_like(t), sched.alpha(t).to(t))
    sigma = torch.where(clean, torch.zeros_like(t), sched.sigma(t).to(t))
    return alpha, sigma


def col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample (B,) float64 scalars broadcastable against `like`."""
    v = torch.as_tensor(v, dtype=torch.float64, device=like.device)
    return losses.per_sample(v.expand(like.shape[0]) if v.ndim == 0 else v, like)


def kernel(sched, s, t):
    """(a, sigma_ts, alpha_t, sigma_t) of x_t = a x_s + sigma_ts n (4.1; flow: a = (1-t)/(1-s))."""
    alpha_s, sigma_s = level(sched, s)
    alpha_t, sigma_t = level(sched, t)
    a = alpha_t / alpha_s
    sigma_ts = (sigma_t ** 2 - a ** 2 * sigma_s ** 2).clamp(min=1e-12).sqrt()
    return a, sigma_ts, alpha_t, sigma_t


def renoise(x_s, n, a, sigma_ts) -> torch.Tensor:
    return (col(a, x_s) * x_s.double() + col(sigma_ts, x_s) * n.double()).to(x_s.dtype)


def ambient_eps(n, sigma_t, sigma_ts) -> torch.Tensor:
    """eps~ = (sigma_t/sigma_ts) n, unbiased for E[eps | x_t] given only x_s (4.2; 6.2)."""
    return col(sigma_t / sigma_ts, n) * n.double()


def ambient_x0(x_t, eps_tilde, alpha_t, sigma_t) -> torch.Tensor:
    """The x0 matching eps~ at x_t; its native target is v* on flow families and eps~ on SDXL."""
    return (x_t.double() - col(sigma_t, x_t) * eps_tilde) / col(alpha_t, x_t)


def critic_weight(kind: str, sigma_t, sigma_ts, w_max: float = 10.0) -> torch.Tensor:
    """min(1, 10 sigma_ts^2) on the v error (4.2); min(1, 10 sigma_ts^2/sigma_t^2) on SDXL's eps error."""
    ratio = sigma_ts ** 2 if kind == "flow" else sigma_ts ** 2 / sigma_t ** 2
    return (w_max * ratio).clamp(max=1.0)


def cps_mean(sched, x_t, x0, t, t_next, theta: float) -> torch.Tensor:
    """mu = alpha(t') x0 + sigma(t') cos(theta) eps_hat, float64 (rtdmd.md 3, 5.2)."""
    alpha_t, sigma_t = level(sched, t)
    alpha_n, sigma_n = level(sched, t_next)
    x0 = x0.double()
    eps_hat = (x_t.double() - col(alpha_t, x_t) * x0) / col(sigma_t, x_t)
    return col(alpha_n, x_t) * x0 + col(sigma_n, x_t) * math.cos(theta) * eps_hat


def cps_step(sched, x_t, x0, t, t_next, xi, theta: float) -> torch.Tensor:
    """x_t' = mu + sigma(t') sin(theta) xi in x_t's dtype; theta = 0 is DDIM/Euler, t' = 0 gives x0."""
    _, sigma_n = level(sched, t_next)
    out = cps_mean(sched, x_t, x0, t, t_next, theta)
    if theta:
        out = out + col(sigma_n, x_t) * math.sin(theta) * xi.double()
    return out.to(x_t.dtype)


def cps_logprob(x_next, mean) -> torch.Tensor:
    """Simplified log pi(x_{k+1} | x_k) = -mean_CHW (x_{k+1} - mu)^2, no normalisation (5.2)."""
    return -losses.mean_chw((x_next.double() - mean.double()) ** 2)


def earlier_t(sched, t, delta) -> torch.Tensor:
    """t'' = max(t - delta/1000, 0) for the consistency step (4.2); SDXL: k'' = max(k - delta, 0)."""
    if sched.kind == "flow":
        return (t.double() - delta.double() / 1000.0).clamp(min=0.0).to(t.dtype)
    k = (sched.k_of_t(t).to(delta.device) - delta).clamp(min=0)
    return sched.t_of_k(k).to(t)


# -- the pieces of the losses ------------------------------------------------------------------
def acdmd_gradient(sched, x_s, x_t, t, s, p_real, p_fake, xi, theta: float) -> torch.Tensor:
    """Normalised AC-DMD gradient (4.3): teacher and critic mapped t -> s with the same xi.

    x_s^F - x_s^T = [alpha_s - sigma_s cos(theta) alpha_t/sigma_t] (p_F - p_T) does not depend on
    xi; at s = 0 it is p_F - p_T, so g is DMD's gradient on x0. Float64 throughout.
    """
    x_t = x_t.detach().double()
    x_real = cps_step(sched, x_t, p_real.detach(), t, s, xi, theta)
    x_fake = cps_step(sched, x_t, p_fake.detach(), t, s, xi, theta)
    return losses.dm_gradient(x_s, x_real, x_fake)


def consistency_term(h1, h2, h0) -> torch.Tensor:
    """mean_batch mean_CHW[(h1 - h0)(h2 - h0)]: unbiased for ||E h(x'') - h0||^2; may be < 0 (4.2)."""
    return losses.mean_chw((h1.float() - h0.float()) * (h2.float() - h0.float())).mean()


def consistency_loss(h, sched, x_t, t, t2, h0, xi1, xi2, theta: float) -> torch.Tensor:
    """Two independent CPS transitions x_t -> t'' with the detached h0; h sees both (4.2).

    h(x, t) is the critic's x0-predictor (batched over the two endpoints); gradient reaches it
    through h0 and both endpoint evaluations, never through the transitions.
    """
    with torch.no_grad():
        x1 = cps_step(sched, x_t, h0.detach(), t, t2, xi1, theta)
        x2 = cps_step(sched, x_t, h0.detach(), t, t2, xi2, theta)
    h1, h2 = h(torch.cat([x1, x2]), torch.cat([t2, t2])).chunk(2)
    return consistency_term(h1, h2, h0)


def ppo_loss(logp, logp_old, adv, clip: float) -> torch.Tensor:
    """mean max(-A rho, -A clip(rho, 1 - c, 1 + c)), rho = exp(log pi - log pi_old) (5.4)."""
    ratio = torch.exp(logp - logp_old.detach())
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip, 1.0 + clip)).mean()


def reward_terms(out) -> dict[str, torch.Tensor]:
    """ctx.reward's output as named (B,) rewards (a plain tensor is one reward)."""
    return dict(out) if isinstance(out, dict) else {"reward": out}


def advantages(rewards: dict[str, torch.Tensor], groups, eps: float = 1e-4, weights=None):
    """(A, A_pre) of rtdmd.md 5.3; A_pre = sum_k w_k A_k before the global renormalisation.

    A_k = (r_k - mean over the prompt's samples)/(std over all samples + eps); prompts whose
    samples all got the same reward give exactly 0 (the samples that are dropped, 5.1).
    A = (A_pre - mean)/(std + eps), population std; clamping happens at use.
    """
    total = None
    for name, r in rewards.items():
        a_k = losses.group_advantages(r.double(), groups, eps=eps, std="global")
        for gid in torch.unique(groups):
            m = groups == gid
            if r[m].max() == r[m].min():
                a_k[m] = 0.0  # exact zero, not a rounding residue of r - mean(r)
        w = 1.0 if weights is None else float(weights[name])
        total = w * a_k if total is None else total + w * a_k
    return (total - total.mean()) / (total.std(unbiased=False) + eps), total


def prompt_seed(prompt: str) -> int:
    """First 4 bytes of SHA-256 of the prompt (5.2)."""
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")


def shared_noise(prompts, step: int, epoch: int, shape, seed: int = 0) -> torch.Tensor:
    """Noise seeded by (prompt, step, epoch): identical for a prompt's samples on every rank (5.2).

    The run seed is mixed in too [INT], so two runs do not share it.
    """
    ids = [str(prompt_seed(p)) for p in prompts]
    return sample_noise(ids, [seed] * len(ids), shape, stream=f"rtdmd/shared/step{step}/epoch{epoch}")


def rollout_noise(ctx, metas, step: int, shared: bool, like, stream: str) -> torch.Tensor:
    """xi_k: prompt-deterministic when `shared` (steps outside S u {last}), rank-local otherwise."""
    if not shared:
        return ctx.randn_like(like, f"{stream}/xi{step}")
    prompts = [m["prompt"] for m in metas]
    return shared_noise(prompts, step, ctx.step, like.shape[1:], ctx.seed).to(like)


def gather(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate a (B,) tensor over ranks, in rank order."""
    if world_size == 1:
        return x
    import torch.distributed as dist
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@dataclass
class Epoch:
    """One stage-2 epoch on this rank: rollout states x_0..x_4, old log-probs, advantages."""

    metas: list
    cond: dict
    xs: list
    logp: list
    adv: torch.Tensor
    keep: torch.Tensor
    selected: list
    reward: float


# -- the method ----------------------------------------------------------------------------------
class RTDMD(Method):
    name = "rtdmd"
    fidelity = "faithful"
    requires = ("reward",)
    Options = RTDMDOptions
    PRESETS = PRESETS

    def __init__(self, teacher, options, ctx):
        super().__init__(teacher, options, ctx)
        if options.stage not in (1, 2):
            raise FewstepError(f"rtdmd.stage must be 1 or 2, got {options.stage!r}")
        if options.stage == 2 and ctx.reward is None:
            raise FewstepError("rtdmd stage 2 needs a reward: the run's context has none "
                               "(fewstep train --reward <toy reward net>)")
        generator, critic = self.initial_networks()
        self._generator = trainable_copy(generator, options)  # stage 2: a fresh LoRA on top
        self.critic = trainable_copy(critic)
        self.grid = student_grid(teacher, options.generator_grid, options.grid_shift)
        self.full_grid = self.grid + [0.0]  # the last step lands on clean data
        self.theta = options.eta * math.pi / 2
        self.sched = teacher.schedule
        self.check_renoise_range()

    def initial_networks(self):
        """Stage 1: the teacher. Stage 2: the stage-1 folder's EMA generator and critic (2)."""
        if self.opt.stage == 1:
            return self.teacher, self.teacher
        return load_stage1(self.opt.init_from, self.teacher)

    def check_renoise_range(self):
        top = (1000 * max(self.full_grid[1:]) + self.opt.renoise_offset)
        if top > self.opt.renoise_clamp[1]:
            raise FewstepError(f"rtdmd: a boundary at t = {max(self.full_grid[1:]):.3f} leaves no "
                               f"room for the re-noise level below {self.opt.renoise_clamp[1]}")

    def networks(self):
        return {"generator": self.generator.denoiser, "critic": self.critic.denoiser}

    def plan(self, step):
        if self.opt.stage == 2:
            return ["critic", "generator"]  # one critic step, then the generator step (5.1)
        gen = (step + 1) % self.opt.generator_every == 0
        return ["critic", "generator"] if gen else ["critic"]  # 4.4

    @classmethod
    def sampler(cls, teacher, options) -> StudentSpec:
        """The CPS sampler on the generator grid, eta pi/2 re-noising, no guidance."""
        return StudentSpec(student_grid(teacher, options.generator_grid, options.grid_shift),
                           theta=options.eta * math.pi / 2, guidance=1.0)

    def loss(self, net, scratch):
        if self.opt.stage == 1:
            if net == "critic":
                x_s, s, batch = self.boundary_sample(grad=False, stream="critic")
                return self.critic_loss(x_s, s, batch.cond, "critic")
            x_s, s, batch = self.boundary_sample(grad=True, stream="gen")
            return self.acdmd_loss(x_s, s, batch.cond, "gen/dm")
        epoch = self.epoch(scratch)
        if net == "critic":
            return self.critic_loss(epoch.xs[-1], 0.0, epoch.cond, "critic")  # 5.6
        return self.stage2_generator_loss(epoch)

    # -- times -------------------------------------------------------------------------------
    def vec(self, t: float, like) -> torch.Tensor:
        return torch.full((like.shape[0],), float(t), device=like.device)

    def renoise_t(self, s: float, n: int, stream: str) -> torch.Tensor:
        """t ~ U[1000 s + 10, 1000] timestep units, clamped to [20, 980], /1000, unshifted (4.1);
        rank-synchronised. SDXL: integer k ~ U{k_s + 10, ..., 999}, same clamp, t = k/999."""
        lo, hi = self.opt.renoise_clamp
        if self.sched.kind == "flow":
            u = self.ctx.uniform(n, 1000.0 * s + self.opt.renoise_offset, 1000.0, stream, shared=True)
            return (u.clamp(lo, hi) / 1000.0).float()
        top = self.sched.n_steps - 1
        k_s = int(round(top * s))
        k = self.ctx.randint(k_s + self.opt.renoise_offset, top, n, stream, shared=True).clamp(lo, hi)
        return self.sched.t_of_k(k).float().to(self.ctx.device)

    # -- stage 1 (rtdmd.md 4) ----------------------------------------------------------------
    def boundary_sample(self, grad: bool, stream: str):
        """(x_s, s, prompts): j ~ U{1..4} CPS steps of G from pure noise; only the last keeps
        gradient; x_s is that step's noisy output (x0 when j = 4) (4.1)."""
        batch = self.ctx.prompts(self.opt.batch, f"{stream}/prompts")
        j = int(self.ctx.randint(1, len(self.grid), 1, f"{stream}/stop", shared=True)[0])
        z = self.ctx.randn((len(batch), *self.teacher.latent_shape), f"{stream}/z")
        x = self.rollout(z, batch.cond, self.grid, j - 1, self.theta, stream)
        t, s = self.vec(self.full_grid[j - 1], x), self.vec(self.full_grid[j], x)
        xi = self.ctx.randn_like(x, f"{stream}/xi{j - 1}")
        with torch.set_grad_enabled(grad):
            x0 = self.generator.x0(x, t, batch.cond)
            x_s = cps_step(self.sched, x, x0, t, s, xi, self.theta)
        return x_s, self.full_grid[j], batch

    def critic_loss(self, x_s, s: float, cond, stream: str):
        """L_fake = L_AC + gamma L_cons on sg(x_s) at level s (4.2)."""
        x_s = x_s.detach()
        t = self.renoise_t(s, x_s.shape[0], f"{stream}/t")
        n = self.ctx.randn_like(x_s, f"{stream}/n")
        a, sigma_ts, alpha_t, sigma_t = kernel(self.sched, self.vec(s, x_s), t)
        x_t = renoise(x_s, n, a, sigma_ts)
        pred = self.critic.native(x_t, t, cond)
        x0_target = ambient_x0(x_t, ambient_eps(n, sigma_t, sigma_ts), alpha_t, sigma_t)
        target = self.critic.native_target(x_t, t, x0_target)
        weight = critic_weight(self.sched.kind, sigma_t, sigma_ts, self.opt.critic_weight_max)
        loss_ac = losses.native_mse(pred, target, weight)
        stats = {"ac": float(loss_ac.detach()), "s": float(s)}
        if self.opt.gamma <= 0:
            return loss_ac, stats
        h0 = self.critic.x0_from_native(x_t, t, pred)  # reuse the L_AC prediction
        loss_cons = self.consistency(x_t, t, h0, cond, stream)
        stats["cons"] = float(loss_cons.detach())
        return loss_ac + self.opt.gamma * loss_cons, stats

    def consistency(self, x_t, t, h0, cond, stream: str):
        delta = self.ctx.randint(1, self.opt.delta_max, x_t.shape[0], f"{stream}/delta", shared=True)
        t2 = earlier_t(self.sched, t, delta)
        xi1 = self.ctx.randn_like(x_t, f"{stream}/cons_xi1")
        xi2 = self.ctx.randn_like(x_t, f"{stream}/cons_xi2")
        both = cond_cat([cond, cond])

        def h(x, tt):  # critic x0-predictor; level 0 is the identity
            pred = self.critic.x0(x, tt, both)
            return torch.where(losses.per_sample(tt == 0, x), x, pred)

        return consistency_loss(h, self.sched, x_t, t, t2, h0, xi1, xi2, self.theta)

    def acdmd_loss(self, x_s, s: float, cond, stream: str):
        """L_DM = 1/2 mean (x_s - sg(x_s - g))^2 in float64, g of 4.3 (s = 0: DMD on x0, 5.4)."""
        t = self.renoise_t(s, x_s.shape[0], f"{stream}/t")
        n = self.ctx.randn_like(x_s, f"{stream}/n")
        s_vec = self.vec(s, x_s)
        a, sigma_ts, _, _ = kernel(self.sched, s_vec, t)
        x_t = renoise(x_s.detach(), n, a, sigma_ts)
        with torch.no_grad():
            p_real = self.teacher.x0(x_t, t, cond, self.opt.teacher_guidance)
            p_fake = self.critic.x0(x_t, t, cond)
        xi = self.ctx.randn_like(x_s, f"{stream}/xi")
        g = acdmd_gradient(self.sched, x_s, x_t, t, s_vec, p_real, p_fake, xi, self.theta)
        loss = losses.dm_surrogate(x_s.double(), g)
        return loss, {"dm": float(loss.detach()), "dm_grad_abs": float(g.abs().mean()), "s": float(s)}

    # -- stage 2 (rtdmd.md 5) ----------------------------------------------------------------
    def epoch(self, scratch) -> Epoch:
        if "epoch" not in scratch:
            scratch["epoch"] = self.sample_epoch()
        return scratch["epoch"]

    def epoch_prompts(self):
        """The epoch's P x K rows, drawn identically on all ranks; this rank's contiguous slice
        (a group may span ranks) and every row's group id."""
        P, K, ranks = self.opt.prompts_per_epoch, self.opt.group_size, self.ctx.world_size
        if (P * K) % ranks:
            raise FewstepError(f"rtdmd: prompts_per_epoch x group_size = {P * K} must divide "
                               f"evenly over {ranks} ranks")
        rows = self.ctx.pool.draw(P, self.ctx.shared_gen("prompts"), repeat=K)
        per = P * K // ranks
        idx = torch.arange(self.ctx.rank * per, (self.ctx.rank + 1) * per)
        cond = {k: v.to(self.ctx.device) for k, v in cond_index(rows.cond, idx).items()}
        return [rows.metas[i] for i in idx.tolist()], cond, rows.groups

    @torch.no_grad()
    def rollout_states(self, metas, cond, selected, stream: str):
        """4-step CPS rollout of G (CFG 1) from pure noise: states x_0..x_4, old log-probs (5.2)."""
        x = self.ctx.randn((len(metas), *self.teacher.latent_shape), f"{stream}/z")
        xs, logp = [x], []
        for k in range(len(self.grid)):
            t, t_next = self.vec(self.full_grid[k], x), self.vec(self.full_grid[k + 1], x)
            mean = cps_mean(self.sched, x, self.generator.x0(x, t, cond), t, t_next, self.theta)
            shared = k not in selected and k < len(self.grid) - 1
            xi = rollout_noise(self.ctx, metas, k, shared, x, stream)
            _, sigma_n = level(self.sched, t_next)
            x = (mean + col(sigma_n, x) * math.sin(self.theta) * xi.double()).to(x.dtype)
            xs.append(x)
            logp.append(cps_logprob(x, mean))
        return xs, logp

    def sample_epoch(self) -> Epoch:
        """Rollouts in chunks of `batch`, rewards, advantages, zero-advantage drop (5.1-5.3)."""
        n_stochastic = len(self.grid) - 1
        perm = torch.randperm(n_stochastic, generator=self.ctx.shared_gen("selected"))
        selected = sorted(perm[: self.opt.selected_steps].tolist())
        metas, cond, groups = self.epoch_prompts()
        chunks = []
        for c in range(0, len(metas), self.opt.batch):
            rows = torch.arange(c, min(c + self.opt.batch, len(metas)))
            chunks.append(self.rollout_states(metas[c:c + len(rows)], cond_index(cond, rows),
                                              selected, f"roll{c}"))
        xs = [torch.cat([ch[0][k] for ch in chunks]) for k in range(len(self.grid) + 1)]
        logp = [torch.cat([ch[1][k] for ch in chunks]) for k in range(len(self.grid))]
        with torch.no_grad():
            rewards = reward_terms(self.ctx.reward(self.teacher.decode(xs[-1]), metas))
        rewards = {k: gather(v.detach().double(), self.ctx.world_size) for k, v in rewards.items()}
        adv, adv_pre = advantages(rewards, groups.to(self.ctx.device), self.opt.adv_eps)
        mine = slice(self.ctx.rank * len(metas), (self.ctx.rank + 1) * len(metas))
        keep = adv_pre[mine] != 0
        if not keep.any():
            keep = torch.ones_like(keep)  # nothing survives: keep all, as the padding would
        reward = float(sum(rewards.values()).mean())
        return Epoch(metas, cond, xs, logp, adv[mine], keep, selected, reward)

    def ppo_term(self, ep: Epoch, j: int, rows, cond, adv):
        """L_PPO at step j with the current log-prob of the stored transition (5.4)."""
        x_j, x_next = ep.xs[j][rows], ep.xs[j + 1][rows]
        t, t_next = self.vec(self.full_grid[j], x_j), self.vec(self.full_grid[j + 1], x_j)
        mean = cps_mean(self.sched, x_j, self.generator.x0(x_j, t, cond), t, t_next, self.theta)
        return ppo_loss(cps_logprob(x_next, mean), ep.logp[j][rows], adv, self.opt.ppo_clip)

    def stage2_generator_loss(self, ep: Epoch):
        """sum_{j in S} L_PPO(j) + 1e-3 L_ACDMD + 1e-4 L_BP on the kept samples, / |S u {3}| (5.4)."""
        rows = ep.keep.nonzero().flatten()
        cond, metas = cond_index(ep.cond, rows), [ep.metas[i] for i in rows.tolist()]
        adv = ep.adv[rows].clamp(-self.opt.adv_clip, self.opt.adv_clip)
        ppo = [self.ppo_term(ep, j, rows, cond, adv) for j in ep.selected]
        last = len(self.grid) - 1
        x_last = ep.xs[last][rows]
        x0 = self.generator.x0(x_last, self.vec(self.full_grid[last], x_last), cond)
        dm, dm_stats = self.acdmd_loss(x0, 0.0, cond, "gen/dm")
        r_bp = sum(reward_terms(self.ctx.reward(self.teacher.decode(x0), metas)).values())
        bp = F.relu(self.opt.bp_margin - r_bp).mean()
        final = self.opt.dm_weight * dm + self.opt.bp_weight * bp
        total = (sum(ppo) + final) / (len(ep.selected) + 1)
        stats = {"ppo": float(sum(ppo).detach()), "bp": float(bp.detach()), "reward": ep.reward,
                 "kept": float(ep.keep.float().mean()), **dm_stats}
        return total, stats


def load_stage1(folder: str, teacher):
    """(generator, critic) backbones from a stage-1 model folder: the EMA generator, LoRA merged
    (rtdmd.md 2: "stage-1 EMA LoRA merged"), and the critic."""
    if not folder:
        raise FewstepError("rtdmd stage 2 starts from a stage-1 model: set init_from to the folder "
                           "written by `fewstep train --method rtdmd --out` (stage 1)")
    generator, info = load_student(Path(folder), teacher)
    if info.get("method") != "rtdmd" or info.get("options", {}).get("stage") != 1:
        raise FewstepError(f"{folder} is not a stage-1 rtdmd model (method {info.get('method')!r}, "
                           f"stage {info.get('options', {}).get('stage')!r})")
    critic_file = Path(folder) / "critic.safetensors"
    if not critic_file.is_file():
        raise FewstepError(f"{folder} has no critic.safetensors; re-export the stage-1 run")
    critic = copy.deepcopy(teacher)
    critic.denoiser.load_state_dict(load_file(str(critic_file)))
    return generator, critic
