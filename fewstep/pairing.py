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


def paired(metric_name: str, a: dict, b: dict) -> dict:
    """value(A) - value(B) of one metric with its paired CI (Metric.paired_difference)."""
    from metrics.base import MetricResult

    scoring = {k: v for k, v in a["scoring_args"].items() if k not in ("samples", "out")}
    metric, expected, args = metric_for(metric_name, scoring)
    return metric.paired_difference(
        MetricResult.from_dict(a["results"][metric_name]),
        MetricResult.from_dict(b["results"][metric_name]), a["sample_set"], b["sample_set"],
        expected=expected, resolution=args.resolution, allow_blank=args.allow_blank)
