"""The real architectures: their configurations (diffusers/transformers config.json values)
and the networks built from them on the meta device (no weights, no compute)."""
from __future__ import annotations

import functools

import torch
from torch import nn

from fewstep.engine.memory.census import BF16, FP32, census
from fewstep.errors import FewstepError

TEXT_TOKENS = {"sdxl": 77, "sd3": 77 + 256, "sit": 0}  # CLIP 77; SD3 adds T5's 256 (pipeline)

SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)
SD3_TRANSFORMER = dict(  # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")
VAE_KL = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=1024)
VAES = {"sdxl": dict(VAE_KL, latent_channels=4),  # SDXL VAE; SiT's sd-vae-ft-ema has its shape
        "sd3": dict(VAE_KL, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False),
        "sit": dict(VAE_KL, latent_channels=4, sample_size=256)}
LATENT = {"sdxl": (4, 128, 128), "sd3": (16, 128, 128), "sit": (4, 32, 32)}  # 1024, 1024, 256 px
# reward models by the name a preset gives (AMD reward_model; RTDMD stage 2 assumed HPSv2.1)
HPS_CLIP_H = dict(  # HPSv2.1 = OpenCLIP ViT-H-14 (image and text towers)
    text=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
              num_attention_heads=16, max_position_embeddings=77),
    vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                num_attention_heads=16, patch_size=14, image_size=224), projection_dim=1024)
DINOV2_L = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                image_size=518)  # dinov2_cls: DINOv2 ViT-L/14, the diversity metric's default


def _meta(build):
    with torch.device("meta"):
        return build()


@functools.lru_cache(maxsize=None)
def real_denoiser(family: str) -> nn.Module:
    """The family's denoiser at its real configuration, on the meta device (no weights)."""
    if family == "sdxl":
        from diffusers import UNet2DConditionModel
        return _meta(lambda: UNet2DConditionModel(**SDXL_UNET))
    if family == "sd3":
        from diffusers import SD3Transformer2DModel
        return _meta(lambda: SD3Transformer2DModel(**SD3_TRANSFORMER))
    from fewstep.backbones.sit_net import SiTConfig, SiTNet
    return _meta(lambda: SiTNet(SiTConfig.named("SiT-XL/2")))


@functools.lru_cache(maxsize=None)
def frozen_extras(family: str) -> dict[str, int]:
    """Bytes of the family's text encoders (bf16) and one VAE (fp32), real configurations."""
    from diffusers import AutoencoderKL
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              T5Config, T5EncoderModel)

    vae = census(_meta(lambda: AutoencoderKL(**VAES[family])), FP32).params * FP32
    if family == "sit":
        return {"text": 0, "vae": vae}  # class labels: no text encoder
    encoders = [_meta(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)))]
    if family == "sd3":
        encoders[0] = _meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)))
        encoders.append(_meta(lambda: T5EncoderModel(T5Config(**T5_XXL))))
    encoders.append(_meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))))
    return {"text": sum(census(e, BF16).params for e in encoders) * BF16, "vae": vae}


@functools.lru_cache(maxsize=None)
def extra_params(name: str) -> int:
    """Parameters of a frozen extra network: a reward model or the LPIPS VGG trunk."""
    if name.startswith("hpsv2"):
        from transformers import CLIPConfig, CLIPModel
        cfg = CLIPConfig(text_config=HPS_CLIP_H["text"], vision_config=HPS_CLIP_H["vision"],
                         projection_dim=HPS_CLIP_H["projection_dim"])
        return census(_meta(lambda: CLIPModel(cfg))).params
    if name.startswith("dinov2"):
        from transformers import Dinov2Config, Dinov2Model
        return census(_meta(lambda: Dinov2Model(Dinov2Config(**DINOV2_L)))).params
    if name == "lpips":
        from torchvision.models import vgg16
        return census(_meta(lambda: vgg16().features)).params + 1472  # + LPIPS' 1x1 "lin" layers
    raise FewstepError(f"no parameter count for the frozen network {name!r}")


def real_head(family: str) -> nn.Module:
    """DMD2's GAN head on the real critic's features (channels, side), on the meta device."""
    from fewstep.engine.gan import DiscriminatorHead

    if family == "sdxl":
        channels, side = SDXL_UNET["block_out_channels"][-1], LATENT["sdxl"][1] // 4
    elif family == "sd3":
        cfg = SD3_TRANSFORMER
        channels, side = cfg["num_attention_heads"] * cfg["attention_head_dim"], LATENT["sd3"][1] // 2
    else:
        channels, side = 1152, LATENT["sit"][1] // 2
    return _meta(lambda: DiscriminatorHead(channels, side))
