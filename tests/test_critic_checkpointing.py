"""`grad_checkpointing` checkpoints every trained network per block, the critic too: DMD2's
official SDXL guidance model enables gradient checkpointing on its fake UNet under the same flag
as the generator's (its `gradient_checkpointing` argument), and the memory plan's "act ckpt" column
assumes every network checkpointed. Recomputing a block's forward gives the same numbers."""
import pytest

from test_fsdp import _losses, launch, toy_reward

EXTRA = {"dmd": {"lambda_reg": 0}, "amd": {"batch": 4}}  # no pairs; whole reward groups


def _build(method, family, **options):
    from fewstep.engine.distributed import DistInfo
    from fewstep.engine.run import build_method, toy_context
    from fewstep.toy import teachers

    teacher = teachers.build(family, resolution=8, seed=0)
    reward = toy_reward if method in ("amd", "rtdmd") else None
    ctx = toy_context(teacher, family, 8, 0, DistInfo(world_size=1), reward=reward)
    return build_method(method, teacher, ctx, "toy", {**options, **EXTRA.get(method, {})})


def _checkpointed(net) -> bool:
    return bool(getattr(net.denoiser, "gradient_checkpointing", False))


@pytest.mark.parametrize("method", ["dmd", "dmd2", "amd", "cdm"])
def test_grad_checkpointing_checkpoints_the_critic_too(method):
    on = _build(method, "sd3", grad_checkpointing=True, batch=2)
    off = _build(method, "sd3", batch=2)
    assert _checkpointed(on.critic) and _checkpointed(on._generator)
    assert not _checkpointed(off.critic) and not _checkpointed(off._generator)


def test_a_checkpointed_critic_trains_like_one_without(tmp_path):
    """DMD2 on the toy SD3 transformer, one process: the same losses (recomputation is exact up
    to float32 rounding of the recomputed forward, which is the same arithmetic here)."""
    rows_off, _ = launch(1, tmp_path / "off", tmp_path / "off_out", "dmd2", "sd3", 16)
    rows_on, _ = launch(1, tmp_path / "on", tmp_path / "on_out", "dmd2", "sd3", 16,
                        grad_checkpointing=True)
    on, off = _losses(rows_on), _losses(rows_off)
    assert [r[:2] for r in on] == [r[:2] for r in off] and len(on) == 5
    assert [r[2] for r in on] == pytest.approx([r[2] for r in off], rel=1e-6)
