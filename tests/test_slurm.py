"""`snakemake --profile slurm all` on a real (single-node) SLURM cluster, exactly as the README
says: the profile installed with the cluster's partition, its status command, GPU requests,
resources and a two-rank training job inside one allocation work end to end. The test uses a
running cluster; it starts one (`.ci/slurm up`: Debian's slurm and munge, root) only when asked
with FEWSTEP_TEST_SLURM_UP=1, as `.ci/run` does, and then undoes it (`.ci/slurm down`). A plain
`pytest` never installs packages or starts daemons: without a cluster the test skips."""
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SLURM = REPO / ".ci" / "slurm"
OPT_IN = "FEWSTEP_TEST_SLURM_UP"
HOW_TO_RUN = (f"no SLURM cluster is running. Run this test against one (`sudo bash .ci/slurm up`, "
              f"Debian; `sudo bash .ci/slurm down` undoes it), or set {OPT_IN}=1 as root to let the "
              "test start and undo one itself (installs Debian's slurm and munge, purged again "
              "afterwards; `.ci/run` does this)")
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


def cluster_plan(running: bool, opted_in: bool, root: bool, apt: bool) -> tuple[str, str]:
    """What the real-cluster test does with this machine, and why: "use" the running cluster,
    "start" one (only when asked), "fail" (asked, but it cannot), or "skip" saying how to run it."""
    if running:
        return "use", "a SLURM cluster is already running"
    if not opted_in:
        return "skip", HOW_TO_RUN
    if not (root and apt):
        return "fail", (f"{OPT_IN}=1 asks this test to start a SLURM cluster, which needs root and "
                        "apt-get (Debian); start one yourself with `sudo bash .ci/slurm up`")
    return "start", f"{OPT_IN}=1: started with `.ci/slurm up`"


def cluster_idle() -> bool:
    """A controller answers and its node is idle. Bounded: with a client configured for a stopped
    controller `sinfo` waits about 9 s before it fails."""
    if not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and "idle" in out.stdout.split()


def slurm_script(verb: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM), verb], capture_output=True, text=True)


@contextlib.contextmanager
def live_cluster():
    """The cluster the test runs on, as `cluster_plan` decides; one it started is undone after."""
    action, why = cluster_plan(cluster_idle(), os.environ.get(OPT_IN) == "1", os.geteuid() == 0,
                               shutil.which("apt-get") is not None)
    if action == "skip":
        pytest.skip(why)
    if action == "fail":
        pytest.fail(why)
    if action == "use":
        yield why
        return
    try:
        up = slurm_script("up")
        if up.returncode != 0:
            pytest.fail("`.ci/slurm up` failed:\n" + up.stdout[-2000:] + up.stderr[-2000:])
        yield why
    finally:
        down = slurm_script("down")  # also after a failed up: it undoes what up had done
    assert down.returncode == 0, "`.ci/slurm down` failed:\n" + down.stdout + down.stderr


@pytest.fixture(scope="module")
def cluster():
    with live_cluster() as how:
        yield how


@pytest.mark.parametrize("running, opted_in, root, apt, action", [
    (True, False, False, False, "use"),
    (True, True, True, True, "use"),        # asked, but a cluster is up: nothing is installed
    (False, False, True, True, "skip"),     # root with apt, not asked: no packages, no daemons
    (False, False, False, False, "skip"),
    (False, True, True, True, "start"),
    (False, True, False, True, "fail"),     # asked, cannot: a failure, not a silent skip
    (False, True, True, False, "fail"),
])
def test_cluster_plan(running, opted_in, root, apt, action):
    assert cluster_plan(running, opted_in, root, apt)[0] == action


def test_skip_says_how_to_run_it():
    why = cluster_plan(False, False, True, True)[1]
    assert f"{OPT_IN}=1" in why and "sudo bash .ci/slurm up" in why


def test_no_cluster_as_root_without_opt_in_runs_nothing(monkeypatch):
    """Root with apt-get, no SLURM client, the variable unset: the fixture skips and starts no
    process at all (no apt-get, no `.ci/slurm`)."""
    started = []

    def refuse(*args, **kwargs):
        started.append(args[0] if args else kwargs)
        raise AssertionError(f"started {started[-1]}")

    monkeypatch.setattr(subprocess, "Popen", refuse)  # under subprocess.run and check_output
    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(os, "system", refuse)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name in ("sinfo", "scontrol")
                        else f"/usr/bin/{name}")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.delenv(OPT_IN, raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"{OPT_IN}=1"):
        with live_cluster():
            pass
    assert started == []


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
    student = json.loads((repo / "results/models/sit/dummy/seed0/student.json").read_text())
    assert student["iterations"] == 3 and student["world_size"] == 2
    jobs = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i %k"], capture_output=True,
                          text=True).stdout
    train_ids = [line.split()[0] for line in jobs.splitlines() if "rule_train_" in line]
    assert train_ids, jobs
    detail = subprocess.run(["scontrol", "show", "job", train_ids[-1]], capture_output=True,
                            text=True).stdout
    assert "gpu:2" in detail and "Partition=debug" in detail  # two ranks in one allocation
