"""Benchmark (prints figures; not a test): wall time of the walking-skeleton DAG (teachers only,
workflows/config/skeleton.yaml) with shipped teachers, of `snakemake -n all`, and of the teacher
recipe per family (seconds per step, measured side by side in this run, then extrapolated to the
shipped recipe's steps). `--config default` times the whole default DAG (five methods; ~40 min).

    .venv/bin/python tests/benchmarks/bench_foundation.py [--config skeleton|default]
        [--recipe-steps 20] [--skip-dag]

Run it on a quiet machine: the DAG uses both cores, so anything else running shows in its time.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def timed(cmd, cwd) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - start


def bench_dag(config: str) -> None:
    work = Path(tempfile.mkdtemp(prefix="fewstep-bench-"))
    snake = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work)]
    if config != "default":
        snake += ["--configfile", str(REPO / "workflows" / "config" / f"{config}.yaml")]
    seconds = timed([*snake, "all"], REPO)
    print(f"{config} DAG, shipped teachers, empty results/: {seconds:.1f} s ({seconds / 60:.2f} min)")
    print(f"snakemake -n all (everything done):     {timed([*snake, '-n', 'all'], REPO):.2f} s")
    shutil.rmtree(work)


def bench_recipes(steps: int) -> None:
    import torch

    from fewstep.toy import teachers
    torch.set_num_threads(1)
    for family in ("sdxl", "sd3", "sit"):
        shipped = json.loads((teachers.SHIPPED / family / "recipe.json").read_text())
        recipe = teachers.Recipe(**{**shipped["recipe"], "steps": steps})
        with tempfile.TemporaryDirectory() as tmp:
            info = teachers.train(recipe, Path(tmp) / family, progress=False)
        per_step = info["wall_seconds"] / steps
        full = shipped["recipe"]["steps"]
        print(f"teacher recipe {family:5s}: {per_step:.3f} s/step (batch {recipe.batch}, 1 thread) "
              f"-> {full} steps ~ {per_step * full / 60:.1f} min; shipped run took "
              f"{shipped['wall_seconds'] / 60:.1f} min on a shared machine")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", choices=["skeleton", "default"], default="skeleton")
    parser.add_argument("--recipe-steps", type=int, default=20)
    parser.add_argument("--skip-dag", action="store_true")
    args = parser.parse_args()
    if not args.skip_dag:
        bench_dag(args.config)
    bench_recipes(args.recipe_steps)
