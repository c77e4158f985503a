"""Resume of an FSDP2 run at another world size, through the training loop: DCP reshards the
weights, the EMA and the AdamW states, the step counter and the schedulers continue, and the run
trains on. The optimiser states each rank holds after the load, gathered, equal the ones the
other world size saved, bit for bit (resharding copies them)."""
import json
from pathlib import Path

import pytest
import torch

from test_fsdp import TRAIN, spawn_ranks


def _resume_run(info, run_dir, out, steps, dump):
    from fewstep.engine import distributed, fsdp
    from fewstep.engine.loop import Trainer
    from fewstep.engine.run import build_method, export, toy_context
    from fewstep.toy import teachers

    teacher = teachers.build("sit", resolution=16, seed=0)
    ctx = toy_context(teacher, "sit", 16, 0, info, autocast=False)
    options = {**TRAIN, "sharding": "fsdp", "steps": steps, "checkpoint_every": 2}
    trainer = Trainer(build_method("dmd2", teacher, ctx, "toy", options), Path(run_dir), info)
    trainer.resume()  # run() resumes again from the same checkpoint: the same state

    def states():  # collectives: every rank gathers
        return {n: fsdp.full_optimizer_state(m, trainer.optimizers[n])
                for n, m in trainer.nets.items()}
    loaded = states()
    trainer.run(progress=False)
    saved = states()
    if info.main:
        torch.save({"loaded": loaded, "saved": saved}, dump)
        export(trainer.method, trainer, Path(out), {})
    distributed.barrier(info)
    return f"ok from {trainer.state.resumed_from}"


def train(world, run_dir, out, steps, dump):
    """Train (or resume) to `steps` at `world` ranks; (resumed_from, optimiser states gathered
    after the load and at the end, metrics rows)."""
    results = spawn_ranks(world, _resume_run, str(run_dir), str(out), steps, str(dump))
    assert all(v.startswith("ok") for v in results.values()), results
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return results[0].removeprefix("ok from "), torch.load(dump, weights_only=True), rows


def assert_same_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for net in a:
        assert a[net]["state"].keys() == b[net]["state"].keys(), net
        for param, entry in a[net]["state"].items():
            for key, value in entry.items():
                assert torch.equal(value, b[net]["state"][param][key]), (net, param, key)
        lrs = [[g["lr"] for g in s[net]["param_groups"]] for s in (a, b)]
        assert lrs[0] == lrs[1], net


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_fsdp_resumes_at_another_world_size_and_trains_on(tmp_path, first, then):
    """Stopped at iteration 2 at `first` ranks, resumed at `then` and trained to 4."""
    run = tmp_path / "run"
    fresh, before, _ = train(first, run, tmp_path / "first", 2, tmp_path / "first.pt")
    assert fresh == "None"
    resumed, after, rows = train(then, run, tmp_path / "then", 4, tmp_path / "then.pt")
    assert resumed == "2"
    assert_same_states(after["loaded"], before["saved"])  # resharded, bit for bit
    assert [row["step"] for row in rows] == [0, 1, 2, 3]  # the counter went on from 2
    assert all(torch.isfinite(torch.tensor(row["critic/loss"])) for row in rows)
    steps = [int(s["step"]) for s in after["saved"]["critic"]["state"].values()]
    assert steps and set(steps) == {4}  # AdamW went on counting: 2 loaded + 2 more steps
    student = json.loads((tmp_path / "then" / "student.json").read_text())
    assert student["iterations"] == 4
