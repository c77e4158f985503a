"""Paired differences between two scored sample sets of one family (shared prompts, seeds and
per-sample noise), each metric rebuilt from the score file's own scoring arguments so that the
comparison runs under exactly the protocol that produced the scores (the audit, the HTML report).
Layer: evaluation, beside fewstep.scoring (tests/test_import_contract.py)."""
from __future__ import annotations

import argparse
import json

_BUILT: dict[str, tuple] = {}  # metric + scoring arguments -> (metric, expected grid, args)


def metric_for(metric_name: str, scoring_args: dict):
    """(metric, expected (prompt_id, seed) grid, args), built once per protocol in a process
    (a feature net and reference statistics are loaded once for many pairs)."""
    from fewstep.prompts import read_prompts
    from fewstep.scoring import build_metric

    key = json.dumps([metric_name, scoring_args], sort_keys=True, default=str)
    if key not in _BUILT:
        args = argparse.Namespace(**{"metric_options": {}, **scoring_args})
        rows = read_prompts(args.prompts)
        metric = build_metric(metric_name, args, rows)
        expected = [(r["prompt_id"], s) for r in rows for s in args.seeds]
        _BUILT[key] = (metric, expected, args)
    return _BUILT[key]


def load_kwargs(expected, args) -> dict:
    """How a metric reloads a scored set: its (prompt_id, seed) grid, resolution and blank rule."""
    return dict(expected=expected, resolution=args.resolution, allow_blank=args.allow_blank)


def cell_of(row: dict, metric_name: str) -> list[tuple]:
    """[(MetricResult, sample-set folder)] of a score row: every replicate of a cell's aggregate
    (fewstep.cells), or the row itself (a teacher set, a single score file)."""
    from metrics.base import MetricResult

    if "replicates" not in row:
        return [(MetricResult.from_dict(row["results"][metric_name]), row["sample_set"])]
    out = []
    for rep in row["replicates"]:
        with open(rep["score_file"]) as f:  # closed at once: a report reads many of them
            replicate = json.load(f)
        out.append((MetricResult.from_dict(replicate["results"][metric_name]),
                    replicate["sample_set"]))
    return out


def paired(metric_name: str, a: dict, b: dict) -> dict:
    """value(A) - value(B) of one metric with its paired CI, A and B each a cell of one or more
    training seeds (Metric.paired_difference_cells: one seed each is the plain paired bootstrap
    over prompts; more resample training seeds too). Adds each side's training-seed count."""
    scoring = {k: v for k, v in a["scoring_args"].items() if k not in ("samples", "out")}
    metric, expected, args = metric_for(metric_name, scoring)
    out = metric.paired_difference_cells(cell_of(a, metric_name), cell_of(b, metric_name),
                                         **load_kwargs(expected, args))
    return {**out, "n_training_seeds": {"a": a.get("n_training_seeds"),
                                        "b": b.get("n_training_seeds")}}
