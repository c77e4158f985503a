"""fewstep score: every configured metric on sample sets of one prompt set, one score .json each.

Several sets in one call (`--samples a b --out a.json b.json`) build the metrics once (feature
net, reference statistics): the DAG scores all of a family's teacher sets in one job.
"""
from __future__ import annotations

from pathlib import Path


def add_arguments(p):
    p.add_argument("--samples", required=True, nargs="+", help="sample-set folder(s)")
    p.add_argument("--prompts", required=True, help="the prompt .jsonl it was sampled from")
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--feature-net", help="toy feature net (toy_fid)")
    p.add_argument("--reference-images", type=int, default=2000, help="toy_fid reference renders")
    p.add_argument("--cache", default="results/cache")
    p.add_argument("--allow-blank", action="store_true",
                   help="score constant images instead of refusing the set (toy world: an empty "
                        "canvas is a legitimate bad sample)")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--bootstrap-seed", type=int, default=0)
    p.add_argument("--against", nargs="+", default=[],
                   help="the teacher's score .json files of this family: each set is also compared "
                        "with the teacher set at its NFE (or the next one up), paired on the shared "
                        "noise")
    p.add_argument("--metric-options", type=json_object, default={},
                   help='JSON mapping metric -> constructor options, e.g. '
                        '\'{"fid": {"reference": "coco2014-val", "crop": "center"}}\'')
    p.add_argument("--out", required=True, nargs="+", help="one score .json per --samples folder")


def json_object(text: str) -> dict:
    import argparse
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def build_metric(name: str, args, class_conditional: bool):
    """The metric with the run's bootstrap settings and its configured options."""
    from fewstep.registry import METRICS
    from metrics.base import check_metric_options

    cls = METRICS.get(name)
    options = args.metric_options.get(name, {})
    check_metric_options(name, cls, options)
    stats = dict(n_resamples=args.resamples, level=args.confidence, seed=args.bootstrap_seed)
    if name == "toy_fid":
        from fewstep.commands.fidref import toy_fid
        metric = toy_fid(args.prompts, args.feature_net, args.reference_images, args.cache)
        for key, value in {**stats, **options}.items():
            setattr(metric, key, value)
        return metric
    if name == "toy_geneval":  # class-conditional sets hold only GenEval's colors task
        options = {"require_all_tasks": not class_conditional, **options}
    return cls(**stats, **options)


def run(args):
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
    class_conditional = all("class_label" in r for r in rows)
    metrics = {name: build_metric(name, args, class_conditional) for name in args.metrics}
    for samples, out in zip(args.samples, args.out):
        score_set(args, metrics, expected, samples, out, prompt_set, rows)


def prompt_set_of(prompts_path) -> dict:
    """The scored prompt set's name and canonical sha256 (fewstep.prompt_sets): from the prompt
    file's provenance sidecar when a benchmark set wrote it, else the toy held-out set's."""
    import json

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


def score_set(args, metrics, expected, samples, out, prompt_set: dict, prompt_rows: list[dict]):
    import json

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
    row = {"sample_set": str(samples), "family": head["family"], "method": head["method"],
           "steps": head.get("steps"), "nfe": head["nfe"], "guidance": head.get("guidance"),
           "manifest_sha256": ss.manifest_sha256, "prompt_set": prompt_set,
           "results": results, "sampling_provenance": prov,
           "scoring_args": {**vars(args), "samples": samples, "out": out}}
    if args.against:
        row["against_teacher"] = against_teacher(args, metrics, expected, row)
    write_json(out, row)


def against_teacher(args, metrics, expected, row) -> dict:
    """Paired differences (this set - the teacher's set at the same NFE) for every metric."""
    import json

    from fewstep.commands.report import matching_teacher
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
