"""Released checkpoints: a published student sampled through the harness with its method's preset
(the sampler never comes from the checkpoint's name), full weights or a merged LoRA."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from fewstep.cli import main
from fewstep.commands.prompts import eval_prompts
from fewstep.engine.distributed import DistInfo
from fewstep.engine.method import student_spec
from fewstep.engine.run import build_method, load_student, toy_context
from fewstep.toy import teachers

TEACHER = teachers.SHIPPED / "sdxl"


def perturbed_unet(seed: int):
    unet = teachers.load(TEACHER).denoiser
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    return unet


def test_a_released_unet_folder_is_sampled_with_the_presets_sampler(tmp_path):
    release = tmp_path / "lcm-8step-1024"  # a misleading name: the preset decides the sampler
    perturbed_unet(1).save_pretrained(release)
    model = tmp_path / "model"
    main(["release", "--method", "dmd2", "--preset", "toy", "--teacher", str(TEACHER),
          "--weights", str(release), "--out", str(model)])
    teacher = teachers.load(TEACHER)
    generator, info = load_student(model, teacher)
    expected = student_spec(build_method("dmd2", teacher,
                                         toy_context(teacher, "sdxl", 16, 0, DistInfo()), "toy")).to_dict()
    assert info["student"] == expected and info["student"]["nfe"] == 4
    assert info["fidelity"] == "faithful, released checkpoint" and info["preset"] == "toy"
    reference = perturbed_unet(1).state_dict()
    for key, value in generator.denoiser.state_dict().items():
        assert torch.equal(value, reference[key])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in eval_prompts("sdxl", 2)))
    main(["sample", "--teacher", str(TEACHER), "--student", str(model), "--prompts", str(prompts),
          "--seeds", "0", "--device", "cpu", "--out", str(tmp_path / "set")])
    assert (tmp_path / "set" / "manifest.jsonl").is_file()


def test_a_state_dict_file_and_refusals(tmp_path, capsys):
    path = tmp_path / "student.safetensors"
    save_file({k: v.contiguous() for k, v in perturbed_unet(2).state_dict().items()}, str(path))
    main(["release", "--method", "cdm", "--preset", "toy", "--teacher", str(TEACHER),
          "--weights", str(path), "--out", str(tmp_path / "model")])
    saved = load_file(str(tmp_path / "model" / "generator.safetensors"))
    assert torch.equal(saved["conv_in.weight"], perturbed_unet(2).state_dict()["conv_in.weight"])
    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv_in.weight": torch.zeros(1)}, str(wrong))
    capsys.readouterr()
    for weights, message in ((wrong, "does not fit the teacher's UNet2DConditionModel"),
                             (tmp_path / "none", "released weights .* not found")):
        code = main(["release", "--method", "cdm", "--preset", "toy", "--teacher", str(TEACHER),
                     "--weights", str(weights), "--out", str(tmp_path / "bad")])
        assert code == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "bad").exists()


def test_the_dag_samples_a_released_student_instead_of_training_it(tmp_path):
    """distill.released swaps one (method, family) cell's training for `fewstep release`; a
    released method that is not configured is refused before any job."""
    import subprocess
    import sys

    import yaml

    from fewstep import config

    cfg = {"distill": {"methods": ["dmd2"], "preset": "toy", "stages": {}, "overrides": {},
                       "pairs": {"count": 4, "steps": 2},
                       "released": {"dmd2": {"sdxl": {"weights": "/w/dmd2 unet", "lora": True}}}}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(config.REPO / "Snakefile"),
                          "-d", str(tmp_path), "-n", "-p", "all", "--configfile", str(path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "release --method dmd2 --preset toy --teacher results/teachers/sdxl --weights " \
           "'/w/dmd2 unet' --lora" in out.stdout
    assert "--run-dir results/runs/sdxl/dmd2" not in out.stdout  # not trained
    assert "--run-dir results/runs/sd3/dmd2" in out.stdout
    loaded = config.load()
    loaded["distill"]["released"] = {"dummy": {"sdxl": {"weights": "x"}}}
    with pytest.raises(config.ConfigError, match="'dummy', which is not in distill/methods"):
        config.validate(loaded)


def test_a_relative_release_path_is_looked_up_in_the_weights_cache(tmp_path, monkeypatch):
    from fewstep.commands.release import released_path

    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert released_path("dmd2/unet") == tmp_path / "cache" / "dmd2" / "unet"
    (tmp_path / "local").mkdir()
    assert released_path("local").resolve() == tmp_path / "local"  # an existing path as given
    assert released_path(str(tmp_path / "abs")) == tmp_path / "abs"


def test_a_released_student_records_its_teacher_and_refuses_another(tmp_path):
    from fewstep.engine.run import teacher_identity
    from fewstep.errors import FewstepError

    path = tmp_path / "student.safetensors"
    save_file({k: v.contiguous() for k, v in perturbed_unet(3).state_dict().items()}, str(path))
    main(["release", "--method", "cdm", "--preset", "toy", "--teacher", str(TEACHER),
          "--weights", str(path), "--out", str(tmp_path / "model")])
    recipe = teachers.verify(TEACHER)
    info = json.loads((tmp_path / "model" / "student.json").read_text())
    assert info["teacher_sha256"] == recipe["sha256"]
    assert info["teacher_identity"] == teacher_identity(recipe)
    teacher = teachers.load(TEACHER, verified=recipe)
    load_student(tmp_path / "model", teacher, recipe)
    with pytest.raises(FewstepError, match="was made with teacher"):
        load_student(tmp_path / "model", teacher, {"sha256": {"x": "0" * 64}})
