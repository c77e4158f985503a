"""Trainable copies of a backbone: full fine-tune or peft LoRA, optional gradient checkpointing.

LoRA targets default to the backbone's `lora_targets` (each family names its own: DMD2's list for
SDXL, attention projections for SD3, attention and MLP projections for SiT).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from fewstep.backbones.base import Backbone

def trainable_copy(backbone: Backbone, opt=None) -> Backbone:
    """Deep copy whose denoiser trains (text encoders and codec stay frozen and shared/copied)."""
    net = copy.deepcopy(backbone)
    net.requires_grad_(False)
    net.denoiser.requires_grad_(True)
    net.denoiser.train()
    if opt is not None and opt.lora_rank > 0:
        with torch.random.fork_rng(devices=[]):  # LoRA init from the run's seed alone
            torch.manual_seed(opt.seed)
            add_lora(net, opt.lora_rank, opt.lora_alpha or opt.lora_rank, opt.lora_targets)
    if opt is not None and opt.grad_checkpointing:
        enable_checkpointing(net.denoiser)
    master_weights_fp32(net.denoiser)
    return net


def master_weights_fp32(module: torch.nn.Module) -> None:
    """Trainable parameters in fp32 (a bf16/fp16 teacher's copy keeps its frozen weights in half
    precision): optimiser updates of 1e-6 relative size vanish in bf16; autocast computes in bf16."""
    for param in module.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def add_lora(backbone: Backbone, rank: int, alpha: float, targets=()) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(targets or backbone.lora_targets)
    if not targets:
        raise ValueError(f"{type(backbone).__name__} names no lora_targets; pass lora_targets")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                        init_lora_weights="gaussian")
    inject_adapter_in_model(config, backbone.denoiser)
    for name, p in backbone.denoiser.named_parameters():
        p.requires_grad_("lora_" in name)


def enable_checkpointing(denoiser: nn.Module) -> None:
    if hasattr(denoiser, "enable_gradient_checkpointing"):
        denoiser.enable_gradient_checkpointing()
    elif hasattr(denoiser, "gradient_checkpointing"):
        denoiser.gradient_checkpointing = True
    else:
        raise ValueError(f"{type(denoiser).__name__} has no gradient checkpointing switch")


@torch.no_grad()
def merged_state_dict(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    """The denoiser's weights with any LoRA merged, under the base architecture's key names."""
    work = copy.deepcopy(denoiser)
    lora_layers = [m for m in work.modules() if hasattr(m, "merge") and hasattr(m, "base_layer")]
    for layer in lora_layers:
        layer.merge()
    out = {}
    for key, value in work.state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value.detach().contiguous().cpu()
    return out
