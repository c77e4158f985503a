"""The SiT network (a DiT transformer) and the conversion from the official SiT checkpoint.

Architecture as described by the DiT paper (Peebles & Xie, arXiv 2212.09748, "adaLN-Zero" blocks)
and implemented in the official code (facebookresearch/DiT models.py; willisma/SiT models.py is the
same network): patchify with a strided convolution, add a fixed 2D sine-cosine position table,
condition every block on c = embed(t) + embed(label) through a shift/scale/gate modulation, then a
modulated final linear layer and unpatchify. This is our own module with our own parameter names;
`convert_official_sit_state_dict` maps the official names onto it.

Why not diffusers' DiTTransformer2DModel: its timestep embedding divides the frequency exponent by
(half - 1) (Timesteps(downscale_freq_shift=1)) where DiT/SiT divide by half, so official weights
would see slightly wrong time features; it also gives every block its own copy of the time and
label embedders. Neither matches SiT's math or layout exactly.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

FREQ_DIM = 256  # width of the sinusoidal time features before the time MLP (official value)
MAX_PERIOD = 10000.0

# Named sizes of the SiT paper (Ma et al., arXiv 2401.08740, Table 1), identical to DiT's.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
SIT_CONFIGS = {f"SiT-{name}/{p}": {"depth": d, "hidden_size": h, "num_heads": nh, "patch_size": p}
               for name, (d, h, nh) in _SIZES.items() for p in (2, 4, 8)}


@dataclass(frozen=True)
class SiTConfig:
    """Shape of a SiT network. Defaults are SiT-XL/2 at 256x256 (32x32x4 SD-VAE latents)."""

    input_size: int = 32          # latent height = width
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000       # the label embedding has one more row: the null class
    learn_sigma: bool = True      # network emits 2C channels; only the first C are used
    class_dropout_prob: float = 0.1  # used by drop_labels() in training, never implicitly

    def __post_init__(self):
        problems = []
        if self.input_size % self.patch_size:
            problems.append(f"input_size {self.input_size} is not a multiple of patch_size "
                            f"{self.patch_size}")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not a multiple of num_heads "
                            f"{self.num_heads}")
        if self.hidden_size % 4:
            problems.append(f"hidden_size {self.hidden_size} must be a multiple of 4 "
                            "(the 2D sine-cosine table splits it in four)")
        if min(self.input_size, self.patch_size, self.in_channels, self.depth,
               self.num_classes) < 1:
            problems.append("input_size, patch_size, in_channels, depth, num_classes must be >= 1")
        if problems:
            raise ValueError("SiTConfig: " + "; ".join(problems) + ". Fix these fields.")

    @classmethod
    def from_dict(cls, d: dict) -> "SiTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"SiTConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    @classmethod
    def named(cls, name: str, **overrides) -> "SiTConfig":
        if name not in SIT_CONFIGS:
            raise ValueError(f"unknown SiT size {name!r}; choose one of {sorted(SIT_CONFIGS)}")
        return cls(**{**SIT_CONFIGS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size


# Fixed embeddings --------------------------------------------------------------------------------
def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer position code: [sin(p w_k), cos(p w_k)], w_k = 10000^(-k/(dim/2)) (MAE/DiT)."""
    k = torch.arange(dim // 2, dtype=torch.float64)
    omega = 1.0 / MAX_PERIOD ** (k / (dim / 2))
    angles = positions.double().reshape(-1, 1) * omega
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d_table(hidden: int, grid: int) -> torch.Tensor:
    """(grid*grid, hidden) table, tokens in row-major order. As in the MAE/DiT code, the first half
    of the channels encodes the column index and the second half the row index."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = torch.cat([sincos_1d(cols, hidden // 2), sincos_1d(rows, hidden // 2)], dim=1)
    return table.float()


def time_features(t: torch.Tensor, dim: int = FREQ_DIM) -> torch.Tensor:
    """[cos(t f_k), sin(t f_k)], f_k = exp(-ln(10000) k / (dim/2)): the GLIDE/DiT timestep code.

    SiT feeds its own time t_SiT in [0, 1] here unscaled (willisma/SiT transport passes it as is).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    angles = t.float().reshape(-1, 1) * freqs
    out = torch.cat([angles.cos(), angles.sin()], dim=1)
    return F.pad(out, (0, dim % 2))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# Network -----------------------------------------------------------------------------------------
class SiTBlock(nn.Module):
    """Pre-norm transformer block whose LayerNorms are modulated (shift, scale) by the condition
    and whose residual branches are gated; the gates start at zero (adaLN-Zero, DiT sec. 3.2)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.mlp_in = nn.Linear(hidden, int(hidden * mlp_ratio))
        self.mlp_out = nn.Linear(int(hidden * mlp_ratio), hidden)
        self.modulation = nn.Linear(hidden, 6 * hidden)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # qkv features are laid out (3, heads, head_dim), as in timm's Attention
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.attn_out(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.modulation(F.silu(c)).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attention(modulate(_norm(x), sh1, sc1))
        h = self.mlp_out(F.gelu(self.mlp_in(modulate(_norm(x), sh2, sc2)), approximate="tanh"))
        return x + g2.unsqueeze(1) * h


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)  # no affine: adaLN provides shift and scale


class SiTNet(nn.Module):
    """forward(x, t_sit, y) -> the SiT velocity (first C channels); forward_full keeps all 2C."""

    def __init__(self, config: SiTConfig, adaln_zero: bool = True):
        super().__init__()
        self.config = cfg = config
        h, p = cfg.hidden_size, cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, h, kernel_size=p, stride=p)
        # fixed, rebuilt from the config: never saved, checked against official checkpoints
        self.register_buffer("pos_embed", sincos_2d_table(h, cfg.grid)[None], persistent=False)
        self.time_in = nn.Linear(FREQ_DIM, h)
        self.time_out = nn.Linear(h, h)
        self.label_embed = nn.Embedding(cfg.num_classes + 1, h)  # row num_classes = null label
        self.blocks = nn.ModuleList(SiTBlock(h, cfg.num_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.depth))
        self.final_modulation = nn.Linear(h, 2 * h)
        self.final_linear = nn.Linear(h, p * p * cfg.out_channels)
        self.init_weights(adaln_zero)

    @torch.no_grad()
    def init_weights(self, adaln_zero: bool = True):
        """DiT's initialisation; adaln_zero=False leaves the modulations random (tests)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.label_embed.weight, std=0.02)
        nn.init.normal_(self.time_in.weight, std=0.02)
        nn.init.normal_(self.time_out.weight, std=0.02)
        if adaln_zero:
            zeroed = [b.modulation for b in self.blocks] + [self.final_modulation,
                                                            self.final_linear]
            for m in zeroed:
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def condition(self, t_sit: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        temb = self.time_out(F.silu(self.time_in(time_features(t_sit).to(self.time_in.weight))))
        return temb + self.label_embed(y)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) with features ordered (p_row, p_col, C) -> (B, C, H, W)."""
        b, g, p, c = x.shape[0], self.config.grid, self.config.patch_size, self.config.out_channels
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, g * p, g * p)

    def forward_full(self, x: torch.Tensor, t_sit: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._check_input(x, y)
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        c = self.condition(t_sit, y)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_modulation(F.silu(c)).chunk(2, dim=1)
        return self.unpatchify(self.final_linear(modulate(_norm(tokens), shift, scale)))

    def forward(self, x: torch.Tensor, t_sit: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.forward_full(x, t_sit, y)
        return out[:, : self.config.in_channels]  # learn_sigma: the variance half is unused

    def drop_labels(self, y: torch.Tensor, prob: float | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace labels by the null class with probability `prob` (CFG training).

        Explicit instead of upstream's implicit train-mode dropout, so a critic trained in train
        mode never silently loses its labels."""
        prob = self.config.class_dropout_prob if prob is None else prob
        drop = torch.rand(y.shape, generator=generator, device=y.device) < prob
        return torch.where(drop, torch.full_like(y, self.config.num_classes), y)

    def _check_input(self, x: torch.Tensor, y: torch.Tensor):
        cfg = self.config
        want = (cfg.in_channels, cfg.input_size, cfg.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"SiT input has shape {tuple(x.shape)}; this network expects "
                             f"(B, {want[0]}, {want[1]}, {want[2]})")
        if y.dtype not in (torch.int64, torch.int32) or y.shape != x.shape[:1]:
            raise ValueError(f"SiT labels must be integer class ids of shape ({x.shape[0]},); got "
                             f"{y.dtype} {tuple(y.shape)}")


# Official checkpoint conversion ------------------------------------------------------------------
# ours <- official (willisma/SiT models.py; timm PatchEmbed/Attention/Mlp sub-module names)
_GLOBAL_KEYS = {
    "patch_embed.{}": "x_embedder.proj.{}",
    "time_in.{}": "t_embedder.mlp.0.{}",
    "time_out.{}": "t_embedder.mlp.2.{}",
    "final_modulation.{}": "final_layer.adaLN_modulation.1.{}",
    "final_linear.{}": "final_layer.linear.{}",
}
_BLOCK_KEYS = {
    "qkv.{}": "attn.qkv.{}",
    "attn_out.{}": "attn.proj.{}",
    "mlp_in.{}": "mlp.fc1.{}",
    "mlp_out.{}": "mlp.fc2.{}",
    "modulation.{}": "adaLN_modulation.1.{}",
}
_OFFICIAL_LABEL_KEY = "y_embedder.embedding_table.weight"
_OFFICIAL_POS_KEY = "pos_embed"


def official_to_ours_names(depth: int) -> dict[str, str]:
    """official key -> our key, for a network of `depth` blocks."""
    names = {_OFFICIAL_LABEL_KEY: "label_embed.weight"}
    for ours, theirs in _GLOBAL_KEYS.items():
        for kind in ("weight", "bias"):
            names[theirs.format(kind)] = ours.format(kind)
    for i in range(depth):
        for ours, theirs in _BLOCK_KEYS.items():
            for kind in ("weight", "bias"):
                names[f"blocks.{i}." + theirs.format(kind)] = f"blocks.{i}." + ours.format(kind)
    return names


def unwrap_official_checkpoint(ckpt: dict, prefer: str = "ema") -> dict:
    """A train.py checkpoint holds {"model", "ema", "opt", "args"}; released files are plain state
    dicts. Pick `prefer` ("ema" as upstream's find_model does, or "model")."""
    if prefer not in ("ema", "model"):
        raise ValueError(f"prefer={prefer!r}: use 'ema' or 'model'")
    if not isinstance(ckpt, dict):
        raise TypeError(f"an official SiT checkpoint is a dict, got {type(ckpt).__name__}")
    for key in (prefer, "ema", "model"):
        if isinstance(ckpt.get(key), dict):
            return ckpt[key]
    return ckpt


def official_depth(sd: dict) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not idx:
        raise ValueError("official SiT state dict has no 'blocks.<i>.' keys; is this a SiT "
                         f"checkpoint? First keys: {sorted(sd)[:8]}")
    return max(idx) + 1


def infer_official_config(sd: dict, num_heads: int | None = None) -> SiTConfig:
    """Read the network shape from an official state dict; heads come from the named sizes
    (they leave no trace in the weights) unless `num_heads` is given."""
    sd = unwrap_official_checkpoint(sd)
    need = ["x_embedder.proj.weight", _OFFICIAL_LABEL_KEY, "final_layer.linear.weight",
            _OFFICIAL_POS_KEY]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"official SiT state dict lacks {missing}; cannot infer its shape")
    hidden, in_ch, p, _ = sd["x_embedder.proj.weight"].shape
    out = sd["final_layer.linear.weight"].shape[0] // (p * p)
    depth = official_depth(sd)
    grid = int(round(math.sqrt(sd[_OFFICIAL_POS_KEY].shape[-2])))
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden if "blocks.0.mlp.fc1.weight" in sd \
        else 4.0
    if num_heads is None:
        match = [v["num_heads"] for v in SIT_CONFIGS.values()
                 if (v["depth"], v["hidden_size"], v["patch_size"]) == (depth, hidden, p)]
        if not match:
            raise ValueError(f"official SiT checkpoint (depth {depth}, hidden {hidden}, patch {p}) "
                             "is not a named SiT size; pass num_heads= explicitly")
        num_heads = match[0]
    return SiTConfig(input_size=grid * p, patch_size=p, in_channels=in_ch, hidden_size=hidden,
                     depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                     num_classes=sd[_OFFICIAL_LABEL_KEY].shape[0] - 1,
                     learn_sigma=out == 2 * in_ch)


def convert_official_sit_state_dict(sd: dict, prefer: str = "ema") -> dict[str, torch.Tensor]:
    """Official SiT/DiT state dict (or a train.py checkpoint) -> our SiTNet state dict.

    pos_embed is a fixed sine-cosine table in the official model; we rebuild it from the config,
    so here it is only checked against our table (a mismatch means a different grid or layout).
    Unknown or missing keys raise a ValueError listing them.
    """
    sd = unwrap_official_checkpoint(sd, prefer)
    names = official_to_ours_names(official_depth(sd))
    unknown = sorted(k for k in sd if k not in names and k != _OFFICIAL_POS_KEY)
    missing = sorted(k for k in names if k not in sd)
    if unknown or missing:
        raise ValueError(
            "cannot convert this official SiT state dict: "
            + (f"unexpected keys {unknown[:20]}{' ...' if len(unknown) > 20 else ''}; " if unknown
               else "")
            + (f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}; " if missing
               else "")
            + "expected the layout of willisma/SiT models.py (x_embedder, t_embedder, "
              "y_embedder, blocks.<i>.{attn,mlp,adaLN_modulation}, final_layer, pos_embed)")
    if _OFFICIAL_POS_KEY in sd:
        _check_pos_embed(sd[_OFFICIAL_POS_KEY])
    return {ours: sd[theirs] for theirs, ours in names.items()}


def _check_pos_embed(pos: torch.Tensor):
    n, hidden = pos.shape[-2], pos.shape[-1]
    grid = int(round(math.sqrt(n)))
    if grid * grid != n:
        raise ValueError(f"official pos_embed has {n} tokens, not a square grid")
    ours = sincos_2d_table(hidden, grid)
    err = (pos.reshape(n, hidden).float() - ours).abs().max().item()
    if err > 1e-4:
        raise ValueError(f"official pos_embed differs from the 2D sine-cosine table (max error "
                         f"{err:.3g}); the checkpoint uses another position layout")
