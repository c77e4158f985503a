"""The HTML page of one experiment: `build(rows, out_dir, ...)` writes index.html and img/*.png
atomically (the folder appears complete or not at all)."""
from __future__ import annotations

import html
import json
from pathlib import Path

from fewstep.reporting import figures, tables

STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;
margin:1em 0;font-size:13px}td,th{border:1px solid #bbb;padding:3px 6px;text-align:right}
th{background:#eee}caption{text-align:left;font-size:12px;color:#555}.ci{color:#666;font-size:11px}
.leak{background:#c00;color:#fff;padding:0 3px;border-radius:3px;font-size:10px}.na{color:#999}
.dev{background:#b60;color:#fff;padding:0 3px;border-radius:3px;font-size:10px}
.devnotes{font-size:12px;color:#444}.seeds{display:block;color:#666;font-size:10px}
.covers{font-size:12px;color:#444}
.better{background:#e3f6e3}.worse{background:#f9e0e0}.tie{background:#f7f7f7}
.plots img{margin:4px;border:1px solid #ddd}td:first-child{text-align:left}"""
# the headless-browser test reads this marker: how many images decoded, out of how many
CHECK_IMAGES = """<script>window.addEventListener('load',function(){var i=document.images,ok=0;
for(var k=0;k<i.length;k++){if(i[k].complete&&i[k].naturalWidth>0){ok++;}}
document.body.setAttribute('data-images-ok',ok+'/'+i.length);});</script>"""


def ordered(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["method"] != "teacher", r["method"], r.get("steps") or 0))


def against_teacher_pairs(rows):
    out = []
    for s in (r for r in rows if r["method"] != "teacher"):
        against = s.get("against_teacher") or {}
        label = f"teacher NFE {against.get('teacher_nfe', '-')} ({against.get('match', 'not run')})"
        out.append((s, label, against.get("metrics")))
    return out


def against_dmd2_pairs(rows, metrics, pair):
    """Each student against DMD2 of the same family, paired on the shared noise."""
    dmd2 = next((r for r in rows if r["method"] == "dmd2"), None)
    if dmd2 is None or pair is None:
        return []
    out = []
    for s in (r for r in rows if r["method"] not in ("teacher", "dmd2")):
        diffs = {m: pair(m, s, dmd2) for m in metrics if m in s["results"] and m in dmd2["results"]}
        out.append((s, f"DMD2 NFE {dmd2['nfe']}", diffs))
    return out


def family_section(family, rows, metrics, img: Path, pair, notes) -> list[str]:
    parts = [f"<h2>{html.escape(family)}</h2>", tables.leaderboard(rows, metrics, notes)]
    teacher_pairs = against_teacher_pairs(rows)
    if teacher_pairs:
        parts.append(tables.paired_table(teacher_pairs, metrics, "the teacher", notes,
                                         vs_teacher=True))
    dmd2_pairs = against_dmd2_pairs(rows, metrics, pair)
    if dmd2_pairs:
        parts.append(tables.paired_table(dmd2_pairs, metrics, "DMD2", notes, vs_teacher=False))
    plots = []
    for metric in metrics:
        for x in ("nfe", "latency"):
            name = f"{family}-{metric}-{x}.png"
            figures.quality_plot(rows, metric, x, img / name)
            plots.append(f'<img src="img/{name}" alt="{html.escape(metric)} against {x}">')
    parts.append('<div class="plots">' + "".join(plots) + "</div>")
    figures.sample_grid(rows, img / f"{family}-grid.png")
    parts.append(f'<h3>Samples: the same prompts and seed for every method</h3>'
                 f'<img src="img/{family}-grid.png" alt="{html.escape(family)} sample grid">')
    return parts


def audit_section(verdicts: list[dict] | None) -> list[str]:
    if not verdicts:
        return []
    body = [[tables.td(v["claim_id"] + "".join(f" ({m})" for m in v.get("marks", ()))),
             tables.td("toy-scale evidence" if v["world"] == "toy" else "paper protocol"),
             verdict_cell(v), tables.td(v["evidence"])] for v in verdicts]
    family = next((v["family"] for v in verdicts if v.get("family")), 0)
    return ["<h2>Claims audit</h2>",
            tables.table(["claim", "world", "verdict", "evidence"], body,
                         "reports/claims.yaml judged by fewstep audit (reports/claims_audit.md); "
                         "relative verdicts: the Holm-adjusted p-value decides (one family of "
                         f"{family} tested relative verdicts in the audit), the evidence gives the "
                         "raw interval, raw p and Holm p; a method-vs-method claim with fewer "
                         "than 3 training seeds a side is inconclusive; "
                         "L: leakage; S: the paper's checkpoint was selected on the claim's own "
                         "test set; D: a run behind the verdict deviates from its paper")]


def verdict_cell(v: dict) -> str:
    """The verdict, with a D mark whose tooltip lists the deviations of the runs behind it."""
    notes = v.get("deviations") or []
    if not notes:
        return tables.td(v["verdict"])
    return (f'<td>{html.escape(v["verdict"])} <span class="dev" '
            f'title="{html.escape("; ".join(notes))}">D</span></td>')


def deviations_section(notes) -> list[str]:
    """The footnotes of every D mark in the report's tables."""
    if not notes.notes:
        return []
    return ["<h2>Deviations from the papers</h2>", tables.deviation_list(notes)]


def ledger_section(rows) -> list[str]:
    """The fidelity ledger of each method in the report (`fewstep methods --fidelity`), as
    preformatted Markdown; a method that is not installed here is named, not shown."""
    from fewstep.errors import FewstepError
    from fewstep.fidelity import markdown
    from fewstep.registry import METHODS

    shown, missing = [], []
    for name in sorted({r["method"] for r in rows if r["method"] != "teacher"}):
        try:
            METHODS.get(name)
            shown.append(name)
        except (KeyError, FewstepError):  # a plugin not installed (or refused) here
            missing.append(name)
    text = markdown(shown) + "".join(f"\n## {n}\n\nNot installed where this report was "
                                     "built: its ledger is not shown.\n" for n in missing)
    return ["<details><summary>Fidelity ledger of every method in this report (<code>fewstep "
            "methods --fidelity</code>; reports/fidelity.md)</summary>"
            f"<pre>{html.escape(text)}</pre></details>"]


def identities(rows) -> list[str]:
    seen = {}
    for r in rows:
        for name, res in r["results"].items():
            seen.setdefault(name, tables.metric_identity(res))
    items = "".join(f"<li><b>{html.escape(n)}</b>: <code>{html.escape(json.dumps(i, sort_keys=True))}"
                    f"</code></li>" for n, i in sorted(seen.items()))
    return [f"<details><summary>Metric identities (protocols)</summary><ul>{items}</ul></details>"]


def build(rows: list[dict], out_dir, experiment: str, verdicts=None, pair=None,
          protect=()) -> Path:
    """protect: folders the report folder must not be or hold (the leaderboard's folder)."""
    from fewstep.io import atomic_path

    metrics = sorted({m for r in rows for m in r["results"]})
    with atomic_path(out_dir, protect=protect) as tmp:
        (tmp / "img").mkdir(parents=True)
        parts = [f"<h1>fewstep report: {html.escape(experiment)}</h1>",
                 "<p>Generated by <code>fewstep report</code> from the score files and sample sets; "
                 "never edited by hand. ↑ higher is better, ↓ lower is better; brackets: 95 % "
                 "bootstrap CIs (prompts with all their images; a student cell of several "
                 "training seeds: the mean over seeds, its interval resampling training seeds "
                 "and then prompts, and its per-seed values); paired verdicts are decided by "
                 "Holm-adjusted p-values, one family per table; NFE counts network evaluations "
                 "(a guided step "
                 "counts 2); latency: one image at batch 1 on the sampling device. "
                 '<span class="leak">L</span> marks a score by a metric whose model the method '
                 'trained on; <span class="dev">D</span> marks a student whose run deviates from '
                 "its paper (the entries of its method's fidelity ledger that apply to it, listed "
                 "under the tables and in the ledger below).</p>"]
        notes = tables.DeviationNotes(ordered(rows))
        for family in sorted({r["family"] for r in rows}):
            fam_rows = ordered([r for r in rows if r["family"] == family])
            parts += family_section(family, fam_rows, metrics, tmp / "img", pair, notes)
        parts += deviations_section(notes) + ledger_section(rows)
        if figures.training_cost_plot(rows, tmp / "img" / "training-cost.png"):
            parts.append('<h2>Training cost</h2><img src="img/training-cost.png" alt="training cost">')
        parts += audit_section(verdicts) + identities(rows)
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>fewstep "
                f"{html.escape(experiment)}</title><style>{STYLE}</style>{CHECK_IMAGES}</head>"
                f"<body>{''.join(parts)}</body></html>")
        (tmp / "index.html").write_text(page)
    return Path(out_dir) / "index.html"
