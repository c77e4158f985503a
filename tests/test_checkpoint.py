"""Checkpoints that a crash or a disk left broken: a checkpoint counts only once its manifest (every
file's sha256, written last) is on disk and matches; resume takes the newest whole one and says
which it skipped; a torn last line of metrics.jsonl is dropped; Ctrl-C saves like SIGTERM."""
import json
import os
import signal

import pytest
import torch

from fewstep.engine import checkpoint
from fewstep.engine.distributed import DistInfo
from fewstep.engine.loop import StopRequested, Trainer
from fewstep.engine.run import build_method, toy_context
from fewstep.toy import teachers
from trainer_checks import assert_same, weights


@pytest.fixture(scope="module")
def sit_teacher():
    torch.manual_seed(0)
    return teachers.build("sit", resolution=16, seed=0)


def make(teacher, steps, every=2):
    ctx = toy_context(teacher, teacher.family, 16, 0, DistInfo())
    return build_method("dummy", teacher, ctx, "toy", dict(batch=2, warmup=1, steps=steps,
                                                           checkpoint_every=every, log_every=1))


def logged_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_checkpoint_carries_a_manifest_of_every_file(sit_teacher, tmp_path):
    Trainer(make(sit_teacher, 2), tmp_path).run(progress=False)
    folder = checkpoint.latest(tmp_path)
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
    files = {p.name for p in folder.iterdir()} - {checkpoint.MANIFEST}
    assert set(manifest["files"]) == files and "weights.safetensors" in files
    assert checkpoint.problem(folder) is None


def test_a_truncated_checkpoint_is_skipped_and_resume_matches(sit_teacher, tmp_path, capsys):
    straight = Trainer(make(sit_teacher, 6), tmp_path / "a")
    straight.run(progress=False)
    Trainer(make(sit_teacher, 4), tmp_path / "b").run(progress=False)  # saves step 2 and step 4
    torn = tmp_path / "b" / "ckpt" / "step_00000004" / "weights.safetensors"
    torn.write_bytes(torn.read_bytes()[:100])  # the disk filled up mid-write
    capsys.readouterr()
    resumed = Trainer(make(sit_teacher, 6), tmp_path / "b")
    assert resumed.run(progress=False).resumed_from == 2
    err = capsys.readouterr().err
    assert "skipped checkpoint" in err and "step_00000004" in err and "weights.safetensors" in err
    assert_same(weights(straight), weights(resumed))
    assert logged_steps(tmp_path / "b") == list(range(6))


def test_a_checkpoint_without_its_manifest_is_incomplete(sit_teacher, tmp_path, capsys):
    """A folder with state.json but no manifest (a save that never finished, or a checkpoint of a
    fewstep from before manifests) is not resumed from; the message says why."""
    Trainer(make(sit_teacher, 4), tmp_path).run(progress=False)
    (tmp_path / "ckpt" / "step_00000004" / checkpoint.MANIFEST).unlink()
    capsys.readouterr()
    assert checkpoint.latest(tmp_path).name == "step_00000002"
    err = capsys.readouterr().err
    assert "step_00000004" in err and "no manifest.json" in err
    (tmp_path / "ckpt" / "step_00000002" / checkpoint.MANIFEST).unlink()
    assert checkpoint.latest(tmp_path) is None  # nothing whole left: training starts over


def test_a_changed_file_fails_its_hash(sit_teacher, tmp_path):
    Trainer(make(sit_teacher, 2), tmp_path).run(progress=False)
    folder = tmp_path / "ckpt" / "step_00000002"
    data = bytearray((folder / "rng.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "rng.safetensors").write_bytes(bytes(data))
    assert "rng.safetensors" in checkpoint.problem(folder) and "sha256" in checkpoint.problem(folder)


def test_a_torn_last_line_of_the_metrics_log_is_dropped(sit_teacher, tmp_path, capsys):
    Trainer(make(sit_teacher, 4, every=4), tmp_path).run(progress=False)
    log = tmp_path / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 4, "generator/lo')  # killed mid-write
    capsys.readouterr()
    state = Trainer(make(sit_teacher, 5, every=4), tmp_path).run(progress=False)
    assert state.resumed_from == 4 and logged_steps(tmp_path) == list(range(5))
    assert "dropped a torn last line" in capsys.readouterr().err


def test_a_corrupt_line_inside_the_log_is_an_error_that_names_it(sit_teacher, tmp_path):
    from fewstep.errors import FewstepError

    Trainer(make(sit_teacher, 2), tmp_path).run(progress=False)
    log = tmp_path / "metrics.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(["{oops", *lines]) + "\n")
    with pytest.raises(FewstepError, match=r"metrics.jsonl line 1 is not JSON"):
        Trainer(make(sit_teacher, 3), tmp_path).run(progress=False)


def _interrupt(method, at, times=1):
    """Deliver SIGINT (Ctrl-C) to this process `times` times during iteration `at`."""
    original = method.loss

    def loss(net, scratch):
        if method.ctx.step == at and net == method.plan(at)[0]:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return original(net, scratch)

    method.loss = loss


def test_ctrl_c_saves_a_checkpoint_like_sigterm(sit_teacher, tmp_path):
    straight = Trainer(make(sit_teacher, 5, every=100), tmp_path / "a")
    straight.run(progress=False)
    method = make(sit_teacher, 5, every=100)
    _interrupt(method, at=2)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup or a background job
    with pytest.raises(StopRequested) as stop:
        Trainer(method, tmp_path / "b").run(progress=False)
    assert stop.value.step == 3 and stop.value.signum == signal.SIGINT
    assert checkpoint.latest(tmp_path / "b").name == "step_00000003"
    resumed = Trainer(make(sit_teacher, 5, every=100), tmp_path / "b")
    assert resumed.run(progress=False).resumed_from == 3
    assert_same(weights(straight), weights(resumed))
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler restored


def test_a_second_ctrl_c_aborts_at_once(sit_teacher, tmp_path):
    method = make(sit_teacher, 5, every=100)
    _interrupt(method, at=2, times=2)
    with pytest.raises(KeyboardInterrupt):
        Trainer(method, tmp_path).run(progress=False)
    assert checkpoint.latest(tmp_path) is None  # no save was started by the abort


def test_the_cli_exits_75_after_ctrl_c(tmp_path, monkeypatch):
    """`fewstep train` turns the saved stop into exit status 75 (EX_TEMPFAIL), as for SIGTERM."""
    from fewstep.cli import main
    from fewstep.engine import loop

    def stopped(self, progress=True):
        raise StopRequested(3, signal.SIGINT)

    monkeypatch.setattr(loop.Trainer, "run", stopped)
    code = main(["train", "--method", "dummy", "--preset", "toy", "--teacher",
                 str(teachers.SHIPPED / "sit"), "--run-dir", str(tmp_path / "run"),
                 "--out", str(tmp_path / "model"), "--no-progress"])
    assert code == loop.STOP_EXIT == 75 and not (tmp_path / "model").exists()
