"""Scoring sample sets: the metrics a score run builds, the prompt set it names, the teacher set a
student set is compared with, and the score file it writes (`fewstep score` parses the arguments).

Layer: evaluation (above the metrics, below the commands; tests/test_import_contract.py). The
metrics are found by name through the registry and built by their own `from_options`, so no metric
is named here; the score files are read back by the report, the audit and fewstep.pairing, which
rebuild a metric from a score file's own scoring arguments.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace


def scoring_context(args, prompt_rows: list[dict]) -> SimpleNamespace:
    """What a metric may take from the scoring job (Metric.from_options reads it): the bootstrap
    settings, the prompt file and its rows, the toy FID's feature net, reference renders and
    cache. Score files of any age rebuild their metrics (fewstep.pairing): absent fields are None,
    and an absent interval (score files written before `--interval`, or a default run) is the
    percentile interval, an absent seed level the t level (metrics.seed_level)."""
    job = {k: getattr(args, k, None) for k in ("prompts", "feature_net", "reference_images",
                                              "cache")}
    return SimpleNamespace(n_resamples=args.resamples, level=args.confidence,
                           seed=args.bootstrap_seed, prompt_rows=prompt_rows,
                           interval=getattr(args, "interval", None) or "percentile",
                           seed_level=getattr(args, "seed_level", None) or "t", **job)


def build_metric(name: str, args, prompt_rows: list[dict]):
    """The registered metric `name` with the run's bootstrap settings and its configured options
    over the defaults it takes from the scoring job (prompt_rows: the scored prompt file's)."""
    from fewstep.registry import METRICS

    cls = METRICS.get(name)
    options = args.metric_options.get(name, {})
    return cls.from_options(options, scoring_context(args, prompt_rows), name)


def prompt_set_of(prompts_path) -> dict:
    """The scored prompt set's name and canonical sha256 (fewstep.prompt_sets): from the prompt
    file's provenance sidecar when a benchmark set wrote it, else the toy held-out set's."""
    from fewstep.prompt_sets import provenance_path, prompt_file_sha256

    sha = prompt_file_sha256(prompts_path)
    sidecar = provenance_path(prompts_path)
    if Path(sidecar).is_file():
        prov = json.loads(Path(sidecar).read_text())
        if prov["sha256"] != sha:
            raise ValueError(f"{prompts_path} does not match its provenance {sidecar} (sha256 "
                             f"{sha[:12]} vs {prov['sha256'][:12]}): rewrite it with fewstep prompts")
        return {"name": prov["prompt_set"], "sha256": sha}
    return {"name": f"toy-heldout-{Path(prompts_path).stem}", "sha256": sha}


def matching_teacher(rows: list[dict], student: dict) -> tuple[dict | None, str]:
    """The teacher row of the student's family at the student's NFE; where the teacher was not
    sampled at that NFE (a guided step costs 2, so a guided teacher has no NFE 1), the one with
    the smallest NFE above it, which favours the teacher. Returns (row, how it was matched)."""
    teachers = [r for r in rows if r["family"] == student["family"] and r["method"] == "teacher"]
    same = [r for r in teachers if r["nfe"] == student["nfe"]]
    if same:
        return same[0], "same NFE"
    above = sorted((r for r in teachers if r["nfe"] > student["nfe"]), key=lambda r: r["nfe"])
    return (above[0], "next NFE up") if above else (None, "no teacher at or above this NFE")


def score_sets(args) -> None:
    """Every metric of `args.metrics` on each sample set of `args.samples`, one score file each
    (`args.out`); the metrics are built once for all the sets."""
    from fewstep.prompts import read_prompts
    from fewstep.registry import METRICS

    if len(args.samples) != len(args.out):
        raise ValueError(f"--samples has {len(args.samples)} folders but --out has {len(args.out)} "
                         "files: give one score file per sample set, in the same order")
    for name in args.metrics:
        METRICS.check(name)
    unused = sorted(set(args.metric_options) - set(args.metrics))
    if unused:
        raise ValueError(f"--metric-options names {unused}, which are not in --metrics")
    rows = read_prompts(args.prompts)
    prompt_set = prompt_set_of(args.prompts)  # checked before any metric is built, once per job
    expected = [(r["prompt_id"], s) for r in rows for s in args.seeds]
    metrics = {name: build_metric(name, args, rows) for name in args.metrics}
    for samples, out in zip(args.samples, args.out):
        score_set(args, metrics, expected, samples, out, prompt_set, rows)


def score_set(args, metrics, expected, samples, out, prompt_set: dict, prompt_rows: list[dict]):
    from fewstep.io import write_json
    from metrics.sampleset import load_sample_set

    # The gate, before any metric runs: content (hashes, header) and the prompt file's text, which
    # the metrics' own loads cannot check (they see only the (prompt_id, seed) grid).
    ss = load_sample_set(samples, expected=expected, resolution=args.resolution,
                         allow_blank=args.allow_blank, prompts=prompt_rows)
    results = {}
    for name, metric in metrics.items():
        result = metric.score(samples, expected=expected, resolution=args.resolution,
                              allow_blank=args.allow_blank)
        results[name] = result.to_dict()
        print(f"{samples} {name} {result.version}: {result.value:.4f} "
              f"[{result.ci_low:.4f}, {result.ci_high:.4f}]")
    head = ss.header  # the set-level fields are stated once, there; never read off one row
    prov = json.loads((Path(samples) / "provenance.json").read_text())
    sampler = sampler_identity(prov)
    if sampler is not None:  # a teacher set: its sampler is part of every metric's identity
        for res in results.values():
            res["identity"] = {**res["identity"], "sampler": sampler}
    row = {"sample_set": str(samples), "family": head["family"], "method": head["method"],
           "steps": head.get("steps"), "nfe": head["nfe"], "guidance": head.get("guidance"),
           "manifest_sha256": ss.manifest_sha256, "prompt_set": prompt_set,
           "results": results, "sampling_provenance": prov,
           "scoring_args": {**vars(args), "samples": samples, "out": out}}
    if args.against:
        row["against_teacher"] = against_teacher(args, metrics, expected, row)
    write_json(out, row)


def sampler_identity(provenance: dict) -> dict | None:
    """The teacher sampler a sample set was drawn with, as its scores' identity records it: the
    sampler's name, and the scheduler class and config hash (fewstep.sampling.sampler_record), so
    scores of sets drawn with another sampler, or before samplers were recorded, are another
    protocol. None for a set whose provenance records no teacher sampler (a student's)."""
    rec = provenance.get("sampler")
    if not rec:
        return None
    from fewstep.sampling import config_sha256

    ident = {"sampler": rec["sampler"]}
    if rec.get("scheduler_class"):
        ident.update(scheduler_class=rec["scheduler_class"],
                     scheduler_config_sha256=config_sha256(rec.get("scheduler_config") or {}))
    return ident


def against_teacher(args, metrics, expected, row) -> dict:
    """Paired differences (this set - the teacher's set at the same NFE) for every metric."""
    from metrics.base import MetricResult

    teachers = [json.loads(Path(p).read_text()) for p in args.against]
    teacher, how = matching_teacher(teachers, row)
    if teacher is None:
        return {"match": how}
    out = {"teacher_set": teacher["sample_set"], "teacher_nfe": teacher["nfe"], "match": how,
           "metrics": {}}
    for name, metric in metrics.items():
        if name not in teacher["results"]:
            continue
        mine = MetricResult.from_dict(row["results"][name])
        theirs = MetricResult.from_dict(teacher["results"][name])
        out["metrics"][name] = metric.paired_difference(
            mine, theirs, row["sample_set"], teacher["sample_set"], expected=expected,
            resolution=args.resolution, allow_blank=args.allow_blank)
        d = out["metrics"][name]
        print(f"{row['sample_set']} {name} minus teacher NFE {teacher['nfe']}: "
              f"{d['difference']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] {d['verdict']}")
    return out
