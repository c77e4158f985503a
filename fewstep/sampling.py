"""Teacher samplers and the few-step students' sampler.

A teacher is sampled the way its users sample it (sec. 8): with the checkpoint's own diffusers
scheduler, built from its scheduler config (`sampler = "scheduler"`), running the scheduler's
timesteps and step() with CFG on the native output (eps for SDXL, velocity for SD3) as the
diffusers pipelines apply it. SiT ships no diffusers scheduler; its "scheduler" is its reference
ODE Euler sampler (willisma/SiT transport), the grid loop below. The harness's former sampler, DDIM
on a trailing grid (vp-discrete) / Euler on an unshifted uniform grid (flow), with CFG in x0 space,
stays as `sampler = "ddim-trailing"`: `Schedule.ddim_step` with theta = 0 is DDIM on the VP
schedule and exactly the Euler step of the probability-flow ODE on the flow schedule (sec. 3).
Sections (sec. N) are those of fewstep/notes/conventions.md.
"""
from __future__ import annotations

import hashlib
import inspect
import json

import torch

from fewstep.backbones.base import Backbone, Cond, cond_cat
from fewstep.errors import FewstepError, did_you_mean
from fewstep.schedule import sampling_grid

SAMPLERS = ("scheduler", "ddim-trailing")
DEFAULT_SAMPLER = "scheduler"
# Schedulers that draw fresh noise in step(): the harness's per-(prompt, seed) noise design cannot
# reproduce them from a batch-level generator, so they are refused rather than silently reseeded.
STOCHASTIC_SCHEDULERS = ("DDPMScheduler", "EulerAncestralDiscreteScheduler",
                         "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler",
                         "LCMScheduler", "TCDScheduler")


def nfe_of(steps: int, guidance: float) -> int:
    """Network evaluations: a guided evaluation counts 2 (sec. 5)."""
    return steps * (1 if guidance == 1.0 else 2)


def teacher_grid(backbone: Backbone, steps: int, shift: float = 1.0) -> torch.Tensor:
    kind = "flow" if backbone.schedule.kind == "flow" else "vp-discrete"
    return sampling_grid(steps, kind=kind, shift_s=shift)


@torch.no_grad()
def sample_ode(backbone: Backbone, noise: torch.Tensor, cond: Cond, steps: int,
               guidance: float = 1.0, shift: float = 1.0) -> torch.Tensor:
    """Deterministic n-step sampler from pure noise at t = 1 on `teacher_grid`, CFG in x0 space;
    returns the final x0-prediction (`ddim-trailing`, and SiT's reference Euler sampler)."""
    grid = teacher_grid(backbone, steps, shift).tolist()
    x = noise
    for t, t_next in zip(grid[:-1], grid[1:]):
        x0 = backbone.x0(x, torch.full((x.shape[0],), t), cond, guidance)
        if t_next == 0.0:
            return x0  # the last step lands on clean data: its x0-prediction is the sample
        x = backbone.schedule.ddim_step(x, x0, torch.tensor(t), torch.tensor(t_next))
    return x


# -- the checkpoint's own diffusers scheduler ------------------------------------------------------
def check_sampler(name: str) -> str:
    if name not in SAMPLERS:
        raise FewstepError(f"teacher sampler {name!r} is not known; use one of "
                           f"{', '.join(SAMPLERS)}.{did_you_mean(name, SAMPLERS)}")
    return name


def has_scheduler(backbone: Backbone) -> bool:
    """Whether the family ships a diffusers scheduler config (SDXL, SD3; not SiT)."""
    return getattr(backbone, "scheduler_config", None) is not None


def build_scheduler(config: dict):
    """The diffusers scheduler class the config names (`_class_name`), built with from_config."""
    import diffusers

    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise FewstepError(f"scheduler config: _class_name {name!r} is not a diffusers scheduler "
                           f"(diffusers {diffusers.__version__}); the teacher folder's "
                           "scheduler/scheduler_config.json must name one")
    if name in STOCHASTIC_SCHEDULERS or config.get("stochastic_sampling") or \
            "sde" in str(config.get("algorithm_type", "")):
        raise FewstepError(f"scheduler config: {name} samples stochastically; the teacher sampler "
                           "needs a deterministic scheduler (use sampler 'ddim-trailing')")
    return cls.from_config(config)


def ready_scheduler(backbone: Backbone, steps: int, device=None):
    """The teacher's scheduler with its timesteps for `steps` set as the family's pipeline sets
    them (set_timesteps with the pipeline's extra arguments, begin index 0)."""
    if steps < 1:
        raise ValueError(f"a sampler needs at least one step, got {steps}")
    scheduler = build_scheduler(backbone.scheduler_config)
    scheduler.set_timesteps(steps, device=device, **backbone.scheduler_kwargs(scheduler))
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return scheduler


def guided_native(backbone: Backbone, x_in: torch.Tensor, timestep, cond: Cond,
                  guidance: float) -> torch.Tensor:
    """uncond + w (cond - uncond) on the native output from one batched call, the unconditional
    half first, as the diffusers SDXL and SD3 pipelines do; w = 1: the conditional call only.
    (The pipelines skip CFG for every w <= 1; the harness guides whenever w != 1, sec. 5.)"""
    if guidance == 1.0:
        return backbone.native_at(x_in, timestep, cond)
    both = cond_cat([backbone.null(cond), cond])
    uncond, text = backbone.native_at(torch.cat([x_in, x_in]), timestep, both).chunk(2)
    return uncond + guidance * (text - uncond)


@torch.no_grad()
def sample_scheduler(backbone: Backbone, noise: torch.Tensor, cond: Cond, steps: int,
                     guidance: float = 1.0) -> torch.Tensor:
    """The diffusers pipelines' denoising loop with the teacher's own scheduler: the pipeline's
    initial latents from the noise; per timestep, the pipeline's model input, the guided native
    output, scheduler.step; returns the final latents (the pipelines' output_type="latent")."""
    scheduler = ready_scheduler(backbone, steps, noise.device)
    eta = {"eta": 0.0} if "eta" in inspect.signature(scheduler.step).parameters else {}
    x = backbone.pipeline_latents(scheduler, noise)
    for t in scheduler.timesteps:
        x_in = backbone.pipeline_model_input(scheduler, x, t)
        out = guided_native(backbone, x_in, t, cond, guidance)
        x = scheduler.step(out, t, x, return_dict=False, **eta)[0]
    return x


def sample_teacher(backbone: Backbone, noise: torch.Tensor, cond: Cond, steps: int,
                   guidance: float = 1.0, sampler: str = DEFAULT_SAMPLER) -> torch.Tensor:
    """The teacher's n-step sample: its own scheduler (SiT: its reference Euler sampler), or the
    former trailing-DDIM / uniform-Euler grid (`ddim-trailing`)."""
    if check_sampler(sampler) == "scheduler" and has_scheduler(backbone):
        return sample_scheduler(backbone, noise, cond, steps, guidance)
    return sample_ode(backbone, noise, cond, steps, guidance)


def sampler_record(backbone: Backbone, sampler: str = DEFAULT_SAMPLER,
                   steps: int | None = None) -> dict:
    """What a sample set's provenance and DMD's pairs record of the teacher sampler: its name, and
    the scheduler class, config (and its sha256) and the timesteps at `steps`, or the grid."""
    check_sampler(sampler)
    if sampler == "scheduler" and has_scheduler(backbone):
        import diffusers

        config = dict(backbone.scheduler_config)
        rec = {"sampler": "scheduler", "scheduler_class": config.get("_class_name"),
               "scheduler_config": config, "scheduler_config_sha256": config_sha256(config),
               "diffusers": diffusers.__version__, "cfg": "native output, uncond first"}
        if steps is not None:
            ts = ready_scheduler(backbone, steps).timesteps.tolist()
            rec["timesteps"] = [round(t, 6) if t != int(t) else int(t) for t in ts]
        return rec
    name = "ddim-trailing" if has_scheduler(backbone) else "sit-euler"
    rec = {"sampler": name, "requested": sampler, "cfg": "x0 space"}
    if steps is not None:
        rec["grid"] = teacher_grid(backbone, steps).tolist()
    return rec


def config_sha256(config: dict) -> str:
    """sha256 of a scheduler config without its diffusers version stamp (same config, same hash)."""
    kept = {k: v for k, v in config.items() if k != "_diffusers_version"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def sample_student(generator: Backbone, noise: torch.Tensor, cond: Cond, grid, theta: float,
                   step_noise=None, guidance: float = 1.0) -> torch.Tensor:
    """A few-step generator's sampler: x0_i = G(x_i, t_i, c); x_{i+1} = alpha x0_i + sigma (cos theta
    eps_hat + sin theta xi_i) at t_{i+1} (sec. 3); returns the last x0-prediction.

    theta = pi/2 re-noises with fresh noise (DMD2, methods/notes/dmd2.md sec. 5.1), 0 is deterministic (CDM),
    eta pi/2 is RTDMD's CPS. `step_noise(i)` gives xi_i (per-sample seeded in the DAG).
    """
    x = noise
    x0 = noise
    for i, t in enumerate(grid):
        t_vec = torch.full((x.shape[0],), float(t), device=x.device)
        x0 = generator.x0(x, t_vec, cond, guidance)
        if i + 1 < len(grid):
            xi = step_noise(i) if theta else None
            x = generator.schedule.ddim_step(x, x0, t_vec, torch.full_like(t_vec, float(grid[i + 1])),
                                             xi, theta)
    return x0


# -- sample sets: every (prompt, seed) of a prompt list, on the shared per-sample noise ----------
def sample_jobs(backbone, rows, seeds, batch, desc, draw, span=None):
    """(images (N, 3, H, W) in [0, 1], jobs) for every (prompt, seed), in prompt-major order;
    with span = (lo, hi) (shard_span), only jobs lo..hi-1 of that order.

    Every sampler starts from the same per-(prompt id, seed) noise (paired design);
    draw(noise, cond, ids, seeds) returns the clean latents of one chunk.
    """
    import torch
    from tqdm import tqdm

    from fewstep.noise import sample_noise
    from fewstep.prompts import condition_of

    jobs = [(r, s) for r in rows for s in seeds]
    lo, hi = span or (0, len(jobs))
    images = []
    for i in tqdm(range(lo, hi, batch), desc=desc, leave=False):
        chunk = jobs[i:min(i + batch, hi)]
        ids, chunk_seeds = [r["prompt_id"] for r, _ in chunk], [s for _, s in chunk]
        cond = backbone.encode([condition_of(r) for r, _ in chunk])
        # the noise is drawn on the CPU (identical on every device), then moved
        noise = sample_noise(ids, chunk_seeds, backbone.latent_shape).to(backbone.device)
        with torch.no_grad():
            images.append(backbone.decode(draw(noise, cond, ids, chunk_seeds)).float().cpu())
    return torch.cat(images), jobs[lo:hi]


def sample_images(backbone, rows, seeds, steps, guidance, batch, sampler="scheduler", span=None):
    return sample_jobs(backbone, rows, seeds, batch, f"sample {steps} steps",
                       lambda noise, cond, ids, sd: sample_teacher(backbone, noise, cond, steps,
                                                                   guidance, sampler), span)


# -- shards: a set's jobs in K contiguous slices, each a run of whole batches --------------------
def parse_shard(spec: str) -> tuple[int, int]:
    """`--shard I/K` as (I, K): shard I (0-based) of K."""
    parts = str(spec).split("/")
    try:
        index, count = (int(p) for p in parts) if len(parts) == 2 else (None, None)
    except ValueError:
        index = count = None
    if count is None:
        raise FewstepError(f"--shard {spec!r}: give I/K, shard I (0-based) of K shards, "
                           "e.g. --shard 0/4")
    if count < 1:
        raise FewstepError(f"--shard {spec!r}: the shard count K must be at least 1")
    if not 0 <= index < count:
        raise FewstepError(f"--shard {spec!r}: shard index {index} is outside 0..{count - 1} "
                           f"(the {count} shards are numbered from 0)")
    return index, count


def shard_span(jobs: int, batch: int, index: int, count: int) -> tuple[int, int]:
    """Jobs lo..hi-1 of shard `index` of `count`: the set's batches split as evenly as possible,
    so every forward batch of a shard is a batch of the unsharded run (on CPU, bitwise the same
    images: a batch's numbers may depend on its size and neighbours)."""
    batches = -(-jobs // batch)
    if count > batches:
        raise FewstepError(f"--shard '{index}/{count}': {count} shards but the set has {batches} "
                           f"batches ({jobs} (prompt, seed) jobs in batches of --batch {batch}); "
                           f"use 1..{batches} shards, or a smaller --batch (in the DAG: "
                           "eval.shards at most the batches of its smallest set)")
    first, last = index * batches // count, (index + 1) * batches // count
    return first * batch, min(last * batch, jobs)
