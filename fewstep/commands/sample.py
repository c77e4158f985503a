"""fewstep sample: a teacher at n steps (or a trained student) on a prompt set, written as a sample
set.

Several step counts in one call (`--steps 1 2 4 8 32 --out a b c d e`) load the teacher and encode
the prompts once: on the toy world a process's start-up (imports, loading) costs as much as
sampling a short set, so the DAG samples all of a family's teacher sets in one job. For the same
reason several students of one teacher (a cell's training seeds) sample in one call
(`--student a b c --out x y z`): each set is exactly the one a call of its own writes.

`--shard I/K` samples only shard I of K of every output set (a contiguous run of whole batches of
its (prompt, seed) jobs) into a shard folder: the set's manifest and PNGs for those jobs, named as
in the whole set, and shard.json saying which shard of which set it is. `fewstep gather` merges
the K shard folders into the set the unsharded call writes, byte for byte.
"""
from __future__ import annotations

from pathlib import Path

from fewstep.io import atomic_path


def add_arguments(p):
    p.add_argument("--teacher", required=True, help="teacher folder (fewstep teacher install/train)")
    p.add_argument("--prompts", required=True, help="prompt .jsonl (fewstep prompts)")
    p.add_argument("--steps", type=int, nargs="+",
                   help="teacher sampler steps, one set per value (not with --student)")
    p.add_argument("--student", nargs="+",
                   help="trained model folder(s) of this teacher (fewstep train --out): sample "
                        "each student with its own sampler instead of the teacher, one --out each")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="CFG scale w: uncond + w (cond - uncond) (w = 1: conditional only)")
    p.add_argument("--sampler", default="scheduler",
                   help="teacher sampler: 'scheduler' (default; the checkpoint's own diffusers "
                        "scheduler from its scheduler config, CFG as the diffusers pipelines apply "
                        "it; SiT: its reference Euler sampler) or 'ddim-trailing' (the former "
                        "trailing-DDIM / uniform-Euler grid, CFG in x0 space)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--batch", type=int, default=64,
                   help="images per forward (64: fastest per image on CPU for the toy teachers)")
    p.add_argument("--device", default=None,
                   help="where to sample (default: cuda when available, else cpu)")
    p.add_argument("--shard", metavar="I/K",
                   help="sample only shard I (0-based) of K of each set: its I-th contiguous "
                        "slice of whole --batch batches of the (prompt, seed) jobs; each --out is "
                        "then a shard folder, merged by `fewstep gather` (default: the whole set)")
    p.add_argument("--out", required=True, nargs="+",
                   help="sample-set folder(s) to write: one per --steps value, or one per "
                        "--student folder, in the same order")


def sample_student_images(generator, spec, rows, seeds, batch, span=None):
    """A trained student's sampler; the re-noising noise of step k is its own per-sample stream
    "step{k}", so it too depends only on (prompt id, seed)."""
    from fewstep.noise import sample_noise
    from fewstep.sampling import sample_student

    def draw(noise, cond, ids, chunk_seeds):
        def step_noise(k):
            return sample_noise(ids, chunk_seeds, generator.latent_shape,
                                stream=f"step{k}").to(generator.device)
        return sample_student(generator, noise, cond, spec["grid"], spec["theta"], step_noise,
                              spec["guidance"])

    from fewstep.sampling import sample_jobs

    return sample_jobs(generator, rows, seeds, batch, f"sample student NFE {spec['nfe']}", draw,
                       span)


def timing(sample_all, sample_one, n_images: int, batch: int, device, repeats: int = 3):
    """(images, jobs, timing): the set's wall time and throughput, and the latency of one image at
    batch 1 (median of `repeats` after a warm-up), the report's latency axis."""
    import statistics
    import time

    import torch

    start = time.perf_counter()
    images, jobs = sample_all()
    wall = time.perf_counter() - start
    sample_one()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sample_one()
        times.append(time.perf_counter() - start)
    return images, jobs, {"wall_s": wall, "images": n_images, "s_per_image": wall / n_images,
                          "batch": batch, "latency_s": statistics.median(times),
                          "latency_repeats": repeats, "threads": torch.get_num_threads(),
                          "device": str(device)}


def run_student(args, backbone, recipe, rows, student, out, span=None):
    from fewstep.engine.run import WEIGHTS_FILE, load_student
    from fewstep.io import file_sha256

    generator, info = load_student(Path(student), backbone, recipe)
    spec = info["student"]
    images, jobs, times = timing(
        lambda: sample_student_images(generator, spec, rows, args.seeds, args.batch, span),
        lambda: sample_student_images(generator, spec, rows[:1], args.seeds[:1], 1),
        jobs_in(span, rows, args.seeds), args.batch, backbone.device)
    fields = {"family": generator.family, "method": info["method"], "nfe": spec["nfe"],
              "steps": len(spec["grid"]), "guidance": spec["guidance"]}
    records = set_records(jobs, span, fields)
    # the provenance of a call of its own: this set's student and folder
    provenance = dict(config={**vars(args), "student": student, "out": out}, seeds=args.seeds,
                      teacher_recipe=recipe, student=info, timing=times)
    shard = shard_record(args, rows, span, recipe, fields,
                         sampler={"grid": spec["grid"], "theta": spec["theta"]},
                         student_sha256=file_sha256(Path(student) / WEIGHTS_FILE)) if span else None
    write_set(out, images, records, provenance, shard)
    print(f"wrote {len(records)} images ({generator.family}, {info['method']}, NFE {spec['nfe']}) "
          f"to {out}")


def jobs_in(span, rows, seeds) -> int:
    return span[1] - span[0] if span else len(rows) * len(seeds)


def set_records(jobs, span, fields: dict) -> list[dict]:
    """The manifest records of the jobs sampled; each image is named by its index in the whole
    set, so a shard's files are the whole set's own (gathered without renaming)."""
    from metrics.sampleset import default_image_name

    first = span[0] if span else 0
    return [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "seed": s, **fields, "meta": r,
             "path": default_image_name(first + j)} for j, (r, s) in enumerate(jobs)]


def write_set(out, images, records, provenance: dict, shard: dict | None) -> None:
    """The sample set (or shard folder, with its shard.json), atomically."""
    from fewstep.io import write_json
    from fewstep.provenance import record
    from metrics.sampleset import SHARD_FILE, write_sample_set

    with atomic_path(out) as tmp:
        write_sample_set(tmp, images, records)
        record(tmp / "provenance.json", **provenance)
        if shard is not None:
            write_json(tmp / SHARD_FILE, shard)


def shard_record(args, rows, span, recipe, fields: dict, **identity) -> dict:
    """shard.json: which shard (index of count, jobs lo..hi-1) of which set; `fewstep gather`
    merges only shards whose `set` is equal, so every field that makes the set is in it."""
    from fewstep.engine.run import teacher_identity
    from fewstep.sampling import parse_shard
    from fewstep.shards import SHARD_FORMAT
    from metrics.sampleset import prompt_set_sha256

    index, count = parse_shard(args.shard)
    prompt_set = prompt_set_sha256([{**r, "meta": r} for r in rows])  # the whole set's header's
    return {"fewstep_shard": SHARD_FORMAT, "index": index, "count": count, "jobs": list(span),
            "set": {**fields, **identity, "prompt_set_sha256": prompt_set, "seeds": args.seeds,
                    "batch": args.batch, "jobs": len(rows) * len(args.seeds),
                    "teacher_sha256": teacher_identity(recipe)}}


def check_outputs(args):
    """One output folder per step count or per student, named before any work."""
    if args.student:
        if args.steps is not None:
            raise ValueError("--student samples the students' own samplers: give no --steps")
        if len(args.student) != len(args.out):
            raise ValueError(f"--student has {len(args.student)} folders but --out has "
                             f"{len(args.out)}: give one output folder per student, in the same "
                             "order")
        return
    if args.steps is None:
        raise ValueError("give --steps (teacher sampling) or --student (a trained model folder)")
    if len(args.steps) != len(args.out):
        raise ValueError(f"--steps has {len(args.steps)} values but --out has {len(args.out)} "
                         "folders: give one output folder per step count, in the same order")


def run_teacher(args, backbone, recipe, rows, steps, out, span=None):
    from fewstep.sampling import nfe_of, sample_images, sampler_record

    images, jobs, times = timing(
        lambda: sample_images(backbone, rows, args.seeds, steps, args.guidance, args.batch,
                              args.sampler, span),
        lambda: sample_images(backbone, rows[:1], args.seeds[:1], steps, args.guidance, 1,
                              args.sampler),
        jobs_in(span, rows, args.seeds), args.batch, backbone.device)
    nfe = nfe_of(steps, args.guidance)
    fields = {"family": backbone.family, "method": "teacher", "nfe": nfe, "steps": steps,
              "guidance": args.guidance}
    records = set_records(jobs, span, fields)
    provenance = dict(config={**vars(args), "steps": steps, "out": out}, seeds=args.seeds,
                      teacher_recipe=recipe, timing=times,
                      sampler=sampler_record(backbone, args.sampler, steps))
    shard = shard_record(args, rows, span, recipe, fields, sampler=args.sampler) if span else None
    write_set(out, images, records, provenance, shard)
    print(f"wrote {len(records)} images ({backbone.family}, {steps} steps, NFE {nfe}) to {out}")


def run(args):
    import torch

    from fewstep.prompts import read_prompts
    from fewstep import teachers
    from fewstep.sampling import check_sampler

    check_outputs(args)
    if not args.student:
        check_sampler(args.sampler)  # before the teacher loads
    rows = read_prompts(args.prompts)
    span = shard_of(args, rows)
    recipe = teachers.verify(Path(args.teacher))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone = teachers.load(Path(args.teacher), verified=recipe, device=device).eval()
    if args.student:
        for student, out in zip(args.student, args.out):
            run_student(args, backbone, recipe, rows, student, out, span)
        return None
    torch.manual_seed(0)  # nothing random should remain, but make that explicit
    for steps, out in zip(args.steps, args.out):
        run_teacher(args, backbone, recipe, rows, steps, out, span)


def shard_of(args, rows):
    """The jobs (lo, hi) of --shard I/K, checked before any model loads; None: the whole set."""
    from fewstep.sampling import parse_shard, shard_span

    if args.shard is None:
        return None
    return shard_span(len(rows) * len(args.seeds), args.batch, *parse_shard(args.shard))
