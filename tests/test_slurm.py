"""`snakemake --profile slurm all` on a real (single-node) SLURM cluster, exactly as the README
says: the profile installed with the cluster's partition, its status command, GPU requests,
resources and a two-rank training job inside one allocation work end to end. The test uses a
running cluster or starts one (`.ci/slurm up`, root on Debian) and stops what it started."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
TINY = {
    "families": ["sit"],
    "teachers": {"source": "train", "train": {"steps": 2, "batch": 4, "lr": 0.002, "seed": 0},
                 "guidance": {"sit": 2.0}},
    "eval": {"prompts": 6, "seeds": [0, 1], "steps": [1]},
    "fid": {"reference_images": 36, "feature_net": "train", "feature_net_steps": 20},
    "bootstrap": {"resamples": 50, "confidence": 0.95, "seed": 0},
    "distill": {"methods": ["dummy"], "preset": "toy", "stages": {}, "overrides": {"dummy": {"steps": 3}},
                "pairs": {"count": 4, "steps": 2}, "processes": 2},  # two ranks in one allocation
}


def cluster_idle() -> bool:
    if not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and "idle" in out.stdout.split()


@pytest.fixture(scope="module")
def cluster():
    """A live single-node cluster: the one already running, or one this fixture starts with
    `.ci/slurm up` (Debian's munge, slurmctld and slurmd; needs root) and stops afterwards."""
    if cluster_idle():
        yield "already running"
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no SLURM cluster here and no root/apt to start one; start one with "
                    "`sudo bash .ci/slurm up` (Debian)")
    up = subprocess.run(["bash", str(REPO / ".ci" / "slurm"), "up"], capture_output=True, text=True)
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    try:
        yield "started by the test"
    finally:
        subprocess.run(["bash", str(REPO / ".ci" / "slurm"), "down"], capture_output=True)


def repository_copy(dest: Path) -> Path:
    """The tracked files of this checkout (what a user clones), so results stay out of it."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def test_readme_command_runs_the_dag_on_slurm(cluster, tmp_path):
    """Exactly the README's two commands, from the repository root: install the profile with the
    cluster's partition, then `snakemake --profile slurm all` (here with the tiny config)."""
    repo = repository_copy(tmp_path / "repo")
    (repo / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    install = subprocess.run(["fewstep", "profile", "install", "slurm", "--partition", "debug"],
                             cwd=repo, env=env, capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    out = subprocess.run(["snakemake", "--profile", "slurm", "all", "--configfile", "tiny.yaml"],
                         cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "submitted with SLURM jobid" in log
    assert (repo / "reports" / "leaderboard.md").is_file()
    assert (repo / "reports" / "claims_audit.md").is_file()
    student = json.loads((repo / "results/models/sit/dummy/student.json").read_text())
    assert student["iterations"] == 3 and student["world_size"] == 2
    jobs = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i %k"], capture_output=True,
                          text=True).stdout
    train_ids = [line.split()[0] for line in jobs.splitlines() if "rule_train_" in line]
    assert train_ids, jobs
    detail = subprocess.run(["scontrol", "show", "job", train_ids[-1]], capture_output=True,
                            text=True).stdout
    assert "gpu:2" in detail and "Partition=debug" in detail  # two ranks in one allocation
