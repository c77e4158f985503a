"""A small CNN trained on toy-world renders whose pooled features define the toy FID.

It plays Inception's part for the toy world: trained to recognise what is in a scene (which
colour-shape classes are present, and how many objects there are), so its penultimate features
move when a generator gets shapes, colours or counts wrong, or draws blurry or noisy images.

The network is identified by a sha256 over its config and weights; the FID identity records it.
Files are safetensors with the config and the hash in the metadata; loading re-checks the hash.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fewstep.toy import world

FEATURE_NET_VERSION = "1"


@dataclass(frozen=True)
class FeatureNetConfig:
    size: int = 32                      # input resolution the net is trained at
    widths: tuple[int, ...] = (24, 48, 64)   # conv widths; each stage after the first halves H, W
    feature_dim: int = 64               # penultimate width = FID feature dimension
    classes: tuple[str, ...] = world.CLASSES  # "colour shape" names, one presence output each
    max_objects: int = world.MAX_OBJECTS

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FeatureNetConfig":
        data = dict(data)
        data["widths"], data["classes"] = tuple(data["widths"]), tuple(data["classes"])
        return cls(**data)


@dataclass(frozen=True)
class TrainRecipe:
    steps: int = 700
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    single_share: float = 0.35          # share of single-object class renders; the rest are scenes


QUICK_RECIPE = TrainRecipe(steps=120, batch_size=48)   # seconds; for tests


def _conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
                         nn.GroupNorm(min(8, cout), cout), nn.SiLU())


class ToyFeatureNet(nn.Module):
    """Conv trunk -> 2x2 average pool (keeps coarse layout) -> linear features -> two heads."""

    def __init__(self, config: FeatureNetConfig):
        super().__init__()
        self.config = config
        layers, cin = [], 3
        for i, width in enumerate(config.widths):
            layers += [_conv_block(cin, width, 1 if i == 0 else 2), _conv_block(width, width, 1)]
            cin = width
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Linear(cin * 4, config.feature_dim)
        self.presence = nn.Linear(config.feature_dim, len(config.classes))
        self.count = nn.Linear(config.feature_dim, config.max_objects + 1)
        self.sha256 = ""

    def features(self, images01: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) features of float images in [0, 1]."""
        h = self.trunk(images01 * 2.0 - 1.0)
        return self.embed(F.adaptive_avg_pool2d(h, 2).flatten(1))

    def forward(self, images01: torch.Tensor):
        h = F.silu(self.features(images01))
        return self.presence(h), self.count(h)


# ------------------------------------------------------------------------------------ training

def _targets(objs, classes: tuple[str, ...]) -> tuple[np.ndarray, int]:
    present = np.zeros(len(classes), np.float32)
    for obj in objs:
        present[classes.index(f"{obj.color} {obj.shape}")] = 1.0
    return present, len(objs)


def render_training_batch(rng: np.random.Generator, batch_size: int, recipe: TrainRecipe,
                          config: FeatureNetConfig):
    """Images (B, 3, S, S) in [0, 1], presence targets (B, C) and object counts (B,)."""
    n_single = int(round(batch_size * recipe.single_share))
    scene_seed = int(rng.integers(2**31))
    metas = [world.class_meta(int(k)) for k in rng.integers(len(world.CLASSES), size=n_single)]
    metas += world.prompt_set("train", n=batch_size - n_single, seed=scene_seed)
    seeds = rng.integers(2**31, size=batch_size)
    images, presence, counts = [], [], []
    for meta, seed in zip(metas, seeds):
        image, objs = world.render(meta, int(seed), config.size)
        p, c = _targets(objs, config.classes)
        images.append(image), presence.append(p), counts.append(c)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return x, torch.from_numpy(np.stack(presence)), torch.tensor(counts)


def _loss(net: ToyFeatureNet, x, presence, counts):
    logits_p, logits_c = net(x)
    return F.binary_cross_entropy_with_logits(logits_p, presence) + F.cross_entropy(logits_c, counts)


@torch.no_grad()
def evaluate_feature_net(net: ToyFeatureNet, n: int = 256, seed: int = 12345) -> dict:
    """Held-out accuracy: exact presence vector and object count (renders the net never saw)."""
    net.eval()
    x, presence, counts = render_training_batch(np.random.default_rng(seed), n, TrainRecipe(),
                                                net.config)
    logits_p, logits_c = net(x)
    exact = ((logits_p > 0).float() == presence).all(dim=1).float().mean().item()
    count_acc = (logits_c.argmax(1) == counts).float().mean().item()
    return {"presence_exact": round(exact, 4), "count_accuracy": round(count_acc, 4)}


def train_feature_net(steps: int | None = None, seed: int = 0, size: int = 32, *,
                      recipe: TrainRecipe | None = None, config: FeatureNetConfig | None = None,
                      verbose: bool = False) -> ToyFeatureNet:
    """Train on fresh renders every step (single objects and train-split scenes); eval mode out."""
    recipe = recipe or TrainRecipe()
    recipe = TrainRecipe(**{**asdict(recipe), "seed": seed, **({"steps": steps} if steps else {})})
    config = config or FeatureNetConfig(size=size)
    if config.size != size:
        raise ValueError(f"config.size {config.size} != size {size}; pass one of them")
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    net = ToyFeatureNet(config)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps)
    start = time.time()
    net.train()
    for step in range(recipe.steps):
        loss = _loss(net, *render_training_batch(rng, recipe.batch_size, recipe, config))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if verbose and (step % 100 == 0 or step == recipe.steps - 1):
            print(f"feature net step {step}: loss {loss.item():.4f} ({time.time() - start:.1f}s)")
    net.eval()
    net.recipe = asdict(recipe)
    net.train_summary = {"final_loss": round(loss.item(), 5), "seconds": round(time.time() - start, 1),
                         **evaluate_feature_net(net)}
    net.sha256 = feature_net_hash(net)
    return net


# --------------------------------------------------------------------------- identity and files

def _full_config(net: ToyFeatureNet) -> dict:
    return {"version": FEATURE_NET_VERSION, "net": net.config.to_dict(),
            "recipe": getattr(net, "recipe", None), "train_summary": getattr(net, "train_summary", None)}


def feature_net_hash(net: ToyFeatureNet) -> str:
    """sha256 over the architecture config and the weights (name, dtype, shape, bytes, sorted)."""
    h = hashlib.sha256(json.dumps({"version": FEATURE_NET_VERSION, "net": net.config.to_dict()},
                                  sort_keys=True).encode())
    for name, tensor in sorted(net.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_feature_net(net: ToyFeatureNet, path) -> Path:
    """Write a safetensors file atomically, with config and sha256 in its metadata."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"config": json.dumps(_full_config(net), sort_keys=True), "sha256": feature_net_hash(net)}
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_feature_net(path) -> ToyFeatureNet:
    """Load and verify: the recomputed sha256 must equal the one stored in the file."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "config" not in meta or "sha256" not in meta:
        raise ValueError(f"{path} is not a toy feature-net file (no config/sha256 metadata); "
                         "write it with save_feature_net")
    full = json.loads(meta["config"])
    net = ToyFeatureNet(FeatureNetConfig.from_dict(full["net"]))
    net.load_state_dict(load_file(str(path)), strict=True)
    net.recipe, net.train_summary = full.get("recipe"), full.get("train_summary")
    net.sha256 = feature_net_hash(net)
    if net.sha256 != meta["sha256"]:
        raise ValueError(f"{path}: weights hash {net.sha256[:12]} differs from the stored "
                         f"{meta['sha256'][:12]}; the file is corrupt or was edited, retrain it")
    return net.eval()


# --------------------------------------------------------------- clean-fid extractor contract

class ToyFeatureExtractor:
    """clean-fid custom feature extractor: float (B, 3, S, S) in [0, 255] -> torch (B, D).

    clean-fid calls it under no_grad after moving the batch to the device (fid.get_batch_features),
    with images already resized by the resizer it was given (here: size S of the net).
    """

    def __init__(self, net: ToyFeatureNet):
        self.net = net.eval()
        self.size = net.config.size
        self.sha256 = net.sha256 or feature_net_hash(net)
        self.name = f"toy-feature-net-{FEATURE_NET_VERSION}"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, self.size, self.size):
            raise ValueError(f"toy extractor expects (B, 3, {self.size}, {self.size}) batches, got "
                             f"{tuple(batch.shape)}; pass custom_fn_resize to resize to {self.size}")
        if float(batch.max()) <= 1.0:
            raise ValueError("batch looks like [0, 1] images; clean-fid's contract is [0, 255]")
        self.net.to(batch.device)
        with torch.no_grad():
            return self.net.features(batch.float() / 255.0)


def toy_feature_extractor(net: ToyFeatureNet) -> ToyFeatureExtractor:
    return ToyFeatureExtractor(net)
