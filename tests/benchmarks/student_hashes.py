"""Evidence for a refactor (prints figures; not a test): the sha256 of every method's student
after a short toy run through the real commands (`fewstep teacher install`, `features`, `pairs`,
`train`), so two checkouts can be compared without the 30-minute DAG. Run it from each checkout:

    PYTHONPATH=/path/to/checkout .venv/bin/python tests/benchmarks/student_hashes.py \
        --work /tmp/hashes-a [--family sit] [--steps 12]

Same hashes = same training (the DAG's students differ only in their iteration counts).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path


def fewstep(*args: str, work: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "fewstep", *args], cwd=work, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"fewstep {' '.join(args)} failed:\n{out.stderr[-3000:]}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def runs(steps: int, work: Path) -> list[tuple[str, str, str, list[str]]]:
    """(run name, method, preset, extra --set items); RTDMD's stage 2 starts from stage 1."""
    short = [f"steps={steps}", f"checkpoint_every={steps}"]
    return [("dmd", "dmd", "toy", short + [f"pairs={work}/pairs.safetensors"]),
            ("dmd2", "dmd2", "toy", short), ("amd", "amd", "toy", short),
            ("rtdmd-stage1", "rtdmd", "toy", short),
            ("rtdmd", "rtdmd", "toy-stage2", short + [f"init_from={work}/models/rtdmd-stage1"]),
            ("cdm", "cdm", "toy", short)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="an empty folder for this checkout")
    p.add_argument("--family", default="sit")
    p.add_argument("--steps", type=int, default=12)
    args = p.parse_args()
    work = args.work.resolve()  # absolute paths: a bare name would be looked up in the weights cache
    work.mkdir(parents=True, exist_ok=True)
    fewstep("teacher", "install", "--family", args.family, "--resolution", "16", "--out",
            f"{work}/teacher", work=work)
    fewstep("features", "--source", "train", "--size", "16", "--steps", "40", "--seed", "1",
            "--out", f"{work}/reward.safetensors", work=work)
    fewstep("pairs", "--teacher", f"{work}/teacher", "--count", "16", "--steps", "4",
            "--guidance", "2.0", "--out", f"{work}/pairs.safetensors", work=work)
    hashes = {"pairs": sha256(work / "pairs.safetensors")}
    for name, method, preset, sets in runs(args.steps, work):
        reward = ["--reward", f"{work}/reward.safetensors"] if method in ("amd", "rtdmd") else []
        fewstep("train", "--method", method, "--preset", preset, "--teacher", f"{work}/teacher",
                "--resolution", "16", "--run-dir", f"runs/{name}", "--out", f"models/{name}",
                "--no-progress", *reward, "--set", *sets, work=work)
        hashes[name] = sha256(work / "models" / name / "generator.safetensors")
    print(json.dumps(hashes, indent=1))


if __name__ == "__main__":
    main()
