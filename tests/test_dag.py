"""The walking skeleton, for real: the DAG on a tiny config, teachers trained by the recipe rule."""
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from plugin_checks import plugin_env  # noqa: F401 (a fixture)

from fewstep import config as workflow_config

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]
METRICS = workflow_config.load(workflow_config.DEFAULT)["metrics"]  # the tiny config keeps them
TINY = {
    "teachers": {"source": "train", "train": {"steps": 2, "batch": 4, "lr": 0.002, "seed": 0},
                 "guidance": {"sdxl": 2.0, "sd3": 2.0, "sit": 2.0}},
    "eval": {"prompts": 6, "seeds": [0, 1], "steps": [1, 2]},
    "fid": {"reference_images": 36, "feature_net_steps": 20},
    "bootstrap": {"resamples": 50, "confidence": 0.95, "seed": 0},
    # dummy: the built-in plumbing method; example_plugin: a separately installed package
    # two training seeds: every student trained, sampled and scored twice, then aggregated
    "distill": {"methods": ["dummy", "example_plugin"], "preset": "toy", "stages": {}, "seeds": [0, 1],
                "overrides": {"dummy": {"steps": 3}}, "pairs": {"count": 4, "steps": 2}},
}


def snakemake(workdir, *args, timeout=900, env=None):
    return subprocess.run([*SNAKEMAKE, "-d", str(workdir), "--cores", "2", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def dag_run(tmp_path_factory, plugin_env):
    work = tmp_path_factory.mktemp("dag")
    (work / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    out = snakemake(work, "all", "--configfile", str(work / "tiny.yaml"), env=plugin_env)
    assert out.returncode == 0, out.stderr[-4000:]
    return work


def test_dag_writes_leaderboard_with_a_row_per_family_and_steps(dag_run):
    board, students = (dag_run / "reports" / "leaderboard.md").read_text().split(
        "## Students against their teacher")
    rows = [line for line in board.splitlines() if line.startswith("| s")]
    assert len(rows) == 3 * (2 + 2)  # two teacher step counts and two trained methods per family
    pairs = [line for line in students.split("## Metric identities")[0].splitlines()
             if line.startswith("| s")]
    assert len(pairs) == 3 * 2 * len(METRICS)    # each student, each metric
    assert "toy_fid 1 ↓" in board and "toy_geneval 1 ↑" in board and "toy_hps 2 ↑" in board
    assert "`toy_hps` fills the HPSv2 slot" in board
    for family in ("sdxl", "sd3", "sit"):
        assert (dag_run / f"results/teachers/{family}/recipe.json").is_file()
        score = json.loads((dag_run / f"results/scores/{family}/teacher/steps2.json").read_text())
        n_prompts = 18 if family == "sit" else 6  # SiT: every class at least once
        assert score["nfe"] == 4 and score["results"]["toy_fid"]["n"] == n_prompts * 2


def test_dag_writes_the_claims_audit(dag_run):
    """Every claim gets a verdict; the tiny config trains no paper method, so none was run."""
    from fewstep.audit import load_claims

    claims, _ = load_claims(REPO / "reports" / "claims.yaml")
    verdicts = json.loads((dag_run / "results/audit/verdicts.json").read_text())
    assert {v["claim_id"] for v in verdicts} == {c["id"] for c in claims}
    assert {v["verdict"] for v in verdicts} == {"not run"}
    assert "# Claims audit" in (dag_run / "reports/claims_audit.md").read_text()


def test_dag_writes_the_html_report(dag_run):
    page = (dag_run / "reports/fewstep-toy/index.html").read_text()
    assert page.count("<h2>") == 3 + 2  # three families, training cost, claims audit
    for family in ("sdxl", "sd3", "sit"):
        assert (dag_run / f"reports/fewstep-toy/img/{family}-grid.png").is_file()
    assert "against DMD2" not in page  # the tiny config trains no DMD2


def test_dag_tracks_one_mlflow_run_per_model_and_teacher(dag_run):
    tracked = json.loads((dag_run / "results/mlflow/tracked.json").read_text())
    assert len(tracked["runs"]) == 9  # per family: the teacher and two trained methods
    assert len(tracked["replicate_runs"]) == 3 * 2 * 2  # and each method's two training seeds
    with sqlite3.connect(dag_run / "results/mlflow/mlflow.db") as db:
        keys = db.execute("select value from tags where key = 'fewstep.key'").fetchall()
        live = db.execute("select count(*) from runs where lifecycle_stage = 'active'").fetchone()[0]
        curves = db.execute("select count(*) from metrics where key like 'train.%'").fetchone()[0]
    assert len(keys) == 21 and live == 21 and curves > 0


def test_dag_trains_builtin_and_plugin_methods_and_scores_their_students(dag_run):
    for family in ("sdxl", "sd3", "sit"):
        for method, nfe in (("dummy", 1), ("example_plugin", 2)):
            for seed in (0, 1):
                model = dag_run / f"results/models/{family}/{method}/seed{seed}"
                student = json.loads((model / "student.json").read_text())
                assert student["method"] == method and student["student"]["nfe"] == nfe
                assert student["options"]["seed"] == seed
                assert (dag_run / f"results/runs/{family}/{method}/seed{seed}/ckpt/latest").is_file()
            score = json.loads((dag_run / f"results/scores/{family}/{method}/student.json").read_text())
            assert score["method"] == method and score["nfe"] == nfe
            assert score["n_training_seeds"] == 2
            assert [r["training_seed"] for r in score["replicates"]] == [0, 1]
            for name, result in score["results"].items():
                per_seed = result["details"]["per_seed"]
                assert list(per_seed) == ["0", "1"], name
                assert result["value"] == pytest.approx(sum(per_seed.values()) / 2), name
            # paired with the teacher at its NFE; a guided teacher has no NFE 1, so the next one up
            against = score["against_teacher"]
            assert against["teacher_nfe"] == 2
            assert against["match"] == ("next NFE up" if nfe == 1 else "same NFE")
            assert set(against["metrics"]) == set(METRICS)
            assert all("verdict" in d and d["ci_low"] <= d["ci_high"] for d in against["metrics"].values())
            prov = json.loads((model / "provenance.json").read_text())
            assert prov["config"]["method"] == method and "git_commit" in prov["environment"]


def _two_level_direct(replicates: list[list[dict]], resamples: int, seed: int, level: float):
    """The cell's interval by hand (the default t seed level, metrics/seed_level.py): prompts
    drawn with replacement from rng(seed), one row per resample, every training seed kept; the
    variance of those resamples' seed-mean plus the between-seed variance / k; a t quantile with
    Welch-Satterthwaite degrees of freedom."""
    from scipy import stats as sps

    keys = [(r["prompt_id"], r["seed"]) for r in replicates[0]]
    prompts = list(dict.fromkeys(k[0] for k in keys))
    scores = []
    for rows in replicates:
        by_key = {(r["prompt_id"], r["seed"]): r["score"] for r in rows}
        scores.append({p: [by_key[k] for k in keys if k[0] == p] for p in prompts})
    seed_means = np.array([np.mean([x for p in prompts for x in s[p]]) for s in scores])
    draws = np.random.default_rng(seed).integers(0, len(prompts), size=(resamples, len(prompts)))
    values = [np.mean([np.mean([x for i in row for x in s[prompts[i]]]) for s in scores])
              for row in draws]
    v_prompt, v_seed = np.var(values, ddof=1), np.var(seed_means, ddof=1) / len(scores)
    df = (v_prompt + v_seed) ** 2 / (v_seed ** 2 / (len(scores) - 1)
                                     + v_prompt ** 2 / (len(prompts) - 1))
    half = sps.t.ppf(0.5 + level / 2, df) * np.sqrt(v_prompt + v_seed)
    return seed_means.mean() - half, seed_means.mean() + half


def test_a_two_seed_cells_interval_is_the_seed_level_interval_of_its_seeds(dag_run):
    """End to end: two training seeds trained, sampled and scored, and the aggregate's interval
    equals the seed-level interval computed directly from the two replicate score files."""
    cell = json.loads((dag_run / "results/scores/sit/dummy/student.json").read_text())
    replicates = [json.loads((dag_run / r["score_file"]).read_text()) for r in cell["replicates"]]
    assert len(replicates) == 2
    boot = TINY["bootstrap"]
    low, high = _two_level_direct([r["results"]["toy_hps"]["per_sample"] for r in replicates],
                                  boot["resamples"], boot["seed"], boot["confidence"])
    result = cell["results"]["toy_hps"]
    assert result["details"]["ci_covers"] == "training seeds and prompts"
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((low, high), abs=1e-12)


def test_every_job_records_provenance(dag_run):
    prov = json.loads((dag_run / "results/samples/sd3/teacher/steps1/provenance.json").read_text())
    assert prov["seeds"] == [0, 1] and prov["config"]["steps"] == 1
    assert prov["environment"]["packages"]["torch"].startswith("2.14")
    assert "git_commit" in prov["environment"] and "device" in prov["environment"]


def test_second_run_has_nothing_to_do(dag_run, plugin_env):
    out = snakemake(dag_run, "all", "-n", "--configfile", str(dag_run / "tiny.yaml"), env=plugin_env)
    assert out.returncode == 0
    assert "Nothing to be done" in out.stdout + out.stderr


def test_bad_config_stops_before_any_job(tmp_path):
    bad = dict(TINY, famlies=["sdxl"])
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    out = snakemake(tmp_path, "all", "--configfile", str(tmp_path / "bad.yaml"))
    assert out.returncode != 0
    assert "'famlies' was unexpected" in out.stdout + out.stderr
    assert not (tmp_path / "results").exists()
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(dict(TINY, metrics=["toy_gen_eval"])))
    out = snakemake(tmp_path, "all", "--configfile", str(tmp_path / "typo.yaml"))
    assert "Did you mean 'toy_geneval'" in out.stdout + out.stderr
