"""fewstep fid-ref: build FID reference statistics once, before scoring fans out.

Toy (`--metric toy_fid`, default): the family's reference renders through the toy feature net.
Real (`--metric fid`): the reference image folder (`reference` option: a name under
$FEWSTEP_WEIGHTS/refs/ or a path) through clean-fid's Inception at the evaluation resolution and
crop policy of the score step's options; features are cached per (reference listing, resolution,
crop, mode, Inception hash), so the score jobs read them instead of recomputing.
"""
from __future__ import annotations

import json


def add_arguments(p):
    p.add_argument("--metric", choices=["toy_fid", "fid"], default="toy_fid")
    p.add_argument("--prompts", help="toy_fid: the family's prompt .jsonl")
    p.add_argument("--feature-net", help="toy_fid: the toy feature net")
    p.add_argument("--images", type=int, help="toy_fid: reference renders in all")
    p.add_argument("--metric-options", type=json.loads, default={},
                   help='fid: its options as JSON, e.g. \'{"reference": "coco2014-val", '
                        '"crop": "center", "eval_resolution": 512}\'')
    p.add_argument("--resolution", type=int, required=True,
                   help="toy_fid: image size; fid: the samples' size (eval_resolution wins)")
    p.add_argument("--cache", default="results/cache", help="where reference statistics live")
    p.add_argument("--out", required=True, help="stamp .json naming the statistics built")


def toy_reference(args):
    """The toy FID's reference statistics, built as the score step's toy FID builds them (its
    feature net, renders per prompt and cache from the job, ToyFID.context_defaults)."""
    from types import SimpleNamespace

    from fewstep.prompts import read_prompts
    from metrics.fid import ToyFID

    job = SimpleNamespace(prompts=args.prompts, prompt_rows=read_prompts(args.prompts),
                          feature_net=args.feature_net, reference_images=args.images,
                          cache=args.cache)
    return ToyFID(**ToyFID.context_defaults(job)).reference(args.resolution)


def real_reference(options: dict, resolution: int, cache: str):
    from metrics.fid import FID

    FID.check_options(options, "fid")
    metric = FID(**{"cache_dir": cache, **options})
    return metric.reference_stats(metric.eval_resolution or resolution)


def run(args):
    from fewstep.io import write_json

    if args.metric == "fid":
        ref = real_reference(args.metric_options, args.resolution, args.cache)
    else:
        missing = [f"--{n}" for n in ("prompts", "feature-net", "images")
                   if getattr(args, n.replace("-", "_")) is None]
        if missing:
            raise ValueError(f"toy_fid reference statistics need {' '.join(missing)}")
        ref = toy_reference(args)
    write_json(args.out, {"identity": ref.identity, "stats_sha256": ref.stats_sha256,
                          "n_reference": int(len(ref.features))})
    print(f"reference statistics {ref.stats_sha256[:12]} from {len(ref.features)} images")
