"""Benchmark (prints figures; not a test): how good a toy teacher gets with training length,
resolution and patch size, to size the teachers' retraining (fewstep/toy/teachers.py).

Trains one toy teacher from scratch with the shipped recipe's loss (`teachers.denoising_loss`, label
dropout 0.1, EMA with warm-up, AdamW, linear warm-up of 100 steps) and, at each checkpoint, samples
108 images of the family's evaluation conditions (SiT: its 18 classes; text families: the eval
split's prompts) with the teacher sampler (32 steps, CFG 2) and counts the images whose detected
objects (`fewstep.toy.detector`, score >= 0.3, GenEval's confidence) are exactly the prompt's
classes and counts: a quick proxy of toy GenEval that ignores colour and position. Saves a grid per
checkpoint. Runs on a GPU with --device cuda.

    .venv/bin/python tests/benchmarks/bench_teacher_capacity.py sit --steps 8000 \
        --checkpoints 1000 2000 4000 8000 [--resolution 32 --patch 4] [--device cuda]
"""
from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import numpy as np
import torch

from fewstep.backbones.base import cond_index, cond_where
from fewstep.sampling import sample_teacher
from fewstep.toy import detector, teachers, world

N_EVAL = 108


def eval_conditions(family: str) -> tuple[list[dict], list]:
    if family == "sit":
        labels = [i % len(world.CLASSES) for i in range(N_EVAL)]
        return [world.class_meta(y) for y in labels], labels
    metas = (world.prompt_set("eval") * N_EVAL)[:N_EVAL]
    return metas, [m["prompt"] for m in metas]


def exact_classes(image: np.ndarray, meta: dict) -> bool:
    found = collections.Counter(d.cls for d in detector.detect(image) if d.score >= 0.3)
    wanted = collections.Counter(c["class"] for c in meta["include"] for _ in range(c["count"]))
    return found == wanted


@torch.no_grad()
def evaluate(ema, family: str, out: Path, step: int, device) -> str:
    metas, conditions = eval_conditions(family)
    ema.eval()
    noise = torch.randn((N_EVAL, *ema.latent_shape), generator=torch.Generator().manual_seed(1))
    images = ema.decode(sample_teacher(ema, noise.to(device), ema.encode(conditions), 32, 2.0))
    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    per_task = collections.Counter()
    for image, meta in zip(arr, metas):
        per_task[meta["tag"]] += exact_classes(image, meta)
    rows = [np.concatenate(list(arr[i * 12:(i + 1) * 12]), 1) for i in range(N_EVAL // 12)]
    from PIL import Image
    Image.fromarray(np.concatenate(rows, 0)).save(out / f"step{step}.png")
    ema.train()
    tasks = collections.Counter(m["tag"] for m in metas)
    return (f"{sum(per_task.values())}/{N_EVAL} exact classes; "
            + ", ".join(f"{t} {per_task[t]}/{n}" for t, n in sorted(tasks.items())))


def train(a) -> None:
    arch = dict(teachers.TOY_ARCH[a.family])
    if a.patch:
        arch["patch_size"] = a.patch
    teachers.TOY_ARCH[a.family] = arch  # this process only: the shipped recipe is untouched
    model = teachers.build(a.family, a.resolution, 0).to(a.device)
    ema = teachers.build(a.family, a.resolution, 0).to(a.device)
    ema.load_state_dict(model.state_dict())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    metas, pool = teachers.training_conditions(model, a.family, 0)
    a.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for step in range(1, a.steps + 1):
        idx = torch.randint(len(metas), (a.batch,), generator=gen)
        seeds = torch.randint(2**31 - 1, (a.batch,), generator=gen)
        x0 = model.encode_images(teachers.render_training_batch(
            a.family, metas, idx.tolist(), seeds.tolist(), a.resolution).to(a.device))
        drop = torch.rand(a.batch, generator=gen) < 0.1
        cond = cond_index(pool, idx)
        cond = cond_where(drop, model.null(cond), cond)
        for group in opt.param_groups:
            group["lr"] = a.lr * min(1.0, step / 100)
        loss = teachers.denoising_loss(model, x0, cond, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        teachers.ema_update(ema, model, teachers.ema_decay(0.999, step))
        if step in a.checkpoints:
            seconds = time.perf_counter() - start
            print(f"{a.family} {a.resolution} px patch {arch.get('patch_size', 'default')} step "
                  f"{step} ({seconds:.0f} s, loss {loss.item():.4f}): "
                  f"{evaluate(ema, a.family, a.out, step, a.device)}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("family", choices=sorted(teachers.TOY_ARCH))
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--checkpoints", type=int, nargs="+", default=[1000, 2000, 4000])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--patch", type=int, default=None, help="transformer patch size (SiT)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("/tmp/fewstep-teacher-capacity"))
    a = p.parse_args()
    if a.patch and a.family != "sit":
        p.error("--patch sets the SiT transformer's patch size; the toy SDXL/SD3 builds fix theirs")
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               "unknown CPU")
    flags = "AVX-512" if "avx512f" in Path("/proc/cpuinfo").read_text() else "AVX2"
    print(f"device {a.device}; CPU {cpu}, {flags}; threads {torch.get_num_threads()}")
    train(a)


if __name__ == "__main__":
    main()
