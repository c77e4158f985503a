"""The toy teachers: tiny models of each family's real classes, trained on the toy world.

The recipe is the `teacher_train` rule of the DAG (`fewstep teacher train`). Trained teachers
ship in `fewstep/toy/teachers/<family>/` as the family's own save format, with `recipe.json`
holding the recipe, the loss curve summary, the wall time and the sha256 of every file.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fewstep.backbones.base import Backbone, cond_index, cond_where
from fewstep.io import atomic_path, write_json
from fewstep.registry import BACKBONES
from fewstep.toy import world

SHIPPED = Path(__file__).resolve().parent / "teachers"
PROMPT_POOL = 4096      # distinct training prompts encoded once (the grammar has fewer than this)
MAX_TOKENS = 16         # toy prompts are at most 12 words

# Tiny architectures of the real classes, sized for a 2-core CPU (see fewstep/notes/toy-feasibility.md).
TOY_ARCH = {
    "sdxl": dict(width=32, layers_per_block=1),
    "sd3": dict(width=64, layers=4, shift=1.0),
    "sit": dict(hidden=96, depth=4),
}


@dataclass
class Recipe:
    family: str
    resolution: int = 16
    steps: int = 3000
    batch: int = 64
    lr: float = 2e-3
    seed: int = 0
    label_dropout: float = 0.1   # null conditioning rate, so that CFG works (Ho & Salimans)
    ema_decay: float = 0.999
    warmup: int = 100


def build(family: str, resolution: int, seed: int) -> Backbone:
    cls = BACKBONES.get(family)
    kwargs = dict(TOY_ARCH[family], resolution=resolution, pixel_space=True, seed=seed)
    if family == "sit":
        kwargs["num_classes"] = len(world.CLASSES)
    else:
        kwargs["words"] = sorted(world.VOCAB)
        kwargs["max_length"] = MAX_TOKENS
    return cls.tiny(**kwargs)


def training_conditions(backbone: Backbone, family: str, seed: int):
    """(pool of metadata, conditioning for the pool): prompts for text families, labels for SiT."""
    if family == "sit":
        labels = list(range(len(world.CLASSES)))
        return [world.class_meta(y) for y in labels], backbone.encode(labels)
    metas = world.prompt_set("train", n=PROMPT_POOL, seed=seed)
    return metas, backbone.encode([m["prompt"] for m in metas])


def render_training_batch(family, metas, idx, seeds, resolution):
    if family == "sit":
        imgs = np.stack([world.render_class(int(i), int(s), resolution)[0] for i, s in zip(idx, seeds)])
        # convert in numpy: small torch copies are slow on a loaded 2-core machine
        return torch.from_numpy(np.ascontiguousarray(imgs.transpose(0, 3, 1, 2), np.float32) / 255.0)
    return world.render_batch([metas[i] for i in idx], [int(s) for s in seeds], resolution)


def denoising_loss(backbone: Backbone, x0: torch.Tensor, cond, gen: torch.Generator) -> torch.Tensor:
    """MSE on the family's native target (eps / v / SiT velocity), t ~ U(0, 1) away from the ends."""
    b = x0.shape[0]
    t = (1e-3 + (1 - 2e-3) * torch.rand(b, generator=gen)).float()
    eps = torch.randn(x0.shape, generator=gen)
    x_t = backbone.schedule.add_noise(x0, eps, t)
    target = backbone.native_target(x_t, t, x0)
    return torch.nn.functional.mse_loss(backbone.native(x_t, t, cond), target)


def ema_decay(target: float, step: int) -> float:
    """Warm-up of the EMA decay, min(target, (1 + s) / (10 + s)): a short run must not average
    in its first, untrained weights (0.999 ** 1000 = 0.37 of the weight would sit there)."""
    return min(target, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pt in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pt, 1.0 - decay)


def files_sha256(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "recipe.json" and not p.name.startswith(".")}


def train(recipe: Recipe, out: Path, progress: bool = True) -> dict:
    """Train one toy teacher; write it atomically to `out` with its recipe.json."""
    teacher = build(recipe.family, recipe.resolution, recipe.seed)
    ema = build(recipe.family, recipe.resolution, recipe.seed)
    ema.load_state_dict(teacher.state_dict())
    trainable = [p for p in teacher.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / recipe.warmup))
    gen = torch.Generator().manual_seed(recipe.seed)
    metas, pool_cond = training_conditions(teacher, recipe.family, recipe.seed)
    losses, start = [], time.time()
    for step in tqdm(range(recipe.steps), desc=f"teacher {recipe.family}", disable=not progress):
        idx = torch.randint(len(metas), (recipe.batch,), generator=gen)
        seeds = torch.randint(2**31 - 1, (recipe.batch,), generator=gen)
        x0 = teacher.encode_images(render_training_batch(
            recipe.family, metas, idx.tolist(), seeds.tolist(), recipe.resolution))
        cond = cond_index(pool_cond, idx)
        drop = torch.rand(recipe.batch, generator=gen) < recipe.label_dropout
        cond = cond_where(drop, teacher.null(cond), cond)
        loss = denoising_loss(teacher, x0, cond, gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"teacher {recipe.family}: loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        sched.step()
        ema_update(ema, teacher, ema_decay(recipe.ema_decay, step))
        losses.append(loss.item())
    return save(ema, recipe, out, losses, time.time() - start)


def save(teacher: Backbone, recipe: Recipe, out: Path, losses: list[float], wall_s: float) -> dict:
    k = max(1, len(losses) // 10)
    info = {"recipe": asdict(recipe), "wall_seconds": round(wall_s, 1),
            "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k}
    with atomic_path(out) as tmp:
        teacher.save_pretrained(tmp)
        info["sha256"] = files_sha256(tmp)
        write_json(tmp / "recipe.json", info)
    return info


def verify(folder: Path) -> dict:
    """Check a teacher folder against the hashes in its recipe.json; return the recipe info."""
    info_path = Path(folder) / "recipe.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{folder} has no recipe.json: it is not a fewstep toy teacher "
                                "(train one with `fewstep teacher train`)")
    info = json.loads(info_path.read_text())
    actual = files_sha256(Path(folder))
    bad = sorted(set(info["sha256"].items()) ^ set(actual.items()))
    if bad:
        names = sorted({name for name, _ in bad})
        raise ValueError(f"teacher {folder}: files differ from recipe.json hashes: {names}")
    return info


def load(folder: Path, verified: dict | None = None) -> Backbone:
    """Load a teacher after checking its hashes (pass `verified`, verify()'s result, to skip)."""
    info = verified or verify(folder)
    # absolute: a relative folder without a slash ("teacher") would read as a weights-cache name
    return BACKBONES.get(info["recipe"]["family"]).from_pretrained(Path(folder).absolute())
