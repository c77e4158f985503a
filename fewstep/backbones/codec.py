"""Image <-> latent codecs: a diffusers VAE with its scaling/shift factors, or pixel space (toy)."""
from __future__ import annotations

import torch
from torch import nn


class PixelCodec(nn.Module):
    """The toy world's codec: latents are the pixels mapped from [0, 1] to [-1, 1]."""

    downsampling = 1  # image pixels per latent pixel along each side

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2.0 - 1.0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float() + 1.0) / 2.0).clamp(0.0, 1.0)


class VAECodec(nn.Module):
    """AutoencoderKL with latents = (mean - shift) * scale; decode inverts it (run in fp32).

    SDXL: scale 0.13025, no shift; SD3: scale 1.5305, shift 0.0609; SD VAE (SiT): 0.18215.
    The factors are read from the VAE's config when it has them.
    """

    def __init__(self, vae: nn.Module, scaling_factor: float | None = None,
                 shift_factor: float | None = None):
        super().__init__()
        self.vae = vae
        cfg = getattr(vae, "config", None)
        self.scaling_factor = float(scaling_factor if scaling_factor is not None
                                    else getattr(cfg, "scaling_factor", 0.18215))
        sf = shift_factor if shift_factor is not None else getattr(cfg, "shift_factor", None)
        self.shift_factor = float(sf or 0.0)

    @property
    def downsampling(self) -> int:
        """Image pixels per latent pixel along each side: one halving per extra encoder block."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        mean = self.vae.encode(images.float() * 2.0 - 1.0).latent_dist.mean
        return (mean - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.float() / self.scaling_factor + self.shift_factor
        return ((self.vae.decode(z).sample + 1.0) / 2.0).clamp(0.0, 1.0)
