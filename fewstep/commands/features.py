"""fewstep features: the toy feature extractor of the toy FID (install the shipped one, or train)."""
from __future__ import annotations

import shutil

from fewstep.io import atomic_path


def add_arguments(p):
    p.add_argument("--source", choices=["shipped", "train"], default="train",
                   help="shipped: verify the packaged net (fixed weights, comparable FIDs) and copy "
                        "it; train: run the recipe")
    p.add_argument("--role", choices=["fid", "reward"], default="fid",
                   help="which shipped net (--source shipped): the toy FID's extractor (seed 0) or "
                        "the reward-guided methods' toy reward net (seed 1)")
    p.add_argument("--size", type=int, default=16, help="image size the extractor sees")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    p.add_argument("--out", required=True, help=".safetensors file to write")


def run(args):
    from fewstep.provenance import record
    from fewstep.toy.features import (feature_net_hash, load_feature_net, save_feature_net,
                                      shipped_feature_net, train_feature_net)

    if args.source == "shipped":
        source = shipped_feature_net(args.size, args.role)
        with atomic_path(args.out) as tmp:
            shutil.copyfile(source, tmp)
        net = load_feature_net(args.out)
    else:
        net = train_feature_net(steps=args.steps, seed=args.seed, size=args.size, verbose=True)
        with atomic_path(args.out) as tmp:
            save_feature_net(net, tmp)
    record(f"{args.out}.provenance.json", vars(args), seeds=[args.seed],
           sha256=feature_net_hash(net), recipe=net.recipe)
    print(f"wrote toy feature net {feature_net_hash(net)[:12]} ({args.source}) to {args.out}")
