"""A cell (family, method) over its training seeds: the aggregate score file that the report, the
audit and tracking read (results/scores/{family}/{method}/student.json), built from the cell's
per-replicate score files (results/scores/{family}/{method}/seed{s}.json, or released.json).

A replicate is one trained student (one training seed) or a released checkpoint. Every replicate is
sampled on the same prompts and per-(prompt, image seed) noise, so a cell's value is the mean over
its replicates and its interval resamples training seeds, then prompts with all their images
(metrics.base.Metric.cell_result); comparisons with the teacher and between cells are paired on
the shared prompts and noise (Metric.paired_difference_cells).
Layer: evaluation, beside fewstep.scoring and fewstep.pairing.
"""
from __future__ import annotations

import json
from pathlib import Path

SAME_ACROSS = ("family", "method", "nfe", "steps", "guidance", "prompt_set")


def check_replicates(rows: list[dict], seeds: list[int | None]) -> None:
    """The replicates of one cell: same family, method, NFE, prompts and scoring protocol, one
    per training seed, each student trained with the seed it is labelled with."""
    if not rows or len(rows) != len(seeds):
        raise ValueError(f"a cell needs one training seed per replicate score file; got "
                         f"{len(rows)} files and seeds {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"training seeds {seeds} repeat; each replicate is another seed")
    first = rows[0]
    for row in rows[1:]:
        differ = [k for k in SAME_ACROSS if row.get(k) != first.get(k)]
        args = [k for k in ("prompts", "seeds", "metrics", "resolution", "resamples", "confidence",
                            "bootstrap_seed", "metric_options")
                if row["scoring_args"].get(k) != first["scoring_args"].get(k)]
        if differ or args:
            raise ValueError(f"replicates {first['sample_set']} and {row['sample_set']} are not one "
                             f"cell: they differ in {differ + ['scoring ' + a for a in args]}")
    for row, seed in zip(rows, seeds):
        trained = trained_seed(row)
        if seed is not None and trained is not None and trained != seed:
            raise ValueError(f"{row['sample_set']} is labelled training seed {seed} but its student "
                             f"was trained with seed {trained} (its model's student.json)")


def trained_seed(row: dict) -> int | None:
    """The seed the replicate's student was trained with, from its model folder's student.json
    (None where the folder or the record is not there, e.g. a released checkpoint)."""
    model = (row.get("sampling_provenance") or {}).get("config", {}).get("student")
    record = Path(model) / "student.json" if model else None
    if record is None or not record.is_file():
        return None
    seed = json.loads(record.read_text()).get("options", {}).get("seed")
    return None if seed is None else int(seed)


def replicate_cell(rows: list[dict], metric: str) -> list[tuple]:
    """[(MetricResult, sample-set folder)] of one metric over a cell's replicates."""
    from metrics.base import MetricResult

    return [(MetricResult.from_dict(r["results"][metric]), r["sample_set"]) for r in rows]


def aggregate(rows: list[dict], seeds: list[int | None], files: list[str],
              teachers: list[dict]) -> dict:
    """The cell's aggregate row (format: see the module docstring) from its replicate rows, their
    training seeds (None: released) and score files, and the family's teacher score rows."""
    from fewstep.pairing import load_kwargs, metric_for

    check_replicates(rows, seeds)
    first = rows[0]
    scoring = {k: v for k, v in first["scoring_args"].items() if k not in ("samples", "out")}
    out = {k: v for k, v in first.items() if k != "against_teacher"}
    out["replicates"] = [{"training_seed": s, "score_file": str(f), "sample_set": r["sample_set"],
                          "manifest_sha256": r["manifest_sha256"]}
                         for r, s, f in zip(rows, seeds, files)]
    out["n_training_seeds"] = sum(s is not None for s in seeds)
    out["results"] = {}
    for name in first["results"]:
        metric, expected, args = metric_for(name, scoring)
        result = metric.cell_result(replicate_cell(rows, name), seeds=seeds,
                                    **load_kwargs(expected, args))
        out["results"][name] = result.to_dict()
    if "against_teacher" in first:
        out["against_teacher"] = against_teacher(out, rows, teachers, scoring)
    return out


def against_teacher(cell: dict, rows: list[dict], teachers: list[dict], scoring: dict) -> dict:
    """The cell minus the teacher set at its NFE (or the next one up), paired on the shared noise;
    one replicate: its own comparison, as its score job computed it."""
    from fewstep.pairing import load_kwargs, metric_for
    from fewstep.scoring import matching_teacher

    n_seeds = cell["n_training_seeds"]
    if len(rows) == 1:
        out = json.loads(json.dumps(rows[0]["against_teacher"]))
        for paired in out.get("metrics", {}).values():
            paired["n_training_seeds"] = {"a": n_seeds, "b": None}
        return out
    teacher, how = matching_teacher(teachers, cell)
    if teacher is None:
        return {"match": how}
    out = {"teacher_set": teacher["sample_set"], "teacher_nfe": teacher["nfe"], "match": how,
           "metrics": {}}
    for name in cell["results"]:
        if name not in teacher["results"]:
            continue
        metric, expected, args = metric_for(name, scoring)
        paired = metric.paired_difference_cells(
            replicate_cell(rows, name), replicate_cell([teacher], name),
            **load_kwargs(expected, args))
        out["metrics"][name] = {**paired, "n_training_seeds": {"a": n_seeds, "b": None}}
    return out
