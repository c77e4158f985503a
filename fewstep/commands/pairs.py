"""fewstep pairs: the teacher's deterministic ODE samples for DMD's regression loss
(methods/notes/dmd.md sec. 3.3).

Noise z_ref is drawn per (training prompt, seed) like every sample in the harness; y_ref is the
teacher's n-step deterministic sample from it with the same guidance the DM loss uses
(methods/notes/dmd.md sec. 8, item 7), drawn by the same teacher sampler as the teacher's sample
sets (fewstep.sampling.sample_teacher: the checkpoint's own scheduler by default), which the .json
beside the pairs records. Prompts come from the toy world's training split, never the
held-out evaluation split.
"""
from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p):
    p.add_argument("--teacher", required=True)
    p.add_argument("--count", type=int, required=True, help="number of pairs")
    p.add_argument("--steps", type=int, required=True, help="teacher sampler steps")
    p.add_argument("--guidance", type=float, required=True, help="CFG scale (= the DM teacher's)")
    p.add_argument("--sampler", default="scheduler",
                   help="teacher sampler, as `fewstep sample --sampler`: 'scheduler' (default; the "
                        "checkpoint's own diffusers scheduler) or 'ddim-trailing'")
    p.add_argument("--prompts", default=None,
                   help="training prompt file to draw the pairs' prompts from (required for a real "
                        "teacher; the toy world's training split otherwise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", required=True, help=".safetensors (a .json of prompts is written beside)")


def run(args):
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from fewstep.io import atomic_path, write_json
    from fewstep.noise import sample_noise
    from fewstep.sampling import check_sampler, sample_teacher, sampler_record
    from fewstep import teachers
    from fewstep.train_data import encode_rows

    if args.count < 1:
        raise ValueError(f"--count must be >= 1, got {args.count}")
    check_sampler(args.sampler)
    recipe = teachers.verify(Path(args.teacher))
    teacher = teachers.load(Path(args.teacher), verified=recipe).eval()
    family = recipe["recipe"]["family"]
    metas = pair_prompts(args, family, recipe["recipe"].get("world") == "real")
    zs, ys = [], []
    for i in tqdm(range(0, args.count, args.batch), desc="teacher pairs"):
        chunk = metas[i:i + args.batch]
        z = sample_noise([f"pair-{i + j}" for j in range(len(chunk))], [args.seed] * len(chunk),
                         teacher.latent_shape, stream="pairs")
        cond = encode_rows(teacher, chunk)
        zs.append(z)
        ys.append(sample_teacher(teacher, z, cond, args.steps, args.guidance, args.sampler))
    tensors = {"z": torch.cat(zs), "y": torch.cat(ys).float(),
               "prompt_index": torch.arange(args.count, dtype=torch.int64)}
    with atomic_path(args.out) as tmp:
        save_file(tensors, str(tmp))
    write_json(Path(args.out).with_suffix(".json"),
               {"metas": metas, "steps": args.steps, "guidance": args.guidance, "family": family,
                "teacher_sha256": recipe.get("sha256"),
                "sampler": sampler_record(teacher, args.sampler, args.steps)})
    print(f"wrote {args.count} teacher pairs ({family}, {args.steps} steps, w={args.guidance}) "
          f"to {args.out}")


def pair_prompts(args, family: str, real: bool) -> list[dict]:
    """`count` training rows: drawn without replacement from --prompts (cycled when it holds fewer
    rows, seeded), or the toy world's training split."""
    import random

    from fewstep.errors import FewstepError
    from fewstep.prompts import read_prompts
    from fewstep.toy import world

    if args.prompts:
        rows = read_prompts(args.prompts)
        order = list(range(len(rows)))
        random.Random(args.seed + 1000).shuffle(order)
        return [rows[order[i % len(rows)]] for i in range(args.count)]
    if real:
        raise FewstepError(f"{args.teacher} is a real {family} teacher: give the training prompts "
                           "the pairs are drawn from with --prompts (config: "
                           f"distill/train_data/{family}/prompts)")
    if family == "sit":
        return [world.class_meta(i % len(world.CLASSES)) for i in range(args.count)]
    return world.prompt_set("train", n=args.count, seed=args.seed + 1000)
