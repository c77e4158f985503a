"""SDXL adapter on tiny random models of the real classes: the shared backbone checks
(tests/backbone_conformance.py: loader round trips, CFG, caching, text stack, missing files), and
SDXL's own: the time convention against diffusers' DDIM scheduler and SDXL pipeline, the null
condition, refused checkpoints."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from backbone_conformance import DiffusersConformance, noisy_latents
from fewstep.backbones.sdxl import SDXLBackbone

torch.set_num_threads(1)
PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny latent SDXL (with VAE) and the diffusers folder it was saved to."""
    backbone = SDXLBackbone.tiny(resolution=32, pixel_space=False, width=16, seed=1)
    folder = backbone.save_pretrained(tmp_path_factory.mktemp("sdxl") / "toy-sdxl")
    return backbone, folder


class TestSDXLConformance(DiffusersConformance):
    backbone_cls = SDXLBackbone
    conditions = PROMPTS
    denoiser_folder, probe_text_encoder = "unet", "text_encoder"
    missing_files = ("model_index.json", "unet/config.json", "text_encoder_2/config.json",
                     "tokenizer_2/tokenizer_config.json", "scheduler/scheduler_config.json")

    def tiny_pixel(self):
        return SDXLBackbone.tiny(resolution=16, pixel_space=True, width=16)

    def check_loaded(self, backbone, loaded):
        assert loaded.latent_shape == (4, 16, 16)
        assert loaded.codec.scaling_factor == pytest.approx(0.13025)

    def check_pixel_loaded(self, backbone, loaded, folder):
        assert json.loads((folder / "model_index.json").read_text())["vae"] == [None, None]


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
