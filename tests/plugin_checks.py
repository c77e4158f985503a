"""Installing the example method plugin (tests/plugin_example) the way a user would: from a copy
outside the repository, with pip, into a folder put on PYTHONPATH (not into the venv)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent / "plugin_example"


def install_plugin(where: Path) -> dict:
    """pip-install a copy of the example package into where/site; the environment that sees it."""
    source, site = where / "source", where / "site"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                          "--no-build-isolation", "--no-index", "--target", str(site), str(source)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """The example method package installed (not into the venv) and put on the path."""
    return install_plugin(tmp_path_factory.mktemp("plugin"))
