"""The GPU check's models: each family's teacher built from its real configuration (full size) or a
small configuration of the same shape (toy), with random weights, and diffusers' own pipeline over
the same modules.

Full size: SDXL base's UNet and VAE, SD3-medium's transformer and VAE, SiT-XL/2 with the SD VAE
(configurations from fewstep.engine.memory, the checkpoints' config.json values). Text encoders
are two-layer CLIP / T5 models at the real widths (CLIP-L 768, CLIP-G 1280, T5-XXL 4096) over the
toy word tokenizer: encoding a prompt is outside a training iteration (the pool is encoded once)
and both sides of a sampling comparison share them; the denoiser and the VAE are the real ones.
"""
from __future__ import annotations

import torch

from fewstep.engine.memory import LATENT, SD3_TRANSFORMER, SDXL_UNET, VAES

SDXL_VAE = dict(VAES["sdxl"], scaling_factor=0.13025)   # sdxl-vae config.json
SD3_VAE = dict(VAES["sd3"], scaling_factor=1.5305, shift_factor=0.0609)
SIT_VAE = dict(VAES["sit"], scaling_factor=0.18215)     # sd-vae-ft-ema (upstream sample.py)
TOY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
               up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
               layers_per_block=1, norm_num_groups=8, sample_size=32)

# text encoders: (encoder name, tokenizer name, kind, width, heads, projection, tokens)
SDXL_TEXT = (("text_encoder", "tokenizer", "clip", 768, 12, None, 77),
             ("text_encoder_2", "tokenizer_2", "clip", 1280, 20, 1280, 77))
SD3_TEXT = (("text_encoder", "tokenizer", "clip", 768, 12, 768, 77),
            ("text_encoder_2", "tokenizer_2", "clip", 1280, 20, 1280, 77),
            ("text_encoder_3", "tokenizer_3", "t5", 4096, 64, None, 256))
TOY_SDXL_TEXT = (("text_encoder", "tokenizer", "clip", 16, 2, None, 16),
                 ("text_encoder_2", "tokenizer_2", "clip", 32, 2, 32, 16))
TOY_SD3_TEXT = (("text_encoder", "tokenizer", "clip", 16, 2, 16, 16),
                ("text_encoder_2", "tokenizer_2", "clip", 32, 2, 32, 16),
                ("text_encoder_3", "tokenizer_3", "t5", 64, 2, None, 16))

TOY_SDXL_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
    block_out_channels=(32, 64), transformer_layers_per_block=(1, 1),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(4, 8),
    cross_attention_dim=48, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
TOY_SD3_TRANSFORMER = dict(
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
    attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
    caption_projection_dim=32, pooled_projection_dim=48, pos_embed_max_size=8)
TOY_SIT = dict(input_size=16, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4,
               num_classes=1000)  # the toy world's class ids index it

SPECS = {  # (size, family) -> what the builder needs
    ("full", "sdxl"): dict(net=SDXL_UNET, vae=SDXL_VAE, text=SDXL_TEXT, resolution=1024),
    ("full", "sd3"): dict(net=SD3_TRANSFORMER, vae=SD3_VAE, text=SD3_TEXT, resolution=1024),
    ("full", "sit"): dict(net="SiT-XL/2", vae=SIT_VAE, resolution=256),
    ("toy", "sdxl"): dict(net=TOY_SDXL_UNET, vae=dict(TOY_VAE, latent_channels=4,
                                                      scaling_factor=0.13025),
                          text=TOY_SDXL_TEXT, resolution=32),
    ("toy", "sd3"): dict(net=TOY_SD3_TRANSFORMER, vae=dict(
        TOY_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False), text=TOY_SD3_TEXT, resolution=32),
    ("toy", "sit"): dict(net=TOY_SIT, vae=dict(TOY_VAE, latent_channels=4,
                                               scaling_factor=0.18215), resolution=32),
}
assert all(LATENT[f][1] * 8 == SPECS["full", f]["resolution"] for f in LATENT)


def text_stack(rows, device, dtype):
    """Tokenizers and random text encoders of the given widths (TextStack of the backbones)."""
    from fewstep.backbones import text as toy_text
    from fewstep.backbones._diffusers_io import TextStack

    tokenizers, encoders = {}, {}
    for enc, tok, kind, width, heads, proj, tokens in rows:
        tokenizer = toy_text.build_word_tokenizer(max_length=tokens, add_bos=kind == "clip")
        with torch.device(device):
            if kind == "t5":
                model = toy_text.tiny_t5_encoder(tokenizer, width, num_heads=heads)
            else:
                model = toy_text.tiny_clip_text_model(tokenizer, width, projection=proj is not None,
                                                      projection_dim=proj, num_heads=heads)
        tokenizers[tok], encoders[enc] = tokenizer, model.to(dtype)
    return TextStack(tokenizers, encoders)


def to_dtype(module, dtype):
    """nn.Module.to: diffusers' ModelMixin.to warns about fp32 modules these models do not have."""
    return torch.nn.Module.to(module, dtype)


def build_vae(config: dict, device):
    from diffusers import AutoencoderKL

    with torch.device(device):
        return AutoencoderKL(**config).float().eval()


def build_teacher(family: str, size: str, device, dtype, seed: int = 0):
    """The family's teacher backbone on `device`: denoiser and text encoders in `dtype`, the VAE
    in fp32 (the backbones' codec rule), random weights from `seed`."""
    spec = SPECS[size, family]
    torch.manual_seed(seed)
    vae = build_vae(spec["vae"], device)
    if family == "sit":
        return sit_teacher(spec, vae, device, dtype)
    text = text_stack(spec["text"], device, dtype)
    if family == "sdxl":
        from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

        from fewstep.backbones.sdxl import SDXLBackbone as cls
        with torch.device(device):
            net = to_dtype(UNet2DConditionModel(**spec["net"]), dtype)
        scheduler = EulerDiscreteScheduler(  # SDXL base's scheduler_config.json
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1,
            timestep_spacing="leading")
    else:
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

        from fewstep.backbones.sd3 import SD3Backbone as cls
        with torch.device(device):
            net = to_dtype(SD3Transformer2DModel(**spec["net"]), dtype)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    from fewstep.backbones._diffusers_io import scheduler_config_of

    return cls(net.eval(), text, scheduler_config_of(scheduler), vae, spec["resolution"])


def sit_teacher(spec: dict, vae, device, dtype):
    from fewstep.backbones.codec import VAECodec
    from fewstep.backbones.sit import SiTBackbone, SiTConfig, SiTNet

    net = spec["net"]
    config = SiTConfig.named(net) if isinstance(net, str) else SiTConfig(**net)
    with torch.device(device):
        net = SiTNet(config).to(dtype)
    return SiTBackbone(net.eval(), VAECodec(vae))


def image_side(teacher) -> int:
    """Pixels per side of the family's images (latent side x the codec's downsampling)."""
    return teacher.latent_shape[1] * teacher.codec.downsampling


def prompt_rows(family: str, n: int) -> list[dict]:
    """n sampling rows: toy eval prompts (text families) or class rows (SiT)."""
    from fewstep.toy import world

    if family == "sit":
        return [world.class_meta(i % len(world.CLASSES)) for i in range(n)]
    return world.prompt_set("eval", n=n)


def pipeline(teacher, scheduler):
    """diffusers' StableDiffusionXLPipeline / StableDiffusion3Pipeline over the teacher's own
    modules (no copy), or None for SiT (diffusers has no SiT pipeline)."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    if teacher.family == "sit":
        return None
    text, vae = teacher.text, teacher.codec.vae
    parts = {"vae": vae, "scheduler": scheduler,
             **text.encoders, **text.tokenizers}
    if teacher.family == "sdxl":
        pipe = StableDiffusionXLPipeline(unet=teacher.denoiser, **parts)
    else:
        pipe = StableDiffusion3Pipeline(transformer=teacher.denoiser, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe
