"""The DAG under a careless user: a second `snakemake all` in the same folder is refused by
Snakemake's lock while the first runs, Ctrl-C (SIGINT to the whole process group, as a terminal
sends it) leaves no partial output counted as done, and the rerun resumes training and finishes."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from fewstep.prompts import read_prompts
from metrics.sampleset import load_sample_set

REPO = Path(__file__).resolve().parent.parent
SMALL = {
    "families": ["sit"],
    "eval": {"prompts": 6, "seeds": [0, 1], "steps": [1]},
    "fid": {"reference_images": 36, "feature_net": "shipped", "feature_net_steps": 20},
    "bootstrap": {"resamples": 50, "confidence": 0.95, "seed": 0},
    # long enough to be interrupted after its first checkpoint (about 30 s on 2 cores)
    "distill": {"methods": ["dummy"], "preset": "toy", "stages": {}, "pairs": {"count": 4, "steps": 2},
                "overrides": {"dummy": {"steps": 200, "checkpoint_every": 10}}},
}


def snakemake_command(work: Path, *args) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work),
            "--cores", "2", *args, "--configfile", str(work.parent / "small.yaml")]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "the first run ended before training checkpointed"
        assert time.monotonic() < end, f"{path} did not appear in {timeout} s"
        time.sleep(0.2)


def test_lock_then_ctrl_c_then_rerun(tmp_path):
    work = tmp_path / "work"
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(SMALL))
    first = subprocess.Popen(snakemake_command(work, "all"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(work / "results/runs/sit/dummy/seed0/ckpt/latest", first)
        second = subprocess.run(snakemake_command(work, "all"), capture_output=True, text=True,
                                timeout=120)
        assert second.returncode != 0
        assert "cannot be locked" in second.stdout + second.stderr
        os.killpg(first.pid, signal.SIGINT)  # Ctrl-C: snakemake and every job get it
        first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode != 0
    assert not (work / "results/models/sit/dummy/seed0").exists()  # an unfinished model is no model
    checkpoint = (work / "results/runs/sit/dummy/seed0/ckpt/latest").read_text().strip()
    assert checkpoint.startswith("step_") and checkpoint != "step_00000200"

    rerun = subprocess.run(snakemake_command(work, "all"), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    student = yaml.safe_load((work / "results/models/sit/dummy/seed0/student.json").read_text())
    assert student["iterations"] == 200 and student["resumed_from"] >= 10
    prompts = read_prompts(work / "results/prompts/sit.jsonl")
    for folder in ("teacher/steps1", "dummy/seed0"):  # every set whole and verified by content
        load_sample_set(work / "results/samples/sit" / folder, prompts=prompts, allow_blank=True)
    plan = subprocess.run(snakemake_command(work, "-n", "all"), capture_output=True, text=True,
                          timeout=120)
    assert plan.returncode == 0 and "Nothing to be done" in plan.stdout + plan.stderr


def test_usr1_to_every_process_of_a_slurm_step_saves_and_fails_the_job_for_its_retry(tmp_path):
    """SLURM's `--signal=USR1@300` reaches every process of the job's step, and on one node that
    step runs the inner Snakemake (`srun -n1 snakemake ...`), the job's shell and `fewstep train`.
    The inner Snakemake must outlive the signal: if it died, the step would end and SLURM would
    kill the trainer in the middle of its save. Emulated here with a process group: the trainer
    saves and exits 75, Snakemake reports the job failed (so the profile's retry resumes it)."""
    work = tmp_path / "work"
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(SMALL))
    target = "results/models/sit/dummy/seed0"
    step = subprocess.Popen(snakemake_command(work, target), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(work / "results/runs/sit/dummy/seed0/ckpt/latest", step)
        os.killpg(step.pid, signal.SIGUSR1)  # what slurmstepd does to the step's processes
        out, _ = step.communicate(timeout=300)
    finally:
        if step.poll() is None:
            os.killpg(step.pid, signal.SIGKILL)
    assert step.returncode == 1, f"snakemake ended with {step.returncode}: {out[-2000:]}"
    log = (work / "results/logs/train/sit/dummy/seed0.log").read_text()
    assert f"stopped by signal {int(signal.SIGUSR1)}" in log, log[-2000:]
    saved = (work / "results/runs/sit/dummy/seed0/ckpt/latest").read_text().strip()
    assert f"after iteration {int(saved.removeprefix('step_'))};" in log, (saved, log[-2000:])
    assert not (work / target).exists()  # the job failed: its retry resumes from `saved`
