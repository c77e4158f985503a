"""LoRA under FSDP2 (sharding = fsdp): the adapters are sharded with their base blocks (the base
frozen), and the export merges them into the gathered full weights on rank 0.

CDM's per-step merge of the LoRA student into its full fake teacher is computed on the shards
(fewstep.engine.adapt.merged_sharded). At 2 gloo ranks each run equals DDP with the same LoRA: losses rel 1e-5, every exported (merged)
network atol 1e-6 (tolerances: tests/test_fsdp.py's module docstring, FSDP's reduce-scatter
rounds its sums in another order than DDP's all-reduce).
"""
from test_fsdp import _losses
from test_fsdp_methods import like_ddp


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


def test_fsdp_trains_a_cdm_lora_like_ddp(tmp_path):
    """CDM merges the LoRA student into its full fake teacher after every fake-teacher step: on
    shards the merge is computed on the DTensors (peft's delta, sharded like the base weight).
    The merge made large (m = 0.5, lr 1e-4) as in test_fsdp_methods' CDM check; with the delta
    left out of the sharded merge this test fails (generator loss 0.0014299 against 0.0014275).
    Measured on the toy SDXL UNet (its LoRA has convolutions; not run here, a minute more): the
    merged fake teacher within 6e-8 of DDP's, losses rel 2e-6."""
    rows = like_ddp(tmp_path, "cdm", "sd3", 8, steps=4, batch=2, warmup=1, schedule_len=[1, 3],
                    lr=1e-4, critic_lr=1e-4, ft_ema_from_student=0.5, lora_rank=4,
                    lora_alpha=8.0, checkpoint_every=1000, log_every=1)
    assert {key for _, key, _ in _losses(rows)} == {"generator/loss", "critic/loss"}
