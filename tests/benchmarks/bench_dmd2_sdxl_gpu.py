"""Benchmark (prints figures; not a test): one DMD2 training iteration on the full-size SDXL UNet
architecture with random weights, through the harness's engine: time per iteration, peak GPU
memory, and model FLOP utilisation (FLOPs counted by torch's FlopCounterMode over one iteration,
divided by the time and the GPU's dense bf16 peak).

The official DMD2 code needs more than one 80 GB GPU for SDXL at 1024 px; the target here is to
fit on one: bf16 autocast, LoRA on the generator, gradient checkpointing, critic trained in full.

    # GPU (H100/H200), 1024 px = 128 x 128 latents:
    .venv/bin/python tests/benchmarks/bench_dmd2_sdxl_gpu.py --device cuda
    # plumbing check on the CPU at toy size:
    .venv/bin/python tests/benchmarks/bench_dmd2_sdxl_gpu.py --device cpu --toy

Text encoders are one-layer CLIP models of SDXL's widths (768 + 1280, pooled 1280): their cost is
outside the iteration (prompts are encoded once per pool); real data for the GAN are random
latents; the UNet is UNet2DConditionModel with SDXL base's configuration.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from fewstep.engine.memory import SDXL_UNET  # noqa: E402  (the real UNet's config.json values)

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM datasheets


def sdxl_teacher(toy: bool, device: str, dtype: torch.dtype):
    """SDXLBackbone with SDXL's UNet (random) and one-layer text encoders of SDXL's widths."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    from fewstep.backbones import text as toy_text
    from fewstep.backbones._diffusers_io import TextStack, scheduler_config_of
    from fewstep.backbones.sdxl import SDXLBackbone
    from fewstep.toy.teachers import SHIPPED, load

    if toy:
        return load(SHIPPED / "sdxl").to(device)
    tokenizers = {n: toy_text.build_word_tokenizer(max_length=77) for n in ("tokenizer", "tokenizer_2")}
    encoders = {"text_encoder": toy_text.tiny_clip_text_model(
                    tokenizers["tokenizer"], 768, num_hidden_layers=1),
                "text_encoder_2": toy_text.tiny_clip_text_model(
                    tokenizers["tokenizer_2"], 1280, projection=True, projection_dim=1280,
                    num_hidden_layers=1)}
    with torch.device(device):
        unet = UNet2DConditionModel(**SDXL_UNET).to(dtype)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", prediction_type="epsilon",
                                       steps_offset=1, timestep_spacing="leading")
    teacher = SDXLBackbone(unet, TextStack(tokenizers, encoders), scheduler_config_of(scheduler),
                           None, 128)
    teacher.text.to(device)
    return teacher


def context(teacher, device: str):
    from fewstep.engine.context import Context, PromptPool
    from fewstep.toy import world

    metas = world.prompt_set("train", n=64, seed=0)
    cond = teacher.encode([m["prompt"] for m in metas])

    def real_latents(metas, gen):  # the GAN's real data: random stand-ins of the latent shape
        return torch.rand((len(metas), *teacher.latent_shape), generator=gen)

    return Context(teacher, PromptPool(metas, cond), device=device, real_images=real_latents,
                   autocast=True)


def iteration_flops(trainer) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.iteration()
    return float(counter.get_total_flops())


def measure(trainer, device: str, iters: int) -> float:
    for _ in range(2):  # warm-up: allocator, cuDNN autotuning, LoRA init
        trainer.iteration()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        trainer.iteration()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--toy", action="store_true", help="the shipped toy SDXL teacher (CPU check)")
    p.add_argument("--batch", type=int, default=2, help="DMD2's SDXL batch per GPU")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--lora-alpha", type=float, default=8.0, help="DMD2's released SDXL LoRA: 8")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--iters", type=int, default=3)
    args = p.parse_args()
    from fewstep.engine.loop import Trainer
    from fewstep.engine.run import build_method

    dtype = torch.bfloat16 if args.device == "cuda" and not args.toy else torch.float32
    teacher = sdxl_teacher(args.toy, args.device, dtype)
    overrides = {"batch": args.batch, "lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha,
                 "grad_checkpointing": not args.no_checkpointing}
    method = build_method("dmd2", teacher, context(teacher, args.device),
                          "toy" if args.toy else "dmd2-sdxl4-paper", overrides)
    trainer = Trainer(method, Path(tempfile.mkdtemp()) / "run")
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in method.networks().items()}
    seconds = measure(trainer, args.device, args.iters)
    flops = iteration_flops(trainer)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else float("nan")
    tflops = peak_tflops(args.device)
    mfu = f"{100 * flops / seconds / (tflops * 1e12):.1f} %" if tflops else "n/a (no GPU peak)"
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""))
    print(f"latents {tuple(teacher.latent_shape)}, batch {args.batch}, LoRA rank {args.lora_rank} alpha {args.lora_alpha},"
          f" checkpointing {not args.no_checkpointing}, UNet dtype {dtype}")
    print(f"parameters: " + ", ".join(f"{n} {v / 1e9:.2f} B" for n, v in params.items()))
    print(f"s/iteration {seconds:.3f} (mean of {args.iters}; a generator turn and a critic turn "
          "alternate by DMD2's ratio)")
    print(f"FLOPs/iteration {flops / 1e12:.2f} T; achieved {flops / seconds / 1e12:.1f} TFLOP/s; "
          f"MFU {mfu}")
    print(f"peak GPU memory {peak:.1f} GiB")


if __name__ == "__main__":
    main()
