"""fewstep weights check: listing, exit status, and one file list shared with the loaders."""
from __future__ import annotations

import re

import pytest
import yaml

from fewstep.backbones.sdxl import SDXLBackbone
from fewstep.backbones.weights import MissingWeightsError, entry_options
from fewstep.cli import main
from fewstep.config import DEFAULT
from fewstep.registry import METRICS


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "weights"
    root.mkdir()
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(root))
    # the real metrics, registered the way fewstep/registry.py names them
    monkeypatch.setitem(METRICS._targets, "clip_score", "metrics.clip_score:CLIPScore")
    monkeypatch.setitem(METRICS._targets, "fid", "metrics.fid:FID")
    return root


def _touch(root, *relative):
    for rel in relative:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def _check(capsys, *args) -> tuple[int, str]:
    code = main(["weights", "check", *args])
    return code, capsys.readouterr().out


def _status(out: str) -> dict[str, str]:
    """Expected path -> 'ok' or 'MISSING' (first alternative of each entry)."""
    return {m.group(2): m.group(1) for m in re.finditer(r"^  (ok|MISSING)\s+(\S+)", out, re.M)}


SDXL = "stable-diffusion-xl-base-1.0"


def test_the_toy_config_needs_no_weights(cache, capsys):
    code, out = _check(capsys)
    assert code == 0
    assert "nothing to check" in out and "MISSING" not in out
    for name in ("toy_fid", "toy_geneval", "toy_hps", "toy_imagereward"):
        assert f"metric {name}: no weight files" in out


def test_partial_cache_lists_present_and_missing_files(cache, capsys):
    _touch(cache, "clip/vit-l-14-openai/open_clip_pytorch_model.bin",   # the second alternative
           "refs/coco2014-val/000001.jpg", "SiT-XL-2-256x256.pt",
           f"{SDXL}/model_index.json", f"{SDXL}/unet/config.json",
           f"{SDXL}/unet/diffusion_pytorch_model.safetensors")
    code, out = _check(capsys, "--metrics", "clip_score", "fid", "toy_fid",
                       "--families", "sdxl", "sit", "--world", "real")
    assert code == 1
    status = _status(out)
    assert status[str(cache / "clip/vit-l-14-openai/open_clip_pytorch_model.bin")] == "ok"
    assert status[str(cache / "refs/coco2014-val")] == "ok"
    assert status[str(cache / "SiT-XL-2-256x256.pt")] == "ok"
    assert status[str(cache / f"{SDXL}/unet/diffusion_pytorch_model.safetensors")] == "ok"
    assert status[str(cache / "cleanfid/inception-2015-12-05.pt")] == "MISSING"
    assert status[str(cache / "sd-vae-ft-ema/config.json")] == "MISSING"
    assert status[str(cache / f"{SDXL}/text_encoder/config.json")] == "MISSING"
    assert "nvlabs-fi-cdn.nvidia.com" in out and "stabilityai/sd-vae-ft-ema" in out
    assert "metric toy_fid: no weight files" in out
    n_ok, n_missing = list(status.values()).count("ok"), list(status.values()).count("MISSING")
    assert f"{n_missing} of {n_ok + n_missing} files missing under {cache}" in out.splitlines()[-1]


def test_exit_status_zero_once_everything_is_there(cache, capsys):
    code, out = _check(capsys, "--metrics", "fid", "--families", "sit", "--world", "real")
    assert code == 1
    missing = [path for path, state in _status(out).items() if state == "MISSING"]
    for path in missing:
        target = path + "image.png" if path.endswith("/") else path  # a folder: one image
        _touch(cache, target.removeprefix(str(cache) + "/"))
    code, out = _check(capsys, "--metrics", "fid", "--families", "sit", "--world", "real")
    assert code == 0 and "MISSING" not in out
    assert out.splitlines()[-1] == f"weights check: all {len(missing)} files present under {cache}"


def test_config_file_selects_metrics_and_families(cache, capsys, tmp_path):
    config = yaml.safe_load(DEFAULT.read_text())
    config.update(metrics=["toy_fid", "clip_score"], families=["sd3"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out = _check(capsys, "--config", str(path))
    assert code == 1
    assert "metric clip_score:" in out and "family sd3 (toy world" in out
    assert "metric toy_geneval" not in out and "family sdxl" not in out


def test_the_check_and_the_loader_share_one_file_list(cache, capsys):
    """What the check calls missing is exactly what the SDXL loader refuses to load without."""
    _touch(cache, f"{SDXL}/model_index.json", f"{SDXL}/unet/config.json")
    _, out = _check(capsys, "--metrics", "toy_fid", "--families", "sdxl", "--world", "real")
    said_missing = {p.removeprefix(f"{cache}/{SDXL}/") for p, s in _status(out).items()
                    if s == "MISSING" and "/vae/" not in p}  # the loader checks vae/ apart
    with pytest.raises(MissingWeightsError) as err:
        SDXLBackbone.from_pretrained(SDXL)
    listed = {line.strip()[2:].split(" (or ")[0] for line in str(err.value).splitlines()
              if line.strip().startswith("- ")}
    assert said_missing == listed
    assert {entry_options(e)[0] for e in SDXLBackbone.expected_files()} >= listed


def test_unknown_names_get_a_did_you_mean(cache, capsys):
    assert main(["weights", "check", "--metrics", "clip_scor"]) == 2
    assert "Did you mean 'clip_score'" in capsys.readouterr().err


def test_prompt_sets_are_checked_with_their_data_files(cache, capsys):
    _touch(cache, "prompts/drawbench/drawbench.csv")
    code, out = _check(capsys, "--prompt-sets", "drawbench", "hpdv2")
    assert code == 1
    status = _status(out)
    assert status[str(cache / "prompts/drawbench/drawbench.csv")] == "ok"
    assert status[str(cache / "prompts/hpdv2/photo.json")] == "MISSING"
    assert "Hugging Face dataset zhwang/HPDv2" in out


def test_a_training_config_lists_its_training_data(cache, capsys):
    paper = DEFAULT.parent / "paper" / "sit-imagenet256-train.yaml"
    _touch(cache, "imagenet-train-256/metadata.jsonl")
    code, out = _check(capsys, "--config", str(paper))
    status = _status(out)
    assert code == 1 and "training data of sit:" in out
    assert status[str(cache / "imagenet-train-256/metadata.jsonl")] == "ok"
    assert status[str(cache / "prompts/imagenet/classes.txt")] == "MISSING"
