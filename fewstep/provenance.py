"""What every job records beside its output: resolved config, seeds, environment."""
from __future__ import annotations

import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from fewstep.io import write_json

PACKAGES = ("fewstep", "torch", "torchvision", "diffusers", "transformers", "numpy", "scipy",
            "clean-fid", "open_clip_torch", "snakemake", "mlflow", "pandas")
REPO = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def device_info() -> dict:
    import torch

    info = {"torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def environment() -> dict:
    return {"git_commit": git_commit(), "python": sys.version.split()[0],
            "platform": platform.platform(), "packages": package_versions(),
            "device": device_info(), "argv": sys.argv,
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def record(path, config: dict, seeds=None, **extra) -> dict:
    """Write provenance.json (config, seeds, environment, extras) atomically and return it."""
    prov = {"config": config, "seeds": seeds, "environment": environment(), **extra}
    write_json(path, prov)
    return prov
