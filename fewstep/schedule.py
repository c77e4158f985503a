"""The one time convention, the noise schedules, and the time samplers.

t in [0, 1]; t = 0 is clean data, t = 1 is noise; x_t = alpha(t) * x0 + sigma(t) * eps
(sec. 3). Every conversion here runs in float64 and returns the
caller's dtype, so a bf16 network never sees a bf16 schedule.
Sections (sec. N) are those of fewstep/notes/conventions.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

T_TRAIN = 1000  # discrete DDPM steps of the SDXL family


def col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars (B,) or a scalar -> broadcastable to `like` (B, C, H, W)."""
    v = torch.as_tensor(v, dtype=torch.float64, device=like.device)
    if v.ndim == 0:
        v = v.expand(like.shape[0])
    return v.reshape(-1, *([1] * (like.ndim - 1)))


class Schedule:
    """alpha(t), sigma(t) and the conversions between x0, eps and native outputs."""

    kind: str = "abstract"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # Forward process and its inverses -------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = col(self.alpha(t), x0), col(self.sigma(t), x0)
        return (a * x0.double() + s * eps.double()).to(x0.dtype)

    def eps_from_x0(self, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = col(self.alpha(t), x_t), col(self.sigma(t), x_t)
        return ((x_t.double() - a * x0.double()) / s).to(x_t.dtype)

    def x0_from_eps(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = col(self.alpha(t), x_t), col(self.sigma(t), x_t)
        return ((x_t.double() - s * eps.double()) / a).to(x_t.dtype)

    def ddim_step(self, x_t, x0, t, t_next, eps_noise=None, theta: float = 0.0):
        """x_{t'} = alpha(t') x0 + sigma(t') (cos(theta) eps_hat + sin(theta) xi)
        (sec. 3).

        theta = 0 is DDIM; for the flow schedule it is exactly the Euler step of the ODE.
        """
        eps_hat = self.eps_from_x0(x_t, x0, t).double()
        if theta:
            eps_hat = math.cos(theta) * eps_hat + math.sin(theta) * eps_noise.double()
        a, s = col(self.alpha(t_next), x_t), col(self.sigma(t_next), x_t)
        return (a * x0.double() + s * eps_hat).to(x_t.dtype)

    # The general transition kernel, float64 (sec. 3) -------------
    # ddim_step above and cps_step below are the same step x_t' = alpha(t') x0 + sigma(t') (cos
    # theta eps_hat + sin theta xi) in two roundings: ddim_step rounds eps_hat to x's dtype and
    # reads alpha, sigma as they are (teacher sampling, DMD2, CDM); cps_step stays in float64 and
    # lands exactly on x0 at t' = 0 (RTDMD). Both are kept bit for bit so that no trained student
    # or teacher sample changes; they agree to float32 rounding (tests/test_schedule.py).
    def level(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha(t), sigma(t)) in float64; t = 0 is clean data exactly on every family, also on
        the discrete VP schedule whose k = 0 is slightly noisy."""
        t = torch.as_tensor(t, dtype=torch.float64)
        clean = t == 0
        alpha = torch.where(clean, torch.ones_like(t), self.alpha(t).to(t))
        sigma = torch.where(clean, torch.zeros_like(t), self.sigma(t).to(t))
        return alpha, sigma

    def kernel(self, s, t):
        """(a, sigma_ts, alpha_t, sigma_t) of x_t = a x_s + sigma_ts n: a = alpha(t)/alpha(s),
        sigma_ts^2 = sigma_t^2 - a^2 sigma_s^2 (flow: a = (1 - t)/(1 - s))."""
        alpha_s, sigma_s = self.level(s)
        alpha_t, sigma_t = self.level(t)
        a = alpha_t / alpha_s
        sigma_ts = (sigma_t ** 2 - a ** 2 * sigma_s ** 2).clamp(min=1e-12).sqrt()
        return a, sigma_ts, alpha_t, sigma_t

    @staticmethod
    def renoise(x_s, n, a, sigma_ts) -> torch.Tensor:
        """x_t = a x_s + sigma_ts n in float64, returned in x_s's dtype (the kernel's forward)."""
        return (col(a, x_s) * x_s.double() + col(sigma_ts, x_s) * n.double()).to(x_s.dtype)

    def cps_mean(self, x_t, x0, t, t_next, theta: float) -> torch.Tensor:
        """mu = alpha(t') x0 + sigma(t') cos(theta) eps_hat in float64: the step's mean."""
        alpha_t, sigma_t = self.level(t)
        alpha_n, sigma_n = self.level(t_next)
        x0 = x0.double()
        eps_hat = (x_t.double() - col(alpha_t, x_t) * x0) / col(sigma_t, x_t)
        return col(alpha_n, x_t) * x0 + col(sigma_n, x_t) * math.cos(theta) * eps_hat

    def cps_step(self, x_t, x0, t, t_next, xi, theta: float, mean=None) -> torch.Tensor:
        """x_t' = mu + sigma(t') sin(theta) xi in x_t's dtype (the stochastic DDIM / CPS step);
        theta = 0 is DDIM/Euler, t' = 0 gives x0. `mean`: mu when the caller already has it."""
        out = self.cps_mean(x_t, x0, t, t_next, theta) if mean is None else mean
        if theta:
            out = out + col(self.level(t_next)[1], x_t) * math.sin(theta) * xi.double()
        return out.to(x_t.dtype)

    @staticmethod
    def cps_logprob(x_next, mean) -> torch.Tensor:
        """Simplified log pi(x_t' | x_t) = -mean_CHW (x_t' - mu)^2, no normalisation (RTDMD 5.2)."""
        return -((x_next.double() - mean.double()) ** 2).flatten(1).mean(1)


class FlowSchedule(Schedule):
    """Rectified flow / linear interpolant: alpha = 1 - t, sigma = t (SD3 and SiT)."""

    kind = "flow"

    def alpha(self, t):
        return 1.0 - torch.as_tensor(t, dtype=torch.float64)

    def sigma(self, t):
        return torch.as_tensor(t, dtype=torch.float64)

    @staticmethod
    def steps_earlier(t, delta) -> torch.Tensor:
        """t'' = max(t - delta/1000, 0): delta training timesteps earlier (methods/notes/rtdmd.md sec. 4.2)."""
        return (t.double() - delta.double() / 1000.0).clamp(min=0.0).to(t.dtype)

    # Native outputs of the flow families. v = eps - x0 (SD3); SiT's u = x0 - eps with its
    # own time running the other way, t_sit = 1 - t (sec. 4).
    @staticmethod
    def x0_from_v(x_t, v, t):
        return (x_t.double() - col(t, x_t) * v.double()).to(x_t.dtype)

    @staticmethod
    def v_from_x0(x_t, x0, t):
        return ((x_t.double() - x0.double()) / col(t, x_t)).to(x_t.dtype)

    @staticmethod
    def x0_from_sit_u(x_t, u, t):
        return (x_t.double() + col(t, x_t) * u.double()).to(x_t.dtype)

    @staticmethod
    def sit_time(t):
        return 1.0 - torch.as_tensor(t)


@dataclass
class DiscreteVPSchedule(Schedule):
    """DDPM schedule of the SDXL family: alpha = sqrt(abar_k), sigma = sqrt(1 - abar_k), t = k/999.

    alphas_cumprod comes from the checkpoint's scheduler config; t is mapped to the integer grid
    with k = round(999 t), so only grid times are exact (sec. 4).
    """

    alphas_cumprod: torch.Tensor
    kind: str = "vp-discrete"

    @classmethod
    def from_scheduler_config(cls, cfg: dict) -> "DiscreteVPSchedule":
        n = int(cfg.get("num_train_timesteps", T_TRAIN))
        kind = cfg.get("beta_schedule", "scaled_linear")
        b0, b1 = float(cfg.get("beta_start", 0.00085)), float(cfg.get("beta_end", 0.012))
        if cfg.get("rescale_betas_zero_snr"):  # would change alphas_cumprod; silently wrong otherwise
            raise ValueError(
                "scheduler config: rescale_betas_zero_snr=true is not supported by "
                "DiscreteVPSchedule; use a checkpoint trained without zero-terminal-SNR rescaling")
        if cfg.get("trained_betas") is not None:
            betas = torch.tensor(cfg["trained_betas"], dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2
        elif kind == "linear":
            betas = torch.linspace(b0, b1, n, dtype=torch.float64)
        else:
            raise ValueError(
                f"scheduler config: beta_schedule {kind!r} is not supported; "
                "use 'scaled_linear' or 'linear' (or trained_betas)")
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @property
    def n_steps(self) -> int:
        return self.alphas_cumprod.numel()

    def k_of_t(self, t) -> torch.Tensor:
        return torch.round(torch.as_tensor(t, dtype=torch.float64) * (self.n_steps - 1)).long()

    def t_of_k(self, k) -> torch.Tensor:
        return torch.as_tensor(k, dtype=torch.float64) / (self.n_steps - 1)

    def steps_earlier(self, t, delta) -> torch.Tensor:
        """k'' = max(k - delta, 0): delta timesteps earlier on the integer grid."""
        k = (self.k_of_t(t).to(delta.device) - delta).clamp(min=0)
        return self.t_of_k(k).to(t)

    def _abar(self, t):
        k = self.k_of_t(t).clamp(0, self.n_steps - 1)
        return self.alphas_cumprod.to(k.device)[k]

    def alpha(self, t):
        return self._abar(t).sqrt()

    def sigma(self, t):
        return (1.0 - self._abar(t)).sqrt()


# Time samplers and sampler grids ----------------------------------------------------------------
def shift(u: torch.Tensor, s: float) -> torch.Tensor:
    """Timestep shift sigma = s u / (1 + (s - 1) u) (SD3); s = 1 is the identity."""
    u = torch.as_tensor(u, dtype=torch.float64)
    return s * u / (1.0 + (s - 1.0) * u)


@dataclass(frozen=True)
class TimeSampler:
    """Training-time t ~ p(t): 'uniform' on [lo, hi], 'logit_normal'(m, s), or 'grid' (integer k).

    The shift map is applied after drawing (a property of the sampler, never of alpha/sigma).
    """

    kind: str = "uniform"
    lo: float = 0.0
    hi: float = 1.0
    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0
    n_grid: int = T_TRAIN

    def __post_init__(self):
        if self.kind not in ("uniform", "logit_normal", "grid"):
            raise ValueError(f"time sampler kind {self.kind!r}: use uniform, logit_normal or grid")

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.kind == "uniform":
            u = self.lo + (self.hi - self.lo) * torch.rand(n, generator=generator, dtype=torch.float64)
        elif self.kind == "logit_normal":
            z = self.mean + self.std * torch.randn(n, generator=generator, dtype=torch.float64)
            u = torch.sigmoid(z)
        else:  # integer grid, range as fractions of T exactly as DMD2: floor(lo T)..floor(hi T)
            k_lo, k_hi = math.floor(self.lo * self.n_grid), math.floor(self.hi * self.n_grid)
            k_hi = min(k_hi, self.n_grid - 1)
            k = torch.randint(k_lo, k_hi + 1, (n,), generator=generator)
            return k.double() / (self.n_grid - 1)
        return shift(u, self.shift)


def sampling_grid(nfe_steps: int, kind: str = "flow", shift_s: float = 1.0,
                  n_train: int = T_TRAIN) -> torch.Tensor:
    """Times t_0 = 1 > t_1 > ... > t_n = 0 for an n-step sampler.

    flow: uniform in t, then shifted. vp-discrete: DDIM 'trailing' spacing on the integer grid
    (k = 999, ... ; diffusers' timestep_spacing='trailing'), ending at t = 0 (clean).
    """
    if nfe_steps < 1:
        raise ValueError(f"a sampler needs at least one step, got {nfe_steps}")
    if kind == "flow":
        return torch.cat([shift(torch.linspace(1.0, 0.0, nfe_steps + 1, dtype=torch.float64)[:-1],
                                shift_s), torch.zeros(1, dtype=torch.float64)])
    ratio = n_train / nfe_steps
    ks = torch.round(torch.arange(n_train, 0, -ratio, dtype=torch.float64)) - 1
    return torch.cat([ks / (n_train - 1), torch.zeros(1, dtype=torch.float64)])


def draw_times(ctx, n: int, stream: str, lo: float, hi: float, clamp, *, unit: float = 1.0,
               bound=None, grid: int | None = None, integers: bool = False,
               shared: bool = False) -> torch.Tensor:
    """Per-sample training times t (float32), drawn through a run context's named streams.

    Continuous: u ~ U[lo, hi] (ctx.uniform), times a per-sample `bound` (B,) when given, clamped
    to `clamp`; t = u / unit (unit 1000: u in timestep units). With `grid` points (discrete VP),
    k = floor(grid u) clamped to floor(grid clamp), t = k / (grid - 1) (DMD2's range rule).
    integers=True: k ~ U{lo..hi} directly (ctx.randint), clamped, t = k / (grid - 1).
    """
    c_lo, c_hi = clamp
    if integers:
        k = ctx.randint(lo, hi, n, stream, shared=shared).clamp(c_lo, c_hi)
        return (torch.as_tensor(k, dtype=torch.float64) / (grid - 1)).float()
    u = ctx.uniform(n, lo, hi, stream, shared=shared)
    if bound is not None:
        u = u * bound
    if grid is None:
        return (u.clamp(c_lo, c_hi) / unit).float()
    k = torch.floor(grid * u).clamp(math.floor(grid * c_lo), math.floor(grid * c_hi))
    return (k / (grid - 1)).float()
