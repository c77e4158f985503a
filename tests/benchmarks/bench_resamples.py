"""Benchmark (prints figures; not a test): what the bootstrap's resample count costs in the scoring
stages of a finished DAG, side by side in one run. For one student replicate it times
`fewstep score` (every configured metric, the paired comparison with the teachers) and for its
cell `fewstep aggregate` (a t-level interval per metric and the comparison with the teacher), at
each resample count given, writing into a scratch folder.

    .venv/bin/python tests/benchmarks/bench_resamples.py /path/to/workdir --cell sd3/dmd \
        --resamples 5000 1000
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            flags = Path("/proc/cpuinfo").read_text()
            return line.split(":", 1)[1].strip() + (", AVX-512" if "avx512f" in flags else ", AVX2")
    return platform.processor()


def score_argv(args: dict, out: Path, resamples: int) -> list[str]:
    """The score job's command from a score file's recorded scoring_args, at another R."""
    argv = ["score", "--samples", args["samples"], "--prompts", args["prompts"], "--seeds",
            *map(str, args["seeds"]), "--resolution", str(args["resolution"]), "--metrics",
            *args["metrics"], "--resamples", str(resamples), "--confidence",
            str(args["confidence"]), "--bootstrap-seed", str(args["bootstrap_seed"]),
            "--metric-options", json.dumps(args["metric_options"]), "--out", str(out)]
    for flag in ("feature_net", "reference_images", "cache"):
        if args.get(flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(args[flag])]
    argv += ["--allow-blank"] if args.get("allow_blank") else []
    return argv + (["--against", *args["against"]] if args.get("against") else [])


def timed(argv: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fewstep", *argv], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                        "PYTHONPATH": str(REPO)})
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--cell", default="sd3/dmd", help="family/method")
    p.add_argument("--resamples", type=int, nargs="+", default=[5000, 1000])
    a = p.parse_args()
    cell = json.loads((a.workdir / f"results/scores/{a.cell}/student.json").read_text())
    files = [r["score_file"] for r in cell["replicates"]]
    seeds = [str(r.get("training_seed", i)) for i, r in enumerate(cell["replicates"])]
    against = json.loads((a.workdir / files[0]).read_text())["scoring_args"]["against"]
    print(f"CPU: {cpu_name()}; cell {a.cell}, {len(files)} replicates; one process at a time, "
          "one thread")
    print(f"{'resamples':>9} {'score 1 replicate s':>20} {'aggregate cell s':>17}")
    with tempfile.TemporaryDirectory() as scratch:
        for r in a.resamples:
            outs = [Path(scratch) / f"r{r}-{i}.json" for i in range(len(files))]
            score_s = 0.0
            for i, (f, out) in enumerate(zip(files, outs)):
                args = json.loads((a.workdir / f).read_text())["scoring_args"]
                seconds = timed(score_argv(args, out, r), a.workdir)
                score_s = seconds if i == 0 else score_s
            agg = ["aggregate", "--replicates", *map(str, outs), "--training-seeds", *seeds,
                   "--against", *against, "--out", str(Path(scratch) / f"cell-{r}.json")]
            print(f"{r:>9} {score_s:>20.1f} {timed(agg, a.workdir):>17.1f}")


if __name__ == "__main__":
    main()
