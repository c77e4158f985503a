"""The weights cache: where names resolve, and the error a missing file gives."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fewstep.backbones.weights import (WEIGHTS_ENV, MissingWeightsError, require_files, resolve,
                                       weights_root)


def test_weights_root_defaults_to_user_cache(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    assert weights_root() == Path("~/.cache/fewstep/weights").expanduser()
    monkeypatch.setenv(WEIGHTS_ENV, "")  # empty counts as unset
    assert weights_root() == Path("~/.cache/fewstep/weights").expanduser()


def test_weights_root_follows_the_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    assert weights_root() == tmp_path


def test_resolve_bare_name_goes_to_the_cache_and_paths_stay(monkeypatch, tmp_path):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "cache"))
    assert resolve("sdxl-base") == tmp_path / "cache" / "sdxl-base"
    assert resolve(tmp_path / "elsewhere") == tmp_path / "elsewhere"
    assert resolve("./sdxl-base") == Path("./sdxl-base")
    assert resolve("models/sdxl-base") == Path("models/sdxl-base")
    assert resolve("~/w") == Path("~/w").expanduser()
    with pytest.raises(ValueError, match="empty weights path"):
        resolve("")


def test_require_files_returns_the_folder_when_complete(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    assert require_files(tmp_path, ["unet/config.json"], "toy") == tmp_path


def test_missing_folder_lists_every_expected_file(monkeypatch, tmp_path):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path))
    folder = tmp_path / "nowhere"
    with pytest.raises(MissingWeightsError) as info:
        require_files(folder, ["model_index.json", "unet/config.json"], "sdxl pipeline folder")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for needle in ("sdxl pipeline folder", str(folder), "does not exist", "model_index.json",
                   "unet/config.json", WEIGHTS_ENV, str(tmp_path)):
        assert needle in message, needle


def test_partial_folder_lists_only_what_is_missing(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "model.safetensors.index.json").write_text("{}")
    expected = ["model_index.json", "unet/model.safetensors|unet/model.safetensors.index.json",
                "vae/config.json|vae/config.yaml"]
    with pytest.raises(MissingWeightsError) as info:
        require_files(tmp_path, expected, "toy")
    message = str(info.value)
    assert "missing 1 of 3" in message and "exists but is incomplete" in message
    assert "vae/config.json (or vae/config.yaml)" in message
    assert "model_index.json" not in message.split("missing 1 of 3")[1].split("vae/")[0]


def test_loaders_check_files_before_importing_diffusers(tmp_path):
    """A missing folder must fail fast: no diffusers/transformers import before the check."""
    code = (
        "import sys\n"
        "from fewstep.backbones.sdxl import SDXLBackbone\n"
        "from fewstep.backbones.sd3 import SD3Backbone\n"
        "from fewstep.backbones.weights import MissingWeightsError\n"
        "for cls in (SDXLBackbone, SD3Backbone):\n"
        "    try:\n"
        f"        cls.from_pretrained({str(tmp_path / 'missing')!r})\n"
        "    except MissingWeightsError:\n"
        "        pass\n"
        "heavy = [m for m in ('diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
