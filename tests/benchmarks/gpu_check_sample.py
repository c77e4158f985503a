"""The GPU check's sampling rows: images per second of the harness's samplers (the code `fewstep
sample` runs: fewstep.sampling.sample_images for a teacher, fewstep.commands.sample's
sample_student_images for a student) against diffusers' own pipeline over the same modules, the
same noise, prompts, steps, guidance, batch and resolution, both ending in decoded images.

Pipeline settings: the teacher with its own scheduler (the harness's teacher sampler is that
scheduler's loop); the 4-step SDXL student as DMD2's model card runs it (LCMScheduler, timesteps
999/749/499/249, no guidance); the SD3 student with its flow-matching Euler scheduler at the
student's step count, no guidance. The pipeline returns latents (output_type="latent") that its
own VAE then decodes in fp32 with its image processor: the pipelines' decode would feed bf16
latents to the fp32 VAE (the backbones keep the VAE in fp32; SDXL's is not fp16-safe).
"""
from __future__ import annotations

import math
import time

import torch

from gpu_check_models import image_side, pipeline, prompt_rows

SEEDS = [0]


def student_spec(teacher, family: str) -> dict:
    """The DMD2 preset's student sampler on this teacher (grid, re-noising, guidance)."""
    from fewstep.options import resolve
    from fewstep.registry import METHODS

    from gpu_check_train import PRESETS

    cls = METHODS.get("dmd2")
    opt = resolve(cls.Options, cls.PRESETS, PRESETS[family], {}, method="dmd2")
    return cls.for_options(opt).sampler(teacher, opt).to_dict()


def teacher_guidance(family: str) -> float:
    from fewstep.options import resolve
    from fewstep.registry import METHODS

    from gpu_check_train import PRESETS

    cls = METHODS.get("dmd2")
    return float(resolve(cls.Options, cls.PRESETS, PRESETS[family], {}, "dmd2").teacher_guidance)


def harness_student(teacher, spec: dict, rows: list[dict]):
    from fewstep.commands.sample import sample_student_images

    return lambda: sample_student_images(teacher, spec, rows, SEEDS, len(rows))


def harness_teacher(teacher, rows: list[dict], steps: int, guidance: float):
    from fewstep.sampling import sample_images

    return lambda: sample_images(teacher, rows, SEEDS, steps, guidance, len(rows))


def pipeline_noise(teacher, rows: list[dict]) -> torch.Tensor:
    """The harness's per-(prompt, seed) noise of these rows (fewstep.noise.sample_noise), in the
    denoiser's dtype as a pipeline's user passes latents (the SDXL pipeline does not cast them,
    and its UNet refuses fp32 latents against bf16 weights)."""
    from fewstep.noise import sample_noise

    ids = [r["prompt_id"] for r in rows]
    dtype = next(teacher.denoiser.parameters()).dtype
    return sample_noise(ids, SEEDS * len(rows), teacher.latent_shape).to(teacher.device, dtype)


def decoded(pipe, latents: torch.Tensor) -> torch.Tensor:
    """The pipeline's latents through its VAE in fp32 and its image processor (as tensors)."""
    cfg = pipe.vae.config
    z = latents.float() / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
    with torch.no_grad():
        image = pipe.vae.decode(z, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pt")


def pipeline_call(pipe, teacher, rows, noise, steps: int, guidance: float, extra: dict):
    h, w = teacher.resolution
    if teacher.family == "sd3":
        extra = {"max_sequence_length": teacher.text.tokenizers["tokenizer_3"].model_max_length,
                 **extra}

    def run():
        with torch.no_grad():
            out = pipe(prompt=[r["prompt"] for r in rows], num_inference_steps=steps,
                       guidance_scale=guidance, latents=noise.clone(), height=h, width=w,
                       output_type="latent", **extra)
        return decoded(pipe, out.images)
    return run


def pipeline_student(teacher, spec: dict, rows: list[dict]):
    from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler

    steps, extra = len(spec["grid"]), {}
    if teacher.family == "sdxl":  # DMD2's model card: LCMScheduler at the student's timesteps
        scheduler = LCMScheduler.from_config(teacher.scheduler_config)
        extra["timesteps"] = [int(round(999 * t)) for t in spec["grid"]]
    else:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(teacher.scheduler_config)
    pipe = pipeline(teacher, scheduler)
    guidance = spec["guidance"] if spec["guidance"] > 1 else 1.0  # <= 1: no CFG in both
    return pipeline_call(pipe, teacher, rows, pipeline_noise(teacher, rows), steps, guidance, extra)


def pipeline_teacher(teacher, rows: list[dict], steps: int, guidance: float):
    from fewstep.sampling import build_scheduler

    pipe = pipeline(teacher, build_scheduler(teacher.scheduler_config))
    return pipeline_call(pipe, teacher, rows, pipeline_noise(teacher, rows), steps, guidance, {})


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rates(runs: list, images: int, device, repeat: int) -> list[float]:
    """Images per second of each run: one warm-up call each, then `repeat` timed calls
    alternating between them (load changes hit both); each one's fastest call counts."""
    for run in runs:
        run()
    best = [math.inf] * len(runs)
    for _ in range(repeat):
        for i, run in enumerate(runs):
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            best[i] = min(best[i], time.perf_counter() - start)
    return [images / s for s in best]


def sample_row(teacher, family: str, who: str, images: int, steps: int, device,
               repeat: int) -> tuple[float, float | None, str]:
    """(harness images/s, diffusers images/s or None, settings) of the student or the teacher."""
    rows = prompt_rows(family, images)
    if who == "student":
        spec = student_spec(teacher, family)
        ours = harness_student(teacher, spec, rows)
        theirs = pipeline_student(teacher, spec, rows) if family != "sit" else None
        settings = f"{len(spec['grid'])} steps, w {spec['guidance']:g}"
    else:
        guidance = teacher_guidance(family)
        ours = harness_teacher(teacher, rows, steps, guidance)
        theirs = pipeline_teacher(teacher, rows, steps, guidance) if family != "sit" else None
        settings = f"{steps} steps, w {guidance:g}"
    measured = rates([ours] + ([theirs] if theirs else []), images, device, repeat)
    settings += f", batch {images}, {image_side(teacher)} px"
    return measured[0], (measured[1] if theirs else None), settings
