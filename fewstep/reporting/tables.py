"""Table cells and rows of the HTML report, from score rows (fewstep score files)."""
from __future__ import annotations

import html

# What a training reward (its `fewstep train --reward` spec or a preset's reward_model) shares a
# model with: scoring a student with one of these metrics is leakage (fewstep/notes/claims.md "L").
REWARD_METRICS = {"hpsv2": ("hpsv2.1",), "hpsv2:v2.1": ("hpsv2.1",), "hpsv2:v2.0": ("hpsv2.0",),
                  "hpsv2.1": ("hpsv2.1",), "hpsv2.0": ("hpsv2.0",), "imagereward": ("imagereward",),
                  "clip": ("clip_score", "clip_score_dmd2")}


def student_info(row: dict) -> dict:
    return (row.get("sampling_provenance") or {}).get("student") or {}


def trained_on(row: dict) -> set[str]:
    """Metrics whose model the row's method trained on (empty for teachers and the toy reward,
    whose net is not any scoring net)."""
    info = student_info(row)
    specs = [info.get("reward"), (info.get("options") or {}).get("reward_model")]
    return {m for spec in specs if spec for m in REWARD_METRICS.get(str(spec), ())}


def method_label(row: dict) -> str:
    """Method name, flagged when it is not a faithful implementation (fewstep/notes/conventions.md sec. 7)."""
    fidelity = student_info(row).get("fidelity", "faithful")
    return row["method"] if fidelity == "faithful" else f"{row['method']} ({fidelity})"


def arrow(result: dict) -> str:
    return "↑" if result["higher_is_better"] else "↓"


def value_cell(result: dict | None, leak: bool = False) -> str:
    if result is None:
        return '<td class="na">not run</td>'
    mark = ' <span class="leak" title="trained on this metric\'s model">L</span>' if leak else ""
    return (f'<td>{result["value"]:.3f} <span class="ci">[{result["ci_low"]:.3f}, '
            f'{result["ci_high"]:.3f}]</span>{mark}</td>')


def diff_cell(paired: dict | None) -> str:
    if not paired:
        return '<td class="na">-</td>'
    verdict = paired.get("verdict", "")
    css = {"better": "better", "worse": "worse"}.get(verdict, "tie")
    return (f'<td class="{css}">{paired["difference"]:+.3f} <span class="ci">'
            f'[{paired["ci_low"]:+.3f}, {paired["ci_high"]:+.3f}]</span> {html.escape(verdict)}</td>')


def table(head: list[str], rows: list[list[str]], caption: str = "") -> str:
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f'<table>{cap}<thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def td(text) -> str:
    return f"<td>{html.escape(str(text))}</td>"


def leaderboard(rows: list[dict], metrics: list[str]) -> str:
    """One row per sample set of a family: teacher steps first, then the students."""
    example = {m: next(r["results"][m] for r in rows if m in r["results"]) for m in metrics}
    head = ["method", "steps", "NFE", "latency s/img", "n"] + [f"{m} {arrow(example[m])}"
                                                              for m in metrics]
    body = []
    for r in rows:
        timing = (r.get("sampling_provenance") or {}).get("timing") or {}
        latency = f"{timing['latency_s']:.4f}" if "latency_s" in timing else "-"
        n = max(res["n"] for res in r["results"].values())
        leaks = trained_on(r)
        body.append([td(method_label(r)), td(r.get("steps")), td(r["nfe"]), td(latency), td(n)]
                    + [value_cell(r["results"].get(m), m in leaks) for m in metrics])
    return table(head, body, "values with 95 % bootstrap CIs over prompts; L: leakage")


def paired_table(pairs: list[tuple[dict, str, dict | None]], metrics: list[str],
                 against: str) -> str:
    """pairs: (student row, label of what it is compared with, {metric: paired dict})."""
    head = ["method", "NFE", f"against {against}"] + [f"Δ {m}" for m in metrics]
    body = [[td(method_label(s)), td(s["nfe"]), td(label)]
            + [diff_cell((diffs or {}).get(m)) for m in metrics] for s, label, diffs in pairs]
    return table(head, body, f"paired differences (student − {against}) on the shared noise, "
                             "95 % paired bootstrap CI")
