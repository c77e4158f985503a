"""fewstep sample: a teacher at n steps on a prompt set, written as a sample set."""
from __future__ import annotations

from pathlib import Path

from fewstep.io import atomic_path


def add_arguments(p):
    p.add_argument("--teacher", required=True, help="teacher folder (fewstep teacher install/train)")
    p.add_argument("--prompts", required=True, help="prompt .jsonl (fewstep prompts)")
    p.add_argument("--steps", type=int, help="teacher sampler steps (not with --student)")
    p.add_argument("--student", help="trained model folder (fewstep train --out): sample the "
                                     "student with its own sampler instead of the teacher")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale in x0 space")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--batch", type=int, default=64,
                   help="images per forward (64: fastest per image on CPU for the toy teachers)")
    p.add_argument("--out", required=True, help="sample-set folder to write")


def sample_jobs(backbone, rows, seeds, batch, desc, draw):
    """Images (N, 3, H, W) in [0, 1] for every (prompt, seed), in prompt-major order.

    Every sampler starts from the same per-(prompt id, seed) noise (paired design);
    draw(noise, cond, ids, seeds) returns the clean latents of one chunk.
    """
    import torch
    from tqdm import tqdm

    from fewstep.noise import sample_noise

    jobs = [(r, s) for r in rows for s in seeds]
    images = []
    for i in tqdm(range(0, len(jobs), batch), desc=desc, leave=False):
        chunk = jobs[i:i + batch]
        ids, chunk_seeds = [r["prompt_id"] for r, _ in chunk], [s for _, s in chunk]
        cond = backbone.encode([r.get("class_label", r["prompt"]) for r, _ in chunk])
        noise = sample_noise(ids, chunk_seeds, backbone.latent_shape)
        with torch.no_grad():
            images.append(backbone.decode(draw(noise, cond, ids, chunk_seeds)))
    return torch.cat(images), jobs


def sample_images(backbone, rows, seeds, steps, guidance, batch):
    from fewstep.sampling import sample_ode

    return sample_jobs(backbone, rows, seeds, batch, f"sample {steps} steps",
                       lambda noise, cond, ids, sd: sample_ode(backbone, noise, cond, steps, guidance))


def sample_student_images(generator, spec, rows, seeds, batch):
    """A trained student's sampler; the re-noising noise of step k is its own per-sample stream
    "step{k}", so it too depends only on (prompt id, seed)."""
    from fewstep.noise import sample_noise
    from fewstep.sampling import sample_student

    def draw(noise, cond, ids, chunk_seeds):
        def step_noise(k):
            return sample_noise(ids, chunk_seeds, generator.latent_shape, stream=f"step{k}")
        return sample_student(generator, noise, cond, spec["grid"], spec["theta"], step_noise,
                              spec["guidance"])

    return sample_jobs(generator, rows, seeds, batch, f"sample student NFE {spec['nfe']}", draw)


def run_student(args, backbone, recipe, rows):
    from fewstep.engine.run import load_student
    from fewstep.provenance import record
    from metrics.sampleset import write_sample_set

    generator, info = load_student(Path(args.student), backbone)
    spec = info["student"]
    images, jobs = sample_student_images(generator, spec, rows, args.seeds, args.batch)
    records = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "seed": s,
                "family": generator.family, "method": info["method"], "nfe": spec["nfe"],
                "steps": len(spec["grid"]), "guidance": spec["guidance"], "meta": r}
               for r, s in jobs]
    with atomic_path(args.out) as tmp:
        write_sample_set(tmp, images, records)
        record(tmp / "provenance.json", vars(args), seeds=args.seeds, teacher_recipe=recipe,
               student=info)
    print(f"wrote {len(records)} images ({generator.family}, {info['method']}, NFE {spec['nfe']}) "
          f"to {args.out}")


def run(args):
    import torch

    from fewstep.prompts import read_prompts
    from fewstep.provenance import record
    from fewstep.sampling import nfe_of
    from fewstep.toy import teachers
    from metrics.sampleset import write_sample_set

    rows = read_prompts(args.prompts)
    recipe = teachers.verify(Path(args.teacher))
    backbone = teachers.load(Path(args.teacher), verified=recipe).eval()
    if args.student:
        return run_student(args, backbone, recipe, rows)
    if args.steps is None:
        raise ValueError("give --steps (teacher sampling) or --student (a trained model folder)")
    torch.manual_seed(0)  # nothing random should remain, but make that explicit
    images, jobs = sample_images(backbone, rows, args.seeds, args.steps, args.guidance, args.batch)
    nfe = nfe_of(args.steps, args.guidance)
    records = [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "seed": s,
                "family": backbone.family, "method": "teacher", "nfe": nfe, "steps": args.steps,
                "guidance": args.guidance, "meta": r} for r, s in jobs]
    with atomic_path(args.out) as tmp:
        write_sample_set(tmp, images, records)
        record(tmp / "provenance.json", vars(args), seeds=args.seeds,
               teacher_recipe=recipe)
    print(f"wrote {len(records)} images ({backbone.family}, {args.steps} steps, NFE {nfe}) to {args.out}")
