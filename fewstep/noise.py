"""Per-sample noise derived from (prompt id, seed), shared by every method on a backbone.

Each sample's initial noise depends only on its prompt id, its seed, the latent shape and a
stream name, never on batch size or order, so the teacher and every student start from the same
noise for the same (prompt, seed): differences between methods are paired (ARCHITECTURE.md).
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def sample_seed(prompt_id: str, seed: int, stream: str = "init") -> int:
    """A 63-bit generator seed from a stable hash (Python's hash() is salted per process)."""
    digest = hashlib.sha256(f"{stream}\x1f{prompt_id}\x1f{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sample_noise(prompt_ids: Sequence[str], seeds: Sequence[int], shape: Sequence[int],
                 stream: str = "init", device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise (B, *shape), row i drawn from its own generator on the CPU in float32."""
    if len(prompt_ids) != len(seeds):
        raise ValueError(f"{len(prompt_ids)} prompt ids but {len(seeds)} seeds: give one seed per prompt")
    rows = []
    for pid, seed in zip(prompt_ids, seeds):
        gen = torch.Generator().manual_seed(sample_seed(str(pid), seed, stream))
        rows.append(torch.randn(tuple(shape), generator=gen, dtype=torch.float32))
    return torch.stack(rows).to(device=device, dtype=dtype)


def prompt_seed(prompt: str) -> int:
    """First 4 bytes of SHA-256 of the prompt text (methods/notes/rtdmd.md sec. 5.2)."""
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")


def prompt_noise(prompts: Sequence[str], shape: Sequence[int], stream: str,
                 seed: int = 0) -> torch.Tensor:
    """Noise keyed by (prompt text, seed, stream): one prompt's samples get the same noise on
    every rank, whatever their order (RTDMD's shared noise on the non-selected steps)."""
    ids = [str(prompt_seed(p)) for p in prompts]
    return sample_noise(ids, [seed] * len(ids), shape, stream=stream)
