"""fewstep teacher train|install|check: the toy teachers' recipe and the shipped copies."""
from __future__ import annotations

import shutil
from pathlib import Path

from fewstep.io import atomic_path
from fewstep.registry import BACKBONES


def add_arguments(p):
    p.add_argument("action", choices=["train", "install", "check"],
                   help="train: run the recipe; install: verify the shipped teacher and copy it; "
                        "check: verify a teacher folder's hashes")
    p.add_argument("--family", required=True)
    p.add_argument("--out", help="teacher folder to write (train, install) or check")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")


def run(args):
    import torch

    from fewstep.toy import teachers

    BACKBONES.check(args.family)
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
