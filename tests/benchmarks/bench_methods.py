"""Benchmark (prints figures; not a test): seconds per training iteration of every method's toy
preset on every shipped toy teacher, measured side by side in one process with one CPU thread,
the generator-turn and critic-only iterations reported apart, and the preset's extrapolated wall
time. Peak resident memory of the process is printed at the end.

    .venv/bin/python tests/benchmarks/bench_methods.py [--iters 20] [--methods dmd dmd2 ...]
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from fewstep.engine.distributed import DistInfo  # noqa: E402
from fewstep.engine.loop import Trainer  # noqa: E402
from fewstep.engine.run import build_method, toy_context  # noqa: E402
from fewstep.toy import teachers  # noqa: E402

SHIPPED = REPO / "fewstep" / "toy" / "teachers"


def reward_net(tmp: Path):
    from fewstep.toy.features import save_feature_net, train_feature_net
    from metrics.toy_reward import load_toy_reward

    path = tmp / "reward.safetensors"
    save_feature_net(train_feature_net(steps=50, seed=1, size=16), path)  # speed only: short
    return load_toy_reward(path)


def stage1_model(family: str, teacher, tmp: Path, reward) -> str:
    """RTDMD's stage 2 starts from a stage-1 model: export 2 iterations of stage 1."""
    from fewstep.engine.run import export

    method = bench_method("rtdmd", "toy", family, teacher, reward, {"steps": 2})
    trainer = Trainer(method, tmp / f"s1-{family}")
    trainer.run(progress=False)
    export(method, trainer, tmp / f"s1-{family}-model", {})
    return str(tmp / f"s1-{family}-model")


def method_spec(spec: str, family, teacher, tmp: Path, reward):
    """A benchmark entry (a method name, or rtdmd-stage2) -> bench_method's arguments."""
    name, preset, over = spec, "toy", {}
    if spec == "dmd":
        over = {"lambda_reg": 0.0}  # pairs come from a DAG rule; the DM part is the cost
    if spec == "rtdmd-stage2":
        name, preset = "rtdmd", "toy-stage2"
        over = {"init_from": stage1_model(family, teacher, tmp, reward)}
    return name, preset, family, teacher, reward, over


def bench_method(name, preset, family, teacher, reward, overrides):
    ctx = toy_context(teacher, family, 16, 0, DistInfo(), reward=reward)
    return build_method(name, teacher, ctx, preset, overrides)


def time_run(method, iters: int, tmp: Path) -> tuple[float, float, int]:
    trainer = Trainer(method, tmp)
    gen, other = [], []
    for step in range(iters):
        trainer.state.step = step
        start = time.perf_counter()
        trainer.iteration()
        (gen if "generator" in method.plan(step) else other).append(time.perf_counter() - start)
    mean = lambda v: sum(v[1:] or v) / max(1, len(v[1:] or v))  # drop the first (warm-up) call
    return mean(gen) if gen else float("nan"), mean(other) if other else float("nan"), method.opt.steps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--methods", nargs="+", default=["dmd", "dmd2", "amd", "rtdmd", "rtdmd-stage2", "cdm"])
    p.add_argument("--families", nargs="+", default=["sdxl", "sd3", "sit"])
    args = p.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="fewstep-bench-methods-"))
    reward = reward_net(tmp)
    print(f"{'family':6} {'method':13} {'s/it gen':>9} {'s/it other':>10} {'iters':>6} {'est. min':>8}")
    for family in args.families:
        teacher = teachers.load(SHIPPED / family)
        for spec in args.methods:
            method = bench_method(*method_spec(spec, family, teacher, tmp, reward))
            g, o, steps = time_run(method, args.iters, tmp / f"{family}-{spec}")
            n_gen = sum("generator" in method.plan(s) for s in range(steps))
            est = (n_gen * g + (steps - n_gen) * (o if o == o else 0.0)) / 60
            print(f"{family:6} {spec:13} {g:9.3f} {o:10.3f} {steps:6d} {est:8.1f}", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
