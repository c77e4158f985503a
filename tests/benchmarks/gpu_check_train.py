"""The GPU check's training rows: DMD2 iterations through the harness's engine (build_method and
Trainer, as `fewstep train` runs them), timed over one two-time-scale cycle after a warm-up.

An iteration is a critic update, plus a generator update every `generator_every` iterations
(DMD2's TTUR, methods/dmd2.py plan), so the mean over one cycle of `generator_every` consecutive
iterations is the run's mean cost per iteration. FLOPs: torch.utils.flop_counter.FlopCounterMode
over the two warm-up iterations (step 0: generator and critic; step 1: critic only), a cycle's
FLOPs = F(0) + (generator_every - 1) F(1), recomputation under checkpointing included.
"""
from __future__ import annotations

import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PRESETS = {"sdxl": "dmd2-sdxl4-paper", "sd3": "dmd2-sd3-ext", "sit": "dmd2-sit-ext"}
BATCH = {"full": {"sdxl": 2, "sd3": 2, "sit": 8}, "toy": {"sdxl": 2, "sd3": 2, "sit": 2}}
LORA = {"full": (64, 8.0), "toy": (4, 4.0)}  # DMD2's released SDXL LoRA: rank 64, alpha 8
SPARE_GIB = 3.0  # CUDA context and fragmentation (`fewstep plan`'s legend: keep 3-5 GiB spare)
TOY_TOKENS = {"sdxl": 16, "sd3": 32, "sit": 0}  # the toy text stacks' sequence lengths
GIB = 2 ** 30


@dataclass
class TrainResult:
    seconds: float        # per iteration, mean over one TTUR cycle
    flops: float          # per iteration, same cycle
    peak_gib: float       # torch.cuda.max_memory_allocated (CUDA) or the process's peak RSS
    plan_gib: float       # fewstep.engine.memory's estimate for the same run
    note: str = ""


def overrides(family: str, size: str, lora: bool, sharding: str, batch: int) -> dict:
    rank, alpha = LORA[size] if lora else (0, 0.0)
    return {"batch": batch, "lora_rank": rank, "lora_alpha": alpha,
            "grad_checkpointing": family != "sit",  # SiTNet has no checkpointing switch
            "sharding": sharding, "steps": 10 ** 6, "checkpoint_every": 10 ** 6, "bf16": True}


def context(teacher, family: str, device):
    """The training data: the toy world's prompts (class labels for SiT), encoded once, and
    random images of the family's size as the GAN's real data (encoded by the VAE per draw).
    On the CPU the iteration runs under CPU bf16 autocast (cpu_autocast_context), so the toy
    check trains the bf16 teacher with fp32 trainables as the CUDA run does."""
    from fewstep.engine.context import PromptPool
    from fewstep.toy.teachers import training_conditions

    from gpu_check_models import image_side

    metas, cond = training_conditions(teacher, family, 0)
    side = image_side(teacher)

    def real_images(metas, gen):
        return torch.rand((len(metas), 3, side, side), generator=gen)

    cls = harness_context() if torch.device(device).type == "cuda" else cpu_autocast_context()
    return cls(teacher, PromptPool(metas, cond), device=device, real_images=real_images,
               autocast=True)


def harness_context():
    from fewstep.engine.context import Context

    return Context


def cpu_autocast_context():
    """The harness's Context with its bf16 autocast on the CPU too (the harness enables it on
    CUDA only: Context.autocast): the toy check's stand-in for the CUDA run's autocast."""
    from fewstep.engine.context import Context

    class CPUAutocastContext(Context):
        def autocast(self):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)

    return CPUAutocastContext


class Skip(Exception):
    """A run the memory plan says cannot fit this GPU: not started; its row says why."""

    def __init__(self, plan: float, note: str):
        super().__init__(note)
        self.plan, self.note = plan, note


def options(family: str, size: str, lora: bool, sharding: str, batch: int):
    from fewstep.options import resolve
    from fewstep.registry import METHODS

    cls = METHODS.get("dmd2")
    return resolve(cls.Options, cls.PRESETS, PRESETS[family],
                   overrides(family, size, lora, sharding, batch), method="dmd2")


def fitted(teacher, family: str, size: str, device, lora: bool, sharding: str,
           why: str = "") -> tuple[int, float, str]:
    """(batch, plan GiB, note): the family's batch, halved while the memory plan (plus SPARE_GIB)
    exceeds the GPU's memory; Skip when batch 1 does not fit either."""
    batch, have, note = BATCH[size][family], device_memory_gib(device), ""
    while True:
        plan = plan_gib(options(family, size, lora, sharding, batch), teacher, family, size)
        if have is None or plan + SPARE_GIB <= have:
            return batch, plan, note
        note = note or f" (batch {batch} would need {plan:.0f} GiB)"
        if batch == 1:
            raise Skip(plan, f"{why}not run: the memory plan needs {plan:.1f} GiB at one rank and "
                             f"batch 1, this GPU has {have:.1f} GiB" +
                             (" (FSDP over more ranks shards it)" if sharding == "fsdp" else ""))
        batch //= 2


def device_memory_gib(device) -> float | None:
    """The GPU's memory in GiB (None on the CPU: no limit checked)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.get_device_properties(torch.device(device)).total_memory / GIB


def build_trainer(teacher, family: str, size: str, device, lora: bool, sharding: str,
                  batch: int):
    from fewstep.engine.distributed import DistInfo
    from fewstep.engine.loop import Trainer
    from fewstep.engine.run import build_method

    method = build_method("dmd2", teacher, context(teacher, family, device), PRESETS[family],
                          overrides(family, size, lora, sharding, batch))
    info = DistInfo(device=torch.device(device))
    return Trainer(method, Path(tempfile.mkdtemp(prefix="gpu-check-")) / "run", info)


def fsdp_trainer(teacher, family: str, size: str, device):
    """(trainer, note, plan) of FSDP on one rank with the generator's LoRA; when the engine
    refuses LoRA under FSDP, of the full fine-tune instead, and the note says so."""
    from fewstep.errors import FewstepError

    batch, plan, fit = fitted(teacher, family, size, device, True, "fsdp")
    try:
        trainer = build_trainer(teacher, family, size, device, True, "fsdp", batch)
        return trainer, "FSDP + LoRA" + fit, plan
    except FewstepError as err:
        if "lora" not in str(err).lower():
            raise
        note = f"LoRA off (refused: {str(err).split(';')[0]})"
    free_memory()
    batch, plan, fit = fitted(teacher, family, size, device, False, "fsdp", why=note + "; ")
    return build_trainer(teacher, family, size, device, False, "fsdp", batch), note + fit, plan


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def step(trainer) -> None:
    """One iteration at the trainer's step, then the step advanced (as Trainer.run does)."""
    trainer.iteration()
    trainer.state.step += 1


def counted(trainer) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(trainer)
    return float(counter.get_total_flops())


def reset_peak(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def measure(trainer, device) -> tuple[float, float, float]:
    """(seconds per iteration, FLOPs per iteration, peak GiB) over one TTUR cycle."""
    cycle = trainer.method.opt.generator_every
    first, critic_only = counted(trainer), counted(trainer)  # warm-up: steps 0 and 1
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    for _ in range(cycle):
        step(trainer)
    sync(device)
    seconds = (time.perf_counter() - start) / cycle
    return seconds, (first + (cycle - 1) * critic_only) / cycle, peak_gib(device)


def plan_gib(opt, teacher, family: str, size: str) -> float:
    """fewstep.engine.memory's per-GPU estimate of a DMD2 run with options `opt` at one rank:
    the real architecture's census and meta-device trace at full size, the toy teacher's own at
    toy size; activations as the harness runs DMD2 (harness_activations)."""
    from fewstep.engine import memory as m

    if size == "full":
        denoiser, head = m.real_denoiser(family), m.real_head(family)
        traces = {mode: m.real_trace(family, mode) for mode in ("full", "features")}
        extras = m.real_extras("dmd2", opt, family)
    else:
        denoiser, head, extras = teacher.denoiser, None, {}
        dtype = next(denoiser.parameters()).dtype
        traces = {mode: m.trace_denoiser(family, denoiser, mode, dtype=dtype,
                                         latent=teacher.latent_shape, tokens=TOY_TOKENS[family])
                  for mode in ("full", "features")}
    static = m.static_of("dmd2", opt, denoiser, teacher.lora_targets, head, extras)
    acts = harness_activations(opt, traces)
    row = m.engine_row("gpu-check", static, opt.sharding, "replicate", 1, opt.batch,
                       (acts, acts), m.largest_block(denoiser), bool(opt.bf16) and size == "full")
    return (row.static + acts) / GIB


def harness_activations(opt, traces: dict) -> int:
    """Saved activations of the heaviest update as the harness runs DMD2: every network's
    forwards (the critic's GAN features too) checkpointed per block under grad_checkpointing."""
    from fewstep.engine.memory import method_forwards

    def saved(net: str, mode: str) -> int:
        trace = traces[mode]
        return trace.checkpointed if opt.grad_checkpointing else trace.full

    return max(sum(n * opt.batch * saved(net, mode) for net, mode, n in forwards)
               for forwards in method_forwards("dmd2", opt).values())


def train_row(teacher, family: str, size: str, device, sharding: str) -> TrainResult:
    if sharding == "fsdp":
        trainer, note, plan = fsdp_trainer(teacher, family, size, device)
    else:
        batch, plan, fit = fitted(teacher, family, size, device, True, "ddp")
        trainer = build_trainer(teacher, family, size, device, True, "ddp", batch)
        note = "LoRA" + fit
    seconds, flops, peak = measure(trainer, device)
    opt = trainer.method.opt
    return TrainResult(seconds, flops, peak, plan,
                       note + f"; batch {opt.batch}, TTUR 1:{opt.generator_every}")
