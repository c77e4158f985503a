"""The frozen teacher under FSDP2 (option fsdp_teacher): replicate (each rank holds it whole, at
its own dtype: bf16 for a real teacher) or shard (fully_shard per block with the trained
networks' mixed-precision policy; frozen: no gradients, no optimiser, not in the checkpoint).

Sharding the teacher changes no number: every forward all-gathers its exact weights, so at 2 gloo
ranks a shard run equals a replicate run bit for bit (losses and exported weights).
"""
import pytest
import torch

from test_fsdp import TRAIN, _losses, _toy_method, launch

from fewstep.errors import FewstepError


def test_a_sharded_teacher_trains_like_a_replicated_one_bitwise(tmp_path):
    """DMD2's cell: the teacher's guided and conditional predictions feed the DM loss."""
    rep_rows, rep = launch(2, tmp_path / "rep", tmp_path / "rep_out", sharding="fsdp")
    shard_rows, shard = launch(2, tmp_path / "shard", tmp_path / "shard_out", sharding="fsdp",
                               fsdp_teacher="shard")
    assert _losses(rep_rows) and _losses(shard_rows) == _losses(rep_rows)
    assert rep.keys() == shard.keys() and all(torch.equal(rep[k], shard[k]) for k in rep)


def test_the_sharded_teacher_is_sharded_and_frozen(tmp_path):
    """On a 1-process group: the teacher's weights are DTensors, none trains, and the checkpoint
    holds the trained networks only."""
    import torch.distributed as dist

    from fewstep.engine.loop import Trainer

    method = _toy_method(sharding="fsdp", fsdp_teacher="shard", steps=1)
    try:
        trainer = Trainer(method, tmp_path)
        params = list(method.teacher.denoiser.parameters())
        assert params and all(hasattr(p, "full_tensor") for p in params)  # DTensors
        assert not any(p.requires_grad for p in params)
        trained = {id(p) for opt in trainer.optimizers.values()
                   for group in opt.param_groups for p in group["params"]}
        assert not trained & {id(p) for p in params}
        trainer.run(progress=False)
        assert all(p.grad is None for p in params)
        from fewstep.engine import checkpoint

        import json
        meta = json.loads((checkpoint.latest(tmp_path) / "state.json").read_text())
        assert meta["format"] == "fsdp-dcp"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_fsdp_teacher_shard_needs_sharding_fsdp_naming_both():
    from fewstep.engine.loop import Trainer

    with pytest.raises(FewstepError, match="fsdp_teacher = shard needs sharding = fsdp"):
        Trainer(_toy_method(fsdp_teacher="shard", steps=1), "unused")
    with pytest.raises(FewstepError, match="fsdp_teacher.*'replicate', 'shard'|fsdp_teacher = halve"):
        _toy_method(sharding="fsdp", fsdp_teacher="halve")
