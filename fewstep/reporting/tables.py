"""Table cells and rows of the HTML report, from score rows (fewstep score files)."""
from __future__ import annotations

import html
import json

from fewstep.audit import fixed_reference
from fewstep.fidelity import run_note

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


class DeviationNotes:
    """The "D" marks of a report: a student whose run deviates from its paper (the fidelity
    ledger's entries its student.json records) gets D<n>, one footnote per distinct (method,
    preset, entries); a student recorded before the ledger gets D?. Teachers carry no mark."""

    def __init__(self, rows: list[dict]):
        self._numbers: dict[tuple, int] = {}
        self.notes: list[tuple[str, str]] = []  # (mark, footnote)
        for row in rows:
            self.mark(row)

    @staticmethod
    def _key(row: dict):
        info = student_info(row)
        if row["method"] == "teacher" or not info:
            return None
        if "deviations" not in info:
            return (row["method"], None)
        entries = tuple(json.dumps(d, sort_keys=True, default=str) for d in info["deviations"])
        return (row["method"], info.get("preset"), entries) if entries else None

    def mark(self, row: dict) -> str:
        """"" (no deviation), "D?" (not recorded) or "D<n>"; registers the footnote."""
        key = self._key(row)
        if key is None:
            return ""
        if key not in self._numbers:
            self._numbers[key] = sum(len(k) == 3 for k in self._numbers) + 1
            entries = None if len(key) == 2 else [json.loads(e) for e in key[2]]
            text = run_note(key[0], key[1] if len(key) == 3 else None, entries)
            self.notes.append((self._label(key), f"{self._label(key)}: {text}"))
        return self._label(key)

    def _label(self, key: tuple) -> str:
        return "D?" if len(key) == 2 else f"D{self._numbers[key]}"


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


def method_cell(row: dict, notes: DeviationNotes) -> str:
    """The method's label with its D mark (the footnote as the mark's tooltip)."""
    mark = notes.mark(row)
    if not mark:
        return td(method_label(row))
    title = dict(notes.notes)[mark]
    return (f'<td>{html.escape(method_label(row))} <span class="dev" '
            f'title="{html.escape(title)}">{mark}</span></td>')


def deviation_list(notes: DeviationNotes) -> str:
    """The footnotes of the D marks, below a table ("" when no row deviates)."""
    if not notes.notes:
        return ""
    items = "".join(f"<li>{html.escape(text)}</li>" for _, text in notes.notes)
    return (f'<ul class="devnotes">{items}</ul>')


def leaderboard(rows: list[dict], metrics: list[str], notes: DeviationNotes | None = None) -> str:
    """One row per sample set of a family: teacher steps first, then the students. Without
    `notes` (the report's, shared by its tables) the footnotes of its D marks follow it."""
    own = notes is None
    notes = DeviationNotes(rows) if own else notes
    example = {m: next(r["results"][m] for r in rows if m in r["results"]) for m in metrics}
    head = ["method", "steps", "NFE", "latency s/img", "n"] + [f"{m} {arrow(example[m])}"
                                                              for m in metrics]
    body = []
    for r in rows:
        timing = (r.get("sampling_provenance") or {}).get("timing") or {}
        latency = f"{timing['latency_s']:.4f}" if "latency_s" in timing else "-"
        n = max(res["n"] for res in r["results"].values())
        leaks = trained_on(r)
        body.append([method_cell(r, notes), td(r.get("steps")), td(r["nfe"]), td(latency), td(n)]
                    + [value_cell(r["results"].get(m), m in leaks) for m in metrics])
    caption = "values with 95 % bootstrap CIs over prompts; L: leakage; D: the run deviates from the paper"
    fids = [m for m in metrics if fixed_reference(example[m])]
    if fids:
        caption += (f"; {', '.join(fids)}: CI at the row's n images with the reference fixed (the "
                    "FID at that n, not the infinite-sample FID)")
    return table(head, body, caption) + (deviation_list(notes) if own else "")


def paired_table(pairs: list[tuple[dict, str, dict | None]], metrics: list[str],
                 against: str, notes: DeviationNotes | None = None) -> str:
    """pairs: (student row, label of what it is compared with, {metric: paired dict})."""
    notes = DeviationNotes([s for s, _, _ in pairs]) if notes is None else notes
    head = ["method", "NFE", f"against {against}"] + [f"Δ {m}" for m in metrics]
    body = [[method_cell(s, notes), td(s["nfe"]), td(label)]
            + [diff_cell((diffs or {}).get(m)) for m in metrics] for s, label, diffs in pairs]
    return table(head, body, f"paired differences (student − {against}) on the shared noise, "
                             "95 % paired bootstrap CI")


def metric_identity(res: dict) -> dict:
    """A score's metric protocol: its identity without the teacher sampler a teacher set's
    scores add (that is the set's, listed per family by teacher_samplers)."""
    return {k: v for k, v in res.get("identity", {}).items() if k != "sampler"}
