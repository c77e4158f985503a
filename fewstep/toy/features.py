"""A small CNN trained on toy-world renders whose pooled features define the toy FID.

It plays Inception's part for the toy world: trained on fresh renders to recognise what is in a
scene (which colours, shapes and colour-shape classes are present, how many objects) and which
degradation, if any, was applied (noise, blur, tint, ghosting), so its penultimate features move
when a generator gets shapes, colours or counts wrong, or draws noisy, blurry or tinted images.
Default recipe: about a minute on one CPU thread; QUICK_RECIPE: about ten seconds, for tests.

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
    size: int = 32                            # input resolution the net is trained at
    widths: tuple[int, ...] = (16, 32, 64)    # conv widths; each stage after the first halves H, W
    feature_dim: int = 64                     # penultimate width = FID feature dimension
    colors: tuple[str, ...] = world.COLORS
    shapes: tuple[str, ...] = world.SHAPES
    max_objects: int = world.MAX_OBJECTS
    degradations: tuple[str, ...] = ("clean", "noise", "blur", "tint", "ghost")

    @property
    def labels(self) -> tuple[str, ...]:
        """Presence targets: each colour, each shape, each "colour shape" class."""
        return self.colors + self.shapes + tuple(f"{c} {s}" for c in self.colors for s in self.shapes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FeatureNetConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class TrainRecipe:
    steps: int = 1200
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    single_share: float = 0.35          # share of single-object class renders; the rest are scenes
    degrade_share: float = 0.5          # share of images given a random degradation (quality head)


QUICK_RECIPE = TrainRecipe(steps=200)   # ~10 s: colours, counts, noise and blur; for tests


def _conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
                         nn.GroupNorm(min(8, cout), cout), nn.SiLU())


class ToyFeatureNet(nn.Module):
    """Conv trunk, then (a) a local presence head max-pooled over positions and (b) FID features.

    The local head (one 1x1 conv, max over positions) is what makes small objects learnable in a
    minute: its gradient goes to where the object is. Features = linear map of the trunk's 2x2
    average pool (coarse layout) and global max pool (what is present); the presence and count
    heads on the features make them carry colours, shapes and counts, and the quality head
    (which degradation, if any, was applied) makes them see noise, blur, tints and ghosting,
    which content labels alone ignore and which Inception sees by virtue of natural images.
    """

    def __init__(self, config: FeatureNetConfig):
        super().__init__()
        self.config = config
        layers, cin = [], 3
        for i, width in enumerate(config.widths):
            layers.append(_conv_block(cin, width, 1 if i == 0 else 2))
            if i > 0:
                layers.append(_conv_block(width, width, 1))
            cin = width
        self.trunk = nn.Sequential(*layers)
        n_labels = len(config.labels)
        self.local = nn.Conv2d(cin, n_labels, 1)
        self.embed = nn.Linear(cin * 5, config.feature_dim)
        self.presence = nn.Linear(config.feature_dim, n_labels)
        self.count = nn.Linear(config.feature_dim, config.max_objects + 1)
        self.quality = nn.Linear(config.feature_dim, len(config.degradations))
        self.register_buffer("feature_shift", torch.zeros(config.feature_dim))
        self.register_buffer("feature_scale", torch.ones(()))
        with torch.no_grad():  # start from "mostly absent": most labels are absent in a scene
            self.local.bias.fill_(-3.0)
            self.presence.bias.fill_(-2.0)
        self.sha256 = ""

    def _pooled(self, h: torch.Tensor) -> torch.Tensor:
        layout = F.adaptive_avg_pool2d(h, 2).flatten(1)
        return torch.cat([layout, F.adaptive_max_pool2d(h, 1).flatten(1)], dim=1)

    def features(self, images01: torch.Tensor) -> torch.Tensor:
        """(B, feature_dim) FID features of float images in [0, 1] (calibrated, see below)."""
        raw = self.embed(self._pooled(self.trunk(images01 * 2.0 - 1.0)))
        return (raw - self.feature_shift) / self.feature_scale

    def heads(self, images01: torch.Tensor):
        """Logits: local presence maps (B, labels, h, w) (where each label is, for soft position
        scores: metrics/toy_preference.py), feature presence, object count, degradation kind."""
        h = self.trunk(images01 * 2.0 - 1.0)
        f = F.silu(self.embed(self._pooled(h)))
        return self.local(h), self.presence(f), self.count(f), self.quality(f)

    def forward(self, images01: torch.Tensor):
        """Logits: local presence, feature presence, object count, degradation kind."""
        maps, presence, count, quality = self.heads(images01)
        return maps.amax(dim=(2, 3)), presence, count, quality


# ------------------------------------------------------------------------------------ training

def _targets(objs, config: FeatureNetConfig) -> np.ndarray:
    labels = config.labels
    present = np.zeros(len(labels), np.float32)
    for obj in objs:
        for name in (obj.color, obj.shape, f"{obj.color} {obj.shape}"):
            present[labels.index(name)] = 1.0
    return present


def render_training_batch(rng: np.random.Generator, batch_size: int, recipe: TrainRecipe,
                          config: FeatureNetConfig):
    """Images (B, 3, S, S) in [0, 1], presence targets (B, L) and object counts (B,)."""
    n_single = int(round(batch_size * recipe.single_share))
    scene_seed = int(rng.integers(2**31))
    metas = [world.class_meta(int(k)) for k in rng.integers(len(world.CLASSES), size=n_single)]
    metas += world.prompt_set("train", n=batch_size - n_single, seed=scene_seed)
    seeds = rng.integers(2**31, size=batch_size)
    images, presence, counts = [], [], []
    for meta, seed in zip(metas, seeds):
        image, objs = world.render(meta, int(seed), config.size)
        images.append(image)
        presence.append(_targets(objs, config))
        counts.append(len(objs))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return x, torch.from_numpy(np.stack(presence)), torch.tensor(counts)


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of one (3, H, W) image, radius 2, replicate padding."""
    taps = torch.arange(-2, 3, dtype=image.dtype)
    kernel = torch.exp(-taps**2 / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).repeat(3, 1, 1, 1)          # (3, 1, 1, 5)
    x = F.conv2d(F.pad(image[None], (2, 2, 0, 0), mode="replicate"), kernel, groups=3)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), kernel.transpose(2, 3), groups=3)
    return x[0]


def _degrade_one(image: torch.Tensor, kind: str, other: torch.Tensor, g: torch.Generator):
    u = float(torch.rand((), generator=g))
    if kind == "noise":
        return image + (0.02 + 0.3 * u) * torch.randn(image.shape, generator=g)
    if kind == "blur":
        return _gaussian_blur(image, 0.5 + 1.0 * u)
    if kind == "tint":
        return image + (torch.rand(3, 1, 1, generator=g) - 0.5) * 0.3
    if kind == "ghost":
        return (1 - (0.1 + 0.4 * u)) * image + (0.1 + 0.4 * u) * other
    return image


def degrade_batch(x: torch.Tensor, rng: np.random.Generator, share: float, kinds: tuple[str, ...]):
    """Apply a random degradation of random strength to about `share` of the images.

    Returns the images (re-quantised to 8 bits, as samples are stored) and the kind indices.
    """
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    chosen = np.where(rng.random(len(x)) < share, rng.integers(1, len(kinds), size=len(x)), 0)
    others = x.roll(1, dims=0)
    out = torch.stack([_degrade_one(img, kinds[k], other, g)
                       for img, k, other in zip(x, chosen, others)])
    return torch.round(out.clamp(0, 1) * 255) / 255, torch.from_numpy(chosen)


def _loss(net: ToyFeatureNet, x, presence, counts, quality):
    local, feat, count, kind = net(x)
    return (F.binary_cross_entropy_with_logits(local, presence)
            + F.binary_cross_entropy_with_logits(feat, presence) + F.cross_entropy(count, counts)
            + F.cross_entropy(kind, quality))


def training_batch(rng: np.random.Generator, recipe: TrainRecipe, config: FeatureNetConfig,
                   batch_size: int | None = None):
    x, presence, counts = render_training_batch(rng, batch_size or recipe.batch_size, recipe, config)
    x, quality = degrade_batch(x, rng, recipe.degrade_share, config.degradations)
    return x, presence, counts, quality


@torch.no_grad()
def evaluate_feature_net(net: ToyFeatureNet, n: int = 256, seed: int = 12345) -> dict:
    """Held-out accuracy on fresh renders: class presence and count on clean images (feature
    heads), degradation kind on the recipe's mix of clean and degraded images."""
    net.eval()
    clean_recipe = TrainRecipe(degrade_share=0.0)
    x, presence, counts, _ = training_batch(np.random.default_rng(seed), clean_recipe, net.config, n)
    _, feat, count, _ = net(x)
    n_classes = len(net.config.colors) * len(net.config.shapes)
    exact = ((feat > 0).float() == presence)[:, -n_classes:].all(dim=1).float().mean().item()
    x, _, _, quality = training_batch(np.random.default_rng(seed + 1), TrainRecipe(), net.config, n)
    kind = net(x)[3]
    return {"class_presence_exact": round(exact, 4),
            "count_accuracy": round((count.argmax(1) == counts).float().mean().item(), 4),
            "degradation_accuracy": round((kind.argmax(1) == quality).float().mean().item(), 4)}


@torch.no_grad()
def calibrate_features(net: ToyFeatureNet, n: int = 512, seed: int = 54321) -> None:
    """Set the feature shift/scale so clean renders give zero-mean features of unit mean variance.

    Raw features have an arbitrary scale; KID's cubic kernel (x.y/d + 1)^3 assumes x.y/d of order
    one (as for Inception's pooled features), and a fixed scale makes FID magnitudes comparable
    between retrained nets. The buffers are weights: saved, loaded and hashed with the rest.
    """
    net.eval()
    net.feature_shift.zero_()
    net.feature_scale.fill_(1.0)
    x = training_batch(np.random.default_rng(seed), TrainRecipe(degrade_share=0.0), net.config, n)[0]
    raw = net.features(x)
    net.feature_shift.copy_(raw.mean(dim=0))
    net.feature_scale.fill_(float((raw - raw.mean(dim=0)).pow(2).mean().sqrt()))


def train_feature_net(steps: int | None = None, seed: int = 0, size: int = 32, *,
                      recipe: TrainRecipe | None = None, threads: int | None = 1,
                      verbose: bool = False) -> ToyFeatureNet:
    """Train on fresh renders every step (single objects and train-split scenes); eval mode out.

    steps/seed override the recipe's (default: TrainRecipe(), about a minute on 2 CPU cores).
    threads: torch intra-op threads while training (restored after). These convolutions are too
    small to gain from a second thread, and on a shared 2-core machine one thread is ~2x faster.
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _train(recipe or TrainRecipe(), steps, seed, size, verbose)
    finally:
        torch.set_num_threads(previous)


def _train(recipe: TrainRecipe, steps, seed, size, verbose) -> ToyFeatureNet:
    recipe = TrainRecipe(**{**asdict(recipe), "seed": seed, **({"steps": steps} if steps else {})})
    if recipe.steps < 1 or recipe.batch_size < 2:
        raise ValueError(f"recipe needs steps >= 1 and batch_size >= 2; got {recipe}")
    config = FeatureNetConfig(size=size)
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    net = ToyFeatureNet(config)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps)
    start = time.time()
    net.train()
    for step in range(recipe.steps):
        loss = _loss(net, *training_batch(rng, recipe, config))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if verbose and (step % 100 == 0 or step == recipe.steps - 1):
            print(f"feature net step {step}: loss {loss.item():.4f} ({time.time() - start:.1f}s)")
    calibrate_features(net)
    net.recipe = asdict(recipe)
    net.train_summary = {"final_loss": round(loss.item(), 5), "seconds": round(time.time() - start, 1),
                         **evaluate_feature_net(net)}
    net.sha256 = feature_net_hash(net)
    return net


# --------------------------------------------------------------------------- identity and files

def _full_config(net: ToyFeatureNet) -> dict:
    return {"version": FEATURE_NET_VERSION, "net": net.config.to_dict(),
            "recipe": getattr(net, "recipe", None),
            "train_summary": getattr(net, "train_summary", None)}


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


# ------------------------------------------------------------------------- the shipped net

# The toy FID's extractor is fixed, as Inception's weights are for FID: the shipped net was trained
# once with the default recipe (`fewstep features --size 16 --steps 1200 --seed 0 --out F`), so toy
# FIDs compare across runs, machines and torch versions. The nets behind the toy stand-ins for the
# HPSv2 and ImageReward slots (metrics/toy_preference.py) are the same recipe with seeds 2 and 3;
# the training reward of AMD/RTDMD (metrics/toy_reward.py) is seed 1, trained in the DAG by the
# reward_net rule (`fewstep features --size 16 --steps 1200 --seed 1`, bit-identical to the shipped
# "reward" file on one CPU thread), so no metric shares weights with it. The shipped "reward" file
# lets `fewstep metric-corr` and the tests score the training reward without training it. What
# each one rewards differs too (a different formula on different heads): see those modules. Each
# file's hash is pinned here.
SHIPPED_DIR = Path(__file__).parent / "feature_nets"
SHIPPED_SEEDS = {"fid": 0, "reward": 1, "hps": 2, "imagereward": 3}
SHIPPED_FILES = {"fid": "toy_feature_net_{size}.safetensors",
                 "reward": "toy_reward_net_{size}.safetensors",
                 "hps": "toy_pref_hps_{size}.safetensors",
                 "imagereward": "toy_pref_imagereward_{size}.safetensors"}
SHIPPED_SHA256 = {
    ("fid", 16): "e2bcdefb596301a584146552dee04401ade85657cfc44dd43597b5e6bd9163b3",
    ("reward", 16): "9e8a273bfe15e43fe6c5a4352f30643074aaaea965e28d434925cf7b33901a0e",
    ("hps", 16): "b8678d8909a84cd8e6d3e9a130a9cb46970126be7e777720c4b2e7f9f2c5e218",
    ("imagereward", 16): "4eaad8f76857a786e6dafd5da0b58056e1e0f1c47fdfab3b6497210dde3eba11",
}


def shipped_feature_net(size: int, role: str = "fid") -> Path:
    """Path of a shipped net (role fid | reward | hps | imagereward) for this image size,
    verified against the pinned hash."""
    if role not in SHIPPED_FILES:
        raise ValueError(f"unknown shipped toy net role {role!r}; one of {sorted(SHIPPED_FILES)}")
    if (role, size) not in SHIPPED_SHA256:
        shipped = sorted(s for r, s in SHIPPED_SHA256 if r == role)
        raise ValueError(f"no shipped toy {role} net for {size} px images (shipped: {shipped}): "
                         "set fid.feature_net: train in the config")
    path = SHIPPED_DIR / SHIPPED_FILES[role].format(size=size)
    if not path.is_file():
        raise FileNotFoundError(f"shipped toy {role} net missing: expected {path} (reinstall "
                                "fewstep, or set fid.feature_net: train)")
    net = load_feature_net(path)
    pinned = SHIPPED_SHA256[(role, size)]
    if net.sha256 != pinned:
        raise ValueError(f"{path}: hash {net.sha256[:12]} is not the pinned {pinned[:12]}; the "
                         "shipped file was replaced")
    return path


# --------------------------------------------------------------- clean-fid extractor contract

class ToyFeatureExtractor:
    """clean-fid custom feature extractor: float (B, 3, S, S) in [0, 255] -> torch (B, D).

    clean-fid calls it under no_grad after moving the batch to the device (fid.get_batch_features),
    with images already resized by the resizer it was given (here: size S of the net).
    """

    def __init__(self, net: ToyFeatureNet, threads: int | None = 1):
        self.net = net.eval()
        self.size = net.config.size
        self.sha256 = net.sha256 or feature_net_hash(net)
        self.name = f"toy-feature-net-{FEATURE_NET_VERSION}"
        self.threads = threads  # CPU intra-op threads per call (see train_feature_net); None: leave

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim != 4 or tuple(batch.shape[1:]) != (3, self.size, self.size):
            raise ValueError(f"toy extractor expects (B, 3, {self.size}, {self.size}) batches, got "
                             f"{tuple(batch.shape)}; pass custom_fn_resize to resize to {self.size}")
        if float(batch.max()) <= 1.0:
            raise ValueError("batch looks like [0, 1] images; clean-fid's contract is [0, 255]")
        self.net.to(batch.device)
        previous = torch.get_num_threads()
        if self.threads and batch.device.type == "cpu":
            torch.set_num_threads(self.threads)
        try:
            with torch.no_grad():
                return self.net.features(batch.float() / 255.0)
        finally:
            torch.set_num_threads(previous)


def toy_feature_extractor(net: ToyFeatureNet, threads: int | None = 1) -> ToyFeatureExtractor:
    return ToyFeatureExtractor(net, threads)
