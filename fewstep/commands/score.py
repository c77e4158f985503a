"""fewstep score: every configured metric on sample sets of one prompt set, one score .json each.

Several sets in one call (`--samples a b --out a.json b.json`) build the metrics once (feature
net, reference statistics): the DAG scores all of a family's teacher sets in one job. The work is
fewstep.scoring's; this module declares the arguments.

`--partial` scores shard folders (fewstep sample --shard I/K) into partial .npz files, one per
shard: each metric's per-image columns (scores, feature vectors, GenEval rows), never a
statistic; `fewstep score-merge` makes the set's score file from the K partials (equal to this
command on the gathered set).
"""
from __future__ import annotations

import argparse

# metrics.stats.INTERVAL_METHODS and metrics.seed_level.SEED_LEVELS, written out: parsing
# arguments imports no numpy (tests/test_interval_option.py checks they agree)
INTERVAL_METHODS = ("percentile", "bca", "studentized")
SEED_LEVELS = ("t", "bootstrap")


def add_arguments(p):
    p.add_argument("--samples", required=True, nargs="+", help="sample-set folder(s)")
    p.add_argument("--prompts", required=True, help="the prompt .jsonl it was sampled from")
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--feature-net", help="toy feature net (toy_fid)")
    p.add_argument("--reference-images", type=int, default=2000, help="toy_fid reference renders")
    p.add_argument("--cache", default="results/cache")
    p.add_argument("--allow-blank", action="store_true",
                   help="score constant images instead of refusing the set (toy world: an empty "
                        "canvas is a legitimate bad sample)")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--bootstrap-seed", type=int, default=0)
    # absent unless given, so a default score file's scoring_args are what they were before the
    # option; fewstep.scoring.scoring_context reads an absent interval as percentile
    p.add_argument("--interval", choices=INTERVAL_METHODS, default=argparse.SUPPRESS,
                   help="how each CI is read from its bootstrap: percentile (default), bca or "
                        "studentized (set-level statistics without a per-resample standard error "
                        "use bca; FID keeps its recentred percentile interval)")
    p.add_argument("--seed-level", choices=SEED_LEVELS, default=argparse.SUPPRESS,
                   help="the training-seed level of a cell's interval (fewstep aggregate, paired "
                        "cells): t (default; covers with 3 seeds) or bootstrap (the two-stage "
                        "bootstrap, narrow with few seeds); metrics/seed_level.py")
    p.add_argument("--against", nargs="+", default=[],
                   help="the teacher's score .json files of this family: each set is also compared "
                        "with the teacher set at its NFE (or the next one up), paired on the shared "
                        "noise")
    p.add_argument("--metric-options", type=json_object, default={},
                   help='JSON mapping metric -> constructor options, e.g. '
                        '\'{"fid": {"reference": "coco2014-val", "crop": "center"}}\'')
    # absent unless given, so a whole set's score file records its arguments as before
    p.add_argument("--partial", action="store_true", default=argparse.SUPPRESS,
                   help="score shard folders (fewstep sample --shard I/K) into partial score files "
                        "(.npz: per-image scores, features and rows, the shard and the arguments); "
                        "fewstep score-merge makes the set's score file from its K partials")
    p.add_argument("--out", required=True, nargs="+",
                   help="one score .json (with --partial: one partial .npz) per --samples folder")


def json_object(text: str) -> dict:
    import argparse
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def run(args):
    from fewstep.scoring import score_sets

    score_sets(args)
