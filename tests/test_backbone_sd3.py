"""SD3 adapter on tiny random models of the real classes: the shared backbone checks
(tests/backbone_conformance.py: loader round trips, CFG, caching, text stack, missing files), and
SD3's own: the flow convention against diffusers' FlowMatchEulerDiscreteScheduler and SD3
pipeline, the empty-prompt null condition, missing text-encoder weights, refused shapes."""
from __future__ import annotations

import shutil

import pytest
import torch

from backbone_conformance import DiffusersConformance, noisy_latents
from fewstep.backbones.sd3 import SD3Backbone
from fewstep.backbones.weights import WEIGHTS_ENV, MissingWeightsError

torch.set_num_threads(1)
PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny latent SD3 (16-channel VAE) and the diffusers folder it was saved to."""
    backbone = SD3Backbone.tiny(resolution=32, pixel_space=False, width=16, seed=1)
    folder = backbone.save_pretrained(tmp_path_factory.mktemp("sd3") / "toy-sd3")
    return backbone, folder


class TestSD3Conformance(DiffusersConformance):
    backbone_cls = SD3Backbone
    conditions = PROMPTS
    denoiser_folder, probe_text_encoder = "transformer", "text_encoder_3"
    missing_files = ("model_index.json", "transformer/config.json",
                     "tokenizer_3/tokenizer_config.json", "scheduler/scheduler_config.json")

    def tiny_pixel(self):
        return SD3Backbone.tiny(resolution=16, pixel_space=True, width=16)

    def check_loaded(self, backbone, loaded):
        assert loaded.latent_shape == (16, 16, 16)
        assert (loaded.codec.scaling_factor, loaded.codec.shift_factor) == pytest.approx(
            (1.5305, 0.0609))
        assert loaded.shift == 3.0


def test_alpha_sigma_are_the_plain_flow_schedule_whatever_the_shift(saved):
    backbone, _ = saved
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    assert torch.equal(backbone.schedule.alpha(t), 1 - t)
    assert torch.equal(backbone.schedule.sigma(t), t)


def test_euler_step_equals_flow_match_euler_scheduler(saved):
    from diffusers import FlowMatchEulerDiscreteScheduler

    backbone, folder = saved
    euler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    euler.set_timesteps(4)  # shifted sigmas (shift 3), ending at 0
    cond, x = backbone.encode(PROMPTS), noisy_latents(backbone)
    seen = []
    handle = backbone.transformer.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["timestep"]), with_kwargs=True)
    for i, timestep in enumerate(euler.timesteps):
        t, t_next = euler.sigmas[i], euler.sigmas[i + 1]
        with torch.no_grad():
            v = backbone.native(x, t.expand(2), cond)
        assert torch.equal(seen[-1], timestep.expand(2))  # network time input = 1000 t
        x0 = backbone.x0_from_native(x, t.expand(2), v)
        ours = backbone.schedule.ddim_step(x, x0, t.expand(2), t_next.expand(2), theta=0.0)
        theirs = euler.step(v, timestep, x).prev_sample
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5), i
    handle.remove()


def test_conditioning_equals_the_diffusers_sd3_pipeline(saved):
    from diffusers import StableDiffusion3Pipeline

    backbone, folder = saved
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)  # the folder is a real pipeline folder
    embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
        PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True,
        max_sequence_length=pipe.tokenizer_3.model_max_length)
    cond = backbone.encode(PROMPTS)
    null = backbone.null(cond)  # the pipeline's default negative prompt is ""
    for ours, theirs in [(cond["prompt_embeds"], embeds), (cond["pooled"], pooled),
                         (null["prompt_embeds"], neg_embeds), (null["pooled"], neg_pooled)]:
        assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-5)


def test_null_is_the_cached_empty_prompt_encoding(saved):
    backbone, _ = saved
    cond = backbone.encode(PROMPTS)
    null, empty = backbone.null(cond), backbone.encode([""])
    assert null["prompt_embeds"].shape == cond["prompt_embeds"].shape
    for key in cond:
        assert torch.equal(null[key], empty[key].expand_as(cond[key])), key


def test_folder_missing_text_encoder_weights_names_both_weight_formats(saved, tmp_path):
    _, folder = saved
    broken = shutil.copytree(folder, tmp_path / "broken")
    (broken / "text_encoder_3" / "model.safetensors").unlink()
    with pytest.raises(MissingWeightsError) as info:
        SD3Backbone.from_pretrained(broken)
    message = str(info.value)
    for needle in ("text_encoder_3/model.safetensors (or", WEIGHTS_ENV, str(broken), "missing 1 of"):
        assert needle in message, needle
    assert "transformer/config.json" not in message


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of 8"):
        SD3Backbone.tiny(width=12)
    with pytest.raises(ValueError, match="patch_size"):
        SD3Backbone.tiny(resolution=15, pixel_space=True, width=8)
