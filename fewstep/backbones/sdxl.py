"""SDXL family: ε-prediction UNet on the discrete DDPM schedule, two CLIP text encoders.

Mapping onto the shared time convention (fewstep/notes/conventions.md secs. 3-4): native time is the
integer k = round(999 t); α = √ᾱ_k, σ = √(1 − ᾱ_k) with ᾱ from the checkpoint's scheduler config;
x0 = (x_t − σ ε̂)/α in float64 (as DMD2 does, tianweiy/DMD2 main/utils.py). The null condition is
all-zero prompt and pooled embeddings with the same time ids (DMD2 and the diffusers SDXL pipeline
default, force_zeros_for_empty_prompt).
"""
from __future__ import annotations

from typing import Sequence

import torch

from fewstep.backbones._diffusers_io import (DiffusersBackbone, Part, TextStack, at_least_fp32,
                                             check_width, scheduler_config_of, seeded,
                                             tiny_channels, tiny_vae)
from fewstep.backbones.base import Cond
from fewstep.schedule import DiscreteVPSchedule

SDXL_VAE_SCALE = 0.13025  # scaling_factor of the SDXL VAE config
N_TIME_IDS = 6  # (orig H, orig W, crop top, crop left, target H, target W)


class SDXLBackbone(DiffusersBackbone):
    family = "sdxl"
    PIPELINE_CLASS = "StableDiffusionXLPipeline"
    SCHEDULER_CLASS = "EulerDiscreteScheduler"  # what the SDXL base checkpoint ships
    WEIGHTS_NAME = "stable-diffusion-xl-base-1.0"  # in the weights cache
    WEIGHTS_SOURCE = "Hugging Face stabilityai/stable-diffusion-xl-base-1.0 (diffusers folder)"
    DENOISER = Part("unet", "diffusers", "UNet2DConditionModel", "model")
    TEXT_PARTS = (
        (Part("text_encoder", "transformers", "CLIPTextModel", "model"),
         Part("tokenizer", "transformers", "CLIPTokenizer", "tokenizer")),
        (Part("text_encoder_2", "transformers", "CLIPTextModelWithProjection", "model"),
         Part("tokenizer_2", "transformers", "CLIPTokenizer", "tokenizer")),
    )
    # DMD2's LoRA list (attention, projections, feed-forward, convolutions, down/up-samplers,
    # time embedding; methods/notes/dmd2.md sec. 2)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                    "ff.net.2", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
                    "upsamplers.0.conv", "time_emb_proj")

    def __init__(self, denoiser, text: TextStack | None, scheduler_config: dict, vae=None,
                 resolution=None):
        super().__init__(denoiser, text, scheduler_config, vae, resolution)
        prediction = scheduler_config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise ValueError(f"sdxl: scheduler prediction_type {prediction!r} is not supported; "
                             "the SDXL adapter expects an epsilon-prediction checkpoint")
        self.schedule = DiscreteVPSchedule.from_scheduler_config(self.scheduler_config)
        self._check_conditioning_widths()

    def _check_conditioning_widths(self) -> None:
        """The UNet's cross-attention and added-embedding widths must match the text encoders."""
        cfg = self.unet.config
        if cfg.addition_embed_type != "text_time":
            raise ValueError(f"sdxl: the UNet has addition_embed_type={cfg.addition_embed_type!r}; "
                             "an SDXL UNet needs 'text_time' (pooled text + time ids)")
        if self.text is None:
            return
        clip_l, clip_g = (self.text.encoders[e.name].config for e, _ in self.TEXT_PARTS)
        width = clip_l.hidden_size + clip_g.hidden_size
        added = N_TIME_IDS * cfg.addition_time_embed_dim + clip_g.projection_dim
        if cfg.cross_attention_dim != width or cfg.projection_class_embeddings_input_dim != added:
            raise ValueError(
                f"sdxl: UNet cross_attention_dim={cfg.cross_attention_dim} and "
                f"projection_class_embeddings_input_dim={cfg.projection_class_embeddings_input_dim}"
                f" do not match the text encoders (expected {width} and {added}: hidden sizes "
                "summed, and 6 time ids x addition_time_embed_dim + CLIP-G projection_dim)")

    # -- constructors ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, resolution=None,
                        text_encoders: bool = True) -> "SDXLBackbone":
        """Load a local diffusers SDXL folder (a path, or a bare name under $FEWSTEP_WEIGHTS).

        dtype applies to the UNet and text encoders; the VAE always runs in fp32. resolution
        defaults to the UNet's sample_size times the VAE factor (1024 for SDXL base).
        """
        return cls(**cls._load_parts(path, dtype, text_encoders), resolution=resolution)

    @classmethod
    def tiny(cls, resolution: int = 32, in_channels: int | None = None, words=None,
             pixel_space: bool = True, width: int = 32, text_width: int = 16,
             max_length: int = 16, seed: int = 0,
             layers_per_block: int = 1) -> "SDXLBackbone":
        """Random tiny versions of the real classes: a two-level UNet with text_time embedding,
        CLIP-L (text_width) and CLIP-G (2 x text_width, with projection), optional tiny VAE."""
        from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

        from fewstep.backbones import text as toy_text

        channels = tiny_channels(cls.family, pixel_space, in_channels, latent_default=4)
        width, words = check_width(cls.family, width), words or toy_text.TOY_WORDS
        time_dim = 8
        with seeded(seed):
            tokenizers = {name: toy_text.build_word_tokenizer(words, max_length)
                          for name in ("tokenizer", "tokenizer_2")}
            encoders = {
                "text_encoder": toy_text.tiny_clip_text_model(tokenizers["tokenizer"], text_width),
                "text_encoder_2": toy_text.tiny_clip_text_model(
                    tokenizers["tokenizer_2"], 2 * text_width, projection=True)}
            vae = None if pixel_space else tiny_vae(channels, resolution, SDXL_VAE_SCALE)
            factor = 1 if vae is None else 2
            unet = UNet2DConditionModel(
                sample_size=resolution // factor, in_channels=channels, out_channels=channels,
                block_out_channels=(width, 2 * width), layers_per_block=layers_per_block, norm_num_groups=8,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(width // 8, 2 * width // 8), use_linear_projection=True,
                cross_attention_dim=3 * text_width, addition_embed_type="text_time",
                addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=N_TIME_IDS * time_dim + 2 * text_width)
        scheduler = EulerDiscreteScheduler(  # the SDXL base checkpoint's schedule
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1,
            timestep_spacing="leading")
        return cls(unet, TextStack(tokenizers, encoders), scheduler_config_of(scheduler), vae,
                   resolution)

    # -- conditioning ------------------------------------------------------------------------------
    def time_ids(self, batch: int) -> torch.Tensor:
        """(orig H, orig W, crop top, crop left, target H, target W): uncropped, at the resolution
        (diffusers SDXL pipeline, _get_add_time_ids)."""
        h, w = self.resolution
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32,
                            device=self.device).expand(batch, N_TIME_IDS).clone()

    def _encode(self, prompts: Sequence[str]) -> Cond:
        """Penultimate hidden states of CLIP-L and CLIP-G concatenated on channels; pooled =
        CLIP-G's projected text_embeds (diffusers SDXL pipeline, encode_prompt)."""
        text = self._text_stack()
        hidden = []
        for encoder_part, tokenizer_part in self.TEXT_PARTS:
            tokenizer = text.tokenizers[tokenizer_part.name]
            ids = text.token_ids(tokenizer_part.name, prompts, tokenizer.model_max_length)
            out = text.encoders[encoder_part.name](ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        if hidden[0].shape[1] != hidden[1].shape[1]:
            raise ValueError(f"sdxl: the two tokenizers pad to different lengths "
                             f"({hidden[0].shape[1]} and {hidden[1].shape[1]}); give both the "
                             "same model_max_length")
        return {"prompt_embeds": torch.cat(hidden, dim=-1).to(self.device),
                "pooled": out.text_embeds.to(self.device),  # `out` is CLIP-G's output
                "time_ids": self.time_ids(len(prompts))}

    def null(self, cond: Cond) -> Cond:
        return {"prompt_embeds": torch.zeros_like(cond["prompt_embeds"]),
                "pooled": torch.zeros_like(cond["pooled"]), "time_ids": cond["time_ids"]}

    # -- the network in the shared convention ------------------------------------------------------
    def native(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """ε̂ from the UNet at the integer timestep k = round(999 t)."""
        k = self.schedule.k_of_t(t).clamp(0, self.schedule.n_steps - 1).to(x_t.device)
        return self.native_at(x_t, k, cond)

    def native_at(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> torch.Tensor:
        """ε̂ from the UNet at its own timestep input, as a diffusers scheduler hands it out
        (the SDXL pipeline passes the scheduler's t to the UNet unchanged)."""
        to_net = self._run_network_dtype
        eps = self.unet(
            to_net(x_t), timestep, encoder_hidden_states=to_net(cond["prompt_embeds"]),
            added_cond_kwargs={"text_embeds": to_net(cond["pooled"]),
                               "time_ids": to_net(cond["time_ids"])}).sample
        return eps.to(x_t.dtype)

    def x0_from_native(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t − σ ε̂)/α, in float64 (DMD2's SDXL conversion)."""
        return self.schedule.x0_from_eps(at_least_fp32(x_t), out, t)

    def feature_module(self, layer: int | None = None) -> torch.nn.Module:
        """The UNet's mid-block (DMD2's bottleneck features); `layer` does not apply to a UNet."""
        return self.denoiser.mid_block
