"""Loss math shared by the methods, written once in the specs' symbols.

x: generator sample (with gradient); p_T / p_F: teacher / critic x0-predictions (no gradient);
sg(.): stop-gradient (`.detach()`). fewstep/notes/conventions.md sec. 6 defines each primitive.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_chw(x: torch.Tensor) -> torch.Tensor:
    """Mean over every non-batch dimension: one value per sample, shape (B,)."""
    return x.flatten(1).mean(1)


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> broadcastable against `like` (B, C, H, W)."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def finite_or_zero(g: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(g), g, torch.zeros_like(g))


def dm_gradient(x: torch.Tensor, p_real: torch.Tensor, p_fake: torch.Tensor) -> torch.Tensor:
    """DMD's normalised distribution-matching gradient (DMD Eq. 7-8 as in its Algorithm 2).

    g = (p_F - p_T) / mean_CHW |x - p_T|, per sample, with the guided teacher p_T in both places;
    computed in float64, non-finite entries set to 0 (tianweiy/DMD2 does the same).
    """
    x, p_real, p_fake = (v.detach().double() for v in (x, p_real, p_fake))
    weight = mean_chw((x - p_real).abs())
    g = (p_fake - p_real) / per_sample(weight, x)
    return finite_or_zero(g)


def dm_surrogate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """L = 1/2 mean_all (x - sg(x - g))^2, whose gradient in x is g / N
    (fewstep/notes/conventions.md sec. 6)."""
    target = (x.detach().double() - g.double()).to(x.dtype)
    return 0.5 * F.mse_loss(x, target, reduction="mean")


def displacement_loss(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """CDM's form L = mean_all (x - sg(x + delta))^2, gradient -2 delta / N (no 1/2; methods/notes/cdm.md sec. 4)."""
    target = (x.detach().double() + finite_or_zero(delta.double())).to(x.dtype)
    return F.mse_loss(x, target, reduction="mean")


def native_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Denoising loss on the native target (eps for SDXL, eps - x0 for SD3, x0 - eps for SiT).

    Mean over all elements; `weight` (B,) weighs each sample's term (AMD's RLS, RTDMD's clamp).
    """
    per = mean_chw((pred.float() - target.float()) ** 2)
    if weight is not None:
        per = per * weight.to(per)
    return per.mean()


def denoising_loss(net, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, cond,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """native_mse of `net` (a backbone) at x_t = alpha(t) x0 + sigma(t) eps against the native
    target of x0: a critic's / fake teacher's denoising loss (DMD Eq. 6, methods/notes/cdm.md sec. 4.1)."""
    x_t = net.schedule.add_noise(x0, eps, t)
    return native_mse(net.native(x_t, t, cond), net.native_target(x_t, t, x0), weight)


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: mean softplus(-h(fake)) (DMD2 Eq. 4)."""
    return F.softplus(-fake_logits.float()).mean()


def gan_discriminator_loss(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """Logistic discriminator loss: mean softplus(h(fake)) + mean softplus(-h(real)); no penalty."""
    return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()


def ppo_loss(logp, logp_old, adv, clip: float) -> torch.Tensor:
    """PPO's clipped surrogate mean max(-A rho, -A clip(rho, 1 - c, 1 + c)), rho = exp(log pi -
    log pi_old) (methods/notes/rtdmd.md sec. 5.4, as in Flow-GRPO)."""
    ratio = torch.exp(logp - logp_old.detach())
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip, 1.0 + clip)).mean()


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4,
                     std: str = "group", zero_ties: bool = False) -> torch.Tensor:
    """Group-normalised advantage a_i = (r_i - mean_group r) / (std + eps), in rewards' dtype.

    std = "group": the group's own standard deviation (AMD Eq. 12 as reconstructed);
    std = "global": the std over all samples (RTDMD per_prompt_stat_tracking, global std).
    Standard deviations are the population ones (numpy's default, as in Flow-GRPO's tracker).
    zero_ties: a group whose rewards are all equal gets exactly 0, not the rounding residue of
    r - mean(r) (RTDMD's dropped samples, sec. 5.1; AMD's alpha = beta = W = 1 on ties).
    """
    if std not in ("group", "global"):
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")
    r = rewards.double()
    adv = torch.zeros_like(r)
    global_std = r.std(unbiased=False)
    for gid in torch.unique(groups):
        m = groups == gid
        if zero_ties and r[m].max() == r[m].min():
            continue  # stays exactly 0
        denom = r[m].std(unbiased=False) if std == "group" else global_std
        adv[m] = (r[m] - r[m].mean()) / (denom + eps)
    return adv.to(rewards.dtype)
