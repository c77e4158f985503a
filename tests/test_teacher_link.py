"""Real teachers are linked, not copied: `fewstep teacher link` names the local checkpoint, the
commands load it through the same --teacher folder as a toy teacher (here a tiny random SDXL
saved in the diffusers layout, standing in for stable-diffusion-xl-base-1.0)."""
import json

import pytest
import torch

from fewstep import teachers
from fewstep.backbones.sdxl import SDXLBackbone
from fewstep.cli import main
from fewstep.commands.prompts import eval_prompts
from metrics.sampleset import read_manifest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "weights"
    SDXLBackbone.tiny(resolution=16, seed=3).save_pretrained(root / "my-sdxl")
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(root))
    return root


def test_link_loads_the_checkpoint_and_samples_through_the_same_commands(cache, tmp_path):
    out = tmp_path / "teachers" / "sdxl"
    main(["teacher", "link", "--family", "sdxl", "--weights", "my-sdxl", "--dtype", "fp32",
          "--resolution", "16", "--out", str(out)])
    info = teachers.verify(out)
    assert info["recipe"] == {"family": "sdxl", "resolution": 16, "world": "real"}
    assert "scheduler/scheduler_config.json" in info["small_files"]
    linked = teachers.load(out).eval()
    direct = SDXLBackbone.from_pretrained(cache / "my-sdxl").eval()
    x, t = torch.randn(2, *linked.latent_shape), torch.tensor([0.3, 0.7])
    cond = linked.encode(["a red circle", "a blue square"])
    with torch.no_grad():
        assert torch.equal(linked.x0(x, t, cond), direct.x0(x, t, cond))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in eval_prompts("sdxl", 3)))
    main(["sample", "--teacher", str(out), "--prompts", str(prompts), "--steps", "1",
          "--seeds", "0", "--device", "cpu", "--out", str(tmp_path / "set")])
    assert len(read_manifest(tmp_path / "set")[0]) == 3
    timing = json.loads((tmp_path / "set" / "provenance.json").read_text())["timing"]
    assert timing["device"] == "cpu" and timing["latency_s"] > 0


def test_a_changed_or_missing_checkpoint_is_refused(cache, tmp_path):
    out = tmp_path / "link"
    teachers.link("sdxl", "my-sdxl", out, dtype="fp32")
    config = cache / "my-sdxl" / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text().replace("1000", "999"))
    with pytest.raises(ValueError, match="changed since it was linked.*scheduler_config"):
        teachers.verify(out)
    with pytest.raises(FileNotFoundError, match="no-such-model.*FEWSTEP_WEIGHTS"):
        teachers.link("sdxl", "no-such-model", tmp_path / "other")
    with pytest.raises(ValueError, match="dtype"):
        teachers.link("sdxl", "my-sdxl", tmp_path / "other", dtype="int8")
