"""Benchmark (prints figures; not a test): the engine's cost over a bare loop of the same math.

For every method's toy preset on each shipped toy teacher, two identical method instances are
built (same seed, same teacher): one is stepped by the engine (`Trainer.iteration`: autocast
context, finiteness checks, gradient averaging hook, logged scalars, warm-up schedulers, EMA
bookkeeping), the other by a bare loop written here: for each network in the plan, zero_grad,
the method's loss, backward, clip (if the preset clips), AdamW step, `after_update`, and the same
EMA update. Iterations alternate engine / bare in one process on one thread and the medians are
compared, so machine noise hits both sides alike. Target: engine / bare <= 1.05.

    .venv/bin/python tests/benchmarks/bench_engine_overhead.py [--iters 12] [--families sit ...]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from fewstep.engine.loop import Trainer, ema_decay, ema_update  # noqa: E402
from fewstep.toy import teachers  # noqa: E402
from tests.benchmarks.bench_methods import (SHIPPED, bench_method, method_spec,  # noqa: E402
                                            reward_net)


class BareLoop:
    """The same optimisation with nothing around it: plain AdamW per network, no checks."""

    def __init__(self, method):
        self.method, opt = method, method.opt
        self.nets = method.networks()
        self.params = {n: [p for p in m.parameters() if p.requires_grad] for n, m in self.nets.items()}
        self.optimizers = {n: torch.optim.AdamW(self.params[n], lr=method.lr(n), betas=tuple(opt.betas),
                                                weight_decay=method.weight_decay(n)) for n in self.nets}
        self.ema = copy.deepcopy(self.nets["generator"]).requires_grad_(False) if opt.ema_decay > 0 else None
        self.ema_updates = 0

    def iteration(self, step: int) -> None:
        method = self.method
        method.ctx.step = step
        scratch: dict = {}
        plan = method.plan(step)
        for net in plan:
            self.optimizers[net].zero_grad(set_to_none=True)
            loss, _ = method.loss(net, scratch)
            loss.backward(inputs=self.params[net])
            if method.opt.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params[net], method.opt.grad_clip)
            self.optimizers[net].step()
            method.after_update(net)
        if self.ema is not None and (method.opt.ema_on == "iteration" or "generator" in plan):
            ema_update(self.ema, self.nets["generator"], ema_decay(method, self.ema_updates))
            self.ema_updates += 1


def compare(build, iters: int, tmp: Path) -> tuple[float, float]:
    """Median seconds per iteration (engine, bare), iterations interleaved, first one dropped."""
    trainer, bare = Trainer(build(), tmp), BareLoop(build())
    engine_s, bare_s = [], []
    for step in range(iters + 1):
        trainer.state.step = step
        start = time.perf_counter()
        trainer.iteration()
        middle = time.perf_counter()
        bare.iteration(step)
        end = time.perf_counter()
        if step:
            engine_s.append(middle - start)
            bare_s.append(end - middle)
    return statistics.median(engine_s), statistics.median(bare_s)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--methods", nargs="+", default=["dmd", "dmd2", "amd", "rtdmd", "rtdmd-stage2", "cdm"])
    p.add_argument("--families", nargs="+", default=["sdxl", "sd3", "sit"])
    args = p.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="fewstep-bench-engine-"))
    reward = reward_net(tmp)
    print(f"{'family':6} {'method':13} {'engine s/it':>11} {'bare s/it':>10} {'ratio':>6}")
    ratios = []
    for family in args.families:
        teacher = teachers.load(SHIPPED / family)
        for spec in args.methods:
            args_ = method_spec(spec, family, teacher, tmp, reward)
            build = lambda: bench_method(*args_)  # noqa: E731
            engine, bare = compare(build, args.iters, tmp / f"{family}-{spec}")
            ratios.append(engine / bare)
            print(f"{family:6} {spec:13} {engine:11.4f} {bare:10.4f} {engine / bare:6.3f}", flush=True)
    print(f"ratio engine/bare: median {statistics.median(ratios):.3f}, max {max(ratios):.3f} "
          f"(target <= 1.05)")


if __name__ == "__main__":
    main()
