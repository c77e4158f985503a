"""LoRA under FSDP2 (sharding = fsdp): the adapters are sharded with their base blocks (the base
frozen), and the export merges them into the gathered full weights on rank 0.

At 2 gloo ranks each run equals DDP with the same LoRA: losses rel 1e-5, every exported (merged)
network atol 1e-6 (tolerances: tests/test_fsdp.py's module docstring, FSDP's reduce-scatter
rounds its sums in another order than DDP's all-reduce).
"""
import pytest

from test_fsdp import _toy_method
from test_fsdp_methods import like_ddp

from fewstep.errors import FewstepError


def test_fsdp_trains_a_dmd2_lora_like_ddp(tmp_path):
    """DMD2's cell (GAN head, EMA of the LoRA generator) with a rank-4 generator LoRA."""
    rows = like_ddp(tmp_path, "dmd2", "sit", 16, lora_rank=4, lora_alpha=8.0)
    assert "generator/loss" in rows[0]
    merged = like_ddp.exported["generator.safetensors"]
    assert merged and not any("lora_" in key or "base_layer" in key for key in merged)


def test_fsdp_trains_rtdmd_loras_like_ddp(tmp_path):
    """RTDMD stage 1 with LoRAs on both the generator and the critic (the paper's recipe, at
    rank 4 for the toy transformer) and activation checkpointing of the generator's blocks."""
    like_ddp(tmp_path, "rtdmd", "sd3", 8, steps=4, batch=2, lora_rank=4, lora_alpha=8.0,
             critic_lora_rank=4, critic_lora_alpha=8.0, generator_every=2, grad_checkpointing=True,
             checkpoint_every=1000, log_every=1)
    for name in ("generator.safetensors", "critic.safetensors"):
        assert not any("lora_" in key for key in like_ddp.exported[name])


def test_fsdp_refuses_cdm_with_a_lora_naming_the_option():
    """CDM merges the student (LoRA merged) into the fake teacher after every step: on shards
    that needs a sharded merge not written yet, so it is refused, naming the option."""
    with pytest.raises(FewstepError, match="sharding = fsdp with cdm lora_rank = 4"):
        from fewstep.engine import fsdp

        fsdp.check_shardable(_toy_method(name="cdm", sharding="fsdp", batch=2, steps=1,
                                         lora_rank=4, lora_alpha=4.0))
