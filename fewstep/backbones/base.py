"""The backbone interface: every family is seen through x0(x_t, t, cond, guidance).

Adapters implement `native` (the network's own output) and `x0_from_native`; classifier-free
guidance is applied here, in x0 space, which is exact because x0 is affine in the native output
(sec. 5).
Sections (sec. N) are those of fewstep/notes/conventions.md.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import nn

from fewstep.schedule import Schedule

Cond = dict  # str -> tensor with the batch first; one entry per conditioning input of the network


def cond_index(cond: Cond, idx) -> Cond:
    return {k: v[idx] for k, v in cond.items()}


def cond_cat(conds: Sequence[Cond]) -> Cond:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cond_where(mask: torch.Tensor, a: Cond, b: Cond) -> Cond:
    """Per sample: a where mask is true, else b (label dropout for classifier-free guidance)."""
    return {k: torch.where(mask.reshape(-1, *([1] * (a[k].ndim - 1))), a[k], b[k]) for k in a}


def cond_to(cond: Cond, device) -> Cond:
    return {k: v.to(device) for k, v in cond.items()}


class Backbone(nn.Module):
    """A denoiser of one family in the shared time convention.

    Subclasses set `family`, `schedule`, `latent_shape` (C, H, W), and implement `native`,
    `x0_from_native`, `_encode` (prompts or labels -> Cond), `null` and `decode`. What the engine
    needs to know of a family's network (LoRA targets, GAN feature layer) is asked here too.
    """

    family: str = "abstract"
    schedule: Schedule
    latent_shape: tuple[int, int, int]
    lora_targets: tuple[str, ...] = ()  # module names LoRA adapts by default (peft target_modules)
    probe_prompt = ""  # a prompt (or label) any encoder takes: shape probes (the GAN head's width)

    def __init__(self):
        super().__init__()
        self._cond_cache: dict[str, Cond] = {}

    # -- to implement ------------------------------------------------------------------------------
    def native(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        raise NotImplementedError

    def x0_from_native(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _encode(self, prompts: Sequence) -> Cond:
        raise NotImplementedError

    def null(self, cond: Cond) -> Cond:
        raise NotImplementedError

    def native_at(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The native output at the network's own timestep input, as a diffusers scheduler's
        `timesteps` hold it (the teacher sampler of fewstep.sampling); families that ship a
        diffusers scheduler implement it."""
        raise NotImplementedError(f"{type(self).__name__} ships no diffusers scheduler")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], (B, 3, H, W), float32."""
        raise NotImplementedError

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> latents (training data of the toy teachers, real-image critics)."""
        raise NotImplementedError

    def feature_module(self, layer: int | None = None) -> nn.Module:
        """The module whose output is DMD2's GAN features (the critic's bottleneck, methods/notes/dmd2.md sec. 3.3);
        `layer` picks a transformer block (None: the middle one)."""
        raise NotImplementedError(f"{type(self).__name__} names no GAN feature layer")

    # -- shared ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, guidance: float = 1.0) -> torch.Tensor:
        """Guided x0-prediction D^w = D(null) + w (D(c) - D(null)); w = 1: conditional only."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        if guidance == 1.0:
            return self.x0_from_native(x_t, t, self.native(x_t, t, cond))
        return self.guide(*self.x0_branches(x_t, t, cond), guidance)

    def x0_branches(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond):
        """(D(x_t, t, c), D(x_t, t, null)) from one batched call (methods that use both, e.g. AMD)."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        both = cond_cat([cond, self.null(cond)])
        x_in, t_in = torch.cat([x_t, x_t]), torch.cat([t, t])
        x0_c, x0_u = self.x0_from_native(x_in, t_in, self.native(x_in, t_in, both)).chunk(2)
        return x0_c, x0_u

    def guide(self, x0_c: torch.Tensor, x0_u: torch.Tensor, guidance: float) -> torch.Tensor:
        """D^w = D(null) + w (D(c) - D(null)) in x0 space (sec. 5)."""
        return x0_u + guidance * (x0_c - x0_u)

    def native_target(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The native output that maps to the clean x0: the regression target of a denoising loss.

        x0_from_native is affine in the output o, x0 = a + b o (sec. 5), so
        o* = (x0 - a) / b with a = x0_from_native(o = 0) and b = x0_from_native(o = 1) - a:
        eps for SDXL, eps - x0 for SD3, x0 - eps for SiT, without a per-family formula.
        """
        xd = x_t.double()
        a = self.x0_from_native(xd, t, torch.zeros_like(xd))
        b = self.x0_from_native(xd, t, torch.ones_like(xd)) - a
        return ((x0.double() - a) / b).to(x_t.dtype)

    def encode(self, prompts: Sequence) -> Cond:
        """Conditioning for a prompt set, computed once per distinct set and cached."""
        key = hashlib.sha256("\x1f".join(map(str, prompts)).encode()).hexdigest()
        if key not in self._cond_cache:
            self._cond_cache[key] = self.encode_uncached(prompts)
        return self._cond_cache[key]

    def encode_uncached(self, prompts: Sequence) -> Cond:
        """Conditioning outside the cache: training batches drawn from a large prompt file
        differ every time and would only fill it."""
        with torch.no_grad():
            return self._encode(list(prompts))


def middle_block(blocks: Sequence[nn.Module], layer: int | None = None) -> nn.Module:
    """Transformer block `layer`, or block floor(L/2) when None (DMD2's transformer bottleneck)."""
    return blocks[len(blocks) // 2 if layer is None else layer]
