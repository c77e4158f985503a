"""SD3 adapter on tiny random models of the real classes: loader round trip, the flow convention
against diffusers' FlowMatchEulerDiscreteScheduler and SD3 pipeline, CFG, caching, errors."""
from __future__ import annotations

import copy
import shutil

import pytest
import torch

from fewstep.backbones.base import cond_cat
from fewstep.backbones.codec import PixelCodec, VAECodec
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


def noisy_latents(backbone, batch=2, seed=0):
    return torch.randn(batch, *backbone.latent_shape, generator=torch.Generator().manual_seed(seed))


def test_save_and_load_back_give_equal_outputs(saved):
    backbone, folder = saved
    loaded = SD3Backbone.from_pretrained(folder)
    assert isinstance(loaded.codec, VAECodec) and loaded.latent_shape == (16, 16, 16)
    assert (loaded.codec.scaling_factor, loaded.codec.shift_factor) == pytest.approx((1.5305, 0.0609))
    assert loaded.shift == 3.0
    cond, cond_loaded = backbone.encode(PROMPTS), loaded.encode(PROMPTS)
    for key in cond:
        assert torch.equal(cond[key], cond_loaded[key]), key
    x, t = noisy_latents(backbone), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        assert torch.equal(backbone.x0(x, t, cond, 3.0), loaded.x0(x, t, cond_loaded, 3.0))
        assert torch.equal(backbone.decode(x), loaded.decode(x))
        images = torch.rand(2, 3, 32, 32)
        assert torch.equal(backbone.encode_images(images), loaded.encode_images(images))


def test_pixel_space_teacher_round_trips_without_vae(tmp_path):
    backbone = SD3Backbone.tiny(resolution=16, pixel_space=True, width=16)
    folder = backbone.save_pretrained(tmp_path / "pixel")
    assert not (folder / "vae").exists()
    loaded = SD3Backbone.from_pretrained(folder)
    assert isinstance(loaded.codec, PixelCodec) and loaded.latent_shape == (3, 16, 16)
    x, cond = noisy_latents(backbone), backbone.encode(PROMPTS)
    with torch.no_grad():
        assert torch.equal(backbone.native(x, 0.5, cond), loaded.native(x, 0.5, loaded.encode(PROMPTS)))


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


def test_cfg_in_x0_space_equals_cfg_on_the_native_output(saved):
    backbone, _ = saved
    cond, x, t, w = backbone.encode(PROMPTS), noisy_latents(backbone), torch.tensor([0.25, 0.9]), 4.5
    with torch.no_grad():
        guided = backbone.x0(x, t, cond, guidance=w)
        # the same batched call as x0() makes, so only the guidance algebra differs
        both = cond_cat([cond, backbone.null(cond)])
        v_c, v_u = backbone.native(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    reference = backbone.x0_from_native(x, t, v_u + w * (v_c - v_u))
    assert torch.allclose(guided, reference, rtol=1e-5, atol=1e-5)


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


def test_encode_is_cached_per_prompt_set(saved):
    backbone, _ = saved
    fresh = SD3Backbone(backbone.transformer, backbone.text, backbone.scheduler_config,
                        backbone.codec.vae)  # same parts, empty cache
    calls = []
    handle = fresh.text.encoders["text_encoder_3"].register_forward_pre_hook(
        lambda mod, args: calls.append(1))
    first = fresh.encode(["a red circle"])
    assert fresh.encode(["a red circle"]) is first and len(calls) == 1
    fresh.encode(["a blue circle"])
    handle.remove()
    assert len(calls) == 2


def test_released_text_encoders_keep_the_null_condition(saved):
    backbone, folder = saved
    loaded = SD3Backbone.from_pretrained(folder)
    assert copy.deepcopy(loaded).text is loaded.text
    cond = loaded.encode(PROMPTS)
    loaded.release_text_encoders()
    with torch.no_grad():
        loaded.x0(noisy_latents(loaded), torch.tensor([0.5, 0.5]), cond, guidance=2.0)
    with pytest.raises(RuntimeError, match="release_text_encoders"):
        loaded.encode(["a new prompt"])


def test_folder_without_transformer_names_its_files(saved, tmp_path):
    _, folder = saved
    broken = shutil.copytree(folder, tmp_path / "broken")
    shutil.rmtree(broken / "transformer")
    (broken / "text_encoder_3" / "model.safetensors").unlink()
    with pytest.raises(MissingWeightsError) as info:
        SD3Backbone.from_pretrained(broken)
    message = str(info.value)
    for needle in ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                   "text_encoder_3/model.safetensors (or", WEIGHTS_ENV, str(broken)):
        assert needle in message, needle
    assert "missing 3 of" in message


def test_missing_folder_and_bad_shapes_are_refused(tmp_path):
    with pytest.raises(MissingWeightsError, match="tokenizer_3/tokenizer_config.json"):
        SD3Backbone.from_pretrained(tmp_path / "absent")
    with pytest.raises(ValueError, match="multiple of 8"):
        SD3Backbone.tiny(width=12)
    with pytest.raises(ValueError, match="patch_size"):
        SD3Backbone.tiny(resolution=15, pixel_space=True, width=8)
