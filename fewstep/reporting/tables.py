"""Table cells and rows of the HTML report, from score rows (fewstep score files)."""
from __future__ import annotations

import html
import json

from fewstep.audit import (alpha_of, fixed_reference, raw_direction, seed_rule, teacher_label,
                           training_seeds)
from fewstep.fidelity import run_note
from metrics.multiplicity import direction, family_size, holm, min_resamples, resolvable

# What a training reward (its `fewstep train --reward` spec or a preset's reward_model) shares a
# model with: scoring a student with one of these metrics is leakage (fewstep/notes/claims.md "L").
REWARD_METRICS = {"hpsv2": ("hpsv2.1",), "hpsv2:v2.1": ("hpsv2.1",), "hpsv2:v2.0": ("hpsv2.0",),
                  "hpsv2.1": ("hpsv2.1",), "hpsv2.0": ("hpsv2.0",), "imagereward": ("imagereward",),
                  "clip": ("clip_score", "clip_score_dmd2"),
                  "dinov2_cls": ("diversity_dinov2",)}  # AMD's SiT reward: DINOv2 features


def student_info(row: dict) -> dict:
    return (row.get("sampling_provenance") or {}).get("student") or {}


def trained_on(row: dict) -> set[str]:
    """Metrics whose model the row's method trained on: a real reward named like a metric's
    model, or a toy reward built from a toy metric slot's own net file (the default toy reward,
    the seed-1 net, is none of them). Empty for teachers."""
    from metrics.toy_preference import slots_sharing_net

    info = student_info(row)
    specs = [info.get("reward"), (info.get("options") or {}).get("reward_model")]
    named = {m for spec in specs if spec for m in REWARD_METRICS.get(str(spec), ())}
    return named | slots_sharing_net((info.get("inputs") or {}).get("reward_sha256"))


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


# ------------------------------------------------------------------------------ training seeds

def seed_order(key):
    return (0, int(key)) if str(key).isdigit() else (1, str(key))


def seed_spread(row: dict, result: dict) -> str:
    """A student cell's seed spread: its per-training-seed values ("seeds 48.900 / 51.200 /
    50.300"), "1 seed" (one trained seed, or a score file from before training seeds), "released
    checkpoint"; "" for a teacher set (no training seed)."""
    k = training_seeds(row)
    if k is None:
        return ""
    per_seed = (result.get("details") or {}).get("per_seed") or {}
    if len(per_seed) > 1:
        ordered = sorted(per_seed, key=seed_order)
        return "seeds " + " / ".join(f"{per_seed[s]:.3f}" for s in ordered)
    return "released checkpoint" if k == 0 else "1 seed"


def ci_covers(row: dict) -> str:
    """What a student cell's intervals cover (its scores' details.ci_covers; a score file from
    before training seeds covers prompts of its one run)."""
    for res in row["results"].values():
        covers = (res.get("details") or {}).get("ci_covers")
        if covers:
            return covers
    k = training_seeds(row)
    return ("prompts (released checkpoint)" if k == 0 else "prompts (1 training seed)" if k == 1
            else "training seeds and prompts")


def covers_note(rows: list[dict]) -> str:
    """One sentence: what each student cell's interval covers, grouped ("" without students)."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        if r["method"] != "teacher":
            family = f"{r['family']}/" if r.get("family") else ""
            label = f"{family}{method_label(r)} NFE {r['nfe']}"
            groups.setdefault(ci_covers(r), []).append(label)
    if not groups:
        return ""
    parts = "; ".join(f"{covers}: {', '.join(cells)}" for covers, cells in sorted(groups.items()))
    return ("What a student's interval covers (training seeds and prompts: the prompt "
            "bootstrap's variance plus the between-seed variance / k, t quantile; one training "
            "seed: its prompts only): "
            f"{parts}. Teacher sets have no training seed: their intervals cover prompts.")


# ------------------------------------------------------------------ verdicts of a paired table

def fmt_p(p: float) -> str:
    return "<0.001" if p < 0.0005 else f"{p:.3f}"


def table_verdicts(items: list[tuple]) -> tuple[list[dict | None], int]:
    """The verdicts of one table of paired differences, one Holm family (metrics/multiplicity.py):
    items are (paired dict or None, higher_is_better, training seeds of A, of B (None: a
    teacher)). A tested comparison is decided by its Holm-adjusted p and the estimate's sign; a
    method-vs-method one with too few training seeds is inconclusive and not tested; one
    without a p-value (an older score file) keeps its raw-interval verdict and is not counted.
    Returns ({"p": raw, "holm": adjusted, "verdict": words} or None per item, family size)."""
    ruled = [seed_rule(k_a, k_b) if paired else None for paired, _, k_a, k_b in items]
    raw = [paired.get("p_value") if paired and not r else None
           for (paired, *_), r in zip(items, ruled)]
    out = []
    for (paired, up, k_a, k_b), rule, p, adjusted in zip(items, ruled, raw, holm(raw)):
        if paired is None:
            out.append(None)
            continue
        alpha = alpha_of(paired)
        if rule:
            word = rule
        elif p is None:
            word = raw_direction(paired, up) or "tie (CI contains 0)"
        else:
            word = (direction(paired["difference"], adjusted, alpha, up)
                    or f"tie (Holm p > {alpha:g})")
        out.append({"p": paired.get("p_value"), "holm": None if rule else adjusted,
                    "verdict": word if rule else word + teacher_label(k_a, k_b)})
    return out, family_size(raw)


def family_resamples(items: list[tuple]) -> int | None:
    """The fewest bootstrap resamples behind a table's bootstrap p-values (None: none recorded).
    A p-value from the t seed level (metrics.seed_level, ci method "t, ...") is continuous and
    has no 2/(R+1) floor, so it does not count."""
    counts = [i[0]["n_resamples"] for i in items if i[0] and i[0].get("n_resamples")
              and not str(i[0].get("method", "")).startswith("t, ")]
    return min(counts) if counts else None


def holm_legend(family: int, alpha: float = 0.05, resamples: int | None = None) -> str:
    """Which number decides a table's verdicts, and the family's size; a warning when the
    bootstrap's resolution cannot reach Holm's first threshold (every test would be a tie)."""
    warning = "" if resolvable(family, resamples, alpha) else (
        f" With {resamples} bootstrap resamples the smallest p-value is 2/(R+1) = "
        f"{2 / (resamples + 1):.2g}, too large for Holm to reject any of {family} tests: set "
        f"bootstrap.resamples to at least {min_resamples(family, alpha)}.")
    return warning.lstrip() + (" " if warning else "") + (f"The Holm-adjusted p-value decides the verdict (Holm 1979; one family per table: "
            f"family of {family} tested comparisons, alpha = {alpha:g}): better / worse when it "
            "is at most alpha, by the sign of Δ, else a tie; Δ's bracket is the raw paired "
            "interval and p the raw two-sided p-value (bootstrap; t for a cell of several "
            "training seeds), shown beside the Holm p. p n/a: a score file "
            "from before p-values, judged by its raw interval and not in the family.")


def arrow(result: dict) -> str:
    return "↑" if result["higher_is_better"] else "↓"


def value_cell(result: dict | None, leak: bool = False, row: dict | None = None) -> str:
    """A score with its interval, its L mark and (a student's) seed spread."""
    if result is None:
        return '<td class="na">not run</td>'
    mark = ' <span class="leak" title="trained on this metric\'s model">L</span>' if leak else ""
    spread = seed_spread(row, result) if row is not None else ""
    seeds = f' <span class="seeds">{html.escape(spread)}</span>' if spread else ""
    return (f'<td>{result["value"]:.3f} <span class="ci">[{result["ci_low"]:.3f}, '
            f'{result["ci_high"]:.3f}]</span>{mark}{seeds}</td>')


def diff_cell(paired: dict | None, judged: dict | None = None) -> str:
    """Δ with its raw interval, the raw and Holm p and the verdict (table_verdicts)."""
    if not paired:
        return '<td class="na">-</td>'
    verdict = judged["verdict"] if judged else paired.get("verdict", "")
    css = {"better": "better", "worse": "worse"}.get(verdict.split(" ")[0], "tie")
    p = "p n/a"
    if judged and judged["p"] is not None:
        p = f"p {fmt_p(judged['p'])}" + (f", Holm p {fmt_p(judged['holm'])}"
                                          if judged["holm"] is not None else ", not tested")
    return (f'<td class="{css}">{paired["difference"]:+.3f} <span class="ci">'
            f'[{paired["ci_low"]:+.3f}, {paired["ci_high"]:+.3f}] {html.escape(p)}</span> '
            f'{html.escape(verdict)}</td>')


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
                    + [value_cell(r["results"].get(m), m in leaks, r) for m in metrics])
    caption = ("values with 95 % bootstrap CIs (students: the mean over training seeds, the "
               "interval over training seeds and prompts, and the per-seed values); L: leakage; "
               "D: the run deviates from the paper")
    fids = [m for m in metrics if fixed_reference(example[m])]
    if fids:
        caption += (f"; {', '.join(fids)}: CI at the row's n images with the reference fixed (the "
                    "FID at that n, not the infinite-sample FID; a cell of k training seeds: "
                    "the mean of k FIDs of n / k images each)")
    covers = covers_note(rows)
    note = f'<p class="covers">{html.escape(covers)}</p>' if covers else ""
    return table(head, body, caption) + note + (deviation_list(notes) if own else "")


def paired_table(pairs: list[tuple[dict, str, dict | None]], metrics: list[str],
                 against: str, notes: DeviationNotes | None = None,
                 vs_teacher: bool | None = None) -> str:
    """pairs: (student row, label of what it is compared with, {metric: paired dict}). The table
    is one Holm family (every student x metric with a p-value); vs_teacher (default: `against`
    names the teacher) chooses the training-seed rule: against a teacher a one-seed verdict keeps
    its direction with a label, against another method fewer than 3 seeds is inconclusive."""
    notes = DeviationNotes([s for s, _, _ in pairs]) if notes is None else notes
    vs_teacher = "teacher" in against if vs_teacher is None else vs_teacher
    items = []
    for s, _, diffs in pairs:
        for m in metrics:
            paired = (diffs or {}).get(m)
            up = (s["results"].get(m) or {}).get("higher_is_better", True)
            k_b = None if vs_teacher else training_seeds({"method": against}, paired, "b")
            items.append((paired, up, training_seeds(s, paired, "a"), k_b))
    judged, family = table_verdicts(items)
    cells = iter(zip(items, judged))
    head = ["method", "NFE", f"against {against}"] + [f"Δ {m}" for m in metrics]
    body = [[method_cell(s, notes), td(s["nfe"]), td(label)]
            + [diff_cell(item[0], j) for item, j in (next(cells) for _ in metrics)]
            for s, label, _ in pairs]
    alpha = next((alpha_of(i[0]) for i in items if i[0]), 0.05)
    return table(head, body, f"paired differences (student − {against}) on the shared noise, "
                             "raw 95 % paired bootstrap CI. "
                 + holm_legend(family, alpha, family_resamples(items)))


def metric_identity(res: dict) -> dict:
    """A score's metric protocol: its identity without the teacher sampler a teacher set's
    scores add (that is the set's, listed per family by teacher_samplers)."""
    return {k: v for k, v in res.get("identity", {}).items() if k != "sampler"}
