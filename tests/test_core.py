import json
import subprocess
import sys

import pytest
import yaml
import torch

from fewstep import config
from fewstep.errors import FewstepError
from fewstep.io import atomic_path, write_json
from fewstep.noise import sample_noise
from fewstep.prompts import read_prompts
from fewstep.registry import METRICS, Registry, UnknownNameError


def test_noise_depends_only_on_prompt_and_seed():
    ids, seeds = ["a", "b", "c", "d"], [0, 1, 0, 7]
    full = sample_noise(ids, seeds, (3, 4, 4))
    parts = torch.cat([sample_noise(ids[i:i + 1], seeds[i:i + 1], (3, 4, 4)) for i in range(4)])
    torch.testing.assert_close(full, parts, rtol=0, atol=0)
    reordered = sample_noise(ids[::-1], seeds[::-1], (3, 4, 4))
    torch.testing.assert_close(reordered, full.flip(0), rtol=0, atol=0)
    assert not torch.equal(full[0], full[2])  # same seed, other prompt: other noise
    with pytest.raises(ValueError, match="one seed per prompt"):
        sample_noise(ids, seeds[:2], (1,))


def test_registry_did_you_mean_and_lazy_import():
    reg = Registry("widget", "fewstep.no_such_group", {"json_dump": "json:dumps"})
    with pytest.raises(UnknownNameError, match="Did you mean 'json_dump'"):
        reg.get("json_dumb")
    assert reg.get("json_dump") is json.dumps
    with pytest.raises(UnknownNameError, match="Known metrics"):
        METRICS.check("fid_toy_x")


def test_config_errors_name_the_culprit(tmp_path):
    cfg = config.load()
    cfg["teachers"]["sorce"] = "shipped"
    with pytest.raises(config.ConfigError, match="teachers: Additional properties.*'sorce'"):
        config.validate(cfg)
    cfg = config.load()
    cfg["metrics"] = ["toy_fd"]
    with pytest.raises(config.ConfigError, match="Did you mean 'toy_fid'"):
        config.validate(cfg)
    cfg = config.load()
    cfg["families"] = ["sit"]
    config.validate(cfg)  # a subset of families keeps the default's guidance table
    del cfg["teachers"]["guidance"]["sit"]
    with pytest.raises(config.ConfigError, match=r"guidance has no entry for \['sit'\]"):
        config.validate(cfg)
    cfg["teachers"]["guidance"]["sitt"] = 2.0
    cfg["families"] = ["sdxl"]
    with pytest.raises(config.ConfigError, match="Did you mean 'sit'"):
        config.validate(cfg)
    with pytest.raises(config.ConfigError, match="cannot read config file"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("world: [unclosed\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(bad)


def test_metric_options_are_checked_against_the_metric(tmp_path):
    """metric_options (e.g. FID's reference and crop) reach the metric; a typo fails validation."""
    cfg = config.load()
    cfg["metrics"] = ["toy_fid", "fid"]
    cfg["metric_options"] = {"fid": {"reference": "coco2014-val", "crop": "center",
                                     "eval_resolution": 512}}
    config.validate(cfg)
    cfg["metric_options"]["fid"]["crpo"] = "center"
    with pytest.raises(config.ConfigError, match="no option 'crpo'. Did you mean 'crop'"):
        config.validate(cfg)
    cfg["metric_options"] = {"hpsv2.1": {"precision": "fp32"}}
    with pytest.raises(config.ConfigError, match="'hpsv2.1', which is not in metrics"):
        config.validate(cfg)
    cfg["metric_options"] = {"fid": {"seed": 3}}  # bootstrap settings come from `bootstrap`
    with pytest.raises(config.ConfigError, match="no option 'seed'"):
        config.validate(cfg)


def test_score_passes_metric_options_to_the_metric():
    import argparse

    from fewstep.commands.score import json_object
    from fewstep.scoring import build_metric

    args = argparse.Namespace(resamples=50, confidence=0.9, bootstrap_seed=1,
                              metric_options=json_object('{"fid": {"crop": "none", "mode": '
                                                         '"legacy_pytorch"}}'))
    metric = build_metric("fid", args, [])
    assert (metric.crop, metric.mode, metric.n_resamples, metric.level) == (
        "none", "legacy_pytorch", 50, 0.9)
    args.metric_options = {"fid": {"crop": "centre"}}
    with pytest.raises(ValueError, match="unknown crop policy 'centre'"):
        build_metric("fid", args, [])
    with pytest.raises(argparse.ArgumentTypeError, match="expected a JSON object"):
        json_object("[1]")


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "half.png").write_text("x")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


def test_prompt_file_errors(tmp_path):
    p = tmp_path / "p.jsonl"
    with pytest.raises(FewstepError, match="cannot read prompt file"):
        read_prompts(p)
    p.write_text('{"prompt_id": "a", "prompt": "x"}\nnot json\n')
    with pytest.raises(FewstepError, match="line 2: not JSON"):
        read_prompts(p)
    p.write_text('{"prompt_id": "a", "prompt": "x"}\n{"prompt_id": "a", "prompt": "y"}\n')
    with pytest.raises(FewstepError, match="duplicate prompt_id 'a'"):
        read_prompts(p)
    p.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(FewstepError, match="not UTF-8"):
        read_prompts(p)


def test_cli_help_lists_verbs():
    out = subprocess.run([sys.executable, "-m", "fewstep", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for verb in ("prompts", "teacher", "sample", "score", "track", "report"):
        assert verb in out.stdout


def test_cli_prints_clear_error_without_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fewstep", "prompts", "--family", "sdlx",
                          "--n", "3", "--out", str(tmp_path / "p.jsonl")], capture_output=True, text=True)
    assert out.returncode == 2
    assert "Did you mean 'sdxl'" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "p.jsonl").exists()


def test_every_cli_verb_imports():
    import importlib

    from fewstep.cli import VERBS

    for verb, (module, _) in VERBS.items():
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments) and callable(mod.run), verb


def test_cli_config_verb_validates(tmp_path):
    good = subprocess.run([sys.executable, "-m", "fewstep", "config"], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "valid" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("world: toy\nfamilies: [sdxl]\nmetricz: [toy_fid]\n")
    out = subprocess.run([sys.executable, "-m", "fewstep", "config", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "metricz" in out.stderr and "Traceback" not in out.stderr


def test_profile_install_links_the_repository_profile(tmp_path):
    from fewstep.commands.profile import PROFILES, install
    from fewstep.errors import FewstepError

    target = install("slurm", dest=str(tmp_path))
    assert target.resolve() == (PROFILES / "slurm").resolve()
    assert install("slurm", dest=str(tmp_path)) == target  # idempotent
    cfg = yaml.safe_load((target / "config.yaml").read_text())
    assert cfg["executor"] == "slurm" and cfg["slurm-status-command"] == "squeue"
    with pytest.raises(FewstepError, match="known"):
        install("slrum", dest=str(tmp_path))
    other = tmp_path / "other"
    (other / "slurm").mkdir(parents=True)
    with pytest.raises(FewstepError, match="--force"):
        install("slurm", dest=str(other))


def test_profile_install_writes_the_users_partition_and_account(tmp_path):
    from fewstep.commands.profile import install
    from fewstep.errors import FewstepError

    target = install("slurm", dest=str(tmp_path), partition="gpu", account="proj42")
    cfg = yaml.safe_load((target / "config.yaml").read_text())
    assert cfg["executor"] == "slurm" and cfg["set-resources"]["train"]["runtime"] == 720
    assert cfg["default-resources"]["slurm_partition"] == "gpu"
    assert cfg["default-resources"]["slurm_account"] == "proj42"
    install("slurm", dest=str(tmp_path), partition="debug")  # its own file: updated in place
    cfg = yaml.safe_load((target / "config.yaml").read_text())
    assert cfg["default-resources"]["slurm_partition"] == "debug"
    (target / "config.yaml").write_text("executor: slurm\n")  # hand-made: refused
    with pytest.raises(FewstepError, match="--force"):
        install("slurm", dest=str(tmp_path), partition="gpu")


@pytest.mark.parametrize("verb, args", [
    ("sample", ["--teacher", "t", "--prompts", "p.jsonl", "--steps", "1", "2", "--out", "a"]),
    ("score", ["--samples", "a", "b", "--prompts", "p.jsonl", "--seeds", "0", "--resolution", "16",
               "--metrics", "toy_fid", "--out", "a.json"]),
])
def test_multi_set_verbs_refuse_unpaired_outputs(verb, args, tmp_path):
    """One output per step count / sample set, checked before anything is loaded or written."""
    out = subprocess.run([sys.executable, "-m", "fewstep", verb, *args], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "one" in out.stderr and ("--out" in out.stderr)
    assert not any(tmp_path.iterdir())
