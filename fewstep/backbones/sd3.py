"""SD3 family: MMDiT (SD3Transformer2DModel) on the rectified-flow schedule, three text encoders.

Mapping onto the shared time convention (fewstep/notes/conventions.md secs. 3-4): t is the flow σ,
α = 1 − t, σ = t; the network's timestep input is 1000·t and it predicts v = ε − x0, so
x0 = x_t − t·v̂ (float64). The timestep shift (3.0 for SD3-medium) belongs to samplers and
time grids, never to α/σ; it is read from the scheduler config into `self.shift` for them.
The null condition is the encoding of the empty prompt "" (diffusers SD3 pipeline default) [EXT].
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fewstep.backbones._diffusers_io import (DiffusersBackbone, Part, TextStack, at_least_fp32,
                                             check_width, scheduler_config_of, seeded,
                                             tiny_channels, tiny_vae)
from fewstep.backbones.base import Cond, middle_block
from fewstep.schedule import FlowSchedule

SD3_VAE_SCALE, SD3_VAE_SHIFT = 1.5305, 0.0609  # SD3 VAE config: scaling_factor, shift_factor
T5_MAX_SEQUENCE_LENGTH = 256  # the SD3 pipeline's default max_sequence_length
NULL_PROMPT = ""


class SD3Backbone(DiffusersBackbone):
    family = "sd3"
    PIPELINE_CLASS = "StableDiffusion3Pipeline"
    SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
    WEIGHTS_NAME = "stable-diffusion-3-medium-diffusers"  # in the weights cache
    WEIGHTS_SOURCE = "Hugging Face stabilityai/stable-diffusion-3-medium-diffusers (diffusers folder)"
    DENOISER = Part("transformer", "diffusers", "SD3Transformer2DModel", "model")
    TEXT_PARTS = (
        (Part("text_encoder", "transformers", "CLIPTextModelWithProjection", "model"),
         Part("tokenizer", "transformers", "CLIPTokenizer", "tokenizer")),
        (Part("text_encoder_2", "transformers", "CLIPTextModelWithProjection", "model"),
         Part("tokenizer_2", "transformers", "CLIPTokenizer", "tokenizer")),
        (Part("text_encoder_3", "transformers", "T5EncoderModel", "model"),
         Part("tokenizer_3", "transformers", "T5TokenizerFast", "tokenizer")),
    )
    # joint attention projections of both streams (RTDMD adapts attention on SD3; harness choice)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                    "to_add_out")

    def __init__(self, denoiser, text: TextStack | None, scheduler_config: dict, vae=None,
                 resolution=None):
        super().__init__(denoiser, text, scheduler_config, vae, resolution)
        self.schedule = FlowSchedule()
        self.time_scale = float(self.scheduler_config.get("num_train_timesteps", 1000))
        self.shift = float(self.scheduler_config.get("shift", 1.0))  # for samplers, not α/σ
        patch = int(denoiser.config.patch_size)
        if self.latent_shape[1] % patch or self.latent_shape[2] % patch:
            raise ValueError(f"sd3: latent size {self.latent_shape[1:]} is not divisible by the "
                             f"transformer's patch_size {patch}; change the resolution")
        self._check_conditioning_widths()

    def _check_conditioning_widths(self) -> None:
        """The transformer's joint/pooled widths must match what the text encoders produce."""
        if self.text is None:
            return
        clip_l, clip_g, t5 = (self.text.encoders[e.name].config for e, _ in self.TEXT_PARTS)
        cfg = self.transformer.config
        pooled = clip_l.projection_dim + clip_g.projection_dim
        if clip_l.hidden_size + clip_g.hidden_size > t5.d_model:
            raise ValueError(f"sd3: CLIP hidden sizes {clip_l.hidden_size}+{clip_g.hidden_size} "
                             f"exceed the T5 width {t5.d_model}; the CLIP embeddings are zero-"
                             "padded to the T5 width, so T5 must be at least as wide")
        if cfg.joint_attention_dim != t5.d_model or cfg.pooled_projection_dim != pooled:
            raise ValueError(
                f"sd3: transformer joint_attention_dim={cfg.joint_attention_dim} and "
                f"pooled_projection_dim={cfg.pooled_projection_dim} do not match the text "
                f"encoders (expected T5 d_model {t5.d_model} and CLIP projections summed {pooled})")

    # -- constructors ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, resolution=None,
                        text_encoders: bool = True) -> "SD3Backbone":
        """Load a local diffusers SD3 folder (a path, or a bare name under $FEWSTEP_WEIGHTS).

        dtype applies to the transformer and text encoders; the VAE always runs in fp32.
        text_encoders=False skips CLIP and T5 (every prompt set must then come from the cache).
        """
        return cls(**cls._load_parts(path, dtype, text_encoders), resolution=resolution)

    @classmethod
    def tiny(cls, resolution: int = 32, in_channels: int | None = None, words=None,
             pixel_space: bool = True, width: int = 32, text_width: int = 16,
             max_length: int = 16, seed: int = 0, shift: float = 3.0,
             layers: int = 2) -> "SD3Backbone":
        """Random tiny versions of the real classes: a two-layer MMDiT (patch 2), CLIP-L
        (text_width), CLIP-G (2 x text_width), T5 (4 x text_width), optional 16-channel VAE."""
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        from fewstep.backbones import text as toy_text

        channels = tiny_channels(cls.family, pixel_space, in_channels, latent_default=16)
        width, words = check_width(cls.family, width), words or toy_text.TOY_WORDS
        with seeded(seed):
            tokenizers = {"tokenizer": toy_text.build_word_tokenizer(words, max_length),
                          "tokenizer_2": toy_text.build_word_tokenizer(words, max_length),
                          "tokenizer_3": toy_text.build_word_tokenizer(words, max_length,
                                                                       add_bos=False)}
            encoders = {
                "text_encoder": toy_text.tiny_clip_text_model(
                    tokenizers["tokenizer"], text_width, projection=True),
                "text_encoder_2": toy_text.tiny_clip_text_model(
                    tokenizers["tokenizer_2"], 2 * text_width, projection=True),
                "text_encoder_3": toy_text.tiny_t5_encoder(
                    tokenizers["tokenizer_3"], 4 * text_width)}
            vae = (None if pixel_space else
                   tiny_vae(channels, resolution, SD3_VAE_SCALE, SD3_VAE_SHIFT, quant_conv=False))
            side = resolution // (1 if vae is None else 2)
            transformer = SD3Transformer2DModel(
                sample_size=side, patch_size=2, in_channels=channels, out_channels=channels,
                num_layers=layers, attention_head_dim=8, num_attention_heads=width // 8,
                joint_attention_dim=4 * text_width, caption_projection_dim=width,
                pooled_projection_dim=3 * text_width, pos_embed_max_size=side // 2)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        return cls(transformer, TextStack(tokenizers, encoders), scheduler_config_of(scheduler),
                   vae, resolution)

    # -- conditioning ------------------------------------------------------------------------------
    def _clip_embeds(self, text: TextStack, prompts: Sequence[str]):
        """Penultimate hidden states and projected pooled outputs of CLIP-L and CLIP-G."""
        hidden, pooled = [], []
        for encoder_part, tokenizer_part in self.TEXT_PARTS[:2]:
            tokenizer = text.tokenizers[tokenizer_part.name]
            ids = text.token_ids(tokenizer_part.name, prompts, tokenizer.model_max_length)
            out = text.encoders[encoder_part.name](ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        return torch.cat(hidden, dim=-1), torch.cat(pooled, dim=-1)

    def _encode(self, prompts: Sequence[str]) -> Cond:
        """Joint prompt embeddings as the diffusers SD3 pipeline builds them (encode_prompt): CLIP
        embeddings concatenated on channels, zero-padded to the T5 width, then followed by the T5
        tokens on the sequence axis; pooled = CLIP-L and CLIP-G pooled outputs concatenated."""
        text = self._text_stack()
        clip_hidden, pooled = self._clip_embeds(text, prompts)
        t5_part, t5_tokenizer_part = self.TEXT_PARTS[2]
        t5_tokenizer = text.tokenizers[t5_tokenizer_part.name]
        t5_length = min(T5_MAX_SEQUENCE_LENGTH, t5_tokenizer.model_max_length)
        ids = text.token_ids(t5_tokenizer_part.name, prompts, t5_length)
        t5_hidden = text.encoders[t5_part.name](ids).last_hidden_state
        clip_hidden = F.pad(clip_hidden, (0, t5_hidden.shape[-1] - clip_hidden.shape[-1]))
        joint = torch.cat([clip_hidden, t5_hidden.to(clip_hidden.dtype)], dim=-2)
        return {"prompt_embeds": joint.to(self.device), "pooled": pooled.to(self.device)}

    def null(self, cond: Cond) -> Cond:
        """The encoding of "" (cached like any prompt set), repeated to the batch of `cond`."""
        empty = self.encode([NULL_PROMPT])
        batch = cond["prompt_embeds"].shape[0]
        return {k: v.to(cond[k].device).expand(batch, *v.shape[1:]) for k, v in empty.items()}

    def release_text_encoders(self) -> None:
        self.encode([NULL_PROMPT])  # the null condition must outlive the encoders
        super().release_text_encoders()

    # -- the network in the shared convention ------------------------------------------------------
    def native(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """v̂ = ε − x0 from the transformer at timestep input 1000·t."""
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        return self.native_at(x_t, t * self.time_scale, cond)

    def native_at(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Cond) -> torch.Tensor:
        """v̂ at the transformer's own timestep input (1000·σ), as a diffusers scheduler hands it
        out; broadcast to the batch as the SD3 pipeline does (t.expand(batch))."""
        to_net = self._run_network_dtype
        v = self.transformer(
            hidden_states=to_net(x_t), timestep=timestep.expand(x_t.shape[0]),
            encoder_hidden_states=to_net(cond["prompt_embeds"]),
            pooled_projections=to_net(cond["pooled"])).sample
        return v.to(x_t.dtype)

    def pipeline_latents(self, scheduler, noise: torch.Tensor) -> torch.Tensor:
        """The SD3 pipeline's prepare_latents takes latents passed in as they are (flow matching
        starts at sigma = 1: no init_noise_sigma)."""
        return noise

    def pipeline_model_input(self, scheduler, x: torch.Tensor, timestep) -> torch.Tensor:
        """The SD3 pipeline feeds the latents to the transformer unscaled (it never calls
        scale_model_input; FlowMatchEulerDiscreteScheduler has none)."""
        return x

    def scheduler_kwargs(self, scheduler) -> dict:
        """set_timesteps' extra arguments as the SD3 pipeline computes them: with
        use_dynamic_shifting, mu from the image's token count (the pipeline's calculate_shift)."""
        cfg = scheduler.config
        if not cfg.get("use_dynamic_shifting"):
            return {}
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import \
            calculate_shift

        patch = int(self.transformer.config.patch_size)
        seq_len = (self.latent_shape[1] // patch) * (self.latent_shape[2] // patch)
        return {"mu": calculate_shift(seq_len, cfg.get("base_image_seq_len", 256),
                                      cfg.get("max_image_seq_len", 4096),
                                      cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))}

    def x0_from_native(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x0 = x_t − t·v̂, in float64."""
        return self.schedule.x0_from_v(at_least_fp32(x_t), out, t)

    def feature_module(self, layer: int | None = None) -> torch.nn.Module:
        """Joint block `layer` (None: floor(L/2)); its image-token output is the GAN feature."""
        return middle_block(self.denoiser.transformer_blocks, layer)
