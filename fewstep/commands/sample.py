"""fewstep sample: a teacher at n steps on a prompt set, written as a sample set."""
from __future__ import annotations

from pathlib import Path

from fewstep.io import atomic_path


def add_arguments(p):
    p.add_argument("--teacher", required=True, help="teacher folder (fewstep teacher install/train)")
    p.add_argument("--prompts", required=True, help="prompt .jsonl (fewstep prompts)")
    p.add_argument("--steps", type=int, required=True, help="sampler steps")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale in x0 space")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--out", required=True, help="sample-set folder to write")


def sample_images(backbone, rows, seeds, steps, guidance, batch):
    """Images (N, 3, H, W) in [0, 1] for every (prompt, seed), in prompt-major order."""
    import torch
    from tqdm import tqdm

    from fewstep.noise import sample_noise
    from fewstep.sampling import sample_ode

    jobs = [(r, s) for r in rows for s in seeds]
    images = []
    for i in tqdm(range(0, len(jobs), batch), desc=f"sample {steps} steps", leave=False):
        chunk = jobs[i:i + batch]
        conds = [r.get("class_label", r["prompt"]) for r, _ in chunk]
        noise = sample_noise([r["prompt_id"] for r, _ in chunk], [s for _, s in chunk],
                             backbone.latent_shape)
        with torch.no_grad():
            x0 = sample_ode(backbone, noise, backbone.encode(conds), steps, guidance)
            images.append(backbone.decode(x0))
    return torch.cat(images), jobs


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
