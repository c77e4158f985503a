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


def real_reference(options: dict, resolution: int, cache: str):
    from fewstep.config import check_metric_options
    from metrics.fid import FID

    check_metric_options("fid", options)
    metric = FID(**{"cache_dir": cache, **options})
    return metric.reference_stats(metric.eval_resolution or resolution)


def run(args):
    from fewstep.io import write_json
    from fewstep.scoring import toy_fid

    if args.metric == "fid":
        ref = real_reference(args.metric_options, args.resolution, args.cache)
    else:
        missing = [f"--{n}" for n in ("prompts", "feature-net", "images")
                   if getattr(args, n.replace("-", "_")) is None]
        if missing:
            raise ValueError(f"toy_fid reference statistics need {' '.join(missing)}")
        ref = toy_fid(args.prompts, args.feature_net, args.images, args.cache).reference(
            args.resolution)
    write_json(args.out, {"identity": ref.identity, "stats_sha256": ref.stats_sha256,
                          "n_reference": int(len(ref.features))})
    print(f"reference statistics {ref.stats_sha256[:12]} from {len(ref.features)} images")
