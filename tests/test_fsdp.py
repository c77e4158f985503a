"""FSDP2 sharding (option sharding = fsdp): CPU, gloo, a tiny SiT cell, a few iterations.

Tolerances: FSDP reduce-scatters each block's gradients (sum, then / world size per shard)
where DDP all-reduces one flattened vector, so float32 sums are rounded in another order; on these
toy nets that moves losses and weights by a few ulps per step. rel 1e-5 on losses and atol 1e-6
on the exported weights (|w| ~ 0.1) leave room for ~100 such ulps and still catch any real error
(a missing average is a factor 2, a missed shard a whole block). Resume at the same world size is
bitwise: DCP restores every shard and optimiser state exactly and the draws are keyed by step.
"""
import json
import socket
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fewstep.errors import FewstepError

TRAIN = dict(steps=3, batch=2, warmup=1, generator_grid=[1.0, 0.5], ttur_ratio=2,
             checkpoint_every=1000, ema_decay=0.9)
LOSSES = ("generator/loss", "critic/loss")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toy_reward(images, metas):  # RTDMD's reward: a fixed differentiable function of the images
    return -((images - 0.5) ** 2).mean((1, 2, 3))


def _rank_main(rank, world, port, body, args, queue):
    """One spawned rank: torchrun's environment, a gloo group, then body(info, *args), whose
    message (or error, named for the parent instead of a hang) goes to the queue."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fewstep.engine import distributed

    info = distributed.init("cpu")
    try:
        queue.put((rank, body(info, *args)))
    except Exception as err:
        queue.put((rank, f"{type(err).__name__}: {err}"))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def spawn_ranks(world: int, body, *args) -> dict[int, str]:
    """body(info, *args) on `world` spawned gloo ranks; {rank: its message}."""
    import torch.multiprocessing as mp

    ctx, port = mp.get_context("spawn"), _free_port()
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, body, args, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return results


def _train(info, run_dir, out, method, overrides, family, res):
    from fewstep.engine import distributed
    from fewstep.engine.loop import Trainer
    from fewstep.engine.run import build_method, export, toy_context
    from fewstep.toy import teachers

    teacher = teachers.build(family, resolution=res, seed=0)
    reward = toy_reward if method in ("rtdmd", "amd") else None
    ctx = toy_context(teacher, family, res, 0, info, reward=reward, autocast=False)
    trainer = Trainer(build_method(method, teacher, ctx, "toy", overrides), Path(run_dir), info)
    trainer.run(progress=False)
    if info.main:
        export(trainer.method, trainer, Path(out), {})
    distributed.barrier(info)
    return f"ok from {trainer.state.resumed_from}"


def launch(world, run_dir, out, method="dmd2", family="sit", res=16, **overrides):
    """Train on `world` gloo ranks; returns rank 0's logged rows and the exported weights."""
    options = {**(TRAIN if method == "dmd2" else {}), **overrides}
    results = spawn_ranks(world, _train, str(run_dir), str(out), method, options, family, res)
    assert all(v.startswith("ok") for v in results.values()), results
    launch.resumed_from = results[0].removeprefix("ok from ")  # None: it started afresh
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return rows, load_file(str(Path(out) / "generator.safetensors"))


def _losses(rows):
    return [(row["step"], key, row[key]) for row in rows for key in LOSSES if key in row]


def test_fsdp_at_two_ranks_trains_like_ddp(tmp_path):
    """DMD2 (generator, critic with its GAN head, EMA): the same losses and exported EMA
    generator as the DDP engine at the same world size (tolerances: module docstring)."""
    ddp_rows, ddp = launch(2, tmp_path / "ddp", tmp_path / "ddp_out")
    fsdp_rows, fsdp = launch(2, tmp_path / "fsdp", tmp_path / "fsdp_out", sharding="fsdp")
    for (step, key, a), (_, _, b) in zip(_losses(ddp_rows), _losses(fsdp_rows), strict=True):
        assert b == pytest.approx(a, rel=1e-5), (step, key)
    assert ddp.keys() == fsdp.keys()
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=0, atol=1e-6, msg=key)


def test_fsdp_resume_at_the_same_world_size_is_bitwise(tmp_path):
    """Stopped after 2 of 4 iterations and resumed: the same losses and weights, bit for bit."""
    whole_rows, whole = launch(2, tmp_path / "whole", tmp_path / "whole_out", sharding="fsdp",
                               steps=4, checkpoint_every=2)
    launch(2, tmp_path / "split", tmp_path / "first_out", sharding="fsdp", steps=2,
           checkpoint_every=2)
    split_rows, split = launch(2, tmp_path / "split", tmp_path / "split_out", sharding="fsdp",
                               steps=4, checkpoint_every=2)
    assert launch.resumed_from == "2"
    assert _losses(split_rows) == _losses(whole_rows)
    assert whole.keys() == split.keys()
    assert all(torch.equal(whole[k], split[k]) for k in whole)
    # a rank's shard file torn after the save: that checkpoint no longer counts
    from fewstep.engine import checkpoint

    newest = checkpoint.latest(tmp_path / "whole")
    assert newest.name == "step_00000004" and (newest / "__1_0.distcp").is_file()
    shard = newest / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-8])
    assert checkpoint.latest(tmp_path / "whole", report=False).name == "step_00000002"


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_fsdp_at_two_ranks_trains_rtdmd_like_ddp(tmp_path, grad_checkpointing):
    """RTDMD stage 1 (full fine-tune: LoRA is not sharded yet) on the toy SD3 transformer, with
    and without activation checkpointing of the generator's blocks (the paper recipe's)."""
    options = dict(steps=4, batch=2, lora_rank=0, critic_lora_rank=0, generator_every=2,
                   checkpoint_every=1000, log_every=1, grad_checkpointing=grad_checkpointing)
    ddp_rows, ddp = launch(2, tmp_path / "ddp", tmp_path / "ddp_out", "rtdmd", "sd3", 8, **options)
    fsdp_rows, fsdp = launch(2, tmp_path / "fsdp", tmp_path / "fsdp_out", "rtdmd", "sd3", 8,
                             sharding="fsdp", **options)
    assert {key for _, key, _ in _losses(ddp_rows)} == set(LOSSES)  # both networks trained
    for (step, key, a), (_, _, b) in zip(_losses(ddp_rows), _losses(fsdp_rows), strict=True):
        assert b == pytest.approx(a, rel=1e-5), (step, key)
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=0, atol=1e-6, msg=key)


def test_fsdp_on_one_process_trains_like_one_process(tmp_path):
    """FSDP over a 1-process group changes nothing: the same losses and weights as a plain run."""
    plain_rows, plain = launch(1, tmp_path / "plain", tmp_path / "plain_out")
    fsdp_rows, fsdp = launch(1, tmp_path / "fsdp", tmp_path / "fsdp_out", sharding="fsdp")
    assert _losses(fsdp_rows) == _losses(plain_rows)
    assert all(torch.equal(plain[k], fsdp[k]) for k in plain)


def test_fsdp_resumes_at_another_world_size_with_equal_weights(tmp_path):
    """A 2-rank checkpoint read by one process (DCP reshards): the weights exported at that
    iteration are the 2-rank run's own."""
    _, two = launch(2, tmp_path / "run", tmp_path / "two_out", sharding="fsdp", steps=2,
                    checkpoint_every=2)
    _, one = launch(1, tmp_path / "run", tmp_path / "one_out", sharding="fsdp", steps=2,
                    checkpoint_every=2)
    assert launch.resumed_from == "2"
    assert two.keys() == one.keys() and all(torch.equal(two[k], one[k]) for k in two)


def _toy_method(world_size=1, name="dmd2", **overrides):
    from fewstep.engine.distributed import DistInfo
    from fewstep.engine.run import build_method, toy_context
    from fewstep.toy import teachers

    teacher = teachers.build("sit", resolution=16, seed=0)
    ctx = toy_context(teacher, "sit", 16, 0, DistInfo(world_size=world_size))
    base = TRAIN if name == "dmd2" else {}
    options = {k: v for k, v in {**base, **overrides}.items() if v is not None}
    return build_method(name, teacher, ctx, "toy", options)


def test_fsdp_refuses_what_it_cannot_shard_naming_the_option():
    from fewstep.engine import fsdp

    fsdp.check_shardable(_toy_method(sharding="fsdp", lora_rank=4, lora_alpha=4.0))  # LoRA: ok
    fsdp.check_shardable(_toy_method(name="cdm", sharding="fsdp", batch=2, steps=1))  # checked
    with pytest.raises(FewstepError, match="sharding = fsdp is not checked for method dummy"):
        fsdp.check_shardable(SimpleNamespace(name="dummy", opt=SimpleNamespace()))
    regression = SimpleNamespace(name="dmd2", opt=SimpleNamespace(stage="regression"))
    assert fsdp.unchecked(regression) is None  # tests/test_fsdp_methods.py
    assert fsdp.unchecked(SimpleNamespace(name="rtdmd", opt=SimpleNamespace(stage=3))) == \
        "rtdmd stage = 3"
    with pytest.raises(FewstepError, match="global_batch = 3 is not divisible by the world size 2"):
        _toy_method(world_size=2, sharding="fsdp", batch=None, global_batch=3)
    with pytest.raises(FewstepError, match="sharding.*'ddp', 'fsdp'|sharding = zero"):
        _toy_method(sharding="zero")


def test_fsdp_mixed_precision_is_bf16_compute_fp32_reduce_on_cuda_only():
    from fewstep.engine import fsdp

    on, off = SimpleNamespace(bf16=True), SimpleNamespace(bf16=False)
    cuda = fsdp.precision_policy(on, torch.device("cuda"))
    assert (cuda.param_dtype, cuda.reduce_dtype) == (torch.bfloat16, torch.float32)
    for policy in (fsdp.precision_policy(on, torch.device("cpu")),
                   fsdp.precision_policy(off, torch.device("cuda"))):
        assert (policy.param_dtype, policy.reduce_dtype) == (None, None)  # the fp32 weights


def test_fsdp_refuses_a_checkpoint_of_the_other_engine(tmp_path):
    """A DDP checkpoint resumed with sharding = fsdp (and back) is refused naming both values."""
    from fewstep.engine import checkpoint, fsdp
    from fewstep.engine.loop import Trainer

    Trainer(_toy_method(steps=1), tmp_path).run(progress=False)
    folder = checkpoint.latest(tmp_path)
    with pytest.raises(FewstepError, match="sharding = ddp and this run has sharding = fsdp"):
        fsdp.check_format(folder, sharded=True)
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**state, "format": fsdp.FORMAT}))
    with pytest.raises(FewstepError, match="sharding = fsdp and this run has sharding = ddp"):
        fsdp.check_format(folder, sharded=False)


ONE_PROCESS_GROUP = """
import os, socket, sys
from fewstep.engine import fsdp
from fewstep.engine.distributed import DistInfo
busy = socket.socket()
busy.bind(("127.0.0.1", 0))
busy.listen()
os.environ["MASTER_PORT"] = str(busy.getsockname()[1])  # left over from another group
fsdp.ensure_group(DistInfo(world_size=1))
import torch.distributed as dist
print("group", dist.get_world_size())
"""


def test_a_one_process_fsdp_group_needs_no_port(tmp_path):
    """A 1-process group (one-GPU runs, the GPU check) meets in memory, not on a TCP port: an
    inherited MASTER_PORT that another process holds (a test's group, a second job on the node)
    made it fail with EADDRINUSE."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", ONE_PROCESS_GROUP], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "group 1" in out.stdout, out.stderr[-2000:]
