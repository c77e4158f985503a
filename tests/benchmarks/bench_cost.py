"""Benchmark (prints figures; not a test): the per-cell cost table of a finished DAG run, read from
Snakemake's job records (`.snakemake/metadata`: each output's job start and end time), summed by
stage, with the DAG's wall time and the CPU that ran it.

    .venv/bin/python tests/benchmarks/bench_cost.py /path/to/workdir [--cells] [--seeds 3]
    .venv/bin/python tests/benchmarks/bench_cost.py --arch-scan [--iters 6]   # no workdir

`--seeds k` adds the estimate of a k-training-seed DAG: training and student sampling/scoring jobs
scale by k, the rest (teachers, pairs, teacher sets) does not; job-seconds are divided by the cores
the DAG ran on (a lower bound on wall time: the critical path can add to it). Each train job is
split into its loop (iterations x mean logged iteration time, results/runs/*/metrics.jsonl) and
the rest (start-up, export), and `--target-min` prints the fraction of today's training
iterations with which k seeds fit that wall time at the run's measured parallel efficiency.
A job's time includes its process start-up (python imports, teacher load, prompt encoding).
"""
from __future__ import annotations

import argparse
import base64
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# stages whose work repeats per training seed (one job per trained or sampled student)
PER_SEED = ("train", "sample_student", "score_student")


def jobs(workdir: Path) -> list[dict]:
    """One record per job (a job with several outputs has one metadata file per output)."""
    seen: dict[tuple, dict] = {}
    for record in sorted((workdir / ".snakemake" / "metadata").iterdir()):
        meta = json.loads(record.read_text())
        if meta.get("starttime") is None or meta.get("endtime") is None:
            continue
        output = base64.b64decode(record.name).decode()
        key = (meta["rule"], tuple(meta.get("log") or [output]))
        job = seen.setdefault(key, {"rule": meta["rule"], "outputs": [], "log": key[1][0],
                                    "start": meta["starttime"], "end": meta["endtime"]})
        job["outputs"].append(output)
        job["start"] = min(job["start"], meta["starttime"])
        job["end"] = max(job["end"], meta["endtime"])
    return sorted(seen.values(), key=lambda j: j["start"])


def cell(job: dict) -> str:
    """family/method (or family/run) the job belongs to, from its log path."""
    parts = Path(job["log"]).with_suffix("").parts
    return "/".join(parts[2:]) if len(parts) > 2 else parts[-1]


def by_stage(records: list[dict]) -> dict[str, list[float]]:
    stages: dict[str, list[float]] = defaultdict(list)
    for job in records:
        stages[job["rule"]].append(job["end"] - job["start"])
    return stages


def cpu_name() -> str:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{fields.get('Model name', '?').strip()} ({fields.get('CPU(s)', '?').strip()} CPUs, {isa})"


def print_cells(records: list[dict]) -> None:
    print(f"{'stage':16s} {'cell':28s} {'seconds':>8s}")
    for job in sorted(records, key=lambda j: (j["rule"], cell(j))):
        print(f"{job['rule']:16s} {cell(job):28s} {job['end'] - job['start']:8.1f}")
    print()


def busy(records: list[dict]) -> float:
    """Seconds during which at least one job ran (the union of job intervals): the DAG's wall time
    without the gaps between separate invocations (a rerun of some rules)."""
    total, reach = 0.0, float("-inf")
    for job in sorted(records, key=lambda j: j["start"]):
        total += max(0.0, job["end"] - max(job["start"], reach))
        reach = max(reach, job["end"])
    return total


def print_stages(stages: dict[str, list[float]], wall: float) -> float:
    total = sum(sum(v) for v in stages.values())
    print(f"{'stage':16s} {'jobs':>4s} {'job-s':>8s} {'mean s':>7s} {'max s':>7s} {'share':>6s}")
    for rule, secs in sorted(stages.items(), key=lambda kv: -sum(kv[1])):
        print(f"{rule:16s} {len(secs):4d} {sum(secs):8.1f} {sum(secs) / len(secs):7.1f} "
              f"{max(secs):7.1f} {sum(secs) / total:6.1%}")
    print(f"{'all jobs':16s} {sum(map(len, stages.values())):4d} {total:8.1f}  "
          f"({total / 60:.1f} job-min; DAG wall, jobs running: {wall / 60:.1f} min)")
    return total


def estimate(stages: dict[str, list[float]], seeds: int, cores: int) -> None:
    fixed = sum(sum(v) for k, v in stages.items() if k not in PER_SEED)
    per_seed = sum(sum(v) for k, v in stages.items() if k in PER_SEED)
    total = fixed + seeds * per_seed
    print(f"\n{seeds} training seeds: {fixed / 60:.1f} job-min fixed + {seeds} x "
          f"{per_seed / 60:.1f} per seed = {total / 60:.1f} job-min; / {cores} cores >= "
          f"{total / cores / 60:.1f} min wall")


def training_split(workdir: Path, records: list[dict]) -> list[dict]:
    """Each train job's iterations (its log's last line), loop seconds (mean logged iteration
    time x iterations, from its run folder's metrics.jsonl) and the rest (start-up, export)."""
    rows = []
    for job in (j for j in records if j["rule"] == "train"):
        family, run = Path(job["log"]).with_suffix("").parts[-2:]
        found = re.search(r"for (\d+) iterations", (workdir / job["log"]).read_text())
        log = workdir / "results" / "runs" / family / run / "metrics.jsonl"
        if not found or not log.exists():
            continue
        times = [json.loads(line)["seconds"] for line in log.read_text().splitlines() if line]
        iters, seconds = int(found.group(1)), job["end"] - job["start"]
        loop = iters * sum(times) / len(times)
        rows.append({"cell": f"{family}/{run}", "iters": iters, "job": seconds, "loop": loop,
                     "per_iter": loop / iters, "rest": seconds - loop})
    return rows


def print_training(rows: list[dict]) -> None:
    print(f"\n{'train cell':22s} {'iters':>5s} {'s/iter':>6s} {'loop s':>7s} {'rest s':>6s}")
    for r in sorted(rows, key=lambda r: r["cell"]):
        print(f"{r['cell']:22s} {r['iters']:5d} {r['per_iter']:6.3f} {r['loop']:7.1f} "
              f"{r['rest']:6.1f}")
    loop, rest = sum(r["loop"] for r in rows), sum(r["rest"] for r in rows)
    print(f"{'all':22s} {'':5s} {'':6s} {loop:7.1f} {rest:6.1f}  (rest = start-up + export)")


def fit_target(stages, rows, seeds: int, cores: int, parallel: float, target_min: float) -> None:
    """The fraction of today's training iterations (same networks, every cell scaled alike) with
    which `seeds` seeds fit target_min of wall time at the measured parallel efficiency."""
    budget = target_min * 60 * cores * parallel
    fixed = sum(sum(v) for k, v in stages.items() if k not in PER_SEED)
    other = sum(sum(v) for k, v in stages.items() if k in PER_SEED and k != "train")
    loop, rest = sum(r["loop"] for r in rows), sum(r["rest"] for r in rows)
    frac = (budget - fixed - seeds * (other + rest)) / (seeds * loop)
    print(f"{target_min:.0f} min with {seeds} seeds at parallel efficiency {parallel:.2f}: "
          f"{budget / 60:.1f} job-min; fixed {fixed / 60:.1f} + {seeds} x (sample/score "
          f"{other / 60:.1f} + train start-up {rest / 60:.1f} + {frac:.2f} x loop "
          f"{loop / 60:.1f}) -> training iterations x {frac:.2f} (per-iteration cost x {frac:.2f} "
          f"with today's iterations)")


# today's toy sizes (fewstep.toy.teachers.TOY_ARCH) first, then smaller ones
ARCHS = {"sdxl": [dict(width=32, layers_per_block=1), dict(width=16, layers_per_block=1)],
         "sd3": [dict(width=64, layers=4, shift=1.0), dict(width=32, layers=4, shift=1.0),
                 dict(width=64, layers=2, shift=1.0)],
         "sit": [dict(hidden=96, depth=4), dict(hidden=64, depth=4), dict(hidden=96, depth=2)]}


def arch_scan(iters: int, method: str = "dmd2") -> None:
    import statistics
    import tempfile
    import time

    import torch

    from fewstep.engine.distributed import DistInfo
    from fewstep.engine.loop import Trainer
    from fewstep.engine.run import build_method, toy_context
    from fewstep.toy import teachers

    torch.set_num_threads(1)
    print(f"CPU: {cpu_name()}; {method} toy preset, CPU s/iteration (median of {iters}, 1 thread)")
    for family, archs in ARCHS.items():
        trainers = []
        for arch in archs:
            teachers.TOY_ARCH[family] = arch
            teacher = teachers.build(family, 16, seed=0)
            params = sum(p.numel() for p in teacher.denoiser.parameters())
            ctx = toy_context(teacher, family, 16, 0, DistInfo())
            trainers.append((arch, params, Trainer(build_method(method, teacher, ctx, "toy", {}),
                                                   Path(tempfile.mkdtemp()))))
        teachers.TOY_ARCH[family] = archs[0]
        times: list[list[float]] = [[] for _ in trainers]
        for step in range(iters + 1):  # alternated, so machine noise hits every size alike
            for i, (_, _, trainer) in enumerate(trainers):
                trainer.state.step = step
                start = time.process_time()
                trainer.iteration()
                if step:
                    times[i].append(time.process_time() - start)
        base = statistics.median(times[0])
        for (arch, params, _), t in zip(trainers, times):
            print(f"  {family:5s} {str(arch):42s} {params / 1e6:5.2f} M params "
                  f"{statistics.median(t):6.3f} s/iter  x{statistics.median(t) / base:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path, nargs="?",
                   help="the DAG's working directory (holds .snakemake/)")
    p.add_argument("--arch-scan", action="store_true",
                   help="measure per-iteration cost of smaller toy networks instead")
    p.add_argument("--iters", type=int, default=6, help="iterations per size (--arch-scan)")
    p.add_argument("--cells", action="store_true", help="also list every job")
    p.add_argument("--seeds", type=int, default=3, help="training seeds to estimate")
    p.add_argument("--cores", type=int, default=2, help="cores the DAG ran on")
    p.add_argument("--target-min", type=float, default=30.0, help="wall-time goal to fit")
    args = p.parse_args()
    if args.arch_scan:
        return arch_scan(args.iters)
    if args.workdir is None:
        p.error("give the DAG's working directory, or --arch-scan")
    records = jobs(args.workdir)
    print(f"CPU: {cpu_name()}; run: {args.workdir}\n")
    if args.cells:
        print_cells(records)
    stages = by_stage(records)
    wall = busy(records)
    total = print_stages(stages, wall)
    estimate(stages, args.seeds, args.cores)
    rows = training_split(args.workdir, records)
    if rows:
        print_training(rows)
        fit_target(stages, rows, args.seeds, args.cores, total / (args.cores * wall),
                   args.target_min)


if __name__ == "__main__":
    main()
