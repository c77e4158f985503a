"""The plan's rows: the bytes a run holds whatever its batch (Static) and one row per engine,
FSDP teacher placement and world size."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fewstep.engine.memory.census import BF16, FP32, census, held_bytes
from fewstep.engine.memory.networks import Network, frozen_networks, trained_networks
from fewstep.engine.memory.trace import CHECKPOINT_BLOCKS

ENGINES = ("ddp", "fsdp")
TEACHER_PLACEMENT = ("replicate", "shard")  # the fsdp_teacher option's values, its default first


@dataclass(frozen=True)
class Static:
    """Bytes a run holds whatever its batch, per column, for one process holding everything."""

    trained: tuple[Network, ...]
    frozen: tuple[Network, ...]

    def weights(self, role: str | None = None) -> int:
        return sum(n.census.weight_bytes for n in self.trained + self.frozen
                   if role is None or n.role == role)

    def gradients(self) -> int:
        return sum(FP32 * n.census.trained for n in self.trained)

    def optimiser(self) -> int:
        return sum(2 * FP32 * n.census.trained + FP32 * n.census.trained_tensors for n in self.trained)

    def ema(self) -> int:
        return sum(n.census.weight_bytes for n in self.trained if n.ema)


def static_of(method: str, options, denoiser: nn.Module, targets, head=None,
              extras: dict | None = None, teacher_dtype_bytes: int | None = BF16) -> Static:
    """The Static of a run of `method` with `options` on a teacher whose denoiser is `denoiser`
    (at the teacher's dtype: bf16 for a real teacher, as it is for a toy one)."""
    teacher = held_bytes(denoiser, teacher_dtype_bytes)
    trained = trained_networks(method, options, denoiser, targets, head, teacher_dtype_bytes)
    frozen = frozen_networks(method, options, teacher, extras or {})
    return Static(tuple(trained), tuple(frozen))


def largest_block(denoiser: nn.Module) -> int:
    """Parameters of the largest checkpoint/FSDP unit of a denoiser."""
    sizes = [census(m).params for m in denoiser.modules() if type(m).__name__ in CHECKPOINT_BLOCKS]
    return max(sizes, default=census(denoiser).params)


@dataclass
class Row:
    preset: str
    engine: str          # ddp, fsdp
    teacher: str         # fsdp_teacher: replicate, shard (DDP: replicate)
    world: int
    batch: int           # per GPU
    weights: int
    gradients: int
    optimiser: int
    ema: int
    cast: int
    act_ckpt: int
    act_full: int

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimiser + self.ema + self.cast

    @property
    def total_ckpt(self) -> int:
        return self.static + self.act_ckpt

    @property
    def total_full(self) -> int:
        return self.static + self.act_full


def _ceil_div(a: int, n: int) -> int:
    return -(-a // n)


def engine_row(preset: str, static: Static, engine: str, teacher: str, world: int, batch: int,
               acts: tuple[int, int], block_params: int, autocast: bool) -> Row:
    """One row: DDP replicates everything; FSDP divides the trained networks' weights,
    gradients, optimiser states and EMA (and a sharded teacher) by the world size."""
    frozen_other = sum(n.census.weight_bytes for n in static.frozen if n.role != "teacher")
    teacher_bytes = static.weights("teacher")
    trained_w = sum(n.census.weight_bytes for n in static.trained)
    if engine == "ddp":
        flat = max((FP32 * n.census.trained for n in static.trained), default=0) if world > 1 else 0
        cast = BF16 * sum(n.census.trained for n in static.trained) if autocast else 0
        return Row(preset, engine, "replicate", world, batch, trained_w + teacher_bytes + frozen_other,
                   static.gradients() + flat, static.optimiser(), static.ema(), cast, *acts)
    shard = _ceil_div(teacher_bytes, world) if teacher == "shard" else teacher_bytes
    gathered = (BF16 + BF16 + FP32) * block_params  # block in use + prefetched, its fp32 grads
    return Row(preset, engine, teacher, world, batch,
               _ceil_div(trained_w, world) + shard + frozen_other,
               _ceil_div(static.gradients(), world), _ceil_div(static.optimiser(), world),
               _ceil_div(static.ema(), world), gathered, *acts)
