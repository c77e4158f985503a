"""Snakemake dry runs for the tests: what a config plans (`snakemake -n -p all`), nothing run."""
from __future__ import annotations

import subprocess
import sys

import yaml

from fewstep import config as workflow_config


def dry_run(folder, cfg: dict) -> str:
    """The dry run's stdout for config `cfg`, the workflow in `folder`/work (made here)."""
    folder.mkdir()
    (folder / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "snakemake", "-s",
                          str(workflow_config.REPO / "Snakefile"), "-d", str(folder / "work"),
                          "-n", "-p", "all", "--configfile", str(folder / "cfg.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout
