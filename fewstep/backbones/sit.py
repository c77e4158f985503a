"""The SiT family: a class-conditional DiT transformer trained on the linear interpolant.

Time and sign (derived from willisma/SiT transport/path.py, class ICPlan, and
transport/transport.py, Transport.sample/training_losses):
  upstream draws x1 = data, x0 = noise (we write eps), t_SiT ~ U[0, 1], and builds
      x = alpha(t_SiT) x1 + sigma(t_SiT) x0  with  alpha = t_SiT, sigma = 1 - t_SiT,
  so t_SiT = 1 is data. The regression target is d x / d t_SiT = x1 - x0, i.e. u = data - eps.
  With our t = 1 - t_SiT (t = 1 is noise): x_t = (1 - t) x0 + t eps, and the network predicts
  u = x0 - eps. Then x_t + t u = (1 - t) x0 + t eps + t x0 - t eps = x0, hence
      x0 = x_t + t u      (FlowSchedule.x0_from_sit_u; fewstep/notes/conventions.md sec. 4).
  The network's time input is t_SiT itself, unscaled (the ODE/SDE samplers pass it as is).

Guidance: applied in x0 space on all channels (exact, fewstep/notes/conventions.md sec. 5). The
option `sit_cfg_first3_channels` reproduces upstream forward_with_cfg, which guides output channels
0-2 only and keeps the conditional prediction elsewhere (discussed on the facebookresearch/DiT
tracker).
"""
from __future__ import annotations

import json
import operator
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fewstep.backbones.base import Backbone, Cond, cond_cat, middle_block
from fewstep.backbones.codec import PixelCodec, VAECodec
from fewstep.backbones.sit_net import (SIT_CONFIGS, SiTConfig, SiTNet,
                                       convert_official_sit_state_dict, infer_official_config)
from fewstep.backbones.weights import require_files, resolve, under
from fewstep.schedule import FlowSchedule

__all__ = ["SiTBackbone", "SiTConfig", "SiTNet", "SIT_CONFIGS", "convert_official_sit_state_dict",
           "OFFICIAL_CHECKPOINT", "DEFAULT_VAE", "SD_VAE_SCALE"]

OFFICIAL_CHECKPOINT = "SiT-XL-2-256x256.pt"  # the file released with willisma/SiT (download.py)
DEFAULT_VAE = "sd-vae-ft-ema"  # looked up in the weights cache when no VAE folder is given
OFFICIAL_CHECKPOINT_SOURCE = "willisma/SiT release (its download.py fetches SiT-XL-2-256x256.pt)"
DEFAULT_VAE_SOURCE = "Hugging Face stabilityai/sd-vae-ft-ema (diffusers folder)"
VAE_FILES = ["config.json", "diffusion_pytorch_model.safetensors|diffusion_pytorch_model.bin"]
SD_VAE_SCALE = 0.18215  # latent scale hard-coded by upstream sample.py
CONFIG_FILE, WEIGHTS_FILE, VAE_DIR = "config.json", "model.safetensors", "vae"
FORMAT_VERSION = 1
OFFICIAL_SUFFIXES = (".pt", ".pth", ".ckpt")


class SiTBackbone(Backbone):
    """x0(x_t, t, cond, guidance) for a SiT network; cond = {"y": class ids}, null = num_classes."""

    family = "sit"
    lora_targets = ("qkv", "attn_out", "mlp_in", "mlp_out")  # attention and MLP projections
    probe_prompt = 0  # class 0: SiT conditions on labels, not text

    def __init__(self, net: SiTNet, codec: nn.Module | None = None,
                 sit_cfg_first3_channels: bool = False):
        super().__init__()
        self.net = net
        self.codec = codec if codec is not None else PixelCodec()
        self.schedule = FlowSchedule()
        self.sit_cfg_first3_channels = bool(sit_cfg_first3_channels)
        cfg = net.config
        self.num_classes = cfg.num_classes  # the null label; a plain int (stubbed nets in tests)
        self.latent_shape = (cfg.in_channels, cfg.input_size, cfg.input_size)

    @property
    def denoiser(self) -> nn.Module:
        """The trainable network (what methods fine-tune and checkpoints store)."""
        return self.net

    @property
    def pixel_space(self) -> bool:
        return isinstance(self.codec, PixelCodec)

    # -- the network in its own convention ---------------------------------------------------------
    def native(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """SiT velocity u = x0 - eps (first C channels), evaluated at t_SiT = 1 - t."""
        t_sit = FlowSchedule.sit_time(torch.as_tensor(t, dtype=torch.float64,
                                                      device=x_t.device).expand(x_t.shape[0]))
        dtype = next(self.net.parameters()).dtype
        return self.net(x_t.to(dtype), t_sit.float(), _labels_of(cond))

    def x0_from_native(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # float32 at least: the conversion itself runs in float64 inside the schedule
        return FlowSchedule.x0_from_sit_u(_at_least_fp32(x_t), out, t)

    def guide(self, x0_c: torch.Tensor, x0_u: torch.Tensor, guidance: float) -> torch.Tensor:
        guided = super().guide(x0_c, x0_u, guidance)
        if not self.sit_cfg_first3_channels:
            return guided
        # upstream: channels 0-2 guided, the others keep the conditional branch. x0 is affine in
        # u channel by channel, so doing this in x0 space equals doing it on the velocity.
        return torch.cat([guided[:, :3], x0_c[:, 3:]], dim=1)

    # -- conditions --------------------------------------------------------------------------------
    def _encode(self, labels: Sequence) -> Cond:
        ids = [_label_id(label, i, self.num_classes) for i, label in enumerate(labels)]
        return {"y": torch.tensor(ids, dtype=torch.long, device=self.device)}

    def null(self, cond: Cond) -> Cond:
        return {"y": torch.full_like(_labels_of(cond), self.num_classes)}

    # -- images ------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.pixel_space and latents.shape[1] != 3:
            raise ValueError(f"this SiT backbone works in pixel space with {latents.shape[1]} "
                             "channels, which are not an RGB image; build it with in_channels=3 "
                             "or give it a VAE")
        return self.codec.decode(latents)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(images)

    def feature_module(self, layer: int | None = None) -> nn.Module:
        """Transformer block `layer` (None: floor(L/2)); its tokens are the GAN feature."""
        return middle_block(self.denoiser.blocks, layer)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, resolution: int = 32, in_channels: int = 3, num_classes: int = 10,
             pixel_space: bool = True, depth: int = 2, hidden: int = 64, num_heads: int = 4,
             patch_size: int = 2, learn_sigma: bool = True, adaln_zero: bool = True,
             seed: int = 0, sit_cfg_first3_channels: bool = False) -> "SiTBackbone":
        """A small random SiT of the same classes (toy world, tests). pixel_space=False adds a
        tiny random AutoencoderKL that halves the resolution. adaln_zero=False makes the fresh
        network's output non-zero (tests)."""
        size = resolution if pixel_space else resolution // 2
        config = SiTConfig(input_size=size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden, depth=depth, num_heads=num_heads,
                           num_classes=num_classes, learn_sigma=learn_sigma)
        with torch.random.fork_rng(devices=[]):  # seeded build, caller's RNG stream untouched
            torch.manual_seed(seed)
            codec = PixelCodec() if pixel_space else VAECodec(_tiny_vae(in_channels, resolution),
                                                              scaling_factor=SD_VAE_SCALE)
            net = SiTNet(config, adaln_zero=adaln_zero)
        return cls(net, codec, sit_cfg_first3_channels)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write config.json + model.safetensors (+ vae/ as a diffusers folder)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"family": self.family, "format_version": FORMAT_VERSION,
                "network": self.net.config.to_dict(),
                "codec": "pixel" if self.pixel_space else "vae",
                "vae_scaling_factor": None if self.pixel_space else self.codec.scaling_factor,
                "sit_cfg_first3_channels": self.sit_cfg_first3_channels}
        if not self.pixel_space:
            self.codec.vae.save_pretrained(path / VAE_DIR)
        state = {k: v.detach().contiguous().cpu() for k, v in self.net.state_dict().items()}
        _atomic(path / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        _atomic(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2)))
        return path

    @classmethod
    def required_weights(cls) -> list[tuple[str, str]]:
        """(entry under the weights cache, source) of the files the official route needs: the
        checkpoint and the default VAE folder (what `fewstep weights check` lists)."""
        vae = [(under(DEFAULT_VAE, f), DEFAULT_VAE_SOURCE) for f in VAE_FILES]
        return [(OFFICIAL_CHECKPOINT, OFFICIAL_CHECKPOINT_SOURCE), *vae]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, vae: str | os.PathLike | None = None,
                        pixel_space: bool = False, num_heads: int | None = None,
                        prefer: str = "ema", sit_cfg_first3_channels: bool | None = None
                        ) -> "SiTBackbone":
        """Load (a) a folder written by save_pretrained, or (b) an official SiT checkpoint file
        (e.g. SiT-XL-2-256x256.pt) with a VAE folder: `vae`, else `sd-vae-ft-ema` in the weights
        cache; pixel_space=True uses no VAE. A bare name (no folder part) is looked up in the
        weights cache ($FEWSTEP_WEIGHTS), any other path is used as is."""
        where = Path(resolve(path))
        if where.is_dir() or not where.suffix:
            return _load_own_folder(cls, where, vae, sit_cfg_first3_channels)
        if where.suffix not in OFFICIAL_SUFFIXES:
            raise ValueError(f"{where}: expected a folder written by save_pretrained or an "
                             f"official SiT checkpoint file ({', '.join(OFFICIAL_SUFFIXES)})")
        require_files(where.parent, [where.name], "official SiT checkpoint")
        net = _load_official_net(where, num_heads, prefer)
        codec = PixelCodec() if pixel_space else _load_vae_codec(vae if vae is not None
                                                                 else DEFAULT_VAE)
        if pixel_space and net.config.in_channels != 3:
            raise ValueError(f"pixel_space=True needs a 3-channel network; {where.name} has "
                             f"{net.config.in_channels} channels (latent space): give a VAE "
                             "instead")
        return cls(net, codec, bool(sit_cfg_first3_channels))


# Helpers -----------------------------------------------------------------------------------------
def _labels_of(cond: Cond) -> torch.Tensor:
    if not isinstance(cond, dict) or "y" not in cond:
        got = sorted(cond) if isinstance(cond, dict) else type(cond).__name__
        raise ValueError(f"SiT condition must be {{'y': class ids}} (from backbone.encode(labels));"
                         f" got {got}")
    return cond["y"]


def _label_id(label, position: int, num_classes: int) -> int:
    """An integer class id, or a string holding one, checked against 0..num_classes-1."""
    value = label.item() if isinstance(label, torch.Tensor) and label.numel() == 1 else label
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    try:
        if isinstance(value, bool):
            raise TypeError("a bool is not a class id")
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"SiT label at position {position} is {label!r}; SiT is class-conditional:"
                         f" pass integer class ids 0..{num_classes - 1} (or strings of them)"
                         ) from None
    if not 0 <= value < num_classes:
        raise ValueError(f"SiT label at position {position} is {value}, outside "
                         f"0..{num_classes - 1}"
                         f" (the null label {num_classes} is added by guidance, not passed in)")
    return value


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _atomic(target: Path, write) -> None:
    tmp = target.with_name(target.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, target)


def _tiny_vae(latent_channels: int, resolution: int) -> nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, sample_size=resolution)


def _load_vae_codec(folder: str | os.PathLike, scaling_factor: float = SD_VAE_SCALE) -> VAECodec:
    folder = require_files(resolve(folder), VAE_FILES, "SD VAE (diffusers AutoencoderKL folder)")
    from diffusers import AutoencoderKL  # heavy: only after the files are known to be there

    vae = AutoencoderKL.from_pretrained(folder).eval()
    return VAECodec(vae, scaling_factor=scaling_factor, shift_factor=0.0)


def _load_own_folder(cls, folder: Path, vae, first3: bool | None) -> SiTBackbone:
    from safetensors.torch import load_file

    require_files(folder, [CONFIG_FILE, WEIGHTS_FILE], "SiT backbone folder (save_pretrained)")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    if meta.get("family") != "sit":
        raise ValueError(f"{folder / CONFIG_FILE} is for family {meta.get('family')!r}, not 'sit'")
    net = SiTNet(SiTConfig.from_dict(meta["network"]))
    _load_into(net, load_file(str(folder / WEIGHTS_FILE)), folder / WEIGHTS_FILE)
    if meta.get("codec") == "vae" or vae is not None:
        codec = _load_vae_codec(vae if vae is not None else folder / VAE_DIR,
                                meta.get("vae_scaling_factor") or SD_VAE_SCALE)
    else:
        codec = PixelCodec()
    flag = meta.get("sit_cfg_first3_channels", False) if first3 is None else first3
    return cls(net, codec, flag)


def _load_official_net(file: Path, num_heads: int | None, prefer: str) -> SiTNet:
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # pickles with non-tensor objects (train.py's "args") land here
        raise ValueError(f"cannot read {file} as a tensor-only checkpoint ({err}). If it is a "
                         "train.py checkpoint you trust, re-save its 'ema' state dict alone with "
                         "torch.save and load that file") from err
    net = SiTNet(infer_official_config(ckpt, num_heads))
    _load_into(net, convert_official_sit_state_dict(ckpt, prefer), file)
    return net


def _load_into(net: SiTNet, state: dict, source: Path) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"weights in {source} do not fit the SiT config {net.config}: "
                         f"{err}") from err
    net.eval()
