"""fewstep track with training seeds: one MLflow run per (cell, training seed), nested under one
aggregate run per cell, idempotent (the aggregate's "replicates" list names the replicate files)."""
import json

from test_track import score, track


def replicate(family, method, seed, value):
    row = score(family, method, 4, value)
    row["training_seed"] = seed
    return row


def aggregate(family, method, seeds, values):
    """A cell's student.json as the score aggregation writes it (mean, per-seed details)."""
    mean = sum(values) / len(values)
    row = score(family, method, 4, mean)
    name = "seed{}".format
    row["replicates"] = [{"training_seed": s, "score_file": f"results/scores/{family}/{method}/"
                          f"{name(s) if s is not None else 'released'}.json",
                          "sample_set": f"results/samples/{family}/{method}/{name(s)}"}
                         for s in seeds]
    row["n_training_seeds"] = sum(s is not None for s in seeds)
    for res in row["results"].values():
        res["details"] = {"per_seed": {str(s): v for s, v in zip(seeds, values) if s is not None},
                          "seed_sd": 0.5 if len(values) > 1 else None,
                          "n_training_seeds": row["n_training_seeds"]}
    row["against_teacher"]["metrics"]["toy_hps"]["p_value"] = 0.01
    return row


def write(path, row):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(row if isinstance(row, str) else json.dumps(row))
    return str(path)


def write_cell(root, family, method, seeds, values):
    for s, v in zip(seeds, values):
        name = "released" if s is None else f"seed{s}"
        write(root / f"results/scores/{family}/{method}/{name}.json",
              replicate(family, method, s, v))
        model = (root / f"results/released/{family}/{method}" if s is None
                 else root / f"results/models/{family}/{method}/seed{s}")
        write(model / "student.json", {"seed": s})
        write(model / "provenance.json", {"seed": s})
        if s is not None:  # the replicate's training curve
            write(root / f"results/runs/{family}/{method}/seed{s}/metrics.jsonl",
                  "".join(json.dumps({"step": i, "generator/loss": s + 1.0 / (i + 1)}) + "\n"
                          for i in range(3)))
    return write(root / f"results/scores/{family}/{method}/student.json",
                 aggregate(family, method, seeds, values))


def tracked(root):
    return json.loads((root / "results/mlflow/tracked.json").read_text())


def test_one_run_per_training_seed_nested_under_the_cell_and_idempotent(tmp_path):
    from mlflow.tracking import MlflowClient

    teacher = score("sd3", "teacher", 1, 1.0)
    files = [write(tmp_path / "results/scores/sd3/teacher/steps1.json", teacher),
             write_cell(tmp_path, "sd3", "amd", [0, 1], [3.0, 4.0]),
             write_cell(tmp_path, "sd3", "lcm", [None], [2.0]),  # a released checkpoint
             str(tmp_path / "results/scores/sd3/amd/seed0.json")]  # tracked through its aggregate
    track(tmp_path, files)
    first = tracked(tmp_path)
    assert set(first["runs"]) == {"sd3/teacher", "sd3/amd", "sd3/lcm"}
    assert set(first["replicate_runs"]) == {"sd3/amd/seed0", "sd3/amd/seed1",
                                            "sd3/lcm/released"}
    client = MlflowClient(tracking_uri=first["tracking_uri"])
    cell = client.get_run(first["runs"]["sd3/amd"]).data
    assert cell.tags["kind"] == "cell" and cell.tags["n_training_seeds"] == "2"
    assert cell.metrics["toy_hps"] == 3.5 and cell.metrics["toy_hps/seed1"] == 4.0
    assert cell.metrics["toy_hps.seed_sd"] == 0.5
    assert cell.metrics["vs_teacher.toy_hps.p_value"] == 0.01
    assert cell.params["option.lr"] == "1e-05"
    seed1 = client.get_run(first["replicate_runs"]["sd3/amd/seed1"])
    tags = seed1.data.tags
    assert tags["mlflow.parentRunId"] == first["runs"]["sd3/amd"]
    assert (tags["kind"], tags["training_seed"], tags["replicate"]) == ("replicate", "1", "seed1")
    assert (tags["family"], tags["method"], tags["fidelity"]) == ("sd3", "amd", "reconstructed")
    assert seed1.data.metrics["toy_hps"] == 4.0 and seed1.data.params["config.world"] == "toy"
    assert [m.value for m in client.get_metric_history(seed1.info.run_id, "train.generator/loss")] \
        == [2.0, 1.5, 1 + 1 / 3]
    names = {a.path for folder in client.list_artifacts(seed1.info.run_id)
             for a in client.list_artifacts(seed1.info.run_id, folder.path)}
    assert {"scores/seed1.json", "model/student.json", "model/provenance.json"} <= names
    released = client.get_run(first["replicate_runs"]["sd3/lcm/released"]).data.tags
    assert (released["replicate"], released["training_seed"]) == ("released", "none")
    assert client.get_run(first["runs"]["sd3/lcm"]).data.tags["n_training_seeds"] == "0"

    track(tmp_path, files)  # unchanged: the same runs
    assert tracked(tmp_path) == first
    # a new aggregate (seed 1 dropped): the cell's run replaced, seed 0's kept and re-parented,
    # seed 1's deleted
    write_cell(tmp_path, "sd3", "amd", [0], [3.0])
    track(tmp_path, files)
    second = tracked(tmp_path)
    assert second["runs"]["sd3/amd"] != first["runs"]["sd3/amd"]
    assert second["runs"]["sd3/teacher"] == first["runs"]["sd3/teacher"]
    assert second["replicate_runs"]["sd3/amd/seed0"] == first["replicate_runs"]["sd3/amd/seed0"]
    assert "sd3/amd/seed1" not in second["replicate_runs"]
    kept = client.get_run(second["replicate_runs"]["sd3/amd/seed0"]).data.tags
    assert kept["mlflow.parentRunId"] == second["runs"]["sd3/amd"]
    live = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert sorted(r.data.tags["fewstep.key"] for r in live) == \
        ["sd3/amd", "sd3/amd/seed0", "sd3/lcm", "sd3/lcm/released", "sd3/teacher"]


def test_a_missing_replicate_file_fails_before_anything_is_tracked(tmp_path, capsys):
    aggregate_file = write_cell(tmp_path, "sd3", "amd", [0, 1], [3.0, 4.0])
    (tmp_path / "results/scores/sd3/amd/seed1.json").unlink()
    assert track(tmp_path, [aggregate_file]) == 2
    err = capsys.readouterr().err
    assert "results/scores/sd3/amd/seed1.json" in err and "training seed 1" in err
    assert not (tmp_path / "results/mlflow").exists()
