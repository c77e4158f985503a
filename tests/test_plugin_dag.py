"""A method plugin is one file: the example package, installed from outside the repository, is
trained by the DAG on the reward it requires, sampled, scored and reported, then released from
its own weights and evaluated again, with no file of the repository naming it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fewstep.io import file_sha256
from plugin_checks import plugin_env  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parent.parent
PLUGIN = "example_plugin"
# one family, one teacher step count, a few prompts: the shipped teacher is copied, not trained
TINY = {
    "families": ["sit"],
    "eval": {"prompts": 6, "seeds": [0], "steps": [1]},
    "metrics": ["toy_fid", "toy_geneval"],
    "fid": {"reference_images": 36, "feature_net_steps": 20},
    "bootstrap": {"resamples": 50, "confidence": 0.95, "seed": 0},
    "distill": {"methods": [PLUGIN], "preset": "toy", "stages": {}, "overrides": {},
                "pairs": {"count": 4, "steps": 2}},
}


def snakemake(workdir: Path, cfg: dict, env: dict, name: str):
    (workdir / name).write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d",
                          str(workdir), "--cores", "2", "all", "--configfile", str(workdir / name)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, plugin_env):
    work = tmp_path_factory.mktemp("dag")
    snakemake(work, TINY, plugin_env, "tiny.yaml")
    return work


@pytest.fixture(scope="module")
def released(trained, plugin_env):
    """The same workdir with the plugin's trained weights configured as a published release."""
    weights = trained / "published" / "example_plugin_sit.safetensors"
    weights.parent.mkdir()
    trained_weights = trained / f"results/models/sit/{PLUGIN}/seed0/generator.safetensors"
    weights.write_bytes(trained_weights.read_bytes())
    cfg = {**TINY, "distill": {**TINY["distill"],
                               "released": {PLUGIN: {"sit": {"weights": str(weights)}}}}}
    snakemake(trained, cfg, plugin_env, "released.yaml")
    return trained, weights


def test_the_plugin_trains_on_the_reward_it_requires(trained):
    model = json.loads((trained / f"results/models/sit/{PLUGIN}/seed0/student.json").read_text())
    assert model["method"] == PLUGIN and model["iterations"] == 4
    assert model["inputs"]["reward"] == "results/metrics/toy_reward_net.safetensors"
    assert model["student"]["nfe"] == 2  # its own sampler: two steps, the guidance baked in
    rows = [json.loads(line) for line in
            (trained / f"results/runs/sit/{PLUGIN}/seed0/metrics.jsonl").read_text().splitlines()]
    assert all(row["generator/reward"] < 0 for row in rows)  # toy rewards are log-probabilities


def test_the_plugin_is_sampled_scored_and_reported(trained):
    score = json.loads((trained / f"results/scores/sit/{PLUGIN}/student.json").read_text())
    assert score["method"] == PLUGIN and score["nfe"] == 2
    assert score["against_teacher"]["match"] == "same NFE"
    board = (trained / "reports/leaderboard.md").read_text()
    assert f"| sit | {PLUGIN} (plumbing) | 2 | 2 |" in board  # the steps and NFE of its sampler


def test_the_plugins_release_is_sampled_scored_and_reported(released):
    work, weights = released
    model = json.loads((work / f"results/released/sit/{PLUGIN}/student.json").read_text())
    assert model["weights"] == "released" and model["preset"] == "toy"
    assert model["released"]["sha256"] == {weights.name: file_sha256(weights)}
    assert model["student"] == json.loads(
        (work / f"results/models/sit/{PLUGIN}/seed0/student.json").read_text())["student"]
    samples = work / f"results/samples/sit/{PLUGIN}/released"
    sampled = json.loads((samples / "provenance.json").read_text())
    assert f"results/released/sit/{PLUGIN}" in json.dumps(sampled)
    board = (work / "reports/leaderboard.md").read_text()
    assert f"| sit | {PLUGIN} (plumbing, released checkpoint) | 2 | 2 |" in board
    assert f"| sit | {PLUGIN} (plumbing) |" not in board  # the release replaced the trained row


def test_no_file_of_the_repository_names_the_plugin():
    tracked = subprocess.run(["git", "ls-files", "fewstep", "methods", "metrics", "workflows",
                              "Snakefile"], cwd=REPO, capture_output=True, text=True, check=True)
    named = [p for p in tracked.stdout.split() if PLUGIN in (REPO / p).read_text(errors="ignore")]
    assert named == []
