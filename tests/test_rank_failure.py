"""A rank that dies takes the job down, with no hang: a real 2-rank training run launched by the
train rule's single-node command (torchrun --standalone, gloo), one rank SIGKILLed (an
out-of-memory kill, a failed GPU) once the run is logging. torchrun's agent notices the dead
worker, stops the other one and exits nonzero (so Snakemake's retry reruns the job, which resumes
from the last checkpoint); no rank is left running. Data parallel and FSDP."""
import os
import signal
import time

import pytest

from test_torchrun_signals import _kill, _logs, _standalone, _tree, _wait_for_first_row

RANK_DEATH_TIMEOUT_S = 60  # torchrun polls its workers every few seconds; 2 shared cores


def _ranks(torchrun_pid: int) -> list[int]:
    """The training processes under the agent (its descendants running `-m fewstep`)."""
    ranks = []
    for pid in _tree(torchrun_pid)[1:]:
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"fewstep" in cmdline and b"train" in cmdline:
            ranks.append(pid)
    return ranks


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def _fsdp_args(base):
    """DMD2 (checked under FSDP) with sharding = fsdp, in place of the dummy method."""
    def args(run_dir, steps):
        return ["dmd2" if a == "dummy" else a for a in base(run_dir, steps)] + ["sharding=fsdp"]
    return args


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_a_killed_rank_ends_the_job_within_the_timeout(tmp_path, monkeypatch, sharding):
    import test_torchrun_signals as launched

    if sharding == "fsdp":
        monkeypatch.setattr(launched, "_train_args", _fsdp_args(launched._train_args))
    run_dir, log = tmp_path / "run", tmp_path / "standalone.log"
    (torchrun,) = procs = _standalone(tmp_path, run_dir, 1_000_000)
    ranks = []
    try:
        _wait_for_first_row(run_dir, procs, [log])
        ranks = _ranks(torchrun.pid)
        assert len(ranks) == 2, (ranks, _logs([log]))
        killed = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)  # cannot be caught: no save, no goodbye
        code = torchrun.wait(timeout=RANK_DEATH_TIMEOUT_S)
        seconds = time.monotonic() - killed
        survivor_alive = _alive(ranks[0])
    finally:
        _kill(procs, ranks)
    if sharding == "fsdp":  # the run was DMD2's (a critic), which took `sharding=fsdp`
        assert "critic/" in (run_dir / "metrics.jsonl").read_text().splitlines()[0]
    print(f"{sharding}: torchrun exited {code} {seconds:.1f} s after a rank was killed")
    assert code != 0, _logs([log])
    assert not survivor_alive, "the surviving rank was left running"
