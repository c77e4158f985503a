"""The checks every backbone family passes, written once (as diffusers' tester mixins do).

A family's test module subclasses a mixin as `Test<Family>Conformance` and provides:
  backbone_cls      the family's Backbone class;
  conditions        what `encode` takes for a batch of two (prompts, or class labels);
  missing_files     names the error for an absent folder must mention;
  tiny_pixel()      a tiny pixel-space backbone at 16 px;
  fixture `saved`   (a tiny latent backbone with a VAE, the folder its save_pretrained wrote),
                    module-scoped in the family's module so its own tests share it;
  check_loaded(backbone, loaded), check_pixel_loaded(backbone, loaded, folder): the family's own
                    extra assertions on a backbone loaded back from its folder, latent or pixel
                    space (optional).
The diffusers families (SDXL, SD3) subclass `DiffusersConformance`, which adds the text stack and
the folder layout. Family-specific behaviour (time convention, guidance quirks, conditioning
against the upstream pipeline) stays in the family's module.
"""
from __future__ import annotations

import copy
import shutil

import pytest
import torch

from fewstep.backbones.base import cond_cat
from fewstep.backbones.codec import PixelCodec, VAECodec
from fewstep.backbones.weights import WEIGHTS_ENV, MissingWeightsError


def noisy_latents(backbone, batch=2, seed=0):
    return torch.randn(batch, *backbone.latent_shape, generator=torch.Generator().manual_seed(seed))


class BackboneConformance:
    backbone_cls: type
    conditions: list
    missing_files: tuple[str, ...] = ()

    def tiny_pixel(self):
        """Each family's test class builds its own (listed in the module docstring)."""
        raise NotImplementedError(f"{type(self).__name__} must define tiny_pixel()")

    def check_loaded(self, backbone, loaded) -> None:
        """The family's extra assertions on a backbone loaded back from its folder."""

    def check_pixel_loaded(self, backbone, loaded, folder) -> None:
        """The family's extra assertions on a pixel-space backbone loaded back from `folder`."""

    def test_registry_resolves_the_family(self, saved):
        from fewstep.registry import BACKBONES

        backbone, _ = saved
        assert BACKBONES.get(backbone.family) is self.backbone_cls

    def test_save_and_load_back_give_equal_outputs(self, saved):
        backbone, folder = saved
        loaded = self.backbone_cls.from_pretrained(folder)
        assert isinstance(loaded.codec, VAECodec) and loaded.latent_shape == backbone.latent_shape
        self.check_loaded(backbone, loaded)
        cond, cond_loaded = backbone.encode(self.conditions), loaded.encode(self.conditions)
        for key in cond:
            assert torch.equal(cond[key], cond_loaded[key]), key
        x, t = noisy_latents(backbone), torch.tensor([0.3, 0.8])
        with torch.no_grad():
            assert torch.equal(backbone.x0(x, t, cond, 3.0), loaded.x0(x, t, cond_loaded, 3.0))
            decoded = backbone.decode(x)
            assert torch.equal(decoded, loaded.decode(x))
            images = torch.rand(2, 3, *decoded.shape[-2:])
            assert torch.equal(backbone.encode_images(images), loaded.encode_images(images))

    def test_pixel_space_backbone_round_trips_without_vae(self, tmp_path):
        backbone = self.tiny_pixel()
        folder = backbone.save_pretrained(tmp_path / "pixel")
        assert not (folder / "vae").exists()
        loaded = self.backbone_cls.from_pretrained(folder)
        assert isinstance(loaded.codec, PixelCodec) and loaded.latent_shape == (3, 16, 16)
        self.check_pixel_loaded(backbone, loaded, folder)
        x, t = noisy_latents(backbone), torch.tensor([0.5, 0.5])
        cond, cond_loaded = backbone.encode(self.conditions), loaded.encode(self.conditions)
        with torch.no_grad():
            assert torch.equal(backbone.native(x, t, cond), loaded.native(x, t, cond_loaded))
            assert torch.equal(backbone.x0(x, t, cond, 3.0), loaded.x0(x, t, cond_loaded, 3.0))

    def test_cfg_in_x0_space_equals_cfg_on_the_native_output(self, saved):
        backbone, _ = saved
        cond, x, w = backbone.encode(self.conditions), noisy_latents(backbone), 4.5
        t = torch.tensor([0.25, 0.9])
        with torch.no_grad():
            guided = backbone.x0(x, t, cond, guidance=w)
            # the same batched call as x0() makes, so only the guidance algebra differs
            both = cond_cat([cond, backbone.null(cond)])
            out_c, out_u = backbone.native(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        reference = backbone.x0_from_native(x, t, out_u + w * (out_c - out_u))
        assert torch.allclose(guided, reference, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # no guidance: the conditional branch alone
            assert torch.equal(backbone.x0(x, t, cond, 1.0), backbone.x0(x, t, cond))

    def test_x0_is_float32_at_least_for_a_bf16_input(self, saved):
        backbone, _ = saved
        x, t = noisy_latents(backbone).bfloat16(), torch.tensor([0.5, 0.5])
        assert backbone.x0_from_native(x, t, torch.randn_like(x)).dtype == torch.float32

    def test_missing_folder_names_its_files_and_the_env_var(self, tmp_path):
        with pytest.raises(MissingWeightsError) as info:
            self.backbone_cls.from_pretrained(tmp_path / "absent")
        message = str(info.value)
        for needle in (*self.missing_files, WEIGHTS_ENV, str(tmp_path / "absent")):
            assert needle in message, needle


class DiffusersConformance(BackboneConformance):
    """The diffusers pipeline families: a text stack shared and cached, a denoiser folder."""
    denoiser_folder: str           # unet / transformer
    probe_text_encoder: str        # an encoder every encode calls

    def test_bare_name_loads_from_the_weights_cache(self, saved, monkeypatch):
        backbone, folder = saved
        monkeypatch.setenv(WEIGHTS_ENV, str(folder.parent))
        loaded = self.backbone_cls.from_pretrained(folder.name, text_encoders=False)
        assert loaded.text is None and loaded.latent_shape == backbone.latent_shape

    def test_encode_is_cached_per_prompt_set(self, saved):
        backbone, _ = saved
        fresh = self.backbone_cls(backbone.denoiser, backbone.text, backbone.scheduler_config,
                                  backbone.codec.vae)  # same parts, empty cache
        calls = []
        handle = fresh.text.encoders[self.probe_text_encoder].register_forward_pre_hook(
            lambda mod, args: calls.append(1))
        first = fresh.encode(["a red circle"])
        assert len(calls) == 1
        assert fresh.encode(["a red circle"]) is first and len(calls) == 1
        fresh.encode(["a blue circle"])
        handle.remove()
        assert len(calls) == 2

    def test_text_encoders_are_shared_frozen_and_releasable(self, saved):
        _, folder = saved
        loaded = self.backbone_cls.from_pretrained(folder)
        assert copy.deepcopy(loaded).text is loaded.text
        text_params = {id(p) for enc in loaded.text.encoders.values() for p in enc.parameters()}
        assert not text_params & {id(p) for p in loaded.parameters()}
        assert not any(p.requires_grad for p in loaded.codec.parameters())
        cached = loaded.encode(self.conditions)
        loaded.release_text_encoders()
        assert loaded.encode(self.conditions) is cached
        with torch.no_grad():  # guidance needs the null condition, kept from before the release
            loaded.x0(noisy_latents(loaded), torch.tensor([0.5, 0.5]), cached, guidance=2.0)
        with pytest.raises(RuntimeError, match="not in the encoding cache(.|\n)*release_text_encod"):
            loaded.encode(["a new prompt"])

    def test_folder_without_the_denoiser_names_its_files(self, saved, tmp_path):
        _, folder = saved
        broken = shutil.copytree(folder, tmp_path / "broken")
        shutil.rmtree(broken / self.denoiser_folder)
        with pytest.raises(MissingWeightsError) as info:
            self.backbone_cls.from_pretrained(broken)
        message = str(info.value)
        for needle in (f"{self.denoiser_folder}/config.json", WEIGHTS_ENV, str(broken),
                       f"{self.denoiser_folder}/diffusion_pytorch_model.safetensors", "missing 2 of"):
            assert needle in message, needle
        assert "text_encoder/config.json" not in message

    def test_network_dtype_follows_the_weights_after_a_cast_and_a_copy(self, saved):
        """The cached input dtype must change when the denoiser is cast, and a deep copy (critic,
        EMA) cast on its own must not see the original's cached answer."""
        backbone, _ = saved
        copy_ = copy.deepcopy(backbone)
        assert copy_.network_dtype() == backbone.network_dtype() == torch.float32
        copy_.denoiser.to(torch.bfloat16)
        assert copy_.network_dtype() == torch.bfloat16 == copy_.denoiser.dtype
        assert backbone.network_dtype() == torch.float32
        x, t, cond = noisy_latents(copy_), torch.tensor([0.5, 0.5]), copy_.encode(self.conditions)
        with torch.no_grad():
            assert copy_.native(x, t, cond).dtype == torch.float32  # bf16 net, fp32 at the boundary
        copy_.denoiser.float()
        assert copy_.network_dtype() == torch.float32
