"""`snakemake --profile slurm` on a real (single-node) SLURM cluster: the shipped profile's status
command, GPU requests and resources work end to end. CI starts the cluster with `.ci/slurm up`;
without a cluster the test is skipped and says how to start one."""
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
                "pairs": {"count": 4, "steps": 2}},
}


def cluster_idle() -> bool:
    if not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and "idle" in out.stdout.split()


@pytest.mark.skipif(not cluster_idle(), reason="no SLURM cluster here; start one with "
                                                "`sudo bash .ci/slurm up` (Debian)")
def test_dag_runs_through_the_slurm_profile(tmp_path):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
           "--profile", str(REPO / "profiles" / "slurm"), "all", "--configfile", str(tmp_path / "tiny.yaml")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "submitted with SLURM jobid" in log
    assert (tmp_path / "reports" / "leaderboard.md").is_file()
    assert (tmp_path / "results" / "models" / "sit" / "dummy" / "student.json").is_file()
    jobs = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i %k"], capture_output=True,
                          text=True).stdout
    train_ids = [line.split()[0] for line in jobs.splitlines() if "rule_train_" in line]
    assert train_ids, jobs
    detail = subprocess.run(["scontrol", "show", "job", train_ids[-1]], capture_output=True, text=True).stdout
    assert "gpu:1" in detail  # gpu=1 became a GPU request
