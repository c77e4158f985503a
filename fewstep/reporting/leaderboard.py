"""The leaderboard as Markdown: one row per (family, method, steps) with CIs and arrows, each
student against its teacher at the same NFE, and the metric identities (`fewstep report`)."""
from __future__ import annotations

import json
from pathlib import Path

from fewstep.audit import alpha_of, fixed_reference, set_images, training_seeds
from fewstep.reporting.tables import (DeviationNotes, covers_note, family_resamples, fmt_p,
                                      holm_legend, method_label, metric_identity, seed_spread,
                                      table_verdicts)
from fewstep.scoring import matching_teacher


def load_rows(paths) -> list[dict]:
    rows = [json.loads(Path(p).read_text()) for p in paths]
    return sorted(rows, key=lambda r: (r["family"], r["method"] != "teacher", r["method"], r["steps"]))


def fmt(result: dict, row: dict | None = None) -> str:
    """Value [interval] (± half-width), and a student's seed spread (tables.seed_spread)."""
    half = (result["ci_high"] - result["ci_low"]) / 2
    spread = seed_spread(row, result) if row is not None else ""
    return (f"{result['value']:.3f} [{result['ci_low']:.3f}, {result['ci_high']:.3f}] "
            f"(±{half:.3f})" + (f"; {spread}" if spread else ""))


def header(metric_names, example: dict) -> list[str]:
    cols = ["family", "method", "steps", "NFE", "guidance", "n"]
    for m in metric_names:
        res = example["results"][m]
        arrow = "↑" if res["higher_is_better"] else "↓"
        cols.append(f"{m} {res['version']} {arrow}")
    return cols


def labelled(row: dict, notes: DeviationNotes) -> str:
    """The method's label and, for a run that deviates from its paper, its D mark."""
    mark = notes.mark(row)
    return f"{method_label(row)} {mark}" if mark else method_label(row)


def render(rows: list[dict], notes: DeviationNotes | None = None) -> str:
    notes = DeviationNotes(rows) if notes is None else notes
    metric_names = sorted({m for r in rows for m in r["results"]})
    cols = header(metric_names, next(r for r in rows if set(metric_names) <= set(r["results"])))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        n = max(res["n"] for res in r["results"].values())
        cells = [r["family"], labelled(r, notes), str(r["steps"]), str(r["nfe"]), f"{r['guidance']:g}", str(n)]
        cells += [fmt(r["results"][m], r) if m in r["results"] else "not run"
                  for m in metric_names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(student: dict, teacher: dict) -> str:
    """better / worse when the two confidence intervals are disjoint, else a tie."""
    up = student["higher_is_better"]
    if student["ci_low"] > teacher["ci_high"]:
        return "better" if up else "worse"
    if student["ci_high"] < teacher["ci_low"]:
        return "worse" if up else "better"
    return "tie (CIs overlap)"


def paired_cells(paired: dict | None, res: dict, t: dict,
                 judged: dict | None = None) -> tuple[str, str, str, str]:
    """(difference, p / Holm p, win rate, verdict): the paired bootstrap of the score step where
    it ran, decided by table_verdicts; else the plain difference with the disjoint-interval
    verdict."""
    if paired is None:
        return f"{res['value'] - t['value']:+.3f}", "-", "-", verdict(res, t) + " (unpaired)"
    diff = f"{paired['difference']:+.3f} [{paired['ci_low']:+.3f}, {paired['ci_high']:+.3f}]"
    wins = paired.get("win_rate")
    rate = f"{wins['win_rate']:.2f} [{wins['ci_low']:.2f}, {wins['ci_high']:.2f}]" if wins else "-"
    judged = judged or {"p": None, "holm": None, "verdict": paired["verdict"]}
    if judged["p"] is None:
        p = "p n/a"
    else:
        p = f"{fmt_p(judged['p'])} / " + ("not tested" if judged["holm"] is None
                                           else fmt_p(judged["holm"]))
    return diff, p, rate, judged["verdict"]


def teacher_cells(rows: list[dict]) -> list[tuple]:
    """(student, metric, its result, teacher row or None, how matched, paired dict or None) for
    every student x metric of the students-vs-teacher table, in its order."""
    out = []
    for s in (r for r in rows if r["method"] != "teacher"):
        teacher, how = matching_teacher(rows, s)
        paired = (s.get("against_teacher") or {}).get("metrics", {})
        for name, res in sorted(s["results"].items()):
            if teacher is None or name not in teacher["results"]:
                out.append((s, name, res, None, how, None))
                continue
            t = teacher["results"][name]
            if fixed_reference(res) and set_images(res) != set_images(t):  # FID biases differ
                out.append((s, name, res, teacher, how, None))
                continue
            out.append((s, name, res, teacher, how, paired.get(name)))
    return out


def teacher_verdicts(cells: list[tuple]) -> tuple[list, int, float]:
    """The table's Holm family (tables.table_verdicts): verdicts, family size, alpha."""
    items = [(paired, res["higher_is_better"], training_seeds(s, paired, "a"), None)
             for s, _, res, _, _, paired in cells]
    judged, family = table_verdicts(items)
    alpha = next((alpha_of(p) for *_, p in cells if p), 0.05)
    return judged, family, alpha


def against_teacher(rows: list[dict], notes: DeviationNotes | None = None) -> str:
    """One line per (student, metric): student and teacher at the same NFE, the paired difference
    with its raw CI, its raw and Holm-adjusted p (one family: this table), the per-prompt win rate
    and the verdict the adjusted p supports."""
    notes = DeviationNotes(rows) if notes is None else notes
    lines = ["| family | method | NFE | teacher NFE | metric | student | teacher | "
             "Δ student − teacher [raw CI] | p / Holm p | prompts won | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    cells = teacher_cells(rows)
    judged, _, _ = teacher_verdicts(cells)
    for (s, name, res, teacher, how, paired), j in zip(cells, judged):
        head = f"| {s['family']} | {labelled(s, notes)} | {s['nfe']} |"
        if teacher is None:
            lines.append(f"{head} - | {name} | {res['value']:.3f} | - | - | - | - | {how} |")
            continue
        t = teacher["results"][name]
        nfe = f"{teacher['nfe']}" + ("" if how == "same NFE" else f" ({how})")
        if fixed_reference(res) and set_images(res) != set_images(t):
            diff, p, rate = "-", "-", "-"
            word = f"not compared (FID at {set_images(res)} vs {set_images(t)} images)"
        else:
            diff, p, rate, word = paired_cells(paired, res, t, j)
            if paired is None:
                word += teacher_label_of(s)
        lines.append(f"{head} {nfe} | {name} | {res['value']:.3f} | {t['value']:.3f} | {diff} | "
                     f"{p} | {rate} | {word} |")
    return "\n".join(lines)


def teacher_label_of(student: dict) -> str:
    """The one-seed label of an unpaired verdict against the teacher (audit.teacher_label)."""
    from fewstep.audit import teacher_label

    return teacher_label(training_seeds(student), None)


# what each toy slot measures (metrics/toy_preference.py): the slots are different measurements
STAND_IN_MEASURES = {"toy_hps": "image quality and composition, whatever the prompt",
                     "toy_imagereward": "prompt alignment"}


def stand_ins(rows) -> list[str]:
    """Say which toy metric fills which real metric's slot (their identities record it)."""
    seen = {name: res["identity"]["stands_in_for"] for r in rows for name, res in r["results"].items()
            if res.get("identity", {}).get("stands_in_for")}
    if not seen:
        return []
    return [f"Toy stand-ins: " + "; ".join(
        f"`{name}` fills the {real} slot (a toy reward model, not {real}: {STAND_IN_MEASURES[name]})"
        if name in STAND_IN_MEASURES else f"`{name}` fills the {real} slot (a toy stand-in, "
        f"not {real})" for name, real in sorted(seen.items())) + ".", ""]


def identities(rows) -> str:
    seen = {}
    for r in rows:
        for name, res in r["results"].items():
            seen.setdefault(name, json.dumps(metric_identity(res), sort_keys=True))
    return "\n".join(f"- `{name}`: `{ident}`" for name, ident in sorted(seen.items()))


def sampler_label(record: dict) -> str:
    """How a teacher set was sampled, in words: the checkpoint's own diffusers scheduler (with
    its spacing and shift where its config has them) or the harness's own grid."""
    if record.get("scheduler_class"):
        config = record.get("scheduler_config") or {}
        knobs = [f"{k} {config[k]}" for k in ("timestep_spacing", "steps_offset", "shift")
                 if k in config]
        return f"{record['scheduler_class']} ({', '.join(knobs)})" if knobs else record["scheduler_class"]
    return {"sit-euler": "the SiT reference Euler sampler",
            "ddim-trailing": "DDIM/Euler on the uniform trailing grid"}.get(record.get("sampler"),
                                                                           "unrecorded")


def teacher_samplers(rows) -> list[str]:
    """One line naming each family's teacher sampler (the baseline every student is held to)."""
    seen = {}
    for r in rows:
        if r["method"] == "teacher":
            record = (r.get("sampling_provenance") or {}).get("sampler") or {}
            seen.setdefault(r["family"], sampler_label(record))
    if not seen:
        return []
    return ["Teachers sampled with: " + "; ".join(f"{fam}: {label}" for fam, label in
                                                 sorted(seen.items())) + ".", ""]


def deviations_section(notes: DeviationNotes) -> list[str]:
    """The footnotes of the D marks, and where every method's whole ledger is."""
    lines = ["## Deviations from the papers", "",
             "D marks a student whose run differs from its paper in an entry of its method's "
             "fidelity ledger (recorded in its student.json); every method's whole ledger: "
             "`fewstep methods --fidelity` (reports/fidelity.md).", ""]
    return lines + ([f"- {text}" for _, text in notes.notes] or ["No run deviates."]) + [""]


def students_section(rows, notes: DeviationNotes) -> list[str]:
    if all(r["method"] == "teacher" for r in rows):
        return []
    cells = teacher_cells(rows)
    _, family, alpha = teacher_verdicts(cells)
    resamples = family_resamples([(paired,) for *_, paired in cells])
    return ["## Students against their teacher at the same NFE", "",
            "Each student beside its own teacher sampled with the same per-sample noise at the "
            "student's NFE (or the next NFE up where the teacher has none). Δ: paired difference "
            "with its raw 95 % interval (over the student's training seeds and prompts: the "
            "prompt bootstrap's variance plus the between-seed variance / k, a t quantile with "
            "Welch-Satterthwaite df; both sets on the same prompts and seeds). " + holm_legend(family, alpha, resamples) + " A student of one training seed keeps its "
            "verdict's direction, labelled: its interval covers prompts only. Prompts won: share "
            "of prompts where the student's mean per-image score beats the teacher's (ties count "
            "one half; per-image metrics only).", "", against_teacher(rows, notes), ""]


def fid_note(rows) -> list[str]:
    """What an FID interval covers, said wherever FIDs are shown."""
    names = sorted({name for r in rows for name, res in r["results"].items() if fixed_reference(res)})
    if not names:
        return []
    return [", ".join(f"`{n}`" for n in names) + ": the interval resamples prompts at the row's n "
            "images with the reference statistics fixed, so it covers the FID at that n, not the "
            "infinite-sample FID; FIDs at different n are never compared. A student cell of k "
            "training seeds averages k FIDs of n / k images each (its n counts every seed's "
            "images) and is compared at that per-set size.", ""]


def leaderboard(rows: list[dict]) -> str:
    """The whole leaderboard page of the score rows (load_rows)."""
    notes = DeviationNotes(rows)
    return "\n".join([
        "# fewstep leaderboard (toy world)",
        "",
        "Generated by `fewstep report` from the score files under `results/scores/`; never edit "
        "by hand. ↑ higher is better, ↓ lower is better; brackets: 95 % bootstrap confidence "
        "interval (prompts resampled with all their images; a student cell of several training "
        "seeds: its mean over the seeds, the interval resampling training seeds and then prompts, "
        "and the per-seed values after it). NFE counts network evaluations: a guided step "
        "counts 2. D<n>: the run deviates from its paper (footnotes below).",
        "",
        render(rows, notes),
        "",
        *([covers_note(rows), ""] if covers_note(rows) else []),
        *fid_note(rows),
        *deviations_section(notes),
        *teacher_samplers(rows),
        *stand_ins(rows),
        *students_section(rows, notes),
        "## Metric identities",
        "",
        identities(rows),
        "",
    ])
