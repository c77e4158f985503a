"""fewstep audit: the papers' claims (reports/claims.yaml) judged against the score files.

Relative claims need paired differences between two sample sets (fewstep.pairing: each metric
rebuilt from the score file's own scoring arguments).
"""
from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p):
    p.add_argument("--claims", default="reports/claims.yaml")
    p.add_argument("--scores", nargs="+", required=True, help="score .json files (fewstep score)")
    p.add_argument("--out", required=True, help="the audit as Markdown")
    p.add_argument("--json", help="the verdicts as JSON (for MLflow and the HTML report)")


def run(args):
    from fewstep import audit
    from fewstep.io import write_json, write_text
    from fewstep.pairing import paired

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
