"""fewstep audit: the papers' claims (reports/claims.yaml) judged against the score files.

Relative claims need paired differences between two sample sets; each metric is rebuilt from
the score file's own scoring arguments (prompts, seeds, resolution, feature net, options), so the
comparison uses exactly the protocol that produced the scores.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p):
    p.add_argument("--claims", default="reports/claims.yaml")
    p.add_argument("--scores", nargs="+", required=True, help="score .json files (fewstep score)")
    p.add_argument("--out", required=True, help="the audit as Markdown")
    p.add_argument("--json", help="the verdicts as JSON (for MLflow and the HTML report)")


def paired(metric_name: str, a: dict, b: dict) -> dict:
    """Paired difference A - B of one metric, with the metric built as the scorer built it."""
    from fewstep.commands.score import build_metric
    from fewstep.prompts import read_prompts
    from metrics.base import MetricResult

    args = argparse.Namespace(**{"metric_options": {}, **a["scoring_args"]})
    rows = read_prompts(args.prompts)
    metric = build_metric(metric_name, args, all("class_label" in r for r in rows))
    expected = [(r["prompt_id"], s) for r in rows for s in args.seeds]
    return metric.paired_difference(
        MetricResult.from_dict(a["results"][metric_name]),
        MetricResult.from_dict(b["results"][metric_name]), a["sample_set"], b["sample_set"],
        expected=expected, resolution=args.resolution, allow_blank=args.allow_blank)


def run(args):
    from fewstep import audit
    from fewstep.io import write_json, write_text

    claims, defaults = audit.load_claims(args.claims)
    rows = []
    for path in args.scores:
        row = json.loads(Path(path).read_text())
        row["score_file"] = str(path)
        rows.append(row)
    verdicts = audit.audit(claims, rows, defaults, paired)
    write_text(args.out, audit.render(claims, verdicts, defaults))
    if args.json:
        write_json(args.json, [vars(v) for v in verdicts])
    for v in verdicts:
        print(f"{v.claim_id} [{v.world}]: {v.verdict}")
