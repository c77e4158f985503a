"""The teacher recipe runs end to end on every family (a short run; the DAG's teacher_train rule)."""
import json

import pytest
import torch

from fewstep.noise import sample_noise
from fewstep.sampling import nfe_of, sample_ode, sample_teacher
from fewstep.toy import teachers, world


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    out = {}
    for family in ("sdxl", "sd3", "sit"):
        folder = tmp_path_factory.mktemp("teachers") / family
        info = teachers.train(teachers.Recipe(family=family, resolution=16, steps=3, batch=4),
                              folder, progress=False)
        out[family] = (folder, info)
    return out


@pytest.mark.parametrize("family", ["sdxl", "sd3", "sit"])
def test_recipe_writes_a_verifiable_teacher(trained, family):
    folder, info = trained[family]
    assert info["recipe"]["family"] == family and info["recipe"]["steps"] == 3
    assert json.loads((folder / "recipe.json").read_text())["sha256"] == info["sha256"]
    assert teachers.verify(folder)["sha256"] == info["sha256"]
    backbone = teachers.load(folder)
    assert backbone.family == family and backbone.latent_shape == (3, 16, 16)


@pytest.mark.parametrize("sampler", ["scheduler", "ddim-trailing"])
@pytest.mark.parametrize("family", ["sdxl", "sd3", "sit"])
def test_teacher_samples_decode_to_images(trained, family, sampler):
    backbone = teachers.load(trained[family][0]).eval()
    rows = [world.class_meta(0) if family == "sit" else world.prompt_set("eval", n=1)[0]] * 2
    conds = [r.get("class_label", r["prompt"]) for r in rows]
    noise = sample_noise(["p0", "p1"], [0, 0], backbone.latent_shape)
    x0 = sample_teacher(backbone, noise, backbone.encode(conds), 2, 2.0, sampler)
    images = backbone.decode(x0)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1
    assert nfe_of(2, 2.0) == 4 and nfe_of(2, 1.0) == 2


def test_tampered_teacher_is_refused(trained):
    folder, _ = trained["sd3"]
    weights = next(p for p in folder.rglob("*.safetensors"))
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(ValueError, match="differ from recipe.json"):
            teachers.verify(folder)
    finally:
        weights.write_bytes(original)


def test_one_step_sampler_returns_the_x0_prediction(trained):
    backbone = teachers.load(trained["sd3"][0]).eval()
    cond = backbone.encode(["a photo of a circle"])
    noise = sample_noise(["p"], [3], backbone.latent_shape)
    with torch.no_grad():
        expected = backbone.x0(noise, torch.ones(1), cond, 1.5)
    torch.testing.assert_close(sample_ode(backbone, noise, cond, 1, 1.5), expected)


def test_a_teacher_folder_named_without_a_slash_is_a_path_not_a_cache_name(trained, tmp_path,
                                                                            monkeypatch):
    """`--teacher teacher` (or ./teacher, which pathlib shortens to the same) is the folder in the
    working directory; only the weights loaders look bare names up in the cache."""
    import shutil

    folder, info = trained["sit"]
    shutil.copytree(folder, tmp_path / "teacher")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(tmp_path / "empty-cache"))
    from pathlib import Path

    from fewstep import teachers as any_teacher

    assert any_teacher.load(Path("./teacher")).family == "sit"


def test_shipped_toy_teachers_name_the_scheduler_they_are_sampled_with():
    """Toy SDXL ships SDXL base's scheduler (Euler, leading spacing, steps_offset 1); toy SD3 a
    flow-matching Euler scheduler with the shift its recipe trains at (1: t ~ U(0, 1)); SiT ships
    none (its reference Euler sampler). The teacher sampler builds exactly these."""
    from fewstep.sampling import build_scheduler, sampler_record

    sdxl = json.loads((teachers.SHIPPED / "sdxl/scheduler/scheduler_config.json").read_text())
    assert sdxl["_class_name"] == "EulerDiscreteScheduler"
    assert (sdxl["timestep_spacing"], sdxl["steps_offset"]) == ("leading", 1)
    assert (sdxl["beta_schedule"], sdxl["prediction_type"]) == ("scaled_linear", "epsilon")
    sd3 = json.loads((teachers.SHIPPED / "sd3/scheduler/scheduler_config.json").read_text())
    assert sd3["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert sd3["shift"] == teachers.TOY_ARCH["sd3"]["shift"] == 1.0
    assert not sd3["use_dynamic_shifting"]
    assert not (teachers.SHIPPED / "sit/scheduler").exists()
    for config in (sdxl, sd3):
        assert type(build_scheduler(config)).__name__ == config["_class_name"]
    sit = teachers.load(teachers.SHIPPED / "sit")
    assert sampler_record(sit, "scheduler", steps=2)["sampler"] == "sit-euler"


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_the_recipe_writes_the_shipped_scheduler(trained, family):
    """A teacher trained by the recipe ships the same scheduler config as the packaged one."""
    folder, _ = trained[family]
    ours = json.loads((folder / "scheduler/scheduler_config.json").read_text())
    shipped = json.loads(
        (teachers.SHIPPED / family / "scheduler/scheduler_config.json").read_text())
    drop = ("_diffusers_version",)
    assert {k: v for k, v in ours.items() if k not in drop} == \
        {k: v for k, v in shipped.items() if k not in drop}
