"""fewstep score-merge: the score file of a sample set from the partial score files of its K
shards (`fewstep score --partial --samples <shard folder>`), equal to `fewstep score` on the
gathered set: every statistic (FID, precision/recall, diversity, GenEval, bootstrap intervals,
the comparison with the teacher) is computed from the shards' per-image columns, concatenated in
set order. The partials are checked first: one set, each shard once, the same scoring arguments,
their images the gathered set's (fewstep/scoring.py)."""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("--partials", required=True, nargs="+", metavar="FILE",
                   help="the set's K partial score files (fewstep score --partial), in any order")
    p.add_argument("--samples", required=True,
                   help="the gathered sample-set folder (fewstep gather of the scored shards)")
    p.add_argument("--against", nargs="+", default=[],
                   help="the teacher's score .json files of this family, as for fewstep score")
    p.add_argument("--out", required=True, help="the score .json to write")


def run(args):
    from fewstep.scoring import merge_partials

    merge_partials(args)
