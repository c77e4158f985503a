"""RTDMD: Reward-Tilted Distribution Matching Distillation (arXiv 2605.26108; official code
Harahan/RTDMD), two stages picked by the `stage` option. Stage 1, AC-DMD (sec. 4): a boundary
sample x_s after j ~ U{1..4} CPS steps of the generator is re-noised with the exact kernel x_t =
a x_s + sigma_ts n (a = alpha(t)/alpha(s), sigma_ts^2 = sigma_t^2 - a^2 sigma_s^2); the critic fits
the unbiased ambient target eps~ = (sigma_t/sigma_ts) n (v* on flow families, eps~ on SDXL, sec.
6.2) plus gamma times a two-sample consistency term (sec. 4.2); every 10th iteration the generator
gets the normalised DM gradient after teacher and critic are mapped back to s by one CPS step that
shares its noise (sec. 4.3). Stage 2 (sec. 5), from the stage-1 model: per iteration an epoch of
K-repeated prompts, 4-step CPS rollouts with prompt-keyed noise off the selected steps and group
advantages with the global std; one critic step on the final x0, one generator step with PPO on
the selected steps, AC-DMD at s = 0 and the reward hinge relu(3 - r) (sec. 5.4). Generator and
critic ("fake score") are LoRAs of rank 32, alpha 64 on the base weights; stage 2 merges each
stage-1 LoRA and trains a fresh one on top (sec. 2). Every choice that differs from the official
code is an entry of FIDELITY (the toy preset's full-weight generator and critic among them).
Sections (sec. N) are those of methods/notes/rtdmd.md.
"""
from __future__ import annotations

import math
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fewstep import losses
from fewstep.backbones.base import cond_cat, cond_index
from fewstep.engine.adapt import LoraSpec, trainable_copy
from fewstep.engine.distributed import all_gather
from fewstep.engine.method import Method, StudentSpec, student_grid
from fewstep.options import TrainOptions, choice
from fewstep.engine.rollout import rollout
from fewstep.engine.run import copy_with_weights, load_student
from fewstep.errors import FewstepError
from fewstep.fidelity import Deviation
from fewstep.schedule import col, draw_times


@dataclass
class RTDMDOptions(TrainOptions):
    stage: int = choice(1, 2)            # 1: AC-DMD cold start (sec. 4); 2: RTDMD (sec. 5)
    init_from: str = ""                  # stage 2: the stage-1 model folder (fewstep train --out)
    teacher_guidance: float = 1.0        # omega of the teacher (both stages); critic unguided
    # the critic's LoRA on the base weights, on the generator's targets (`lora_targets`), as the
    # official fake_score_lora (sec. 2); rank 0 fine-tunes the whole critic (an extension)
    critic_lora_rank: int = 32
    critic_lora_alpha: float = 64.0
    # A of stage 2's fresh LoRAs (on the merged stage-1 weights): "normal" N(0, 1), as the
    # official merge-then-reinit draws it; "gaussian" peft's N(0, 1/rank) (stage 1 always)
    stage2_lora_init: str = choice("normal", "gaussian")
    eta: float = 0.9                     # CPS eta, theta = eta pi/2 (sec. 3)
    generator_grid: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)  # fractions, through grid_shift
    grid_shift: float = 1.0              # SD3: 3.0 -> t = [1, .9, .75, .5]
    # stage 1 (sec. 4)
    generator_every: int = 10            # generator step when (iteration + 1) % r == 0 (sec. 4.4)
    renoise_offset: int = 10             # t ~ U[1000 s + offset, 1000] timestep units (sec. 4.1)
    renoise_clamp: tuple[int, int] = (20, 980)
    critic_weight_max: float = 10.0      # weight min(1, 10 sigma_ts^2) (sec. 4.2)
    gamma: float = 0.01                  # consistency weight (sec. 4.2; 0 switches it off)
    delta_max: int = 200                 # consistency step delta ~ U{1..200} timesteps
    # stage 2 (sec. 5)
    prompts_per_epoch: int = 32          # distinct prompts per epoch (over all ranks)
    group_size: int = 16                 # K images per prompt
    selected_steps: int = 2              # |S|, drawn from the stochastic steps {0, 1, 2}
    ppo_clip: float = 1e-5               # clip range of the ratio (calibrated to the log-prob)
    adv_clip: float = 5.0
    adv_eps: float = 1e-4
    # the official loss runs in this many equal sub-batches per rank: the kept (nonzero-advantage)
    # samples are padded with random zero-advantage ones to a multiple of it, and this many random
    # ones are kept when none survives (sec. 5.1); 0: no padding, all kept when none survives
    sub_batches: int = 16
    # stage 2's re-noise times and consistency steps are drawn per rank (the official AC mixin,
    # whose ranks hold different numbers of kept samples); True shares them as stage 1 does
    stage2_shared_draws: bool = False
    dm_weight: float = 1e-3              # AC-DMD at s = 0 on the final step
    bp_weight: float = 1e-4              # reward back-propagation hinge
    bp_margin: float = 3.0
    RANGES = {"generator_every": "[1, inf)", "group_size": "[1, inf)",
              "prompts_per_epoch": "[1, inf)", "delta_max": "[1, inf)", "gamma": "[0, inf)",
              "eta": "[0, 1]", "critic_lora_rank": "[0, inf)", "critic_lora_alpha": "[0, inf)",
              "sub_batches": "[0, inf)"}


# -- presets (sec. 6) ------------------------------------------------------------------------------
# Each stage's own options are RTDMDOptions' defaults (stage 1 the default stage); the presets
# hold each stage's engine recipe (sec. 6.1, the official cold-start and rtdmd configs) and each
# family's grid shift and guidance. Every preset states its LoRAs (rank and alpha), iterations and
# mixed precision.
LORAS = {"lora_rank": 32, "lora_alpha": 64, "critic_lora_rank": 32, "critic_lora_alpha": 64}
# Each network's scheduler steps after its own update, lambda s / warmup (the official trainers'
# warm-up-then-constant scheduler); with no warm-up the learning rates are constant.
SCHEDULE = {"warmup": 0, "lr_schedule_on": "update", "warmup_start": "zero", "warmup_ticks": 1}
# Stage 1: 15000 iterations (stage 2 starts from checkpoint 15000; the config's total_steps is
# 100000), 9 per GPU on 8 GPUs; bf16 autocast; EMA 0.99 every iteration.
STAGE1 = {**LORAS, **SCHEDULE, "lr": 3e-5, "critic_lr": 3e-5, "weight_decay": 0.0,
          "critic_weight_decay": 0.0, "grad_clip": 1.0, "ema_decay": 0.99, "ema_every": 1,
          "ema_warmup": False, "grad_checkpointing": True, "bf16": True, "global_batch": 72,
          "steps": 15000}
# Stage 2: 1000 epochs (the evaluated checkpoint); an epoch is prompts_per_epoch x group_size =
# 32 x 16 = 512 rollouts over all ranks, whatever the world size; the (global) batch is one
# rollout pass over all ranks, 2 per GPU on 16 GPUs: the per-rank chunk bounds memory only.
STAGE2 = {**LORAS, **SCHEDULE, "stage": 2, "lr": 3e-6, "critic_lr": 3e-5, "weight_decay": 1e-4,
          "critic_weight_decay": 0.0, "grad_clip": 1.0, "ema_decay": 0.9, "ema_every": 8,
          "ema_warmup": True, "grad_checkpointing": True, "bf16": True, "steps": 1000,
          "global_batch": 32}
# SD3: the official target modules (attention projections of the joint blocks only: "attn.",
# not SD3.5's second attention "attn2.")
SD3 = {"grid_shift": 3.0, "teacher_guidance": 7.0,
       "lora_targets": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                        "attn.add_v_proj", "attn.add_q_proj", "attn.to_add_out")}
SDXL = {"teacher_guidance": 8.0}
# unguided teacher, unshifted grid (the defaults); SiTNet has no checkpointing switch (SiT-XL/2
# trains without it)
SIT = {"grad_checkpointing": False}
# The toy world: full-weight generator and critic (ledger entries lora_rank, critic_lora_rank):
# a rank-32 LoRA is most of a tiny network, and the toy numbers were made this way.
# Per-rank batches (global_batch None): the toy world trains in one process.
TOY = {"teacher_guidance": 2.0, "global_batch": None, "lora_rank": 0, "critic_lora_rank": 0,
       "sub_batches": 0, "stage2_shared_draws": True, "grad_checkpointing": False,
       "checkpoint_every": 100, "log_every": 10}
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


# -- the fidelity ledger: where a run differs from the official code ------------------------------
CONFIGS = "official configs/cold_start/*.yaml and configs/rtdmd/*.yaml"
FILTER = "official rtdmd/trainers/grpo_trainer.py, zero-advantage filtering"
FIDELITY = (
    Deviation("critic_lora_rank", 32, "0 fine-tunes the whole critic (an extension; the toy "
              "preset's critic, as the toy numbers were made)", f"{CONFIGS}: model.fake_score_lora"),
    Deviation("critic_lora_alpha", 64, "the critic LoRA's scale is alpha / rank",
              f"{CONFIGS}: model.fake_score_lora"),
    Deviation("lora_rank", 32, "0 fine-tunes the whole generator (the toy preset)",
              f"{CONFIGS}: model.generator_lora"),
    Deviation("lora_alpha", 64, "the generator LoRA's scale is alpha / rank",
              f"{CONFIGS}: model.generator_lora"),
    Deviation("stage2_lora_init", "normal", "\"gaussian\" is peft's init, A ~ N(0, 1/rank): with "
              "Adam the early updates B A scale with A, about rank times smaller than the official's",
              "official rtdmd/utils/lora.py, the merge_before_training path of inject_lora"),
    Deviation("sub_batches", 16, "0 keeps only the nonzero-advantage samples (no padding) and all "
              "of them when none survives (the toy stage 2, as its numbers were made); with 16 the "
              "one-pass loss over the kept samples equals the official sum over 16 equal "
              "sub-batches", FILTER),
    Deviation("stage2_shared_draws", False, "True draws stage 2's re-noise times and consistency "
              "steps alike on all ranks, as stage 1 does (the toy stage 2, as its numbers were "
              "made; one process: the same law)", "official rtdmd/trainers/ac_dmd_mixin.py"),
)


# -- the AC-DMD pieces (sec. 4) --------------------------------------------------------------------
def ambient_eps(n, sigma_t, sigma_ts) -> torch.Tensor:
    """eps~ = (sigma_t/sigma_ts) n, unbiased for E[eps | x_t] given only x_s (sec. 4.2, 6.2)."""
    return col(sigma_t / sigma_ts, n) * n.double()


def ambient_x0(x_t, eps_tilde, alpha_t, sigma_t) -> torch.Tensor:
    """The x0 matching eps~ at x_t; its native target is v* on flow families and eps~ on SDXL."""
    return (x_t.double() - col(sigma_t, x_t) * eps_tilde) / col(alpha_t, x_t)


def critic_weight(kind: str, sigma_t, sigma_ts, w_max: float = 10.0) -> torch.Tensor:
    """min(1, 10 sigma_ts^2) on the v error (sec. 4.2); min(1, 10 sigma_ts^2/sigma_t^2) on SDXL's eps error."""
    ratio = sigma_ts ** 2 if kind == "flow" else sigma_ts ** 2 / sigma_t ** 2
    return (w_max * ratio).clamp(max=1.0)


def acdmd_gradient(sched, x_s, x_t, t, s, p_real, p_fake, xi, theta: float) -> torch.Tensor:
    """Normalised AC-DMD gradient (sec. 4.3): teacher and critic mapped t -> s with the same xi;
    x_s^F - x_s^T = [alpha_s - sigma_s cos(theta) alpha_t/sigma_t] (p_F - p_T) does not depend on
    xi; at s = 0 it is p_F - p_T, so g is DMD's gradient on x0. Float64 throughout."""
    x_t = x_t.detach().double()
    x_real = sched.cps_step(x_t, p_real.detach(), t, s, xi, theta)
    x_fake = sched.cps_step(x_t, p_fake.detach(), t, s, xi, theta)
    return losses.dm_gradient(x_s, x_real, x_fake)


def consistency_term(h1, h2, h0) -> torch.Tensor:
    """mean_batch mean_CHW[(h1 - h0)(h2 - h0)]: unbiased for ||E h(x'') - h0||^2; may be < 0 (sec. 4.2)."""
    return losses.mean_chw((h1.float() - h0.float()) * (h2.float() - h0.float())).mean()


def consistency_loss(h, sched, x_t, t, t2, h0, xi1, xi2, theta: float) -> torch.Tensor:
    """Two independent CPS transitions x_t -> t'' with the detached h0; h sees both (sec. 4.2):
    h(x, t) is the critic's x0-predictor (batched over the two endpoints); gradient reaches it
    through h0 and both endpoint evaluations, never through the transitions."""
    with torch.no_grad():
        x1 = sched.cps_step(x_t, h0.detach(), t, t2, xi1, theta)
        x2 = sched.cps_step(x_t, h0.detach(), t, t2, xi2, theta)
    h1, h2 = h(torch.cat([x1, x2]), torch.cat([t2, t2])).chunk(2)
    return consistency_term(h1, h2, h0)


def reward_terms(out) -> dict[str, torch.Tensor]:
    """ctx.reward's output as named (B,) rewards (a plain tensor is one reward)."""
    return dict(out) if isinstance(out, dict) else {"reward": out}


def advantages(rewards: dict[str, torch.Tensor], groups, eps: float = 1e-4, weights=None):
    """(A, A_pre) of sec. 5.3: A_pre = sum_k w_k A_k, A_k = (r_k - the prompt's mean)/(global std
    + eps), exactly 0 for a prompt whose samples all scored the same (dropped, sec. 5.1); A =
    (A_pre - mean)/(std + eps) with the population std; clamping happens at use."""
    total = None
    for name, r in rewards.items():
        a_k = losses.group_advantages(r.double(), groups, eps=eps, std="global", zero_ties=True)
        w = 1.0 if weights is None else float(weights[name])
        total = w * a_k if total is None else total + w * a_k
    return (total - total.mean()) / (total.std(unbiased=False) + eps), total


def kept_rows(nonzero: torch.Tensor, sub_batches: int, gen: torch.Generator) -> torch.Tensor:
    """The rows that reach the generator loss (sec. 5.1): those with a nonzero advantage, padded
    with random zero-advantage rows up to a multiple of `sub_batches` when enough are left, and
    `sub_batches` random rows when none survives (official zero-advantage filter). 0: no padding,
    every row when none survives."""
    if sub_batches == 0:
        return nonzero if nonzero.any() else torch.ones_like(nonzero)
    keep = nonzero.clone()
    if not keep.any():
        keep[torch.randperm(len(keep), generator=gen)[:sub_batches].to(keep.device)] = True
    missing = -int(keep.sum()) % sub_batches
    free = (~keep).nonzero().flatten()
    if missing and len(free) >= missing:
        keep[free[torch.randperm(len(free), generator=gen)[:missing].to(keep.device)]] = True
    return keep


# One stage-2 epoch on this rank: prompts, rollout states x_0..x_4, old log-probs, advantages,
# the kept rows (non-zero advantage), the selected steps S and the mean reward.
Epoch = namedtuple("Epoch", "metas cond xs logp adv keep selected reward")


# -- the method: a shared base, one class per stage ------------------------------------------------
class RTDMD(Method):
    """The registered method, what both stages share; `stage` picks the class that trains."""

    name = "rtdmd"
    fidelity = "faithful"
    requires = ("reward",)
    ledger = FIDELITY  # both stage classes inherit it
    Options = RTDMDOptions
    PRESETS = PRESETS

    @classmethod
    def for_options(cls, options) -> type[Method]:
        return STAGES[options.stage]

    def __init__(self, teacher, options, ctx):
        super().__init__(teacher, options, ctx)
        generator, critic = self.initial_networks()  # defined by each stage
        gen_lora, critic_lora = self.loras()  # stage 2: fresh LoRAs on the merged stage-1 weights
        self._generator = trainable_copy(generator, lora=gen_lora,
                                         checkpointing=options.grad_checkpointing)
        self.critic = trainable_copy(critic, lora=critic_lora,
                                     checkpointing=options.grad_checkpointing)
        self.grid = student_grid(teacher, options.generator_grid, options.grid_shift)
        self.full_grid = self.grid + [0.0]  # the last step lands on clean data
        self.theta = options.eta * math.pi / 2
        self.sched = teacher.schedule
        top = max(self.full_grid[1:])  # the highest boundary needs room for its re-noise level
        if 1000 * top + options.renoise_offset > options.renoise_clamp[1]:
            raise FewstepError(f"rtdmd: a boundary at t = {top:.3f} leaves no room for the "
                               f"re-noise level below {options.renoise_clamp[1]}")

    def loras(self) -> tuple[LoraSpec | None, LoraSpec | None]:
        """(generator's, critic's) LoRA, both on `lora_targets` (sec. 2); None: full weights.
        Stage 1 draws A with peft's gaussian init; stage 2's fresh LoRAs `stage2_lora_init`. The
        critic's init has its own seed stream (official: drawn after the generator's)."""
        o = self.opt
        init = "gaussian" if o.stage == 1 else o.stage2_lora_init
        targets = tuple(o.lora_targets)
        gen = LoraSpec(o.lora_rank, o.lora_alpha, targets, init, o.seed) if o.lora_rank > 0 else None
        critic = None
        if o.critic_lora_rank > 0:
            critic = LoraSpec(o.critic_lora_rank, o.critic_lora_alpha, targets, init, o.seed,
                              "critic", ("critic_lora_rank", "critic_lora_alpha"))
        return gen, critic

    @classmethod
    def sampler(cls, teacher, options) -> StudentSpec:
        """The CPS sampler on the generator grid, eta pi/2 re-noising, no guidance."""
        return StudentSpec(student_grid(teacher, options.generator_grid, options.grid_shift),
                           theta=options.eta * math.pi / 2, guidance=1.0)

    def vec(self, t: float, like) -> torch.Tensor:
        return torch.full((like.shape[0],), float(t), device=like.device)

    def renoise_t(self, s: float, n: int, stream: str) -> torch.Tensor:
        """t ~ U[1000 s + 10, 1000] timestep units, clamped to [20, 980], /1000, unshifted (sec.
        4.1); rank-synchronised in stage 1 (`shared_draws`). SDXL: integer k ~ U{k_s + 10, ...,
        999}, same clamp, t = k/999."""
        offset, clamp, shared = self.opt.renoise_offset, self.opt.renoise_clamp, self.shared_draws
        if self.sched.kind == "flow":
            return draw_times(self.ctx, n, stream, 1000.0 * s + offset, 1000.0, clamp,
                              unit=1000.0, shared=shared)
        top = self.sched.n_steps - 1
        return draw_times(self.ctx, n, stream, int(round(top * s)) + offset, top, clamp,
                          grid=self.sched.n_steps, integers=True, shared=shared)

    @property
    def shared_draws(self) -> bool:
        """Re-noise times and consistency steps alike on all ranks: the official stage 1
        broadcasts them, its stage 2 draws them per rank (stage2_shared_draws)."""
        return self.opt.stage == 1 or self.opt.stage2_shared_draws

    def renoised(self, x_s, s: float, stream: str):
        """(x_t, t, n, sigma_ts, alpha_t, sigma_t): sg(x_s) at level s re-noised to a fresh t by
        the exact kernel x_t = a x_s + sigma_ts n (sec. 4.1)."""
        t = self.renoise_t(s, x_s.shape[0], f"{stream}/t")
        n = self.ctx.randn_like(x_s, f"{stream}/n")
        a, sigma_ts, alpha_t, sigma_t = self.sched.kernel(self.vec(s, x_s), t)
        return self.sched.renoise(x_s.detach(), n, a, sigma_ts), t, n, sigma_ts, alpha_t, sigma_t

    def critic_loss(self, x_s, s: float, cond, stream: str):
        """L_fake = L_AC + gamma L_cons on sg(x_s) at level s (sec. 4.2)."""
        x_t, t, n, sigma_ts, alpha_t, sigma_t = self.renoised(x_s, s, stream)
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

    def consistency_delta(self, x_t, stream: str) -> torch.Tensor:
        """delta ~ U{1..delta_max} timesteps per sample (sec. 4.2)."""
        return self.ctx.randint(1, self.opt.delta_max, x_t.shape[0], f"{stream}/delta",
                                shared=self.shared_draws)

    def consistency(self, x_t, t, h0, cond, stream: str):
        t2 = self.sched.steps_earlier(t, self.consistency_delta(x_t, stream))
        xi1 = self.ctx.randn_like(x_t, f"{stream}/cons_xi1")
        xi2 = self.ctx.randn_like(x_t, f"{stream}/cons_xi2")
        both = cond_cat([cond, cond])

        def h(x, tt):  # critic x0-predictor; level 0 is the identity
            pred = self.critic.x0(x, tt, both)
            return torch.where(losses.per_sample(tt == 0, x), x, pred)

        return consistency_loss(h, self.sched, x_t, t, t2, h0, xi1, xi2, self.theta)

    def acdmd_loss(self, x_s, s: float, cond, stream: str):
        """L_DM = 1/2 mean (x_s - sg(x_s - g))^2 in float64, g of sec. 4.3 (s = 0: DMD on x0)."""
        x_t, t = self.renoised(x_s, s, stream)[:2]
        with torch.no_grad():
            p_real = self.teacher.x0(x_t, t, cond, self.opt.teacher_guidance)
            p_fake = self.critic.x0(x_t, t, cond)
        xi = self.ctx.randn_like(x_s, f"{stream}/xi")
        g = acdmd_gradient(self.sched, x_s, x_t, t, self.vec(s, x_s), p_real, p_fake, xi, self.theta)
        loss = losses.dm_surrogate(x_s.double(), g)
        return loss, {"dm": float(loss.detach()), "dm_grad_abs": float(g.abs().mean()), "s": float(s)}


class ACDMD(RTDMD):
    """Stage 1, the AC-DMD cold start from the teacher (sec. 4)."""

    def initial_networks(self):
        return self.teacher, self.teacher

    def plan(self, step):  # the generator every `generator_every`-th iteration (sec. 4.4)
        gen = (step + 1) % self.opt.generator_every == 0
        return ["critic", "generator"] if gen else ["critic"]

    def loss(self, net, scratch):
        if net == "critic":
            x_s, s, batch = self.boundary_sample(grad=False, stream="critic")
            return self.critic_loss(x_s, s, batch.cond, "critic")
        x_s, s, batch = self.boundary_sample(grad=True, stream="gen")
        return self.acdmd_loss(x_s, s, batch.cond, "gen/dm")

    def boundary_sample(self, grad: bool, stream: str):
        """(x_s, s, prompts): j ~ U{1..4} steps of G from pure noise (DDIM, then a float64 CPS
        step, the only one with gradient); x_s is its noisy output, x0 when j = 4 (sec. 4.1)."""
        batch = self.ctx.prompts(self.opt.batch, f"{stream}/prompts")
        j = int(self.ctx.randint(1, len(self.grid), 1, f"{stream}/stop", shared=True)[0])
        z = self.ctx.randn((len(batch), *self.teacher.latent_shape), f"{stream}/z")
        x_s = rollout(self.generator, z, batch.cond, self.full_grid, j,
                      lambda i, x: self.ctx.randn_like(x, f"{stream}/xi{i}"), theta=self.theta,
                      last_step="kernel", grad=grad).x
        return x_s, self.full_grid[j], batch


class RewardTiltedDMD(RTDMD):
    """Stage 2 (sec. 5) from a stage-1 model folder (`init_from`); with `lora_rank` > 0 a fresh
    LoRA goes on the merged stage-1 weights, full fine-tuning simply continues training."""

    def initial_networks(self):
        if self.ctx.reward is None:
            raise FewstepError("rtdmd stage 2 needs a reward: the run's context has none "
                               "(fewstep train --reward <toy reward net>)")
        return load_stage1(self.opt.init_from, self.teacher)

    def plan(self, step):  # one epoch: a critic step, then the generator step (sec. 5.1)
        return ["critic", "generator"]

    def loss(self, net, scratch):
        epoch = scratch["epoch"] = scratch.get("epoch") or self.sample_epoch()  # once per iteration
        if net == "critic":
            return self.critic_loss(epoch.xs[-1], 0.0, epoch.cond, "critic")  # sec. 5.6
        return self.generator_loss(epoch)

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
    def rollout_states(self, metas, cond, rows: slice, selected):
        """4-step CPS rollout of G (CFG 1) from pure noise on the epoch's `rows`: states x_0..x_4
        and old log-probs; the noise is prompt-keyed outside S and the last step (sec. 5.2)."""
        metas, cond, stream = metas[rows], cond_index(cond, rows), f"roll{rows.start}"
        z = self.ctx.randn((len(metas), *self.teacher.latent_shape), f"{stream}/z")
        run = rollout(self.generator, z, cond, self.full_grid, len(self.grid),
                      self.rollout_noise(metas, selected, stream), theta=self.theta,
                      step="kernel", record=True)
        return run.states, [self.sched.cps_logprob(x, m) for x, m in zip(run.states[1:], run.means)]

    def rollout_noise(self, metas, selected, stream: str):
        """xi_k: keyed by (prompt, step, epoch) on steps outside S and the last, so one prompt's
        samples share it on every rank (sec. 5.2); rank-local otherwise."""
        prompts, last = [m["prompt"] for m in metas], len(self.grid) - 1

        def noise(k, x):
            if k in selected or k == last:
                return self.ctx.randn_like(x, f"{stream}/xi{k}")
            return self.ctx.prompt_noise(prompts, x, f"rtdmd/shared/step{k}/epoch{self.ctx.step}")
        return noise

    def sample_epoch(self) -> Epoch:
        """Rollouts in chunks of `batch`, rewards, advantages, zero-advantage drop (sec. 5.1-5.3)."""
        perm = torch.randperm(len(self.grid) - 1, generator=self.ctx.shared_gen("selected"))
        selected = sorted(perm[: self.opt.selected_steps].tolist())
        metas, cond, groups = self.epoch_prompts()
        chunks = [self.rollout_states(metas, cond, slice(c, c + self.opt.batch), selected)
                  for c in range(0, len(metas), self.opt.batch)]
        xs, logp = ([torch.cat(parts) for parts in zip(*(ch[i] for ch in chunks))] for i in (0, 1))
        with torch.no_grad():
            rewards = reward_terms(self.ctx.reward(self.teacher.decode(xs[-1]), metas))
        rewards = {k: all_gather(v.detach().double(), self.ctx.world_size) for k, v in rewards.items()}
        adv, adv_pre = advantages(rewards, groups.to(self.ctx.device), self.opt.adv_eps)
        mine = slice(self.ctx.rank * len(metas), (self.ctx.rank + 1) * len(metas))
        keep = kept_rows(adv_pre[mine] != 0, self.opt.sub_batches, self.ctx.gen("keep"))
        reward = float(sum(rewards.values()).mean())
        return Epoch(metas, cond, xs, logp, adv[mine], keep, selected, reward)

    def ppo_term(self, ep: Epoch, j: int, rows, cond, adv):
        """L_PPO at step j with the current log-prob of the stored transition (sec. 5.4)."""
        x_j, x_next = ep.xs[j][rows], ep.xs[j + 1][rows]
        t, t_next = self.vec(self.full_grid[j], x_j), self.vec(self.full_grid[j + 1], x_j)
        mean = self.sched.cps_mean(x_j, self.generator.x0(x_j, t, cond), t, t_next, self.theta)
        logp = self.sched.cps_logprob(x_next, mean)
        return losses.ppo_loss(logp, ep.logp[j][rows], adv, self.opt.ppo_clip)

    def generator_loss(self, ep: Epoch):
        """sum_{j in S} L_PPO(j) + 1e-3 L_ACDMD + 1e-4 L_BP on the kept samples, / |S u {3}| (sec. 5.4)."""
        rows = ep.keep.nonzero().flatten()
        cond, metas = cond_index(ep.cond, rows), [ep.metas[i] for i in rows.tolist()]
        adv = ep.adv[rows].clamp(-self.opt.adv_clip, self.opt.adv_clip)
        ppo = [self.ppo_term(ep, j, rows, cond, adv) for j in ep.selected]
        x_last = ep.xs[-2][rows]  # the last step's input, at grid[-1]
        x0 = self.generator.x0(x_last, self.vec(self.grid[-1], x_last), cond)
        dm, dm_stats = self.acdmd_loss(x0, 0.0, cond, "gen/dm")
        r_bp = sum(reward_terms(self.ctx.reward(self.teacher.decode(x0), metas)).values())
        bp = F.relu(self.opt.bp_margin - r_bp).mean()
        final = self.opt.dm_weight * dm + self.opt.bp_weight * bp
        total = (sum(ppo) + final) / (len(ep.selected) + 1)
        stats = {"ppo": float(sum(ppo).detach()), "bp": float(bp.detach()), "reward": ep.reward,
                 "kept": float(ep.keep.float().mean()), **dm_stats}
        return total, stats


STAGES = {1: ACDMD, 2: RewardTiltedDMD}


def load_stage1(folder: str, teacher):
    """(generator, critic) backbones from a stage-1 model folder: the EMA generator, LoRA merged
    (sec. 2: "stage-1 EMA LoRA merged"), and the critic."""
    if not folder:
        raise FewstepError("rtdmd stage 2 starts from a stage-1 model: set init_from to the folder "
                           "written by `fewstep train --method rtdmd --out` (stage 1)")
    generator, info = load_student(Path(folder), teacher, fp32=True)  # unrounded by a bf16 teacher
    method, stage = info.get("method"), info.get("options", {}).get("stage")
    if method != "rtdmd" or stage != 1:
        raise FewstepError(f"{folder} is not a stage-1 rtdmd model (method {method!r}, stage {stage!r})")
    critic_file = Path(folder) / "critic.safetensors"
    if not critic_file.is_file():
        raise FewstepError(f"{folder} has no critic.safetensors; re-export the stage-1 run")
    return generator, copy_with_weights(teacher, load_file(str(critic_file)), fp32=True)
