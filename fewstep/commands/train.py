"""fewstep train: distil a teacher with a registered method (resumes from its run folder).

Under torchrun every rank runs this command; rank 0 writes checkpoints and the model folder.
Exit status 75 means "stopped by SIGTERM/SIGUSR1/SIGINT after saving a checkpoint": rerun to resume.
The run's checkpoints record the teacher's identity and the hashes of its input files (pairs,
reward file, training prompts, real-image captions, the stage-1 model): a resume with another
one is refused.

`--seeds 0 1 2` trains one run per training seed in this process (method option seed=<s>), with
--run-dir and --out naming each seed's folders through "{seed}" (a --set value may use it too, e.g.
RTDMD stage 2's init_from=.../rtdmd-stage1/seed{seed}): every run is exactly the run of a
call of its own with `--set seed=<s>` (the engine draws from the seed alone, and the teacher is
loaded afresh for each), without paying the process start-up (imports) once per seed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

SEED_FIELD = "{seed}"


def add_arguments(p):
    p.add_argument("--method", required=True, help="registered method name (dmd, dmd2, ...)")
    p.add_argument("--teacher", required=True, help="teacher folder (fewstep teacher install/train)")
    p.add_argument("--preset", default=None, help="named preset of the method (e.g. toy)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="option overrides, YAML values (steps=200 generator_grid=[1.0,0.5])")
    p.add_argument("--run-dir", required=True, help="checkpoints and metrics.jsonl (resume state)")
    p.add_argument("--out", required=True, help="model folder to write when training ends")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="train once per training seed (method option seed), one after the other "
                        "in this process; --run-dir and --out name each seed's folders with "
                        "{seed} (so may --set values), e.g. --out results/models/sd3/dmd/seed{seed}")
    p.add_argument("--reward", default=None,
                   help="the differentiable scorer of reward-guided methods (AMD, RTDMD): a "
                        "registered name, NAME:ARG, or a toy reward net file (`fewstep features "
                        "--seed 1`); e.g. toy:results/metrics/toy_reward_net.safetensors")
    p.add_argument("--train-prompts", default=None,
                   help="prompt file the generator trains on (JSONL, `fewstep prompts`); required "
                        "for a real teacher, the toy world's training split otherwise")
    p.add_argument("--real-data", default=None,
                   help="real images with their own captions for the GAN (DMD2, AMD): a folder "
                        "with images and metadata.jsonl rows {file_name, prompt | class_label}")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-progress", action="store_true")


def check_global_batch(options, world_size: int) -> None:
    """A run with global_batch trains global_batch samples per iteration over all its processes:
    its per-rank batch must be global_batch / world size (resolve(..., world_size) derives it)."""
    from fewstep.errors import FewstepError
    from fewstep.options import per_rank_batch

    total = getattr(options, "global_batch", None)
    if total is None:
        return
    expected = per_rank_batch(total, world_size)
    if options.batch != expected:
        raise FewstepError(f"the options hold global_batch = {total} with batch = "
                           f"{options.batch} per rank, which is not global_batch / world size on "
                           f"{world_size} processes ({expected}): the options were resolved for "
                           f"another world size; resolve them with world_size = {world_size}")


def per_seed(args) -> list[argparse.Namespace]:
    """The arguments of each --seeds run: those of a call of its own with `--set seed=<s>` and
    its own folders; [args] without --seeds. Checked before anything loads."""
    from fewstep.errors import FewstepError

    if args.seeds is None:
        return [args]
    problems = [f"--{flag.replace('_', '-')} {getattr(args, flag)!r} does not contain {SEED_FIELD}"
                for flag in ("run_dir", "out") if SEED_FIELD not in getattr(args, flag)]
    if any(item.split("=", 1)[0].strip() == "seed" for item in args.set):
        problems.append("--set gives seed= as well (--seeds sets each run's seed)")
    if len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0:
        problems.append(f"--seeds {args.seeds} must be distinct non-negative integers")
    if problems:
        raise FewstepError("fewstep train --seeds: " + "; ".join(problems) + ". Example: --seeds 0 "
                           "1 2 --run-dir results/runs/sd3/dmd/seed{seed} --out "
                           "results/models/sd3/dmd/seed{seed}")
    return [argparse.Namespace(**{**vars(args), "seeds": None,
                                  "set": [*(item.replace(SEED_FIELD, str(seed)) for item in args.set),
                                          f"seed={seed}"],
                                  "run_dir": args.run_dir.replace(SEED_FIELD, str(seed)),
                                  "out": args.out.replace(SEED_FIELD, str(seed))})
            for seed in args.seeds]


def run(args):
    runs = per_seed(args)
    if len(runs) > 1:
        import os

        from fewstep.errors import FewstepError
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise FewstepError("fewstep train --seeds trains its seeds in one process; under "
                               "torchrun launch one seed per call (--set seed=<s>)")
    for one in runs:
        code = run_one(one)
        if code:
            return code  # stopped (STOP_EXIT): a rerun resumes this seed; finished seeds re-export
    return 0


def run_one(args):
    import torch

    from fewstep.config import parse_overrides
    from fewstep.engine import distributed
    from fewstep.engine.loop import STOP_EXIT, StopRequested, Trainer
    from fewstep.engine.run import (build_method, build_reward, check_init_from, data_context,
                                    export, run_inputs)
    from fewstep.errors import FewstepError
    from fewstep.provenance import environment
    from fewstep.registry import METHODS
    from fewstep import teachers

    METHODS.check(args.method)
    overrides = parse_overrides(args.set)
    info = distributed.init(args.device)
    recipe = teachers.verify(Path(args.teacher))
    teacher = teachers.load(Path(args.teacher), verified=recipe).to(info.device)
    family = recipe["recipe"]["family"]
    reward = build_reward(args.reward, info.device) if args.reward else None
    if recipe["recipe"].get("world") == "real" and not args.train_prompts:
        raise FewstepError(f"{args.teacher} is a real {family} teacher: give its training prompts "
                           f"with --train-prompts (config: distill/train_data/{family}/prompts); the toy "
                           "world's prompts only fit toy teachers")
    ctx = data_context(teacher, family, args.resolution, 0, info, prompts=args.train_prompts,
                       real=args.real_data, reward=reward)
    method = build_method(args.method, teacher, ctx, args.preset, overrides)
    check_global_batch(method.opt, info.world_size)  # before a single iteration runs
    check_init_from(method.opt, recipe)
    inputs = run_inputs(recipe, method.opt, args.reward, args.train_prompts, args.real_data)
    trainer = Trainer(method, Path(args.run_dir), info, inputs=inputs)
    try:
        state = trainer.run(progress=not args.no_progress)
    except StopRequested as stop:
        print(f"fewstep train: {stop}", file=sys.stderr)
        return STOP_EXIT
    finally:
        distributed.barrier(info)
    if info.main:
        prov = {"config": vars(args), "seeds": [method.opt.seed], "environment": environment()}
        exported = export(method, trainer, Path(args.out),
                          {"preset": args.preset, "overrides": overrides,
                           "teacher_sha256": recipe.get("sha256"),
                           "teacher_identity": inputs["teacher"], "inputs": inputs,
                           "reward": args.reward,
                           "train_prompts": args.train_prompts, "real_data": args.real_data,
                           "world_size": info.world_size,
                           "resumed_from": state.resumed_from}, provenance=prov)
        print(f"trained {args.method} on {family} for {state.step} iterations -> {args.out} "
              f"(NFE {exported['student']['nfe']})")
    distributed.shutdown(info)
    return 0
