"""fewstep track: push the results to MLflow, one run per teacher, and per student cell one
aggregate run with one nested run per replicate (training seed, or its released checkpoint),
idempotently.

Files are the record; MLflow is a sink. A run is keyed by the tag `fewstep.key` (family/method;
a replicate's family/method/seed<s> or family/method/released) and carries the sha256 of everything
pushed: an unchanged run is skipped, a changed one replaced, so rerunning never duplicates. A
replicate's run is a child of its cell's run (tag mlflow.parentRunId, re-pointed when the cell's
run is replaced) and is deleted when the aggregate no longer lists it. Per run: params (the
resolved workflow config, the method's options and preset), metrics (training curves by step,
every score with its CI, paired differences against the teacher; a cell's: the aggregate over
training seeds, each seed's value as <metric>/seed<s>, the seed sd, the paired p-values), tags
(git commit, config hash, protocol id per metric, method fidelity, leakage: metrics whose model the
method trained on; kind cell/replicate, n_training_seeds, training_seed, replicate), artifacts
(score files, student.json, provenance, the family's sample grid). A student score file without
"replicates" (scored before training seeds) is one run as before. If the tracking server cannot
be reached nothing on disk changes; the job fails with that message and the next run pushes
everything.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from fewstep.errors import FewstepError
from fewstep.io import json_lines, write_json

PARENT = "mlflow.parentRunId"  # MLflow's tag of a nested run's parent
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
    # a replicate's own score file, when passed too, is tracked through its cell's aggregate
    return {key: [row for row in rows if "replicates" in row[1]] or rows
            for key, rows in groups.items()}


def replicate_name(seed) -> str:
    """The replicate's folder name (SEEDS layout): seed<s>, or released (no training seed)."""
    return "released" if seed is None else f"seed{seed}"


def replicate_scores(path: Path, aggregate: dict, results: Path) -> list[tuple[object, Path, dict]]:
    """(training seed, score file, score) of each replicate an aggregate lists; its paths are
    relative to the project folder, the one holding results/."""
    out = []
    for rep in aggregate["replicates"]:
        seed, file = rep.get("training_seed"), Path(rep["score_file"])
        file = file if file.is_absolute() else results.parent / file
        if not file.is_file():
            raise FewstepError(
                f"{path} lists the replicate score file {rep['score_file']} "
                f"(training seed {seed}), not found at {file}. `fewstep score` writes it (the "
                "DAG's score rule for that replicate): rerun `snakemake all`.")
        out.append((seed, file, json.loads(file.read_text())))
    return out


def training_logs(results: Path, family: str, method: str, replicate: str = ""
                  ) -> list[tuple[str, Path]]:
    """(prefix, metrics.jsonl) of the method's runs on a family; staged runs get their stage.
    A replicate's logs are in its seed folder of each run folder."""
    runs = results / "runs" / family
    out = [("train." if p.name == method else f"train.{p.name[len(method) + 1:]}.",
            p / replicate / "metrics.jsonl")
           for p in sorted(runs.glob(f"{method}*"))
           if p.name == method or p.name.startswith(f"{method}-stage")]
    return [(prefix, path) for prefix, path in out if path.is_file()]


def model_files(results: Path, family: str, method: str) -> list[Path]:
    folder = results / "models" / family / method
    return [p for p in (folder / "student.json", folder / "provenance.json") if p.is_file()]


def replicate_model_files(results: Path, family: str, method: str, seed) -> list[Path]:
    """A replicate's model folder (its seed folder; a released checkpoint's own folder)."""
    folder = (results / "released" / family / method if seed is None
              else results / "models" / family / method / f"seed{seed}")
    return [p for p in (folder / "student.json", folder / "provenance.json") if p.is_file()]


def score_metrics(scores: list[tuple[Path, dict]]) -> list[tuple[str, float, int]]:
    """(key, value, step) of every score with its CI and its paired difference to the teacher;
    a teacher's sets are told apart by their steps. An aggregate also gives each training seed's
    value (<metric>/seed<s>), their sd and the paired p-values."""
    out = []
    for _, score in scores:
        prefix = f"steps{score['steps']}." if score["method"] == "teacher" else ""
        for name, res in score["results"].items():
            out += [(f"{prefix}{name}", res["value"], 0), (f"{prefix}{name}.ci_low", res["ci_low"], 0),
                    (f"{prefix}{name}.ci_high", res["ci_high"], 0)]
            out += seed_metrics(f"{prefix}{name}", res.get("details") or {})
        for name, d in ((score.get("against_teacher") or {}).get("metrics") or {}).items():
            out += [(f"vs_teacher.{name}", d["difference"], 0),
                    (f"vs_teacher.{name}.ci_low", d["ci_low"], 0),
                    (f"vs_teacher.{name}.ci_high", d["ci_high"], 0)]
            if d.get("p_value") is not None:
                out.append((f"vs_teacher.{name}.p_value", d["p_value"], 0))
    return out


def seed_metrics(name: str, details: dict) -> list[tuple[str, float, int]]:
    out = [(f"{name}/seed{s}", v, 0) for s, v in (details.get("per_seed") or {}).items()
           if str(s).isdigit() and v is not None]
    if details.get("seed_sd") is not None:
        out.append((f"{name}.seed_sd", details["seed_sd"], 0))
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


@dataclass
class Sink:
    """Where runs go and what every run shares (the workflow config and its hash)."""
    client: object
    experiment: str
    results: Path
    grids: Path | None
    config: dict | None

    @property
    def config_text(self) -> str:
        return json.dumps(self.config or {}, sort_keys=True)

    @property
    def config_sha(self) -> str | None:
        return hashlib.sha256(self.config_text.encode()).hexdigest()[:16] if self.config else None

    def grid(self, family: str) -> list[Path]:
        grid = self.grids / f"{family}-grid.png" if self.grids else None
        return [grid] if grid and grid.is_file() else []


def push_run(sink: Sink, key: str, artifacts: list[tuple[Path, str]], build,
             parent: str | None = None, cell: str | None = None) -> str:
    """Create (or keep, when its content hash is unchanged) the run keyed `key`; build() gives
    its (metrics, params, tags), computed only when the run is written. A replicate's run is a
    child of its cell's run (MLflow's nested runs) and tagged with its cell."""
    client = sink.client
    sha = content_sha([p for p, _ in artifacts], sink.config_text)
    found = client.search_runs([sink.experiment], filter_string=f"tags.`fewstep.key` = '{key}'")
    for run in found:
        if run.data.tags.get("fewstep.sha256") == sha:
            if parent and run.data.tags.get(PARENT) != parent:
                client.set_tag(run.info.run_id, PARENT, parent)  # its cell's run was replaced
            return run.info.run_id
        client.delete_run(run.info.run_id)  # changed: replaced, never duplicated
    tags = {"fewstep.key": key, **({PARENT: parent, "fewstep.cell": cell} if parent else {})}
    rid = client.create_run(sink.experiment, run_name=key, tags=tags).info.run_id
    log_all(client, rid, *build())
    for path, folder in artifacts:
        client.log_artifact(rid, str(path), artifact_path=folder)
    client.set_tag(rid, "fewstep.sha256", sha)  # last: a run cut short is replaced next time
    client.set_terminated(rid)
    return rid


def push(sink: Sink, key: str, scores) -> str:
    """One run of a teacher, or of a cell scored before training seeds (no "replicates")."""
    family, method = key.split("/")
    logs = training_logs(sink.results, family, method)
    files = [p for p, _ in scores] + [p for _, p in logs] \
        + model_files(sink.results, family, method) + sink.grid(family)
    return push_run(sink, key, [(p, p.parent.name) for p in files], lambda: (
        score_metrics(scores) + curve_metrics(logs), run_params(scores, sink.config),
        run_tags(key, scores, sink.config_sha)))


def push_replicate(sink: Sink, cell: str, seed, path: Path, score: dict, parent: str) -> str:
    """The run of one (cell, training seed): its score file, model folder and training curves."""
    family, method = cell.split("/")
    name, scores = replicate_name(seed), [(path, score)]
    key = f"{cell}/{name}"
    logs = training_logs(sink.results, family, method, name) if seed is not None else []
    artifacts = [(path, "scores")] \
        + [(p, "model") for p in replicate_model_files(sink.results, family, method, seed)] \
        + [(p, f"train/{p.parent.parent.name}") for _, p in logs]
    tags = {"kind": "replicate", "replicate": name,
            "training_seed": "none" if seed is None else str(seed)}
    return push_run(sink, key, artifacts, lambda: (
        score_metrics(scores) + curve_metrics(logs), run_params(scores, sink.config),
        {**run_tags(key, scores, sink.config_sha), **tags}), parent=parent, cell=cell)


def push_cell(sink: Sink, key: str, path: Path, aggregate: dict, replicates
              ) -> tuple[str, dict[str, str]]:
    """The cell's aggregate run (mean over training seeds, its intervals, per-seed values), then
    one child run per replicate."""
    scores = [(path, aggregate)]
    k = aggregate.get("n_training_seeds", sum(s is not None for s, _, _ in replicates))
    tags = {"kind": "cell", "n_training_seeds": str(k)}
    files = [path] + sink.grid(aggregate["family"])
    parent = push_run(sink, key, [(p, p.parent.name) for p in files], lambda: (
        score_metrics(scores), run_params(scores, sink.config),
        {**run_tags(key, scores, sink.config_sha), **tags}))
    return parent, {f"{key}/{replicate_name(seed)}": push_replicate(sink, key, seed, file, score,
                                                                    parent)
                    for seed, file, score in replicates}


def prune(sink: Sink, cell: str, keep) -> None:
    """Delete the replicate runs of a cell that its aggregate no longer lists."""
    found = sink.client.search_runs([sink.experiment],
                                    filter_string=f"tags.`fewstep.cell` = '{cell}'")
    for run in found:
        if run.data.tags.get("fewstep.key") not in keep:
            sink.client.delete_run(run.info.run_id)


def plan(groups: dict, results: Path) -> dict:
    """key -> (scores, replicates or None); every replicate file is read before anything is
    pushed, so a missing one fails the job with nothing half-tracked."""
    out = {}
    for key, scores in groups.items():
        path, first = scores[0]
        out[key] = (scores, replicate_scores(path, first, results) if "replicates" in first
                    else None)
    return out


def push_all(sink: Sink, planned: dict) -> tuple[dict, dict]:
    runs, children = {}, {}
    for key, (scores, replicates) in planned.items():
        if replicates is None:
            runs[key], kids = push(sink, key, scores), {}
        else:
            runs[key], kids = push_cell(sink, key, *scores[0], replicates)
        prune(sink, key, kids)
        children.update(kids)
    return runs, children


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
    planned = plan(group_scores(args.scores), Path(args.results))
    out.parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=tracking_uri(args.tracking_uri, out))
    config = args.config_json
    try:
        exp_id = experiment_id(client, args.experiment, out)
    except Exception as err:  # noqa: BLE001 - any failure to reach the store is reported as such
        raise SystemExit(f"fewstep track: the tracking store {client.tracking_uri} cannot be "
                         f"reached ({type(err).__name__}: {err}). Nothing on disk changed; rerun "
                         "the track rule (or `snakemake all`) once it is up to push the results.")
    sink = Sink(client, exp_id, Path(args.results), Path(args.grids) if args.grids else None,
                config)
    runs, children = push_all(sink, planned)
    write_json(out, {"tracking_uri": client.tracking_uri, "experiment": args.experiment,
                     "runs": runs, "replicate_runs": children})
    print(f"tracked {len(runs)} runs and {len(children)} replicate runs in {client.tracking_uri}")
