"""Activation bytes: the traced forward of a denoiser (real on the meta device, or toy) and the
heaviest update's forwards with gradient."""
from __future__ import annotations

import copy
import functools

import torch
from torch import nn

from fewstep.engine.memory.architectures import LATENT, TEXT_TOKENS, real_denoiser
from fewstep.engine.memory.networks import method_forwards
from fewstep.engine.memory.trace import SavedTrace, trace_forward


def feature_module(family: str, denoiser: nn.Module) -> nn.Module:
    """DMD2's GAN feature layer (the backbones' feature_module): the UNet's mid-block, else the
    middle transformer block."""
    if family == "sdxl":
        return denoiser.mid_block
    blocks = denoiser.transformer_blocks if family == "sd3" else denoiser.blocks
    return blocks[len(blocks) // 2]


def denoiser_call(family: str, denoiser: nn.Module, batch: int, dtype, device, latent, tokens: int):
    """A closure running the denoiser on random inputs of the real call's shapes."""
    def t(*shape, dt=dtype):
        return torch.zeros(*shape, device=device, dtype=dt)
    x = t(batch, *latent)
    if family == "sdxl":
        cfg = denoiser.config
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        return lambda: denoiser(x, t(batch, dt=torch.float32) + 500, t(batch, tokens, cfg.cross_attention_dim),
                                added_cond_kwargs={"text_embeds": t(batch, pooled),
                                                   "time_ids": t(batch, 6)}).sample
    if family == "sd3":
        cfg = denoiser.config
        return lambda: denoiser(x, t(batch, tokens, cfg.joint_attention_dim),
                                t(batch, cfg.pooled_projection_dim), t(batch, dt=torch.float32)).sample
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    return lambda: denoiser(x, t(batch, dt=torch.float32), labels)


def trace_denoiser(family: str, denoiser: nn.Module, mode: str, batch: int = 1, dtype=torch.bfloat16,
                   latent=None, tokens: int | None = None) -> SavedTrace:
    """The SavedTrace of one forward of a denoiser (its own device and parameters: the meta copy of
    a real one, or a toy one on the CPU), `mode` 'full' or 'features'."""
    device = next(denoiser.parameters()).device
    latent = latent or LATENT[family]
    tokens = TEXT_TOKENS[family] if tokens is None else tokens
    run = denoiser_call(family, denoiser, batch, dtype, device, latent, tokens)
    stop = feature_module(family, denoiser) if mode == "features" else None
    return trace_forward(denoiser, run, stop)


@functools.lru_cache(maxsize=None)
def real_trace(family: str, mode: str) -> SavedTrace:
    """Per-sample trace of the real denoiser in bf16 (CUDA autocast's dtype), on the meta device."""
    # nn.Module.to: diffusers' ModelMixin.to warns about modules it would keep in fp32
    net = nn.Module.to(copy.deepcopy(real_denoiser(family)), torch.bfloat16)
    return trace_denoiser(family, net, mode, batch=1)


def activations(method: str, options, batch: int, traces: dict) -> tuple[int, int]:
    """(checkpointed, full) activation bytes of the heaviest update: sum over its forwards with
    gradient of samples x per-sample bytes; `traces` maps 'full'/'features' to a SavedTrace."""
    per_update = []
    for forwards in method_forwards(method, options).values():
        ckpt = sum(n * batch * traces[mode].checkpointed for _, mode, n in forwards)
        full = sum(n * batch * traces[mode].full for _, mode, n in forwards)
        per_update.append((ckpt, full))
    return max(u[0] for u in per_update), max(u[1] for u in per_update)
