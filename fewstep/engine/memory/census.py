"""Parameter counts and bytes of a network as a run holds it: a Census (trained fp32
parameters, frozen bytes) of a module, or of the trained copy fewstep.engine.adapt makes of it."""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass

from torch import nn

GIB = 2 ** 30
BF16, FP32 = 2, 4


@dataclass(frozen=True)
class Census:
    """What a network costs to hold: fp32 trained parameters and the bytes of everything else."""

    trained: int = 0            # trainable parameters (fp32)
    trained_tensors: int = 0    # trainable parameter tensors (AdamW keeps a step scalar each)
    frozen_bytes: int = 0       # frozen parameters and buffers, at their dtype
    params: int = 0             # all parameters

    @property
    def weight_bytes(self) -> int:
        return FP32 * self.trained + self.frozen_bytes

    def __add__(self, other: "Census") -> "Census":
        return Census(*(a + b for a, b in zip(self._tuple(), other._tuple())))

    def _tuple(self):
        return self.trained, self.trained_tensors, self.frozen_bytes, self.params


def census(module: nn.Module, frozen_dtype_bytes: int | None = None) -> Census:
    """The census of a module as it is (requires_grad marks the trained parameters); frozen
    parameters counted at `frozen_dtype_bytes` when given, else at their own dtype."""
    trained = tensors = frozen = total = 0
    for p in module.parameters():
        total += p.numel()
        if p.requires_grad:
            trained, tensors = trained + p.numel(), tensors + 1
        else:
            frozen += p.numel() * (frozen_dtype_bytes or p.element_size())
    for b in module.buffers():
        frozen += b.numel() * (frozen_dtype_bytes or b.element_size())
    return Census(trained, tensors, frozen, total)


def held_bytes(module: nn.Module, dtype_bytes: int | None = None) -> int:
    """Bytes of every parameter and buffer of a frozen copy, at `dtype_bytes` or their own dtype."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * (dtype_bytes or t.element_size()) for t in tensors)


def trained_census(denoiser: nn.Module, lora=None, frozen_dtype_bytes: int | None = BF16) -> Census:
    """A trained copy of `denoiser` as fewstep.engine.adapt.trainable_copy makes it: every
    parameter trained (fp32), or with a LoRA (adapt.LoraSpec) the adapters alone, its base frozen
    at the teacher's dtype."""
    if lora is None:
        whole = census(denoiser, frozen_dtype_bytes)
        buffers = sum(b.numel() * (frozen_dtype_bytes or b.element_size()) for b in denoiser.buffers())
        return Census(whole.params, sum(1 for _ in denoiser.parameters()), buffers, whole.params)
    # peft's injection takes seconds on a real network: one per (network, rank, targets)
    key = (lora.rank, tuple(lora.targets), frozen_dtype_bytes)
    known = _LORA_CENSUS.setdefault(denoiser, {})
    if key not in known:
        known[key] = _lora_census(denoiser, lora, frozen_dtype_bytes)
    return known[key]


_LORA_CENSUS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _lora_census(denoiser: nn.Module, lora, frozen_dtype_bytes: int | None) -> Census:
    from fewstep.engine.adapt import add_lora

    holder = _Holder(copy.deepcopy(denoiser))
    holder.requires_grad_(False)
    add_lora(holder, lora)
    return census(holder.denoiser, frozen_dtype_bytes)


class _Holder(nn.Module):
    """What add_lora needs of a backbone: a denoiser and its default LoRA targets."""

    def __init__(self, denoiser, targets=()):
        super().__init__()
        self.denoiser, self.lora_targets = denoiser, targets
