"""fewstep aggregate: a cell's replicate score files (one per training seed, or a released
checkpoint's) into the cell's aggregate score file: the mean over training seeds with an interval
that resamples training seeds and then prompts, the per-seed values, and the paired comparison with
the teacher at the same NFE (fewstep.cells)."""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("--replicates", nargs="+", required=True,
                   help="the cell's replicate score .json files (fewstep score), one per seed")
    p.add_argument("--training-seeds", nargs="+", required=True,
                   help="the training seed of each replicate, in order (`released` for a "
                        "released checkpoint)")
    p.add_argument("--against", nargs="*", default=[],
                   help="the family's teacher score .json files (the comparison at the same NFE)")
    p.add_argument("--out", required=True, help="the cell's aggregate score .json")


def parse_seed(text: str) -> int | None:
    from fewstep.planning import RELEASED

    if text == RELEASED:
        return None
    if not text.isdigit():
        raise ValueError(f"--training-seeds: {text!r} is not a seed (a non-negative integer) "
                         f"or {RELEASED!r}")
    return int(text)


def run(args):
    import json
    from pathlib import Path

    from fewstep.cells import aggregate
    from fewstep.io import write_json

    seeds = [parse_seed(s) for s in args.training_seeds]
    rows = [json.loads(Path(f).read_text()) for f in args.replicates]
    teachers = [json.loads(Path(f).read_text()) for f in args.against]
    cell = aggregate(rows, seeds, args.replicates, teachers)
    write_json(args.out, cell)
    for name, res in cell["results"].items():
        seeds_text = ", ".join(f"{v:.4g}" for v in res["details"].get("per_seed", {}).values())
        print(f"{cell['family']}/{cell['method']} {name}: {res['value']:.4f} "
              f"[{res['ci_low']:.4f}, {res['ci_high']:.4f}] seeds: {seeds_text}")
