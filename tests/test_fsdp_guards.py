"""The NaN guard under FSDP2: a loss that is not finite on one rank stops every rank with the
guard's error at the same iteration (no rank left waiting in FSDP's reduce-scatter), before any
optimiser steps on it; gradient clipping's global norm is compared with DDP's in
tests/test_fsdp_methods.py (CDM clips at 1.0)."""
from pathlib import Path

from test_fsdp import TRAIN, spawn_ranks


def _poisoned_run(info, run_dir):
    from fewstep.engine.loop import Trainer
    from fewstep.engine.run import build_method, toy_context
    from fewstep.toy import teachers

    teacher = teachers.build("sit", resolution=16, seed=0)
    ctx = toy_context(teacher, "sit", 16, 0, info, autocast=False)
    method = build_method("dmd2", teacher, ctx, "toy", {**TRAIN, "sharding": "fsdp"})
    loss = method.loss

    def poisoned(net, scratch):  # rank 1's critic loss at iteration 1 is NaN
        value, scalars = loss(net, scratch)
        if info.rank == 1 and net == "critic" and ctx.step == 1:
            value = value * float("nan")
        return value, scalars
    method.loss = poisoned
    Trainer(method, Path(run_dir), info).run(progress=False)
    return "ok"


def test_a_nan_loss_on_one_rank_stops_every_rank_with_the_guard(tmp_path):
    results = spawn_ranks(2, _poisoned_run, str(tmp_path))
    for rank, message in results.items():
        assert message.startswith("NonFiniteLossError: iteration 1: the critic loss of dmd2"), \
            (rank, message)
    assert "nan" in results[1] and "rank" in results[0]
