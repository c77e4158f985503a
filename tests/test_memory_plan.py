"""fewstep plan (fewstep.engine.memory): the plan's weights, gradients, optimiser and EMA bytes for a toy
preset equal the bytes counted on the live training objects after a step (exact); the traced
activation estimate against the memory a CPU forward keeps (within a stated factor); bad input."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fewstep.engine import memory
from fewstep.cli import main
from fewstep.engine.distributed import DistInfo
from fewstep.engine.gan import make_head
from fewstep.engine.loop import Trainer
from fewstep.engine.run import build_method, toy_context
from fewstep.errors import FewstepError
from fewstep.toy import teachers

RES = 16


@pytest.fixture(scope="module")
def sit():
    torch.manual_seed(0)
    return teachers.build("sit", resolution=RES, seed=0)


def brightness(images, metas):
    return images.mean(dim=(1, 2, 3))


def live_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def live_columns(trainer: Trainer) -> dict:
    """Bytes counted on the live objects: every net's parameters and buffers, their gradients,
    the AdamW state tensors, the EMA, the teacher's denoiser."""
    nets = trainer.nets.values()
    optimiser = [v for o in trainer.optimizers.values() for s in o.state.values()
                 for v in s.values() if torch.is_tensor(v)]
    return {"trained": sum(live_bytes([*m.parameters(), *m.buffers()]) for m in nets),
            "gradients": live_bytes(p.grad for m in nets for p in m.parameters() if p.grad is not None),
            "optimiser": live_bytes(optimiser),
            "ema": sum(live_bytes([*m.parameters(), *m.buffers()]) for m in trainer.emas.values()),
            "teacher": live_bytes([*trainer.method.teacher.denoiser.parameters(),
                                   *trainer.method.teacher.denoiser.buffers()])}


def planned_columns(name: str, method, teacher) -> dict:
    head = make_head(teacher, getattr(method.opt, "gan_feature_layer", None), method.opt.seed) \
        if memory.gan_on(method.opt) else None
    static = memory.static_of(name, method.opt, teacher.denoiser, teacher.lora_targets, head,
                              teacher_dtype_bytes=None)  # the toy teacher's own dtype (fp32)
    return {"trained": sum(n.census.weight_bytes for n in static.trained),
            "gradients": static.gradients(), "optimiser": static.optimiser(), "ema": static.ema(),
            "teacher": static.weights("teacher")}


# every network updates at iteration 0 (generator_every 1), both gradients alive after it
CASES = {
    "dummy": {},
    "dmd": {"lambda_reg": 0.0},
    "dmd2": {"generator_every": 1},
    "dmd2-lora-ema": {"generator_every": 1, "lora_rank": 4, "lora_alpha": 4.0, "ema_decay": 0.9},
    "amd": {"generator_every": 1, "batch": 8},
    "cdm": {"generator_every": 1},
    "rtdmd": {"generator_every": 1},
    "rtdmd-loras": {"generator_every": 1, "lora_rank": 4, "lora_alpha": 8.0,
                    "critic_lora_rank": 2, "critic_lora_alpha": 2.0},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_equals_live_bytes_after_a_step(sit, case, tmp_path):
    name = case.split("-")[0]
    ctx = toy_context(sit, "sit", RES, 0, DistInfo(), reward=brightness if name == "amd" else None)
    opts = {"batch": 2, "warmup": 1, "steps": 1, "checkpoint_every": 1000, **CASES[case]}
    method = build_method(name, sit, ctx, "toy", opts)
    trainer = Trainer(method, tmp_path)
    assert set(trainer.method.plan(0)) == set(trainer.nets)  # every network steps at iteration 0
    trainer.iteration()
    live, planned = live_columns(trainer), planned_columns(name, method, sit)
    assert live["gradients"] > 0 and live["optimiser"] > 0
    assert planned == live


def test_lora_census_counts_only_adapters_as_trained(sit):
    from fewstep.engine.adapt import LoraSpec

    full = memory.trained_census(sit.denoiser, None, None)
    lora = memory.trained_census(sit.denoiser, LoraSpec(4, 4.0, sit.lora_targets), None)
    assert full.trained == full.params and 0 < lora.trained < full.trained
    assert lora.params == full.params + lora.trained  # the base is kept, frozen


# -- activations: the trace against what a CPU forward keeps ---------------------------------------
MEASURE = textwrap.dedent("""
    import gc, json, sys
    import psutil, torch
    from fewstep.engine import memory
    from fewstep.backbones.sdxl import SDXLBackbone
    torch.set_num_threads(1)
    ckpt, batch = sys.argv[1] == "ckpt", int(sys.argv[2])
    net = SDXLBackbone.tiny(resolution=64, width=32, seed=0).denoiser
    if ckpt:
        net.enable_gradient_checkpointing()
    run = memory.denoiser_call("sdxl", net, batch, torch.float32, "cpu", (3, 64, 64), 16)
    with torch.no_grad():
        run()  # allocator and kernel warm-up outside the measurement
    gc.collect()
    before = psutil.Process().memory_info().rss
    out = run()
    after = psutil.Process().memory_info().rss
    print(json.dumps({"kept": after - before - out.numel() * out.element_size()}))
""")
# Measured here (toy SDXL UNet, batch 32, fp32): no checkpointing traced 1862 MiB, kept 1798 MiB
# (0.97x); checkpointed traced 370 MiB, kept 409 MiB (1.11x). The checkpointed figure excludes
# the recomputed block (alive during backward only).
FULL_FACTOR, CKPT_FACTOR = 1.25, 1.25


def measured_kept(mode: str, batch: int) -> int:
    import json

    # a fixed mmap threshold: glibc would otherwise keep freed forward temporaries in the heap
    # (its dynamic threshold), which RSS would count as kept
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", MEASURE, mode, str(batch)], capture_output=True,
                         text=True, check=True, timeout=300, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["kept"]


def toy_trace(batch: int) -> memory.SavedTrace:
    from fewstep.backbones.sdxl import SDXLBackbone

    net = SDXLBackbone.tiny(resolution=64, width=32, seed=0).denoiser.to("meta")
    return memory.trace_denoiser("sdxl", net, "full", batch, torch.float32, (3, 64, 64), 16)


def test_activation_trace_matches_the_memory_a_cpu_forward_keeps():
    batch = 32
    trace = toy_trace(batch)
    full, ckpt_kept = trace.full, trace.outside + trace.inputs
    measured_full, measured_ckpt = measured_kept("full", batch), measured_kept("ckpt", batch)
    print(f"toy SDXL UNet, batch {batch}, fp32: traced {full / 2**20:.1f} MiB, measured "
          f"{measured_full / 2**20:.1f} MiB; checkpointed: traced {ckpt_kept / 2**20:.1f} MiB, "
          f"measured {measured_ckpt / 2**20:.1f} MiB")
    assert full / FULL_FACTOR <= measured_full <= full * FULL_FACTOR
    assert ckpt_kept / CKPT_FACTOR <= measured_ckpt <= ckpt_kept * CKPT_FACTOR


# -- the real plan and bad input -----------------------------------------------------------------
def test_real_parameter_counts():
    assert memory.census(memory.real_denoiser("sdxl")).params == 2_567_463_684
    assert memory.census(memory.real_denoiser("sit")).params == 674_834_720


def test_dmd2_sdxl_full_weights_grads_adamw_are_the_issue_figure():
    """Generator and critic weights, gradients and AdamW in fp32: about 83 GB (16 bytes/param)."""
    row = memory.plan_preset("dmd2-sdxl4-paper", [8], engines=("ddp",))[0]
    trained = sum(n.census.trained for n in memory.static_of(
        "dmd2", memory.preset_options("dmd2-sdxl4-paper", 8)[1], memory.real_denoiser("sdxl"),
        (), None).trained)
    assert 2 * 2_567_463_684 == trained
    assert row.batch == 16 and row.optimiser > 16 * trained / 2 and row.gradients >= 4 * trained


def test_fsdp_divides_the_trained_state_by_the_world_size():
    ddp, fsdp = memory.plan_preset("dmd2-sit-ext", [8], teachers=("shard",))
    assert fsdp.optimiser == -(-ddp.optimiser // 8) and fsdp.gradients < ddp.gradients / 8
    assert fsdp.weights < ddp.weights


def test_unknown_preset_has_a_did_you_mean():
    with pytest.raises(FewstepError, match=r"unknown preset 'dmd2-sdxl-paper'.*dmd2-sdxl\d-paper"):
        memory.method_of("dmd2-sdxl-paper")


def test_world_size_that_does_not_divide_the_global_batch_names_both():
    with pytest.raises(FewstepError, match=r"rtdmd-sd3-paper at --world-size 64.*global_batch = 72"):
        memory.preset_options("rtdmd-sd3-paper", 64)


def test_cli_prints_the_table_and_errors(capsys):
    assert main(["plan", "--preset", "dmd2-sit-ext", "--world-size", "1", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "dmd2-sit-ext" in out and "fits 80 GiB" in out and "fsdp" in out
    assert "dmd2-sit-ext: generator: 1 x generator + 1 x critic to the GAN features" in out
    assert main(["plan", "--preset", "dmd2-sdxl-paper"]) == 2
    assert "did you mean" in capsys.readouterr().err.lower()
    assert main(["plan", "--preset", "rtdmd-sd3-paper", "--world-size", "64"]) == 2
    assert "global_batch" in capsys.readouterr().err
    assert main(["plan", "--preset", "dmd2-sit-ext", "--world-size", "0"]) == 2
    assert "--world-size 0" in capsys.readouterr().err
    assert main(["plan", "--gpu-gib", "0"]) == 2
    assert "--gpu-gib 0" in capsys.readouterr().err
