"""Teachers are sampled the way their users sample them: the checkpoint's own diffusers scheduler,
built from its scheduler config, with CFG on the native output as the diffusers pipelines apply it
(fewstep/notes/conventions.md sec. 5). On tiny random SD3 (shift 3) and SDXL models, the teacher
sampler's final latents equal StableDiffusion3Pipeline / StableDiffusionXLPipeline's
(output_type="latent") for the same noise, steps and guidance; DMD's pairs and `fewstep sample`
use that sampler and record the scheduler; the former trailing-DDIM sampler stays an option."""
from __future__ import annotations

import json

import pytest
import torch

from fewstep.backbones.sd3 import SD3Backbone
from fewstep.backbones.sdxl import SDXLBackbone

torch.set_num_threads(1)
PROMPTS = ["a red circle", "two blue squares"]
RESOLUTION = 32


def _saved(cls, tmp_path_factory, **kwargs):
    backbone = cls.tiny(resolution=RESOLUTION, pixel_space=False, width=16, seed=1, **kwargs).eval()
    folder = backbone.save_pretrained(tmp_path_factory.mktemp(cls.family) / cls.family)
    return backbone, folder


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    backbone, folder = _saved(SDXLBackbone, tmp_path_factory)
    return backbone, StableDiffusionXLPipeline.from_pretrained(folder), {}


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline

    backbone, folder = _saved(SD3Backbone, tmp_path_factory, shift=3.0)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    # the toy T5 tokenizer pads to 16 tokens; the adapter encodes at min(256, model_max_length)
    return backbone, pipe, {"max_sequence_length": pipe.tokenizer_3.model_max_length}


def _noise(backbone, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((len(PROMPTS), *backbone.latent_shape), generator=gen)


def _pipeline_latents(pipe, noise, steps, guidance, extra):
    with torch.no_grad():
        out = pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance,
                   latents=noise.clone(), output_type="latent", height=RESOLUTION,
                   width=RESOLUTION, **extra)
    return out.images


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
@pytest.mark.parametrize("steps,guidance", [(4, 2.0), (1, 3.5), (3, 1.0)])
def test_teacher_samples_equal_the_diffusers_pipeline(family, steps, guidance, request):
    from fewstep.sampling import sample_teacher

    backbone, pipe, extra = request.getfixturevalue(family)
    noise = _noise(backbone, steps)
    theirs = _pipeline_latents(pipe, noise, steps, guidance, extra)
    ours = sample_teacher(backbone, noise, backbone.encode(PROMPTS), steps, guidance)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4


def test_sd3_teacher_runs_on_the_shifted_scheduler_grid(sd3):
    """Diffusers' FlowMatchEulerDiscreteScheduler with shift 3: the network sees 1000 sigma on the
    shifted grid (the former uniform grid never passed the shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fewstep.sampling import sample_teacher

    backbone, _, _ = sd3
    seen = []
    handle = backbone.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(float(kwargs["timestep"][0])), with_kwargs=True)
    try:
        sample_teacher(backbone, _noise(backbone), backbone.encode(PROMPTS), 4, 1.0)
    finally:
        handle.remove()
    reference = FlowMatchEulerDiscreteScheduler.from_config(backbone.scheduler_config)
    reference.set_timesteps(4)
    assert reference.config.shift == 3.0
    assert seen == pytest.approx(reference.timesteps.tolist(), abs=1e-3)


def test_sdxl_teacher_uses_leading_spacing_with_steps_offset(sdxl):
    from fewstep.sampling import sample_teacher

    backbone, _, _ = sdxl
    seen = []
    handle = backbone.unet.register_forward_pre_hook(lambda mod, args: seen.append(args[1]))
    try:
        sample_teacher(backbone, _noise(backbone), backbone.encode(PROMPTS), 4, 1.0)
    finally:
        handle.remove()
    assert [round(float(t.reshape(-1)[0])) for t in seen] == [751, 501, 251, 1]


def test_ddim_trailing_is_the_former_sampler_kept_as_an_option(sdxl):
    from fewstep.sampling import sample_ode, sample_teacher

    backbone, _, _ = sdxl
    noise, cond = _noise(backbone), backbone.encode(PROMPTS)
    legacy = sample_ode(backbone, noise, cond, 4, 2.0)
    assert torch.equal(sample_teacher(backbone, noise, cond, 4, 2.0, sampler="ddim-trailing"),
                       legacy)
    assert not torch.allclose(sample_teacher(backbone, noise, cond, 4, 2.0), legacy, atol=1e-3)


def test_unknown_sampler_names_the_option_and_the_choices(sdxl):
    from fewstep.errors import FewstepError
    from fewstep.sampling import sample_teacher

    backbone, _, _ = sdxl
    with pytest.raises(FewstepError, match=r"sampler 'ddim'.*scheduler.*ddim-trailing"):
        sample_teacher(backbone, _noise(backbone), backbone.encode(PROMPTS), 2, 1.0,
                       sampler="ddim")


def test_a_config_naming_no_diffusers_scheduler_is_refused(sdxl):
    from fewstep.errors import FewstepError
    from fewstep.sampling import build_scheduler

    backbone, _, _ = sdxl
    with pytest.raises(FewstepError, match="NoSuchScheduler"):
        build_scheduler({**backbone.scheduler_config, "_class_name": "NoSuchScheduler"})


def test_sampler_record_names_the_scheduler_and_its_config(sdxl):
    from fewstep.sampling import sampler_record

    backbone, _, _ = sdxl
    rec = sampler_record(backbone, "scheduler", steps=4)
    assert rec["sampler"] == "scheduler"
    assert rec["scheduler_class"] == "EulerDiscreteScheduler"
    assert rec["scheduler_config"] == backbone.scheduler_config
    assert rec["timesteps"] == [751, 501, 251, 1]
    legacy = sampler_record(backbone, "ddim-trailing", steps=4)
    assert legacy["sampler"] == "ddim-trailing" and "scheduler_class" not in legacy


def test_sit_keeps_its_reference_euler_sampler():
    """SiT ships no diffusers scheduler: `scheduler` is its reference ODE Euler sampler."""
    from fewstep.backbones.sit import SiTBackbone
    from fewstep.sampling import sample_ode, sample_teacher, sampler_record

    backbone = SiTBackbone.tiny(resolution=8, pixel_space=True, num_classes=3).eval()
    cond = backbone.encode([0, 1])
    noise = torch.randn(2, *backbone.latent_shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_teacher(backbone, noise, cond, 3, 2.0),
                       sample_ode(backbone, noise, cond, 3, 2.0))
    assert sampler_record(backbone, "scheduler", steps=3)["sampler"] == "sit-euler"


# -- the commands: `fewstep sample` and DMD's `fewstep pairs` on the shipped toy SDXL teacher -----
@pytest.fixture(scope="module")
def toy_sdxl():
    from fewstep import teachers
    from fewstep.toy.teachers import SHIPPED

    folder = SHIPPED / "sdxl"
    return folder, teachers.load(folder).eval()


def test_pairs_come_from_the_teacher_sampler(toy_sdxl, tmp_path):
    from safetensors.torch import load_file

    from fewstep.cli import main
    from fewstep.sampling import sample_teacher
    from fewstep.train_data import encode_rows

    folder, teacher = toy_sdxl
    out = tmp_path / "pairs.safetensors"
    assert main(["pairs", "--teacher", str(folder), "--count", "3", "--steps", "2",
                 "--guidance", "2.0", "--out", str(out)]) == 0
    pairs = load_file(str(out))
    info = json.loads(out.with_suffix(".json").read_text())
    cond = encode_rows(teacher, info["metas"])
    expected = sample_teacher(teacher, pairs["z"], cond, 2, 2.0)
    assert (pairs["y"] - expected).abs().max().item() < 1e-5
    assert info["sampler"]["scheduler_class"] == "EulerDiscreteScheduler"
    assert info["sampler"]["scheduler_config"] == teacher.scheduler_config


def test_sample_set_provenance_records_the_scheduler(toy_sdxl, tmp_path):
    from fewstep.cli import main
    from fewstep.commands.prompts import eval_prompts

    folder, teacher = toy_sdxl
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in eval_prompts("sdxl", 2)))
    out = tmp_path / "set"
    assert main(["sample", "--teacher", str(folder), "--prompts", str(prompts), "--steps", "2",
                 "--guidance", "2.0", "--device", "cpu", "--out", str(out)]) == 0
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["sampler"]["sampler"] == "scheduler"
    assert prov["sampler"]["scheduler_class"] == "EulerDiscreteScheduler"
    assert prov["sampler"]["scheduler_config"] == teacher.scheduler_config
    assert prov["sampler"]["timesteps"] == [501, 1]
    assert prov["config"]["sampler"] == "scheduler"


def test_the_metric_identity_names_the_teacher_sampler():
    """A score of a teacher set carries the sampler in every metric's identity, so a score of a set
    drawn with another sampler (or before samplers were recorded) is another protocol."""
    from fewstep.scoring import sampler_identity

    record = {"sampler": "scheduler", "scheduler_class": "EulerDiscreteScheduler",
              "scheduler_config": {"timestep_spacing": "leading", "steps_offset": 1}}
    ident = sampler_identity({"sampler": record})
    assert ident["sampler"] == "scheduler" and ident["scheduler_class"] == "EulerDiscreteScheduler"
    other = dict(record, scheduler_config={"timestep_spacing": "trailing", "steps_offset": 0})
    assert sampler_identity({"sampler": other}) != ident
    assert sampler_identity({}) is None
