"""fewstep track: push score files to MLflow, one run per sample set, idempotently.

Files are the record; MLflow is a sink. A run is keyed by the tag `fewstep.key`
(family/method/steps); a score file already pushed with the same content hash is skipped, a
changed one replaces the old run.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from fewstep.io import write_json


def add_arguments(p):
    p.add_argument("--scores", nargs="+", required=True)
    p.add_argument("--experiment", required=True)
    p.add_argument("--tracking-uri", default=None,
                   help="default: $MLFLOW_TRACKING_URI, else sqlite under results/mlflow")
    p.add_argument("--out", required=True, help="tracked.json: run ids per key")


def tracking_uri(arg: str | None, out: Path) -> str:
    if arg:
        return arg
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    # an explicit absolute sqlite URI: MLflow's implicit default depends on the working folder
    return f"sqlite:///{(out.parent / 'mlflow.db').resolve()}"


def push(client, experiment_id: str, score: dict, sha: str) -> str:
    key = f"{score['family']}/{score['method']}/steps{score['steps']}"
    found = client.search_runs([experiment_id], filter_string=f"tags.`fewstep.key` = '{key}'")
    for run in found:
        if run.data.tags.get("fewstep.sha256") == sha:
            return run.info.run_id
        client.delete_run(run.info.run_id)
    run = client.create_run(experiment_id, run_name=key,
                            tags={"fewstep.key": key, "fewstep.sha256": sha})
    rid = run.info.run_id
    for name in ("family", "method", "steps", "nfe", "guidance", "sample_set"):
        client.log_param(rid, name, score[name])
    for name, res in score["results"].items():
        client.log_metric(rid, name, res["value"])
        client.log_metric(rid, f"{name}.ci_low", res["ci_low"])
        client.log_metric(rid, f"{name}.ci_high", res["ci_high"])
        client.log_param(rid, f"{name}.version", res["version"])
    client.set_terminated(rid)
    return rid


def run(args):
    from mlflow.tracking import MlflowClient

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=tracking_uri(args.tracking_uri, out))
    exp = client.get_experiment_by_name(args.experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(args.experiment)
    runs = {}
    for path in sorted(args.scores):
        text = Path(path).read_text()
        score = json.loads(text)
        runs[path] = push(client, exp_id, score, hashlib.sha256(text.encode()).hexdigest())
    write_json(out, {"tracking_uri": client.tracking_uri, "experiment": args.experiment, "runs": runs})
    print(f"tracked {len(runs)} runs in {client.tracking_uri}")
