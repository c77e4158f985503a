"""Scoring sample sets: the metrics a score run builds, the prompt set it names, the teacher set a
student set is compared with, and the score file it writes (`fewstep score` parses the arguments).
Sharded scoring (below): a shard folder's per-image columns into a partial file (`fewstep score
--partial`), and the set's score file from its K partials (`fewstep score-merge`).

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

    if getattr(args, "partial", False):
        return score_partials(args)
    check_metric_args(args)
    rows = read_prompts(args.prompts)
    prompt_set = prompt_set_of(args.prompts)  # checked before any metric is built, once per job
    expected = [(r["prompt_id"], s) for r in rows for s in args.seeds]
    metrics = {name: build_metric(name, args, rows) for name in args.metrics}
    for samples, out in zip(args.samples, args.out):
        score_set(args, metrics, expected, samples, out, prompt_set, rows)


def score_set(args, metrics, expected, samples, out, prompt_set: dict, prompt_rows: list[dict]):
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
        print_result(samples, name, result)
    write_score_file(args, metrics, expected, ss, samples, out, results, prompt_set)


def print_result(samples, name: str, result) -> None:
    print(f"{samples} {name} {result.version}: {result.value:.4f} "
          f"[{result.ci_low:.4f}, {result.ci_high:.4f}]")


def write_score_file(args, metrics, expected, ss, samples, out, results: dict, prompt_set: dict):
    """The score file of the set `ss` (folder `samples`) from its metrics' results: the header's
    set-level fields, the sampling provenance, the scoring arguments and the teacher comparison."""
    from fewstep.io import write_json

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


# ----------------------------------------------------------- sharded scoring: partials, merge
#
# A partial score file (`fewstep score --partial`) holds what each metric's `image_columns` gives
# for the images of one shard folder (fewstep sample --shard I/K): per-image scores, feature
# vectors, detection rows; never a statistic. `fewstep score-merge` checks the K partials against
# the gathered set and computes every statistic from the concatenated columns, as `fewstep score`
# does from the whole set's (metrics/base.py, Metric.score_set = image_columns, then
# result_from_columns). One .npz file: "header" (JSON text) and one float64 array per numeric
# column ("<metric>/<column>"); JSON rows (GenEval's) live in the header.

PARTIAL_FORMAT = 1
HEADER = "header"
# scoring arguments that may differ between the partials of one set (each names its own files);
# the teacher comparison is the merge's (--against of score-merge)
PER_FILE_ARGS = ("samples", "out", "against", "partial")
RESCORE = ("score that shard again (`fewstep score --partial --samples <shard folder> ...` with "
           "the set's scoring arguments)")


class ScoreMergeError(ValueError):
    """Partial score files that do not make one set's score file; the message names each problem
    (a ValueError: the CLI prints it as a clear error)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"score-merge refused ({len(problems)} problem(s)):\n"
                         + "\n".join(f"  - {p}" for p in problems))


def write_partial(path, header: dict, arrays: dict) -> None:
    """The partial file, atomically (a half-written partial is never read as one)."""
    import numpy as np

    from fewstep.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **{HEADER: np.array(json.dumps(header, sort_keys=True))}, **arrays)


def read_partial(path) -> tuple[dict, dict]:
    """(header, {"<metric>/<column>": float64 array}) of a partial score file."""
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files if k != HEADER}
        return json.loads(str(data[HEADER])), arrays


def split_columns(name: str, columns: dict) -> tuple[dict, dict]:
    """(JSON columns, arrays) of one metric's image columns: lists of rows stay JSON, numbers
    and vectors become float64 arrays (exact: every toy and real column is float64 or float32)."""
    import numpy as np

    rows, arrays = {}, {}
    for column, values in columns.items():
        if isinstance(values, list) and all(isinstance(v, dict) for v in values):
            rows[column] = values
        else:
            arrays[f"{name}/{column}"] = np.asarray(values, dtype=np.float64)
    return rows, arrays


def score_partials(args) -> None:
    """`fewstep score --partial`: each shard folder of `args.samples` into its partial file."""
    from fewstep.prompts import read_prompts

    if args.against:
        raise ValueError("--against is not for --partial: a shard has no teacher comparison; give "
                         "--against to `fewstep score-merge`, which compares the whole set")
    check_metric_args(args)
    rows = read_prompts(args.prompts)
    prompt_set = prompt_set_of(args.prompts)
    expected = [(r["prompt_id"], s) for r in rows for s in args.seeds]
    metrics = {name: build_metric(name, args, rows) for name in args.metrics}
    for samples, out in zip(args.samples, args.out):
        score_partial(args, metrics, expected, samples, out, prompt_set, rows)


def score_partial(args, metrics, expected, samples, out, prompt_set, prompt_rows) -> None:
    from fewstep.shards import read_shard_info
    from metrics.sampleset import load_sample_set, parse_manifest

    info, problems = read_shard_info(Path(samples))
    if problems:
        raise ValueError(f"--partial scores a shard folder: {problems[0]}")
    lo, hi = info["jobs"]
    ss = load_sample_set(samples, expected=expected[lo:hi], resolution=args.resolution,
                         allow_blank=args.allow_blank, prompts=prompt_rows)
    header = {"fewstep_score_partial": PARTIAL_FORMAT, "shard_folder": str(samples),
              "shard": info, "manifest_sha256": ss.manifest_sha256, "keys": ss.keys(),
              "image_sha256": [r["image_sha256"] for r in parse_manifest(samples).rows],
              "prompt_set": prompt_set, "metrics": {},
              "scoring_args": {**vars(args), "samples": str(samples), "out": str(out)},
              "files_sha256": files_sha256(args)}
    arrays = {}
    for name, metric in metrics.items():
        metric.load_weights()
        rows, found = split_columns(name, metric.image_columns(ss))
        header["metrics"][name] = {"version": metric.version, "columns": rows}
        arrays.update(found)
    write_partial(out, header, arrays)
    print(f"{samples}: shard {info['index']} of {info['count']} (jobs {lo}..{hi - 1}), "
          f"{len(metrics)} metrics' image columns into {out}")


# scoring arguments that name a file whose bytes the columns depend on (the toy FID's feature
# net); the merge checks the bytes, not only the path every partial shares
HASHED_FILE_ARGS = ("feature_net",)


def files_sha256(args) -> dict:
    from fewstep.io import file_sha256

    return {k: file_sha256(getattr(args, k)) for k in HASHED_FILE_ARGS
            if getattr(args, k, None) is not None}


def file_problems(partials, scoring) -> list[str]:
    """Each partial's hashed files have the bytes the merge reads now."""
    now = files_sha256(scoring)
    then = {path: head.get("files_sha256", {}) for path, head, _ in partials}
    return [f"{path}: its {k} ({getattr(scoring, k)}) had sha256 {then[path].get(k)} when "
            f"scored, {digest} now; {RESCORE}"
            for path in then for k, digest in now.items() if then[path].get(k) != digest]


def check_metric_args(args) -> None:
    """Every metric known, every configured metric option for a metric that is scored."""
    from fewstep.registry import METRICS

    if len(args.samples) != len(args.out):
        raise ValueError(f"--samples has {len(args.samples)} folders but --out has {len(args.out)} "
                         "files: give one score file per sample set, in the same order")
    for name in args.metrics:
        METRICS.check(name)
    unused = sorted(set(args.metric_options) - set(args.metrics))
    if unused:
        raise ValueError(f"--metric-options names {unused}, which are not in --metrics")


def merge_partials(args) -> None:
    """`fewstep score-merge`: the score file of the gathered set `args.samples` from the partial
    files of its K shards, every statistic computed from the merged image columns (equal to
    `fewstep score` on the whole set), compared with the teacher files of `args.against`."""
    from fewstep.prompts import read_prompts
    from metrics.sampleset import load_sample_set

    partials = read_partials(args.partials)
    scoring = merged_scoring_args(partials[0][1]["scoring_args"], args)
    rows = read_prompts(scoring.prompts)
    prompt_set = prompt_set_of(scoring.prompts)
    expected = [(r["prompt_id"], s) for r in rows for s in scoring.seeds]
    ss = load_sample_set(args.samples, expected=expected, resolution=scoring.resolution,
                         allow_blank=scoring.allow_blank, prompts=rows)
    metrics = {name: build_metric(name, scoring, rows) for name in scoring.metrics}
    check_merge(set_problems(partials, ss, args.samples, prompt_set, scoring.prompts)
                + version_problems(partials, metrics) + file_problems(partials, scoring))
    results = {}
    for name, metric in metrics.items():
        columns = merged_columns(name, partials)
        metric.load_weights()
        metric.remember_columns(ss, columns)   # the teacher comparison reads them (FID, recall)
        result = metric.result_from_columns(ss, columns, scoring.allow_blank)
        results[name] = result.to_dict()
        print_result(args.samples, name, result)
    write_score_file(scoring, metrics, expected, ss, args.samples, args.out, results, prompt_set)


def check_merge(problems: list[str]) -> None:
    if problems:
        raise ScoreMergeError(problems)


def merged_scoring_args(first: dict, args):
    """The scoring arguments `fewstep score` on the whole set would record: the partials' shared
    ones, with the merge's set, score file and teacher files."""
    import argparse

    scoring = {k: v for k, v in first.items() if k != "partial"}
    scoring.update(samples=str(args.samples), out=str(args.out), against=list(args.against))
    return argparse.Namespace(**scoring)


def load_partial(path: Path) -> tuple[dict | None, dict, str | None]:
    """(header, arrays, None), or (None, {}, the problem that makes `path` no partial file)."""
    import zipfile

    if not path.is_file():
        return None, {}, (f"{path} is not a file (partial score files are written by `fewstep "
                          "score --partial`)")
    try:
        header, arrays = read_partial(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        return None, {}, f"{path} is not a partial score file ({err}); {RESCORE}"
    found = header.get("fewstep_score_partial") if isinstance(header, dict) else None
    if found != PARTIAL_FORMAT:
        return None, {}, (f"{path} is not a partial score file of format {PARTIAL_FORMAT} "
                          f"(fewstep_score_partial={found!r}); {RESCORE}")
    return header, arrays, None


def read_partials(paths) -> list[tuple[Path, dict, dict]]:
    """[(path, header, arrays)] in shard order, after checking that they are the K shards of one
    set, each once, scored with the same arguments."""
    found, problems = {}, []
    for path in map(Path, paths):
        if path in found:
            problems.append(f"{path} is given twice to --partials; give each partial once")
            continue
        header, arrays, why = load_partial(path)
        if why:
            problems.append(why)
        else:
            found[path] = (header, arrays)
    check_merge(problems or ([] if found else ["no partial score file given"]))
    check_merge(partial_identity_problems(found))
    check_merge(partial_index_problems(found))
    return sorted(((p, h, a) for p, (h, a) in found.items()), key=lambda t: t[1]["shard"]["index"])


def differing(a: dict, b: dict, skip=()) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if k not in skip and a.get(k) != b.get(k)]


def partial_identity_problems(found: dict) -> list[str]:
    """Every partial against the first: a shard of the same set, of the same K, scored with the
    same arguments and prompt file."""
    (first, (ref, _)), *others = found.items()
    problems = []
    for path, (head, _) in others:
        def fields(d, keys):
            return ", ".join(f"{k}={d.get(k)!r}" for k in keys)
        keys = differing(head["shard"]["set"], ref["shard"]["set"])
        args = differing(head["scoring_args"], ref["scoring_args"], PER_FILE_ARGS)
        if keys:
            problems.append(f"{path} is a partial of another set's shard: its "
                            f"{fields(head['shard']['set'], keys)} are not {first}'s "
                            f"{fields(ref['shard']['set'], keys)}; merge only the partials of "
                            "one set")
        elif head["shard"]["count"] != ref["shard"]["count"]:
            problems.append(f"{path} is of shard {head['shard']['index']} of "
                            f"{head['shard']['count']} but {first} of {ref['shard']['count']}")
        if args:
            problems.append(f"{path} was scored with other arguments than {first}: its "
                            f"{fields(head['scoring_args'], args)}, {first}'s "
                            f"{fields(ref['scoring_args'], args)}; score every shard of the set "
                            f"with the same arguments ({RESCORE})")
        if head["prompt_set"] != ref["prompt_set"]:
            problems.append(f"{path} was scored with another prompt file content than {first} "
                            f"({head['prompt_set']} vs {ref['prompt_set']}); {RESCORE}")
    return problems


def partial_index_problems(found: dict) -> list[str]:
    """Each shard index 0..K-1 exactly once."""
    count = next(iter(found.values()))[0]["shard"]["count"]
    by_index: dict[int, list[Path]] = {}
    for path, (head, _) in found.items():
        by_index.setdefault(head["shard"]["index"], []).append(path)
    problems = [f"shard {i} of {count} is missing: score it (`fewstep score --partial --samples "
                f"<shard {i} folder> ...`) and give its partial to --partials"
                for i in range(count) if i not in by_index]
    problems += [f"shard {i} of {count} is given twice or more: {', '.join(map(str, paths))}; "
                 "give each shard's partial once"
                 for i, paths in sorted(by_index.items()) if len(paths) > 1]
    return problems


def set_problems(partials, ss, gathered, prompt_set: dict, prompts) -> list[str]:
    """The gathered set is the partials' set: its header the shards' set identity, and each
    partial's (prompt_id, seed) pairs and image sha256s its job range of the set's manifest."""
    from metrics.sampleset import SET_KEYS, parse_manifest

    ident = partials[0][1]["shard"]["set"]
    problems = [f"{gathered} is not the set of these partials: its {k}={ss.header.get(k)!r}, the "
                f"partials' shards' {ident.get(k)!r}; give the set gathered from those shards "
                "(fewstep gather)" for k in SET_KEYS if ss.header.get(k) != ident.get(k)]
    keys = [list(k) for k in ss.keys()]
    hashes = [r["image_sha256"] for r in parse_manifest(gathered).rows]
    for path, head, _ in partials:
        lo, hi = head["shard"]["jobs"]
        if [list(k) for k in head["keys"]] != keys[lo:hi]:
            problems.append(f"{path}: its (prompt_id, seed) pairs are not jobs {lo}..{hi - 1} of "
                            f"{gathered}; {RESCORE}")
        elif head["image_sha256"] != hashes[lo:hi]:
            j = next(i for i, (a, b) in enumerate(zip(head["image_sha256"], hashes[lo:hi])) if a != b)
            problems.append(f"{path}: its image sha256s are not those of {gathered}'s images of "
                            f"jobs {lo}..{hi - 1} (first differing: {ss.records[lo + j]['path']}): "
                            f"it scored other images; {RESCORE}")
        if head["prompt_set"] != prompt_set:
            problems.append(f"{path} was scored with prompt file content {head['prompt_set']}; "
                            f"{prompts} now holds {prompt_set}; {RESCORE}")
    return problems


def version_problems(partials, metrics: dict) -> list[str]:
    """Each partial holds every metric's columns, computed by this metric version."""
    problems = []
    for path, head, _ in partials:
        for name, metric in metrics.items():
            got = head["metrics"].get(name)
            if got is None:
                problems.append(f"{path} has no columns of metric {name}; {RESCORE}")
            elif got["version"] != metric.version:
                problems.append(f"{path}: metric {name} version {got['version']!r}, this fewstep's "
                                f"is {metric.version!r}; {RESCORE}")
    return problems


def merged_columns(name: str, partials) -> dict:
    """One metric's image columns of the whole set: each partial's, concatenated in shard order."""
    import numpy as np

    first = partials[0][1]["metrics"][name]["columns"]
    columns = {c: [row for _, head, _ in partials for row in head["metrics"][name]["columns"][c]]
               for c in first}
    prefix = f"{name}/"
    for key in (k for k in partials[0][2] if k.startswith(prefix)):
        columns[key[len(prefix):]] = np.concatenate([arrays[key] for _, _, arrays in partials])
    return columns
