"""Tensors saved for backward by a forward, traced with saved_tensors_hooks and attributed to
the checkpoint block running (outside the blocks, inside each, the blocks' inputs); attention
traced as flash attention."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

CHECKPOINT_BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock", "JointTransformerBlock", "SiTBlock")


class _FlashAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention in a trace: saves what flash attention saves
    (q, k, v, out, fp32 log-sum-exp), never the N x N scores the math path would."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: a trace only counts
        q, k, v = ctx.saved_tensors[:3]
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    return _FlashAttention.apply(q, k, v)


@contextlib.contextmanager
def flash_attention_stand_in():
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass
class SavedTrace:
    """Bytes saved for backward by one forward: outside the blocks, inside each block (the
    outermost checkpoint unit), and the blocks' inputs (what checkpointing keeps)."""

    outside: int = 0
    inside: dict = field(default_factory=dict)
    inputs: int = 0

    @property
    def full(self) -> int:
        return self.outside + sum(self.inside.values())

    @property
    def checkpointed(self) -> int:
        return self.outside + self.inputs + max(self.inside.values(), default=0)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Tracer:
    """saved_tensors_hooks that attribute each saved tensor (its base, once) to the block running."""

    def __init__(self, module: nn.Module):
        self.params = {id(p) for p in module.parameters()}
        self.seen: dict[int, torch.Tensor] = {}  # keeps them alive: ids stay unique
        self.block: str | None = None
        self.trace = SavedTrace()
        self.handles = []
        for name, sub in module.named_modules():
            if type(sub).__name__ in CHECKPOINT_BLOCKS:
                self.handles.append(sub.register_forward_pre_hook(self._enter(name), with_kwargs=True))
                self.handles.append(sub.register_forward_hook(self._leave(name)))

    def _fresh(self, t) -> int:
        base = t._base if t._base is not None else t
        if id(base) in self.seen or id(base) in self.params:
            return 0
        self.seen[id(base)] = base
        return _nbytes(base)

    def _enter(self, name):
        def hook(mod, args, kwargs):
            if self.block is None:
                self.block = name
                tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
                self.trace.inputs += sum(self._fresh_input(t) for t in tensors)
        return hook

    def _fresh_input(self, t) -> int:
        key = ("input", id(t))
        if key in self.seen:
            return 0
        self.seen[key] = t
        return _nbytes(t)

    def _leave(self, name):
        def hook(mod, args, out):
            if self.block == name:
                self.block = None
        return hook

    def pack(self, t):
        if id(t) not in self.params:
            size = self._fresh(t)
            if self.block is None:
                self.trace.outside += size
            else:
                self.trace.inside[self.block] = self.trace.inside.get(self.block, 0) + size
        return t

    def close(self):
        for h in self.handles:
            h.remove()


class _StopAt(Exception):
    pass


def trace_forward(module: nn.Module, run, stop_at: nn.Module | None = None) -> SavedTrace:
    """The SavedTrace of `run()` (a forward of `module` with gradient), stopped after `stop_at`
    when given (DMD2's GAN features); attention as flash attention."""
    tracer = _Tracer(module)
    stop = stop_at.register_forward_hook(lambda *a: _raise(_StopAt())) if stop_at is not None else None
    try:
        with flash_attention_stand_in(), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(tracer.pack, lambda t: t):
            run()
    except _StopAt:
        pass
    finally:
        tracer.close()
        if stop is not None:
            stop.remove()
    return tracer.trace


def _raise(err):
    raise err
