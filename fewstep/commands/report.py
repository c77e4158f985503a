"""fewstep report: the leaderboard, one row per (family, method, steps), with CIs and arrows, the
static HTML report (fewstep.reporting: this module declares the arguments and the paths) and the
fidelity ledger of the methods it shows (--fidelity)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from fewstep.io import write_text
from fewstep.reporting.leaderboard import leaderboard, load_rows

EXPERIMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # as the config schema's mlflow/experiment


def add_arguments(p):
    p.add_argument("--scores", nargs="+", required=True, help="score .json files (fewstep score)")
    p.add_argument("--out", required=True, help="leaderboard .md to write")
    p.add_argument("--html", help="folder of the static HTML report (index.html + img/)")
    p.add_argument("--experiment", default="toy", help="the HTML report's title")
    p.add_argument("--verdicts", help="fewstep audit's verdicts .json, shown in the HTML report")
    p.add_argument("--fidelity", help="write the fidelity ledger of every method in the scores "
                                      "here (Markdown, e.g. reports/fidelity.md)")
    p.add_argument("--no-dmd2-pairs", action="store_true",
                   help="skip the paired differences against DMD2 (they rescore feature metrics)")


def html_folder(html: str, board: str) -> Path:
    """The HTML report's folder: a child of the leaderboard's folder (reports/<experiment>), never
    that folder itself or anything above it (the atomic write would replace what is there)."""
    folder, parent = Path(os.path.abspath(html)), Path(os.path.abspath(board)).parent
    if folder.parent != parent or not EXPERIMENT.fullmatch(folder.name):
        raise ValueError(f"--html {html}: the HTML report's folder must lie inside {parent.name}/ "
                         f"(the leaderboard's folder), named like an experiment, e.g. "
                         f"{parent.name}/fewstep-toy")
    return folder


def run(args):
    rows = load_rows(args.scores)
    text = leaderboard(rows)
    html = html_folder(args.html, args.out) if args.html else None  # checked before any write
    write_text(args.out, text)
    print(f"wrote {args.out} ({len(rows)} rows)")
    if args.fidelity:
        from fewstep.fidelity import markdown

        write_text(args.fidelity, markdown(sorted({r["method"] for r in rows
                                                   if r["method"] != "teacher"})) + "\n")
        print(f"wrote {args.fidelity}")
    if html:
        from fewstep.pairing import paired
        from fewstep.reporting.page import build

        verdicts = json.loads(Path(args.verdicts).read_text()) if args.verdicts else None
        index = build(rows, html, args.experiment, verdicts,
                      None if args.no_dmd2_pairs else paired, protect=[html.parent])
        print(f"wrote {index}")
