"""SIGUSR1 (what the SLURM profile's `--signal=USR1@300` sends before the time limit) at the
torchrun agent of a real 2-rank gloo training run, launched by the commands the train rule runs
(fewstep.planning): the agent forwards it to every rank, each rank stops after the same
iteration, one checkpoint is saved, the launcher exits nonzero (so Snakemake's retry reruns the
job) and the rerun resumes from the saved iteration. Also with the signal reaching the ranks
directly as well (SLURM signals every process of a job step): still one save, no hang.

Toy sizes: the dummy method on the shipped toy SiT teacher, batch 2 per rank, a run long enough
never to finish; the signal goes once the first metrics row is logged."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fewstep import planning
from fewstep.toy import teachers
from test_multinode import fake_scontrol, free_port_job_id

# torchrun re-raises the agent's SignalException once its ranks have exited (each with
# fewstep.engine.loop.STOP_EXIT, 75): a Python traceback and exit status 1, whatever the ranks
# returned. Nonzero is what counts: Snakemake's retry reruns the job, which resumes.
TORCHRUN_SIGNALLED_EXIT = 1
STOP_TIMEOUT_S = 120  # the iteration in flight, one toy save and the agent's shutdown, on 2 cores
STARTED_TIMEOUT_S = 240  # two ranks importing torch and building the toy run on a shared CPU
STOPPED = re.compile(r"stopped by signal (\d+) after iteration (\d+); checkpoint saved")


def _config(nodes: int, processes: int) -> dict:
    return {"distill": {"nodes": nodes, "processes": processes}}


def _train_args(run_dir: Path, steps: int) -> list[str]:
    return ["train", "--method", "dummy", "--preset", "toy",
            "--teacher", str(teachers.SHIPPED / "sit"), "--run-dir", str(run_dir),
            "--out", str(run_dir.parent / "model"), "--no-progress",
            "--set", f"steps={steps}", "batch=2", "log_every=1", "checkpoint_every=1000000"]


def _env(tmp_path: Path, job_id: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if job_id is not None:  # the multi-node launcher: a fake scontrol naming this machine
        bin_dir = fake_scontrol(tmp_path)
        env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID=job_id,
                   SLURM_JOB_NODELIST="node[1-2]")
    return env


def _standalone(tmp_path: Path, run_dir: Path, steps: int) -> list[subprocess.Popen]:
    """The single-node train command (distill.processes 2): torchrun --standalone."""
    words = shlex.split(planning.train_launch(_config(1, 2), sys.executable))
    log = tmp_path / "standalone.log"
    return [_start(words + _train_args(run_dir, steps), _env(tmp_path), log)]


def _two_nodes(tmp_path: Path, run_dir: Path, steps: int) -> list[subprocess.Popen]:
    """The per-node command of distill.nodes 2 x distill.processes 1 (what srun runs on each
    node), started twice here: two agents, one rank each, one c10d rendezvous."""
    env = _env(tmp_path, str(free_port_job_id()))
    node = planning.node_launch(sys.executable, 2, 1)
    words = ["bash", "-c", f"{node} -m fewstep " + shlex.join(_train_args(run_dir, steps))]
    return [_start(words, env, tmp_path / f"node{i}.log") for i in range(2)]


def _start(words: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen(words, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_for_first_row(run_dir: Path, procs: list[subprocess.Popen], logs) -> None:
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + STARTED_TIMEOUT_S
    while not (metrics.exists() and metrics.read_text().strip()):
        dead = [p.returncode for p in procs if p.poll() is not None]
        assert not dead and time.monotonic() < deadline, (dead, _logs(logs))
        time.sleep(0.5)


def _logs(paths) -> str:
    return "\n".join(p.read_text()[-3000:] for p in paths if p.exists())


def _tree(pid: int) -> list[int]:
    """pid and its descendants (torchrun starts each rank in a process group of its own, so a
    process group signal does not reach them: SLURM's cgroup tracking does)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _kill(procs: list[subprocess.Popen], pids: list[int]) -> None:
    """Every process the test started, the ranks included (orphaned if their agent died)."""
    _signal(pids + [q for p in procs for q in _tree(p.pid)], signal.SIGKILL)
    for p in procs:
        p.wait()


def _checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in (run_dir / "ckpt").glob("step_*"))


LAUNCHERS = {"standalone": (_standalone, ["standalone.log"]),
             "two-nodes": (_two_nodes, ["node0.log", "node1.log"])}


def _signalled_run(tmp_path, launcher: str, whole_step: bool, sig: int = signal.SIGUSR1):
    """Start the run, send `sig` once a row is logged (to each agent, or to every process of
    each agent's process tree, as SLURM signals every process of a job step), wait for the
    exit: (exit statuses, seconds from the signal, log text, run folder)."""
    start, names = LAUNCHERS[launcher]
    run_dir = tmp_path / "run"
    logs = [tmp_path / n for n in names]
    procs, pids = start(tmp_path, run_dir, 1_000_000), []
    try:
        _wait_for_first_row(run_dir, procs, logs)
        pids = [q for p in procs for q in _tree(p.pid)]
        sent = time.monotonic()
        _signal(pids if whole_step else [p.pid for p in procs], sig)
        codes = [p.wait(timeout=STOP_TIMEOUT_S) for p in procs]
        seconds = time.monotonic() - sent
    finally:
        _kill(procs, pids)
    return codes, seconds, _logs(logs), run_dir


def _assert_one_save_by_every_rank(text: str, run_dir: Path, sig: int, ranks: int = 2) -> int:
    stops = STOPPED.findall(text)
    assert len(stops) == ranks, text
    assert {int(s) for s, _ in stops} == {sig}, stops
    steps = {int(step) for _, step in stops}
    assert len(steps) == 1, stops  # every rank stopped after the same iteration
    step = steps.pop()
    assert _checkpoints(run_dir) == [step], text  # one save, at that iteration
    return step


@pytest.mark.parametrize("launcher, whole_step", [("standalone", False), ("standalone", True),
                                                  ("two-nodes", True)])
def test_sigusr1_at_the_launcher_saves_on_every_rank_and_exits_nonzero(tmp_path, launcher,
                                                                        whole_step):
    codes, seconds, text, run_dir = _signalled_run(tmp_path, launcher, whole_step)
    print(f"{launcher} (signal to {'every process' if whole_step else 'torchrun'}): exit "
          f"{codes} {seconds:.1f} s after SIGUSR1")
    assert codes == [TORCHRUN_SIGNALLED_EXIT] * len(codes), text[-4000:]
    # the ranks' own status: torchrun's shutdown log names no SIGKILL (they exited by themselves)
    assert "forcefully exiting via" not in text, text[-4000:]
    step = _assert_one_save_by_every_rank(text, run_dir, signal.SIGUSR1)
    if launcher == "standalone" and not whole_step:
        _rerun_resumes(tmp_path, run_dir, step)


def _rerun_resumes(tmp_path: Path, run_dir: Path, step: int) -> None:
    """What Snakemake's retry does: the same command again (here one step longer, so it ends)."""
    (proc,) = _standalone(tmp_path, run_dir, step + 1)
    try:
        assert proc.wait(timeout=STARTED_TIMEOUT_S) == 0, _logs([tmp_path / "standalone.log"])
    finally:
        _kill([proc], [])
    student = json.loads((run_dir.parent / "model" / "student.json").read_text())
    assert student["resumed_from"] == step and student["iterations"] == step + 1


def test_sigterm_at_the_launcher_saves_too(tmp_path):
    """scancel and the time limit itself send SIGTERM: forwarded by default, and now given
    STOP_GRACE_S (not torchrun's 30 s) before the agent kills a rank still saving."""
    codes, seconds, text, run_dir = _signalled_run(tmp_path, "standalone", False, signal.SIGTERM)
    print(f"standalone (SIGTERM to torchrun): exit {codes} {seconds:.1f} s after the signal")
    assert codes == [TORCHRUN_SIGNALLED_EXIT], text[-4000:]
    _assert_one_save_by_every_rank(text, run_dir, signal.SIGTERM)
