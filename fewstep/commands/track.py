"""fewstep track: push the results to MLflow, one run per trained model (and one per teacher),
idempotently.

Files are the record; MLflow is a sink. A run is keyed by the tag `fewstep.key` (family/method)
and carries the sha256 of everything pushed: an unchanged run is skipped, a changed one replaced,
so rerunning never duplicates. Per run: params (the resolved workflow config, the method's options
and preset), metrics (training curves by step, every score with its CI, paired differences against
the teacher), tags (git commit, config hash, protocol id per metric, method fidelity, leakage:
metrics whose model the method trained on), artifacts (score files, student.json, provenance,
the family's sample grid). If the tracking server cannot be reached nothing on disk changes; the
job fails with that message and the next run pushes everything.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from fewstep.io import json_lines, write_json

MAX_PARAM = 500  # characters of one param value (MLflow's limit is larger; tables stay readable)


def add_arguments(p):
    p.add_argument("--scores", nargs="+", required=True)
    p.add_argument("--experiment", required=True)
    p.add_argument("--tracking-uri", default=None,
                   help="default: $MLFLOW_TRACKING_URI, else sqlite under results/mlflow")
    p.add_argument("--config-json", type=json.loads, default=None,
                   help="the resolved workflow config as one JSON string, logged as params")
    p.add_argument("--results", default="results", help="folder of runs/ and models/")
    p.add_argument("--grids", help="folder of <family>-grid.png sample grids (the HTML report's)")
    p.add_argument("--out", required=True, help="tracked.json: run ids per key")


def tracking_uri(arg: str | None, out: Path) -> str:
    if arg:
        return arg
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    # an explicit absolute sqlite URI: MLflow's implicit default depends on the working folder
    return f"sqlite:///{(out.parent / 'mlflow.db').resolve()}"


def flatten(prefix: str, value, out: dict) -> dict:
    """Nested config -> {"a.b.c": "value"} strings."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = json.dumps(value, sort_keys=True) if isinstance(value, (list, tuple)) \
            else str(value)
    return out


def group_scores(paths) -> dict[str, list[tuple[Path, dict]]]:
    groups: dict[str, list] = {}
    for path in sorted(map(Path, paths)):
        score = json.loads(path.read_text())
        groups.setdefault(f"{score['family']}/{score['method']}", []).append((path, score))
    return groups


def training_logs(results: Path, family: str, method: str) -> list[tuple[str, Path]]:
    """(prefix, metrics.jsonl) of the method's runs on a family; staged runs get their stage."""
    runs = results / "runs" / family
    out = [("train." if p.name == method else f"train.{p.name[len(method) + 1:]}.",
            p / "metrics.jsonl")
           for p in sorted(runs.glob(f"{method}*"))
           if p.name == method or p.name.startswith(f"{method}-stage")]
    return [(prefix, path) for prefix, path in out if path.is_file()]


def model_files(results: Path, family: str, method: str) -> list[Path]:
    folder = results / "models" / family / method
    return [p for p in (folder / "student.json", folder / "provenance.json") if p.is_file()]


def score_metrics(scores: list[tuple[Path, dict]]) -> list[tuple[str, float, int]]:
    """(key, value, step) of every score with its CI and its paired difference to the teacher;
    a teacher's sets are told apart by their steps."""
    out = []
    for _, score in scores:
        prefix = f"steps{score['steps']}." if score["method"] == "teacher" else ""
        for name, res in score["results"].items():
            out += [(f"{prefix}{name}", res["value"], 0), (f"{prefix}{name}.ci_low", res["ci_low"], 0),
                    (f"{prefix}{name}.ci_high", res["ci_high"], 0)]
        for name, d in ((score.get("against_teacher") or {}).get("metrics") or {}).items():
            out += [(f"vs_teacher.{name}", d["difference"], 0),
                    (f"vs_teacher.{name}.ci_low", d["ci_low"], 0),
                    (f"vs_teacher.{name}.ci_high", d["ci_high"], 0)]
    return out


def curve_metrics(logs: list[tuple[str, Path]]) -> list[tuple[str, float, int]]:
    out = []
    for prefix, path in logs:
        for line in json_lines(path.read_text()):
            row = json.loads(line)
            out += [(f"{prefix}{k}", float(v), int(row["step"])) for k, v in row.items()
                    if k != "step" and isinstance(v, (int, float))]
    return out


def deviation_tag(score: dict, info: dict) -> str:
    """The fidelity-ledger entries a student's run deviates in ("none" for a teacher or a faithful
    run; "unknown" for a student recorded before runs recorded them)."""
    if score["method"] == "teacher":
        return "none"
    if "deviations" not in info:
        return "unknown"
    return ",".join(sorted(d["what"] for d in info["deviations"])) or "none"


def run_tags(key: str, scores: list[tuple[Path, dict]], config_sha: str | None) -> dict:
    from fewstep.reporting.tables import student_info, trained_on

    first = scores[0][1]
    env = (first.get("sampling_provenance") or {}).get("environment") or {}
    scored = {name for _, s in scores for name in s["results"]}
    tags = {"fewstep.key": key, "family": first["family"], "method": first["method"],
            "fidelity": student_info(first).get("fidelity", "teacher" if first["method"] ==
                                                "teacher" else "faithful"),
            "leakage": ",".join(sorted(trained_on(first) & scored)) or "none",
            "deviations": deviation_tag(first, student_info(first)),
            "git_commit": str(env.get("git_commit", "unknown"))}
    if config_sha:
        tags["config_sha256"] = config_sha
    for _, s in scores:
        for name, res in s["results"].items():
            ident = json.dumps(res.get("identity", {}), sort_keys=True)
            tags[f"protocol.{name}"] = hashlib.sha256(ident.encode()).hexdigest()[:16]
    return tags


def run_params(scores, config: dict | None) -> dict:
    from fewstep.reporting.tables import student_info

    info = student_info(scores[0][1])
    params = flatten("config", config or {}, {})
    params.update(flatten("option", info.get("options") or {}, {}))
    for key in ("preset", "iterations", "train_seconds", "reward"):
        if key in info:
            params[f"student.{key}"] = str(info[key])
    return {k: v[:MAX_PARAM] for k, v in params.items()}


def content_sha(files: list[Path], extra: str) -> str:
    digest = hashlib.sha256(extra.encode())
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def log_all(client, rid: str, metrics, params: dict, tags: dict) -> None:
    """Batched writes (MLflow's log_batch limits: 1000 metrics, 100 params per call)."""
    from mlflow.entities import Metric, Param, RunTag

    ms = [Metric(k, float(v), 0, step) for k, v, step in metrics]
    for i in range(0, len(ms), 1000):
        client.log_batch(rid, metrics=ms[i:i + 1000])
    ps = [Param(k, v) for k, v in sorted(params.items())]
    for i in range(0, len(ps), 100):
        client.log_batch(rid, params=ps[i:i + 100])
    client.log_batch(rid, tags=[RunTag(k, v) for k, v in tags.items()])


def push(client, experiment_id: str, key: str, scores, args, config: dict | None) -> str:
    """Create (or keep, when its content hash is unchanged) the run of one model or teacher."""
    family, method = key.split("/")
    results = Path(args.results)
    logs = training_logs(results, family, method)
    grid = Path(args.grids) / f"{family}-grid.png" if args.grids else None
    files = [p for p, _ in scores] + [p for _, p in logs] + model_files(results, family, method) \
        + ([grid] if grid and grid.is_file() else [])
    config_text = json.dumps(config or {}, sort_keys=True)
    sha = content_sha(files, config_text)
    found = client.search_runs([experiment_id], filter_string=f"tags.`fewstep.key` = '{key}'")
    for run in found:
        if run.data.tags.get("fewstep.sha256") == sha:
            return run.info.run_id
        client.delete_run(run.info.run_id)  # changed: replaced, never duplicated
    rid = client.create_run(experiment_id, run_name=key, tags={"fewstep.key": key}).info.run_id
    config_sha = hashlib.sha256(config_text.encode()).hexdigest()[:16] if config else None
    log_all(client, rid, score_metrics(scores) + curve_metrics(logs), run_params(scores, config),
            run_tags(key, scores, config_sha))
    for path in files:
        client.log_artifact(rid, str(path), artifact_path=path.parent.name)
    client.set_tag(rid, "fewstep.sha256", sha)  # last: a run cut short is replaced next time
    client.set_terminated(rid)
    return rid


def experiment_id(client, name: str, out: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp:
        return exp.experiment_id
    artifacts = (out.parent / "artifacts").resolve().as_uri()  # explicit: never ./mlruns
    return client.create_experiment(name, artifact_location=artifacts)


def run(args):
    from mlflow.tracking import MlflowClient

    # an unreachable server should fail in seconds, not after MLflow's minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=tracking_uri(args.tracking_uri, out))
    config = args.config_json
    try:
        exp_id = experiment_id(client, args.experiment, out)
    except Exception as err:  # noqa: BLE001 - any failure to reach the store is reported as such
        raise SystemExit(f"fewstep track: the tracking store {client.tracking_uri} cannot be "
                         f"reached ({type(err).__name__}: {err}). Nothing on disk changed; rerun "
                         "the track rule (or `snakemake all`) once it is up to push the results.")
    runs = {key: push(client, exp_id, key, scores, args, config)
            for key, scores in group_scores(args.scores).items()}
    write_json(out, {"tracking_uri": client.tracking_uri, "experiment": args.experiment, "runs": runs})
    print(f"tracked {len(runs)} runs in {client.tracking_uri}")
