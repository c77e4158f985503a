"""fewstep teacher train|install|check|link: the toy teachers' recipe and the shipped copies, and
(link) a real teacher's link folder naming its local weights (fewstep.teachers)."""
from __future__ import annotations

import shutil
from pathlib import Path

from fewstep.io import atomic_path
from fewstep.registry import BACKBONES


def add_arguments(p):
    p.add_argument("action", choices=["train", "install", "check", "link"],
                   help="train: run the recipe; install: verify the shipped teacher and copy it; "
                        "check: verify a teacher folder's hashes; link: point a teacher folder at "
                        "a real checkpoint in the weights cache")
    p.add_argument("--family", required=True)
    p.add_argument("--out", help="teacher folder to write (train, install) or check")
    p.add_argument("--resolution", type=int, default=None,
                   help="toy: image size (default 16); link: the resolution to sample at "
                        "(default: the checkpoint's own)")
    p.add_argument("--weights", help="link: a weights-cache name or a path (diffusers folder, or "
                                     "SiT's official .pt)")
    p.add_argument("--dtype", default="bf16", help="link: fp32 | bf16 | fp16")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def link(args):
    from fewstep import teachers

    if not args.weights or not args.out:
        raise ValueError("teacher link needs --weights (a cache name or path) and --out")
    info = teachers.link(args.family, args.weights, args.out, args.dtype, args.resolution)
    print(f"linked {args.family} teacher {info['weights']} ({args.dtype}) -> {args.out}")
    return 0


def run(args):
    import torch

    from fewstep.toy import teachers

    BACKBONES.check(args.family)
    if args.action == "link":
        return link(args)
    args.resolution = args.resolution or 16
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.action == "train":
        recipe = teachers.Recipe(family=args.family, resolution=args.resolution, steps=args.steps,
                                 batch=args.batch, lr=args.lr, seed=args.seed)
        info = teachers.train(recipe, Path(args.out))
        print(f"teacher {args.family}: {args.steps} steps in {info['wall_seconds']} s, "
              f"loss {info['loss_first']:.4f} -> {info['loss_last']:.4f}; wrote {args.out}")
    elif args.action == "install":
        src = teachers.SHIPPED / args.family
        info = teachers.verify(src)
        if info["recipe"]["resolution"] != args.resolution:
            raise ValueError(f"shipped {args.family} teacher is {info['recipe']['resolution']} px "
                             f"but the config asks for {args.resolution} px: set "
                             "teachers.source: train to train one at this resolution")
        with atomic_path(args.out) as tmp:
            shutil.copytree(src, tmp)
        print(f"installed shipped {args.family} teacher (hashes verified) to {args.out}")
    else:
        teachers.verify(Path(args.out or teachers.SHIPPED / args.family))
        print("hashes match recipe.json")
