"""SDXL adapter on tiny random models of the real classes: loader round trip, the time
convention against diffusers' own DDIM scheduler and SDXL pipeline, CFG, caching, errors."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from fewstep.backbones.base import cond_cat
from fewstep.backbones.codec import PixelCodec, VAECodec
from fewstep.backbones.sdxl import SDXLBackbone
from fewstep.backbones.weights import WEIGHTS_ENV, MissingWeightsError

torch.set_num_threads(1)
PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny latent SDXL (with VAE) and the diffusers folder it was saved to."""
    backbone = SDXLBackbone.tiny(resolution=32, pixel_space=False, width=16, seed=1)
    folder = backbone.save_pretrained(tmp_path_factory.mktemp("sdxl") / "toy-sdxl")
    return backbone, folder


def noisy_latents(backbone, batch=2, seed=0):
    return torch.randn(batch, *backbone.latent_shape, generator=torch.Generator().manual_seed(seed))


def test_save_and_load_back_give_equal_outputs(saved):
    backbone, folder = saved
    loaded = SDXLBackbone.from_pretrained(folder)
    assert isinstance(loaded.codec, VAECodec) and loaded.latent_shape == backbone.latent_shape == (4, 16, 16)
    assert loaded.codec.scaling_factor == pytest.approx(0.13025)
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
    backbone = SDXLBackbone.tiny(resolution=16, pixel_space=True, width=16)
    folder = backbone.save_pretrained(tmp_path / "pixel")
    assert not (folder / "vae").exists()
    assert json.loads((folder / "model_index.json").read_text())["vae"] == [None, None]
    loaded = SDXLBackbone.from_pretrained(folder)
    assert isinstance(loaded.codec, PixelCodec) and loaded.latent_shape == (3, 16, 16)
    x, cond = noisy_latents(backbone), backbone.encode(PROMPTS)
    with torch.no_grad():
        assert torch.equal(backbone.native(x, 0.5, cond), loaded.native(x, 0.5, loaded.encode(PROMPTS)))


def test_bare_name_loads_from_the_weights_cache(saved, monkeypatch):
    backbone, folder = saved
    monkeypatch.setenv(WEIGHTS_ENV, str(folder.parent))
    loaded = SDXLBackbone.from_pretrained(folder.name, text_encoders=False)
    assert loaded.text is None and loaded.latent_shape == backbone.latent_shape


def test_schedule_is_the_checkpoint_schedule(saved):
    from diffusers import DDIMScheduler

    backbone, folder = saved
    ddim = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    abar = backbone.schedule.alphas_cumprod
    assert torch.allclose(abar.float(), ddim.alphas_cumprod, rtol=1e-6)
    assert abar[0].item() == pytest.approx(0.99915) and abar[999].item() == pytest.approx(0.00466, abs=1e-5)


def test_x0_equals_ddim_pred_original_sample(saved):
    from diffusers import DDIMScheduler

    backbone, folder = saved
    # clip_sample off, as in the SDXL pipelines' DDIM configs (it would clamp x0 to [-1, 1])
    ddim = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", clip_sample=False)
    ddim.set_timesteps(4)
    cond, x = backbone.encode(PROMPTS), noisy_latents(backbone)
    for k in [*ddim.timesteps.tolist(), 999, 0]:
        t = torch.full((2,), k / 999)
        with torch.no_grad():
            eps = backbone.native(x, t, cond)
        ours = backbone.x0_from_native(x, t, eps)
        theirs = ddim.step(eps, k, x).pred_original_sample
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5), k


def test_network_sees_the_integer_timestep(saved):
    backbone, _ = saved
    seen = []
    handle = backbone.unet.register_forward_pre_hook(lambda mod, args: seen.append(args[1]))
    with torch.no_grad():
        backbone.native(noisy_latents(backbone), torch.tensor([0.5, 1.0]), backbone.encode(PROMPTS))
    handle.remove()
    assert seen[0].dtype == torch.long and seen[0].tolist() == [500, 999]  # round(999 * 0.5) = 500


def test_cfg_in_x0_space_equals_cfg_on_the_native_output(saved):
    backbone, _ = saved
    cond, x, t, w = backbone.encode(PROMPTS), noisy_latents(backbone), torch.tensor([0.25, 0.9]), 4.5
    with torch.no_grad():
        guided = backbone.x0(x, t, cond, guidance=w)
        # the same batched call as x0() makes, so only the guidance algebra differs
        both = cond_cat([cond, backbone.null(cond)])
        eps_c, eps_u = backbone.native(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
    reference = backbone.x0_from_native(x, t, eps_u + w * (eps_c - eps_u))
    assert torch.allclose(guided, reference, rtol=1e-5, atol=1e-5)


def test_null_is_all_zero_embeddings_with_the_same_time_ids(saved):
    backbone, _ = saved
    cond = backbone.encode(PROMPTS)
    null = backbone.null(cond)
    assert not null["prompt_embeds"].any() and not null["pooled"].any()
    assert torch.equal(null["time_ids"], cond["time_ids"])
    assert cond["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2


def test_conditioning_equals_the_diffusers_sdxl_pipeline(saved):
    from diffusers import StableDiffusionXLPipeline

    backbone, folder = saved
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)  # the folder is a real pipeline folder
    embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
        PROMPTS, device="cpu", do_classifier_free_guidance=True)
    cond = backbone.encode(PROMPTS)
    null = backbone.null(cond)
    for ours, theirs in [(cond["prompt_embeds"], embeds), (cond["pooled"], pooled),
                         (null["prompt_embeds"], neg_embeds), (null["pooled"], neg_pooled)]:
        assert torch.allclose(ours, theirs, atol=1e-5)
    time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32,
                                      text_encoder_projection_dim=pooled.shape[-1])
    assert torch.equal(cond["time_ids"][:1], time_ids)


def test_encode_is_cached_per_prompt_set(saved):
    backbone, _ = saved
    fresh = SDXLBackbone(backbone.unet, backbone.text, backbone.scheduler_config,
                         backbone.codec.vae)  # same parts, empty cache
    calls = []
    handle = fresh.text.encoders["text_encoder"].register_forward_pre_hook(
        lambda mod, args: calls.append(1))
    first = fresh.encode(["a red circle"])
    assert len(calls) == 1
    assert fresh.encode(["a red circle"]) is first and len(calls) == 1
    fresh.encode(["a blue circle"])
    handle.remove()
    assert len(calls) == 2


def test_text_encoders_are_shared_frozen_and_releasable(saved):
    backbone, folder = saved
    loaded = SDXLBackbone.from_pretrained(folder)
    assert copy.deepcopy(loaded).text is loaded.text
    text_params = {id(p) for enc in loaded.text.encoders.values() for p in enc.parameters()}
    assert not text_params & {id(p) for p in loaded.parameters()}
    assert not any(p.requires_grad for p in loaded.codec.parameters())
    cached = loaded.encode(PROMPTS)
    loaded.release_text_encoders()
    assert loaded.encode(PROMPTS) is cached
    with pytest.raises(RuntimeError, match="not in the encoding cache"):
        loaded.encode(["a new prompt"])


def test_missing_folder_names_every_file_and_the_env_var(tmp_path):
    with pytest.raises(MissingWeightsError) as info:
        SDXLBackbone.from_pretrained(tmp_path / "absent")
    message = str(info.value)
    for needle in ("model_index.json", "unet/config.json", "text_encoder_2/config.json",
                   "tokenizer_2/tokenizer_config.json", "scheduler/scheduler_config.json",
                   WEIGHTS_ENV, str(tmp_path / "absent")):
        assert needle in message, needle


def test_folder_without_unet_names_the_unet_files(saved, tmp_path):
    _, folder = saved
    broken = shutil.copytree(folder, tmp_path / "broken")
    shutil.rmtree(broken / "unet")
    with pytest.raises(MissingWeightsError) as info:
        SDXLBackbone.from_pretrained(broken)
    message = str(info.value)
    assert "unet/config.json" in message and "unet/diffusion_pytorch_model.safetensors" in message
    assert "missing 2 of" in message and "text_encoder/config.json" not in message
    assert WEIGHTS_ENV in message


def test_wrong_checkpoints_are_refused(saved, tmp_path):
    backbone, folder = saved
    v_pred = {**backbone.scheduler_config, "prediction_type": "v_prediction"}
    with pytest.raises(ValueError, match="v_prediction"):
        SDXLBackbone(backbone.unet, backbone.text, v_pred, backbone.codec.vae)
    not_sdxl = shutil.copytree(folder, tmp_path / "not-sdxl")
    index = json.loads((not_sdxl / "model_index.json").read_text())
    del index["unet"]
    (not_sdxl / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="not a sdxl pipeline folder"):
        SDXLBackbone.from_pretrained(not_sdxl)
    with pytest.raises(ValueError, match="in_channels=3"):
        SDXLBackbone.tiny(pixel_space=True, in_channels=4)
    with pytest.raises(ValueError, match="not divisible"):
        SDXLBackbone(backbone.unet, backbone.text, backbone.scheduler_config,
                     backbone.codec.vae, resolution=33)


def test_x0_is_float32_at_least_for_a_bf16_input(saved):
    backbone, _ = saved
    x, t = noisy_latents(backbone).bfloat16(), torch.tensor([0.5, 0.5])
    eps = torch.randn_like(x)
    assert backbone.x0_from_native(x, t, eps).dtype == torch.float32


def test_network_dtype_follows_the_weights_after_a_cast_and_a_copy(saved):
    """The cached input dtype must change when the denoiser is cast, and a deep copy (critic,
    EMA) cast on its own must not see the original's cached answer."""
    backbone, _ = saved
    copy_ = copy.deepcopy(backbone)
    assert copy_.network_dtype() == backbone.network_dtype() == torch.float32
    copy_.denoiser.to(torch.bfloat16)
    assert copy_.network_dtype() == torch.bfloat16 == copy_.denoiser.dtype
    assert backbone.network_dtype() == torch.float32
    x, t, cond = noisy_latents(copy_), torch.tensor([0.5, 0.5]), copy_.encode(PROMPTS)
    with torch.no_grad():
        assert copy_.native(x, t, cond).dtype == torch.float32  # bf16 net, fp32 at the boundary
    copy_.denoiser.float()
    assert copy_.network_dtype() == torch.float32
