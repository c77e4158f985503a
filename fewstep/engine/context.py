"""What a method may ask of the engine during an iteration: randomness, prompts, real data, reward.

Randomness is derived from (seed, iteration, stream name) and, for rank-local draws, the rank, so a
resumed run draws exactly what the uninterrupted run drew, without saving data-loader state, and
draws that must agree across ranks (stop index, schedule length, shared t) come from the `shared`
generators, which are identical on every rank by construction (fewstep/notes/conventions.md sec. 6).
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch

from fewstep.backbones.base import Backbone
from fewstep.train_data import PromptBatch, PromptPool, encode_rows


def _seed(*parts) -> int:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class Context:
    """Per-run services; `step` is set by the loop before each iteration."""

    def __init__(self, teacher: Backbone, pool: PromptPool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu",
                 real_images: Callable | None = None, reward: Callable | None = None,
                 autocast: bool = False, real_data=None):
        self.teacher, self.pool = teacher, pool
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        # real_images: toy renders of drawn prompts; real_data: a folder of captioned images
        self._real_images, self._real_data, self.reward = real_images, real_data, reward
        self.autocast_enabled = autocast and self.device.type == "cuda"
        self.step = 0

    # -- randomness --------------------------------------------------------------------------------
    def gen(self, stream: str) -> torch.Generator:
        """Rank-local generator for this iteration and stream (CPU; tensors move to the device)."""
        return torch.Generator().manual_seed(_seed(self.seed, self.step, stream, "rank", self.rank))

    def shared_gen(self, stream: str) -> torch.Generator:
        """Generator identical on every rank (rank-synchronised draws)."""
        return torch.Generator().manual_seed(_seed(self.seed, self.step, stream, "shared"))

    def randn(self, shape, stream: str) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.gen(stream)).to(self.device)

    def randn_like(self, x: torch.Tensor, stream: str) -> torch.Tensor:
        return torch.randn(x.shape, generator=self.gen(stream)).to(x)

    def uniform(self, n: int, low: float, high: float, stream: str, shared: bool = False) -> torch.Tensor:
        g = self.shared_gen(stream) if shared else self.gen(stream)
        return (low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)).to(self.device)

    def randint(self, low: int, high: int, n: int, stream: str, shared: bool = False) -> torch.Tensor:
        """Integers in [low, high] inclusive."""
        g = self.shared_gen(stream) if shared else self.gen(stream)
        return torch.randint(low, high + 1, (n,), generator=g).to(self.device)

    # -- data --------------------------------------------------------------------------------------
    def prompts(self, n: int, stream: str = "prompts", repeat: int = 1) -> PromptBatch:
        batch = self.pool.draw(n, self.gen(stream), repeat)
        batch.cond = {k: v.to(self.device) for k, v in batch.cond.items()}
        return batch

    def real(self, n: int, stream: str = "real") -> tuple[torch.Tensor, PromptBatch]:
        """Real latents with their own captions (DMD2's GAN data)."""
        if self._real_data is not None:
            images, rows = self._real_data.draw(n, self.gen(stream))
            batch = self._row_batch(rows, 1)
        elif self._real_images is not None:
            batch = self.prompts(n, stream + "/prompts")
            images = self._real_images(batch.metas, self.gen(stream))
        else:
            raise no_real_data()
        with torch.no_grad():
            latents = self.teacher.encode_images(images.to(self.device))
        return latents, batch

    def real_captions(self, n: int, stream: str, repeat: int = 1) -> PromptBatch:
        """The captions of n real images, without reading the images, each repeated `repeat`
        times (DMD2's multi-step generator prompts, methods/notes/dmd2.md sec. 5.2). The toy
        world's real images are renders of its training prompts, so there a real caption is a
        draw of the prompt pool on this stream."""
        if self._real_data is not None:
            return self._row_batch(self._real_data.draw_rows(n, self.gen(stream)), repeat)
        if self._real_images is not None:
            return self.prompts(n, stream, repeat)
        raise no_real_data("or draw the generator's prompts from the prompt stream "
                           "(backsim_prompts = prompt_stream)")

    def _row_batch(self, rows: list[dict], repeat: int) -> PromptBatch:
        """Drawn data rows encoded once, each repeated `repeat` times (one group per row)."""
        cond = {k: v.to(self.device).repeat_interleave(repeat, dim=0)
                for k, v in encode_rows(self.teacher, rows).items()}
        return PromptBatch([r for r in rows for _ in range(repeat)], cond,
                           torch.arange(len(rows)).repeat_interleave(repeat))

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast_enabled)

    def prompt_noise(self, prompts, like: torch.Tensor, stream: str) -> torch.Tensor:
        """Noise like `like`, keyed by (prompt text, run seed, stream): the same for one prompt's
        samples on every rank (fewstep.noise.prompt_noise)."""
        from fewstep.noise import prompt_noise

        return prompt_noise(prompts, like.shape[1:], stream, self.seed).to(like)


def no_real_data(alternative: str = ""):
    """The error of a run that draws real data and was given none."""
    from fewstep.errors import FewstepError

    return FewstepError("this run has no real data; the method needs real images (`fewstep train "
                        "--real-data FOLDER`, config distill/train_data/<family>/real_images)"
                        + (f"; {alternative}" if alternative else ""))
