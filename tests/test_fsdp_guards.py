"""The NaN guard under FSDP2: a loss that is not finite on one rank stops every rank with the
guard's error at the same iteration (no rank left waiting in FSDP's reduce-scatter), before any
optimiser steps on it; gradient clipping's global norm is compared with DDP's in
tests/test_fsdp_methods.py (CDM clips at 1.0)."""
from pathlib import Path

import torch

from test_fsdp import TRAIN, _free_port


def _worker(rank, world, port, run_dir, queue):
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fewstep.engine import distributed
    from fewstep.engine.loop import Trainer
    from fewstep.engine.run import build_method, toy_context
    from fewstep.toy import teachers

    info = distributed.init("cpu")
    try:
        teacher = teachers.build("sit", resolution=16, seed=0)
        ctx = toy_context(teacher, "sit", 16, 0, info, autocast=False)
        method = build_method("dmd2", teacher, ctx, "toy", {**TRAIN, "sharding": "fsdp"})
        loss = method.loss

        def poisoned(net, scratch):  # rank 1's critic loss at iteration 1 is NaN
            value, scalars = loss(net, scratch)
            if rank == 1 and net == "critic" and ctx.step == 1:
                value = value * float("nan")
            return value, scalars
        method.loss = poisoned
        Trainer(method, Path(run_dir), info).run(progress=False)
        queue.put((rank, "ok"))
    except Exception as err:
        queue.put((rank, f"{type(err).__name__}: {err}"))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_nan_loss_on_one_rank_stops_every_rank_with_the_guard(tmp_path):
    import torch.multiprocessing as mp

    ctx, port = mp.get_context("spawn"), _free_port()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank, message in results.items():
        assert message.startswith("NonFiniteLossError: iteration 1: the critic loss of dmd2"), \
            (rank, message)
    assert "nan" in results[1] and "rank" in results[0]
