"""fewstep fid-ref: build a family's toy FID reference statistics once, before scoring fans out."""
from __future__ import annotations

import math


def add_arguments(p):
    p.add_argument("--prompts", required=True, help="the family's prompt .jsonl")
    p.add_argument("--feature-net", required=True)
    p.add_argument("--images", type=int, required=True, help="reference renders in all")
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--cache", default="results/cache", help="where reference statistics live")
    p.add_argument("--out", required=True, help="stamp .json naming the statistics built")


def toy_fid(prompts: str, feature_net: str, images: int, cache: str):
    from fewstep.prompts import read_prompts
    from metrics.fid import ToyFID

    per_prompt = math.ceil(images / len(read_prompts(prompts)))
    return ToyFID(feature_net=feature_net, reference_prompts=prompts,
                  renders_per_prompt=per_prompt, cache_dir=cache)


def run(args):
    from fewstep.io import write_json

    metric = toy_fid(args.prompts, args.feature_net, args.images, args.cache)
    ref = metric.reference(args.resolution)
    write_json(args.out, {"identity": ref.identity, "stats_sha256": ref.stats_sha256,
                          "n_reference": int(len(ref.features))})
    print(f"reference statistics {ref.stats_sha256[:12]} from {len(ref.features)} renders")
