"""DMD2's diffusion-GAN discriminator: bottleneck features of the critic and a small conv head.

Features (methods/notes/dmd2.md sec. 3.3): the output of the module the critic's backbone names
(`feature_module`: the SDXL UNet's mid-block; for transformer critics the image-token stream after
block floor(L/2), reshaped to its spatial grid; option `dmd2.gan.feature_layer`). The forward pass
stops at the hooked module (DMD2's "classify mode" also skips the decoder half), so a feature call
costs about half a network evaluation.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fewstep.backbones.base import Backbone


class _Stop(Exception):
    def __init__(self, value):
        self.value = value


def _to_grid(tokens: torch.Tensor, backbone: Backbone) -> torch.Tensor:
    """(B, N, D) image tokens -> (B, D, h, w)."""
    b, n, d = tokens.shape
    side = int(math.isqrt(n))
    if side * side != n:
        raise ValueError(f"cannot reshape {n} image tokens to a square grid")
    return tokens.transpose(1, 2).reshape(b, d, side, side)


def bottleneck_features(backbone: Backbone, x_t, t, cond, layer: int | None = None) -> torch.Tensor:
    """Critic features phi(x_t) in (B, C, h, w); gradients flow to the input and the early layers."""
    module = backbone.feature_module(layer)

    def hook(mod, args, output):
        raise _Stop(output)

    handle = module.register_forward_hook(hook)
    try:
        backbone.native(x_t, t, cond)
    except _Stop as stop:
        out = stop.value
    else:
        raise RuntimeError(f"feature layer {type(module).__name__} was not reached")
    finally:
        handle.remove()
    if isinstance(out, tuple):  # SD3 joint blocks return (context tokens, image tokens)
        out = out[-1]
    return out.float() if out.ndim == 4 else _to_grid(out.float(), backbone)


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class DiscriminatorHead(nn.Module):
    """n x [Conv 4x4 s2 p1, GroupNorm(32), SiLU] down to 4x4, then Conv 4x4 s4 (-> 1x1), GroupNorm,
    SiLU, Conv 1x1 -> one logit (DMD2's cls_pred_branch, methods/notes/dmd2.md sec. 3.3). Width = feature width.
    Feature maps smaller than 4x4 (toy sizes) take a final conv as wide as the map."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        layers: list[nn.Module] = []
        while size > 4:
            layers += [nn.Conv2d(channels, channels, 4, 2, 1), nn.GroupNorm(_groups(channels), channels),
                       nn.SiLU()]
            size //= 2
        k = min(4, size)
        layers += [nn.Conv2d(channels, channels, k, k), nn.GroupNorm(_groups(channels), channels),
                   nn.SiLU(), nn.Conv2d(channels, 1, 1)]
        self.net = nn.Sequential(*layers)
        self.n_down = sum(isinstance(m, nn.Conv2d) and m.stride == (2, 2) for m in layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).flatten(1).mean(1)


def make_head(critic: Backbone, layer: int | None = None, seed: int = 0) -> DiscriminatorHead:
    """A randomly initialised head sized to the critic's features; the init depends on `seed` only
    (not on how much of the global RNG was used before), so reruns build the same head."""
    c, h, w = critic.latent_shape
    with torch.no_grad():
        x = torch.zeros(1, c, h, w, device=critic.device)
        cond = critic.encode([critic.probe_prompt])
        feats = bottleneck_features(critic, x, torch.tensor([0.5], device=x.device), cond, layer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = DiscriminatorHead(feats.shape[1], feats.shape[-1])
    return head.to(critic.device)
