"""Distribution-matching building blocks shared by DMD, DMD2 and AMD.

One generator G_theta (teacher copy) and one critic D_F (teacher copy, the "fake score"), the DM
gradient of fewstep/notes/conventions.md sec. 6 (DMD Eq. 7-8, Algorithm 2) and the critic's
denoising loss on the native target. Times follow each family: SDXL draws integers k on the DMD2
grid (k in {20..980} for DM, {0..999} for the critic), flow families draw continuous t.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fewstep import losses
from fewstep.engine.adapt import trainable_copy
from fewstep.engine.method import RENOISE, Method, StudentSpec, student_grid
from fewstep.options import TrainOptions, choice
from fewstep.schedule import TimeSampler


@dataclass
class DMOptions(TrainOptions):
    teacher_guidance: float = 1.0        # omega of D_T^omega (x0-space CFG); critic is unguided
    dm_t_range: tuple[float, float] = (0.02, 0.98)  # fractions of T (SDXL integer rule) or t
    dm_t_shift: float = 1.0              # shift of DM times on flow families (dmd2.dm_t_shift)
    critic_t_clip: tuple[float, float] = (0.001, 0.999)  # flow critics: U(0,1) clipped (harness)
    generator_grid: tuple[float, ...] = (1.0,)  # fractions of the time range, 1 = noise
    grid_shift: float = 1.0              # shift applied to the grid on flow families
    normaliser_teacher: str = choice("guided", "unguided")  # dmd.normaliser_teacher
    RANGES = {"teacher_guidance": "[0, inf)", "dm_t_shift": "(0, inf)", "grid_shift": "(0, inf)"}


def full_precision(like: torch.Tensor):
    """Autocast off on `like`'s device: the official DMD2 code runs its no-grad forwards (the
    critic's DM prediction, the backward-simulation rollout, the critic-only turn's generator
    sample) outside autocast, in fp32 ("autocast and no_grad don't work well together", official
    sd_guidance and sd_unified_model modules; methods/notes/dmd2.md sec. 3.1)."""
    return torch.autocast(device_type=like.device.type, enabled=False)


class DistributionMatching(Method):
    """Generator (the teacher or a method's warm start) + critic initialised from the teacher;
    helpers for the DM and critic losses."""

    Options = DMOptions

    def __init__(self, teacher, options, ctx):
        super().__init__(teacher, options, ctx)
        self.grid = student_grid(teacher, options.generator_grid, options.grid_shift)
        self._generator = trainable_copy(self.initial_generator(), options)
        # full copy (LoRA applies to the generator only), checkpointed per block under the same
        # flag as the generator (DMD2's guidance model does so for its fake UNet)
        self.critic = trainable_copy(teacher, checkpointing=options.grad_checkpointing)
        discrete = teacher.schedule.kind != "flow"
        lo, hi = options.dm_t_range
        self.dm_times = TimeSampler("grid", lo, hi) if discrete else \
            TimeSampler("uniform", lo, hi, shift=options.dm_t_shift)
        self.critic_times = TimeSampler("grid", 0.0, 1.0) if discrete else \
            TimeSampler("uniform", *options.critic_t_clip)

    def initial_generator(self):
        """The backbone the generator starts from: the teacher (DMD2's warm start overrides it)."""
        return self.teacher

    # -- sampling ----------------------------------------------------------------------------------
    @classmethod
    def sampler(cls, teacher, options) -> StudentSpec:
        grid = student_grid(teacher, options.generator_grid, options.grid_shift)
        return StudentSpec(grid, theta=RENOISE if len(grid) > 1 else 0.0)

    def draw_t(self, sampler: TimeSampler, n: int, stream: str) -> torch.Tensor:
        return sampler.sample(n, self.ctx.gen(stream)).float().to(self.ctx.device)

    def generate(self, z, cond, grad: bool = True, stop: int = 0, stream: str = "gen"):
        """x_hat = G(x_stop, t_stop, c); x_stop from a no-grad rollout when stop > 0. Without
        gradient the call runs in fp32 (full_precision)."""
        x_in = z if stop == 0 else self.rollout_input(z, cond, stop, stream)
        t = torch.full((z.shape[0],), self.grid[stop], device=z.device)
        return self.generator_x0(x_in, t, cond, grad)

    def generator_x0(self, x_in, t, cond, grad: bool):
        """G(x_in, t, c): under the run's autocast with gradient, in fp32 without."""
        if grad:
            with torch.enable_grad():
                return self.generator.x0(x_in, t, cond)
        with torch.no_grad(), full_precision(x_in):
            return self.generator.x0(x_in.float(), t, cond)

    def rollout_input(self, z, cond, stop: int, stream: str):
        """DMD2 backward simulation (methods/notes/dmd2.md sec. 5.2): rollout from independent
        noise z' to stop-1, then x_stop = F_{t_stop}(x0_{stop-1}, z) re-noised with the batch
        noise z; in fp32, like the official sample_backward."""
        z_prime = self.ctx.randn_like(z, f"{stream}/z_prime")
        with torch.no_grad(), full_precision(z):
            x = self.rollout(z_prime.float(), cond, self.grid, stop - 1, theta=RENOISE, stream=stream)
            t_prev = torch.full((z.shape[0],), self.grid[stop - 1], device=z.device)
            x0_prev = self.generator.x0(x, t_prev, cond)
            t_stop = torch.full_like(t_prev, self.grid[stop])
            return self.generator.schedule.add_noise(x0_prev, z, t_stop)

    # -- losses ------------------------------------------------------------------------------------
    def teacher_and_critic(self, x, cond, stream: str = "dm"):
        """(x_t, t, p_T^omega, p_F) at a fresh DM time; no gradient anywhere (DMD Alg. 2 steps 1-3)."""
        t = self.draw_t(self.dm_times, x.shape[0], f"{stream}/t")
        eps = self.ctx.randn_like(x, f"{stream}/eps")
        with torch.no_grad():
            x_t = self.teacher.schedule.add_noise(x.detach(), eps, t)
            p_real = self.teacher.x0(x_t, t, cond, self.opt.teacher_guidance)
            p_fake = self.critic_prediction(x_t, t, cond)
        return x_t, t, p_real, p_fake

    def critic_prediction(self, x_t, t, cond):
        """D_F(x_t, t, c) of the DM gradient, no gradient, in fp32 (official sd_guidance module:
        the fake score runs outside autocast; the teacher in bf16)."""
        with torch.no_grad(), full_precision(x_t):
            return self.critic.x0(x_t.float(), t, cond)

    def dm_loss(self, x, cond, stream: str = "dm") -> tuple[torch.Tensor, dict]:
        """L_DM = 1/2 mean (x - sg(x - g))^2 with g = (p_F - p_T) / mean|x - p_T| (DMD Eq. 7-8)."""
        x_t, t, p_real, p_fake = self.teacher_and_critic(x, cond, stream)
        if self.opt.normaliser_teacher == "unguided" and self.opt.teacher_guidance != 1.0:
            # dmd.normaliser_teacher = unguided: same numerator, normaliser mean|x - D_T(c)|
            with torch.no_grad():
                p_plain = self.teacher.x0(x_t, t, cond)
            g = losses.dm_gradient(x, p_plain, p_plain + (p_fake - p_real))
        else:
            g = losses.dm_gradient(x, p_real, p_fake)
        return losses.dm_surrogate(x, g), {"dm_grad_abs": g.abs().mean()}

    def critic_loss(self, x, cond, stream: str = "critic", weight=None) -> torch.Tensor:
        """Denoising loss of D_F on sg(x) over the full range, native target (DMD Eq. 6)."""
        x = x.detach()
        t = self.draw_t(self.critic_times, x.shape[0], f"{stream}/t")
        eps = self.ctx.randn_like(x, f"{stream}/eps")
        x_t = self.critic.schedule.add_noise(x, eps, t)
        pred = self.critic.native(x_t, t, cond)
        target = self.critic.native_target(x_t, t, x)
        return losses.native_mse(pred, target, weight)
