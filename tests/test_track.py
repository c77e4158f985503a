"""fewstep track: one MLflow run per trained model (and teacher), idempotent, complete."""
import json
import sqlite3

import pytest

from fewstep.cli import main


def score(family, method, steps, value, leak_reward=None):
    res = {"name": "toy_hps", "version": "1", "higher_is_better": True, "value": value,
           "ci_low": value - 1, "ci_high": value + 1, "n": 8, "per_sample": [],
           "identity": {"metric": "toy_hps", "resolution": [16, 16]}, "details": {}}
    student = None if method == "teacher" else {
        "method": method, "fidelity": "reconstructed" if method == "amd" else "faithful",
        "options": {"lr": 1e-5, "reward_model": "toy"}, "preset": "toy", "reward": leak_reward,
        "deviations": [{"what": "regression", "paper": "lpips", "ours": "l2"},
                       {"what": "critic_lora_rank", "paper": 32, "ours": 0}]}
    row = {"family": family, "method": method, "steps": steps, "nfe": steps,
           "results": {"toy_hps": res, "hpsv2.1": {**res, "name": "hpsv2.1"}},
           "sampling_provenance": {"student": student, "environment": {"git_commit": "abc123"}}}
    if method != "teacher":
        row["against_teacher"] = {"metrics": {"toy_hps": {"difference": 0.5, "ci_low": 0.1,
                                                          "ci_high": 0.9}}}
    return row


@pytest.fixture
def layout(tmp_path):
    files = []
    for family, method, steps, value in (("sd3", "teacher", 1, 1.0), ("sd3", "teacher", 2, 2.0),
                                         ("sd3", "amd", 4, 3.0)):
        path = tmp_path / "results/scores" / family / method / f"steps{steps}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(score(family, method, steps, value, "hpsv2")))
        files.append(str(path))
    log = tmp_path / "results/runs/sd3/amd/metrics.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text("".join(json.dumps({"step": s, "generator/loss": 1.0 / (s + 1)}) + "\n"
                           for s in range(5)))
    model = tmp_path / "results/models/sd3/amd"
    model.mkdir(parents=True)
    (model / "student.json").write_text("{}")
    return tmp_path, files


def track(root, files, *extra):
    return main(["track", "--scores", *files, "--experiment", "unit", "--results",
                 str(root / "results"), "--config-json", '{"world": "toy", "eval": {"seeds": [0]}}',
                 "--out", str(root / "results/mlflow/tracked.json"), *extra])


def test_one_run_per_model_with_params_metrics_tags_and_artifacts(layout):
    from mlflow.tracking import MlflowClient

    root, files = layout
    track(root, files)
    tracked = json.loads((root / "results/mlflow/tracked.json").read_text())
    assert set(tracked["runs"]) == {"sd3/teacher", "sd3/amd"}
    client = MlflowClient(tracking_uri=tracked["tracking_uri"])
    run = client.get_run(tracked["runs"]["sd3/amd"])
    assert run.data.params["config.world"] == "toy" and run.data.params["option.lr"] == "1e-05"
    assert run.data.metrics["toy_hps"] == 3.0 and run.data.metrics["vs_teacher.toy_hps"] == 0.5
    curve = client.get_metric_history(run.info.run_id, "train.generator/loss")
    assert [m.step for m in curve] == [0, 1, 2, 3, 4]
    tags = run.data.tags
    assert tags["fidelity"] == "reconstructed" and tags["leakage"] == "hpsv2.1"
    assert tags["deviations"] == "critic_lora_rank,regression"  # the ledger entries its run used
    assert tags["git_commit"] == "abc123" and len(tags["protocol.toy_hps"]) == 16
    assert "config_sha256" in tags
    names = {a.path for folder in client.list_artifacts(run.info.run_id)
             for a in client.list_artifacts(run.info.run_id, folder.path)}
    assert {"amd/steps4.json", "amd/metrics.jsonl", "amd/student.json"} <= names
    teacher = client.get_run(tracked["runs"]["sd3/teacher"])
    assert teacher.data.metrics["steps1.toy_hps"] == 1.0 and teacher.data.tags["leakage"] == "none"
    assert teacher.data.tags["deviations"] == "none"


def test_pushing_again_updates_and_never_duplicates(layout):
    root, files = layout
    track(root, files)
    first = json.loads((root / "results/mlflow/tracked.json").read_text())["runs"]
    track(root, files)
    assert json.loads((root / "results/mlflow/tracked.json").read_text())["runs"] == first
    changed = json.loads(open(files[2]).read())
    changed["results"]["toy_hps"]["value"] = 9.0
    open(files[2], "w").write(json.dumps(changed))
    track(root, files)
    second = json.loads((root / "results/mlflow/tracked.json").read_text())["runs"]
    assert second["sd3/teacher"] == first["sd3/teacher"] and second["sd3/amd"] != first["sd3/amd"]
    with sqlite3.connect(root / "results/mlflow/mlflow.db") as db:
        live = db.execute("select count(*) from runs where lifecycle_stage = 'active'").fetchone()
    assert live[0] == 2


def test_an_unreachable_server_changes_nothing_and_says_so(layout, monkeypatch):
    root, files = layout
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(SystemExit, match="cannot be reached.*Nothing on disk changed"):
        track(root, files, "--tracking-uri", "http://127.0.0.1:9")
    assert not (root / "results/mlflow/tracked.json").exists()
