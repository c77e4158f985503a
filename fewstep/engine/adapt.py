"""Trainable copies of a backbone: full fine-tune or peft LoRA, optional gradient checkpointing.

LoRA targets default to the backbone's `lora_targets` (each family names its own: DMD2's list for
SDXL, attention projections for SD3, attention and MLP projections for SiT). A LoRA's alpha is
always explicit: alpha sets the adapter's scale alpha/rank, and the papers' LoRAs differ (RTDMD
rank 32 / alpha 64, DMD2's SDXL LoRA rank 64 / alpha 8), so no default stands in for it.
"""
from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from fewstep.backbones.base import Backbone
from fewstep.errors import FewstepError

LORA_INITS = ("gaussian", "normal")


@dataclass(frozen=True)
class LoraSpec:
    """One network's LoRA. `init` draws A (B starts at 0 either way, so the adapted network
    starts equal to its base): "gaussian" is peft's, A ~ N(0, 1/rank); "normal" is A ~ N(0, 1).
    `stream` "" seeds the init with the run's seed alone (the generator); another name draws
    from its own seed (a critic's LoRA is not a copy of the generator's). `names` are the options
    that set rank and alpha, for errors."""
    rank: int
    alpha: float | None
    targets: tuple[str, ...] = ()
    init: str = "gaussian"
    seed: int = 0
    stream: str = ""
    names: tuple[str, str] = ("lora_rank", "lora_alpha")


def generator_lora(opt) -> LoraSpec | None:
    """The generator's LoRA from the shared options (lora_rank 0: none, a full fine-tune)."""
    if opt is None or opt.lora_rank <= 0:
        return None
    return LoraSpec(opt.lora_rank, opt.lora_alpha, tuple(opt.lora_targets), seed=opt.seed)


def trainable_copy(backbone: Backbone, opt=None, lora: LoraSpec | None = None,
                   checkpointing: bool = False) -> Backbone:
    """Deep copy whose denoiser trains (text encoders and codec stay frozen and shared/copied).
    With `opt` the generator's LoRA and checkpointing come from it; other networks (critics)
    pass their own `lora` (None: full fine-tune) and `checkpointing`."""
    if opt is not None:
        lora, checkpointing = generator_lora(opt), bool(opt.grad_checkpointing)
    net = copy.deepcopy(backbone)
    net.requires_grad_(False)
    net.denoiser.requires_grad_(True)
    net.denoiser.train()
    if lora is not None:
        add_lora(net, lora)
    if checkpointing:
        enable_checkpointing(net.denoiser)
    master_weights_fp32(net.denoiser)
    return net


def master_weights_fp32(module: torch.nn.Module) -> None:
    """Trainable parameters in fp32 (a bf16/fp16 teacher's copy keeps its frozen weights in half
    precision): optimiser updates of 1e-6 relative size vanish in bf16; autocast computes in bf16."""
    for param in module.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def check_lora(spec: LoraSpec) -> None:
    """A LoRA names its alpha; rank and init are valid (errors name the options)."""
    rank_name, alpha_name = spec.names
    if spec.rank <= 0:
        raise FewstepError(f"{rank_name} = {spec.rank!r}: a LoRA needs a rank >= 1 (0 means no "
                           f"LoRA, a full fine-tune)")
    if not spec.alpha or spec.alpha <= 0:
        raise FewstepError(f"{alpha_name} = {spec.alpha!r}: a LoRA of rank {spec.rank} needs an "
                           f"explicit alpha > 0 (its scale is alpha/rank): set {alpha_name} to the "
                           f"paper's value (RTDMD: 64 at rank 32; DMD2's SDXL LoRA: 8 at rank 64)")
    if spec.init not in LORA_INITS:
        raise FewstepError(f"LoRA init {spec.init!r} is not one of {', '.join(LORA_INITS)}")


def lora_seed(spec: LoraSpec) -> int:
    if not spec.stream:
        return spec.seed
    digest = hashlib.sha256(f"{spec.seed}\x1f{spec.stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def add_lora(backbone: Backbone, spec: LoraSpec, alpha=None, targets=()) -> None:
    """Inject the LoRA of `spec` into the backbone's denoiser; only its adapters train.
    (`add_lora(backbone, rank, alpha, targets)` is the older call, with the generator's names.)"""
    from peft import LoraConfig, inject_adapter_in_model

    if not isinstance(spec, LoraSpec):
        spec = LoraSpec(int(spec), alpha, tuple(targets))
    check_lora(spec)
    names = list(spec.targets or backbone.lora_targets)
    if not names:
        raise ValueError(f"{type(backbone).__name__} names no lora_targets; pass lora_targets")
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=names,
                        init_lora_weights="gaussian")
    with torch.random.fork_rng(devices=[]):  # the init from the run's seed (and stream) alone
        torch.manual_seed(lora_seed(spec))
        inject_adapter_in_model(config, backbone.denoiser)
        for name, p in backbone.denoiser.named_parameters():
            if spec.init == "normal" and "lora_A" in name:
                nn.init.normal_(p.data)
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
def merged_state_dict(denoiser: nn.Module, in_place: bool = False) -> dict[str, torch.Tensor]:
    """The denoiser's weights with any LoRA merged, under the base architecture's key names;
    `in_place` merges into the denoiser itself (a throwaway copy: FSDP's export) instead of a copy."""
    if any(hasattr(p, "full_tensor") for p in denoiser.parameters()):
        return merged_sharded(denoiser)
    work = denoiser if in_place else copy.deepcopy(denoiser)
    lora_layers = [m for m in work.modules() if hasattr(m, "merge") and hasattr(m, "base_layer")]
    for layer in lora_layers:
        layer.merge()
    out = {}
    for key, value in work.state_dict().items():
        if "lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value.detach().contiguous().cpu()
    return out


@torch.no_grad()
def merged_sharded(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    """merged_state_dict of an FSDP-sharded denoiser without a copy of it (CDM's fake-teacher
    merge): per LoRA layer, its base weight gathered plus peft's own delta (get_delta_weight, on
    the gathered adapters: linear and convolution layers alike), sharded again like the base.
    The same sums as the unsharded merge; a collective: every rank calls it, in the same order."""
    from torch.distributed.tensor import distribute_tensor

    layers = {name: m for name, m in denoiser.named_modules()
              if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")}
    out = {}
    for key, value in denoiser.state_dict().items():
        if "lora_" in key:
            continue
        owner, mark, leaf = key.rpartition(".base_layer.")
        if mark and leaf == "weight" and hasattr(value, "full_tensor"):
            full = value.full_tensor()
            for adapter in layers[owner].active_adapters:
                full = (full + gathered_delta(layers[owner], adapter)).to(full.dtype)
            value = distribute_tensor(full, value.device_mesh, value.placements)
        out[key.replace(".base_layer.", ".")] = value.detach()
    return out


def gathered_delta(layer: nn.Module, adapter: str) -> torch.Tensor:
    """peft's delta weight of one LoRA layer with its adapter weights gathered (unsharded) for
    the call; the sharded parameters are put back after it."""
    parts = [layer.lora_A[adapter], layer.lora_B[adapter]]
    kept = [part.weight for part in parts]
    try:
        for part, weight in zip(parts, kept):
            part.weight = nn.Parameter(weight.full_tensor(), requires_grad=False)
        return layer.get_delta_weight(adapter)
    finally:
        for part, weight in zip(parts, kept):
            part.weight = weight
