"""Training options shared by every method, and presets resolved with did-you-mean errors.

A method's options are a dataclass that extends TrainOptions. Spec option names are dotted
(`amd.advantage.clip`); here the dots become underscores (`advantage_clip`), and overrides may be
written either way. Presets are plain dicts of overrides named `<method>-<backbone>-paper|ext|int`
(fewstep/notes/conventions.md sec. 7) plus a `toy` preset per method.

Each fact about an option is declared once, on its options class: an option that takes one of a
few values is a `choice(...)` field (the values live in its field metadata); a method's ranges are
its class's `RANGES` and the names the papers use for a harness option its class's `ALIASES`
(both merged down the inheritance chain). The resolver and every options object check them.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

from fewstep.errors import FewstepError, did_you_mean


def choice(*choices, default=dataclasses.MISSING):
    """A field that takes one of `choices` (default: the first), declared once for the resolver's
    did-you-mean error and for every options object's own check."""
    default = choices[0] if default is dataclasses.MISSING else default
    if default not in choices:
        raise ValueError(f"default {default!r} is not one of {choices}")
    return field(default=default, metadata={"choices": tuple(choices)})


@dataclass
class TrainOptions:
    steps: int = 1000                 # iterations (each one updates the networks of the plan)
    batch: int = 8                    # samples per rank per iteration (see global_batch)
    # samples per iteration over all ranks: the papers' recipe, so 8 and 64 GPUs train the same
    # one; batch is derived as global_batch / world size (resolve). None: batch is per rank
    global_batch: int | None = None
    lr: float = 1e-5                  # generator learning rate
    critic_lr: float | None = None    # None: same as lr
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    critic_weight_decay: float | None = None
    grad_clip: float = 10.0           # max global grad norm per network (0: off)
    warmup: int = 0                   # linear LR warm-up, in scheduler ticks (then constant)
    # what ticks a network's LR scheduler: every iteration (DMD2 steps both schedulers every
    # iteration) or each update of that network (CDM: its scheduler steps after its own optimiser)
    lr_schedule_on: str = choice("iteration", "update")
    # ticks per scheduler step: the official codes run under Accelerate, whose prepared scheduler
    # ticks once per process per step, so their warm-up lasts warmup / processes steps
    warmup_ticks: int = 1
    # LR of the first step: "step" lr / warmup (fewstep's rule), "zero" 0 (torch's LambdaLR with
    # diffusers' constant_with_warmup lambda s / warmup, as the official codes use)
    warmup_start: str = choice("step", "zero")
    ema_decay: float = 0.0            # generator EMA (0: none); see ema_warmup
    ema_warmup: bool = False          # decay min(ema_decay, (1 + n) / (10 + n)) (CDM, RTDMD stage 2)
    ema_every: int = 1                # EMA ticks between EMA updates (see ema_on)
    # what ticks the EMA: every iteration (RTDMD stage 1) or every generator update (CDM: the EMA
    # inside the student step)
    ema_on: str = choice("iteration", "generator_update")
    bf16: bool = True                 # bf16 autocast on CUDA (never on CPU)
    grad_checkpointing: bool = False
    # how ranks share the trained networks: ddp (each rank holds them whole, gradients averaged)
    # or fsdp (FSDP2: weights, gradients, optimiser states and EMA sharded per block;
    # fewstep.engine.fsdp)
    sharding: str = choice("ddp", "fsdp")
    # the frozen teacher under sharding = fsdp: replicate (each rank holds it whole, at its own
    # dtype: bf16 for a real teacher) or shard (fully_shard per block, the trained networks'
    # mixed-precision policy, frozen); the same numbers either way
    fsdp_teacher: str = choice("replicate", "shard")
    lora_rank: int = 0                # 0: full fine-tune of the generator; > 0: peft LoRA
    lora_alpha: float = 0.0           # required with lora_rank > 0 (the update is alpha / rank)
    lora_targets: tuple[str, ...] = ()  # module-name patterns; () = the family's defaults
    checkpoint_every: int = 200
    log_every: int = 1                # every iteration: TTUR plans would hide generator rows otherwise
    seed: int = 0

    def __post_init__(self):
        """Options built directly (tests, dataclasses.replace) obey the ranges and choices too."""
        owner = type(self).__name__
        for name, interval in option_ranges(type(self)).items():
            value = getattr(self, name, None)
            if is_number(value) and not in_range(value, interval):
                raise FewstepError(out_of_range(owner, name, value, interval))
        for name, allowed in option_choices(type(self)).items():
            if getattr(self, name) not in allowed:
                raise FewstepError(not_a_choice(owner, name, getattr(self, name), allowed))
        check_lora_alpha(self, owner)


def check_lora_alpha(options, owner: str) -> None:
    """A LoRA states its alpha: peft scales the update by alpha / rank, and the papers' values
    differ (DMD2's SDXL LoRA: rank 64, alpha 8; RTDMD: rank 32, alpha 64); no default is safe.
    Covers lora_rank/lora_alpha and every <net>_lora_rank/<net>_lora_alpha pair."""
    for f in dataclasses.fields(options):
        alpha = f.name[:-len("rank")] + "alpha"
        if f.name.endswith("lora_rank") and hasattr(options, alpha):
            rank = getattr(options, f.name)
            if is_number(rank) and rank > 0 and not getattr(options, alpha):
                raise FewstepError(f"{owner} option {f.name} = {rank} needs an explicit "
                                   f"{alpha} (> 0; the LoRA update is scaled by {alpha} / "
                                   f"{f.name}): set {alpha} (the paper's value), or {f.name} = 0 "
                                   "for a full fine-tune")


# Ranges of the shared options: a run that trains zero iterations, saves every 0 iterations or
# keeps an EMA of decay 1 is a mistake, not a setting. A method adds ranges for its own options as
# `RANGES` on its options class (a ClassVar, so not a field). Brackets as in maths: "[1, inf)".
RANGES = {"steps": "[1, inf)", "batch": "[1, inf)", "global_batch": "[1, inf)", "lr": "(0, inf)",
          "critic_lr": "(0, inf)", "warmup_ticks": "[1, inf)",
          "weight_decay": "[0, inf)", "critic_weight_decay": "[0, inf)", "grad_clip": "[0, inf)",
          "warmup": "[0, inf)", "ema_decay": "[0, 1)", "ema_every": "[1, inf)",
          "lora_rank": "[0, inf)", "lora_alpha": "[0, inf)", "checkpoint_every": "[1, inf)",
          "log_every": "[1, inf)", "seed": "[0, inf)"}


def in_range(value: float, interval: str) -> bool:
    """Whether `value` lies in an interval written "[lo, hi)" (inf for no bound)."""
    lo, hi = (float(v) for v in interval[1:-1].split(","))
    above = value > lo if interval[0] == "(" else value >= lo
    below = value < hi if interval[-1] == ")" else value <= hi
    return math.isfinite(value) and above and below


def option_ranges(cls) -> dict[str, str]:
    """The shared ranges, then each options class's own `RANGES` down its inheritance chain."""
    ranges = dict(RANGES)
    for klass in reversed(cls.__mro__):
        ranges.update(vars(klass).get("RANGES", {}))
    return ranges


def option_choices(cls) -> dict[str, tuple]:
    """Each `choice` field's values; a subclass that only changes such a field's default keeps
    its parent's choices (field metadata read down the inheritance chain)."""
    choices = {}
    for klass in reversed(cls.__mro__):
        for f in vars(klass).get("__dataclass_fields__", {}).values():
            if "choices" in f.metadata:
                choices[f.name] = f.metadata["choices"]
    return choices


def option_aliases(cls) -> dict[str, str]:
    """The papers' names for options (alias -> the harness's name), each options class's own
    `ALIASES` down its inheritance chain."""
    aliases = {}
    for klass in reversed(cls.__mro__):
        aliases.update(vars(klass).get("ALIASES", {}))
    return aliases


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def out_of_range(owner: str, key: str, value, interval: str) -> str:
    return f"{owner} option {key} = {value!r} is out of range: it must lie in {interval}"


def not_a_choice(owner: str, key: str, value, allowed: tuple) -> str:
    listed = ", ".join(map(repr, allowed))
    return f"{owner} option {key}: {value!r} is not one of {listed}.{did_you_mean(value, allowed)}"


def _canonical(key: str) -> str:
    return key.replace(".", "_").replace("-", "_")


def option_names(cls, values: dict, method: str) -> dict[str, tuple[str, object]]:
    """{option name: (key as written, value)} for one preset or one set of overrides: dots or
    dashes, a `<method>.` prefix and a paper's alias all name the same option, which may be given
    once; unknown names get did-you-mean errors."""
    fields, aliases = {f.name for f in dataclasses.fields(cls)}, option_aliases(cls)
    named: dict[str, tuple[str, object]] = {}
    for key, value in values.items():
        name = _canonical(key)
        if name.startswith(method + "_"):
            name = name[len(method) + 1:]  # `dmd.lambda_reg` and `lambda_reg` are the same option
        name = aliases.get(name, name)
        if name not in fields:
            hint = did_you_mean(_canonical(key), [*fields, *aliases])
            raise FewstepError(f"unknown {method} option {key!r}.{hint}")
        if name in named:
            raise FewstepError(f"{method} options {named[name][0]!r} and {key!r} are the same "
                               f"option ({name}); give it once")
        named[name] = (key, value)
    return named


BATCH_OPTIONS = ("batch", "global_batch")  # one idea: how many samples an iteration draws


def resolve(cls, presets: dict[str, dict], preset: str | None, overrides: dict | None = None,
            method: str = "method", world_size: int = 1):
    """Options of `cls` from a named preset and overrides (an override replaces the preset's
    value whichever name either uses; batch and global_batch count as one option), with the
    per-rank batch derived from global_batch for `world_size` processes; unknown names get
    did-you-mean errors."""
    values: dict = {}
    if preset is not None:
        if preset not in presets:
            raise FewstepError(f"unknown {method} preset {preset!r}."
                               f"{did_you_mean(preset, presets, cutoff=0.4)} "
                               f"Known presets: {', '.join(sorted(presets))}.")
        values.update(option_names(cls, presets[preset], method))
    given = option_names(cls, overrides or {}, method)
    if any(name in given for name in BATCH_OPTIONS):
        values = {k: v for k, v in values.items() if k not in BATCH_OPTIONS}
    values.update(given)
    options = {name: checked(cls, name, value, method, key) for name, (key, value) in values.items()}
    return cls(**derive_batch(options, world_size, method))


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """global_batch / world_size, or an error naming both when it does not divide."""
    if global_batch % world_size:
        raise FewstepError(f"global_batch = {global_batch} is not divisible by the world size "
                           f"{world_size} (processes of this run): run on a number of processes "
                           f"that divides {global_batch}, or give global_batch a multiple of "
                           f"{world_size}")
    return global_batch // world_size


def derive_batch(options: dict, world_size: int, method: str = "method") -> dict:
    """Resolved option values with batch = global_batch / world size when global_batch is given;
    a batch given beside it (in the same preset or the same overrides) must agree."""
    total = options.get("global_batch")
    if total is None:
        return options
    batch = per_rank_batch(total, world_size)
    if "batch" in options and options["batch"] != batch:
        raise FewstepError(f"{method} options batch = {options['batch']} and global_batch = "
                           f"{total} disagree at world size {world_size} (global_batch / world "
                           f"size = {batch} per rank): give one of them (global_batch = null "
                           "makes batch per rank)")
    return {**options, "batch": batch}


def checked(cls, name: str, value, method: str = "method", key: str | None = None):
    """`value` as option `name` of `cls` (lists become tuples, integers floats), or a
    FewstepError saying what the option takes: a YAML typo must not reach the loop."""
    hint = typing.get_type_hints(cls)[name]
    try:
        value = _coerce(hint, value)
    except (TypeError, ValueError):
        raise FewstepError(f"{method} option {key or name}: expected {_describe(hint)}, got "
                           f"{value!r} ({type(value).__name__})") from None
    interval = option_ranges(cls).get(name)
    if interval and is_number(value) and not in_range(value, interval):
        raise FewstepError(out_of_range(method, key or name, value, interval))
    allowed = option_choices(cls).get(name)
    if allowed is not None and value not in allowed:
        raise FewstepError(not_a_choice(method, key or name, value, allowed))
    return value


def _coerce(hint, value):
    """Check `value` against a field's type hint (int, float, bool, str, X | None, tuple[...])."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value)
            except (TypeError, ValueError):
                continue
        raise TypeError(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v) for v in value)
        if len(args) != len(value):
            raise ValueError(value)
        return tuple(_coerce(a, v) for a, v in zip(args, value))
    if hint is bool:
        if not isinstance(value, bool):
            raise TypeError(value)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(value)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(value)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    return value  # a type this checker does not know: the method checks it


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    return {bool: "true or false", int: "an integer", float: "a number",
            str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


def as_dict(options) -> dict:
    return dataclasses.asdict(options)


__all__ = ["TrainOptions", "resolve", "as_dict", "choice", "option_aliases", "option_choices",
           "per_rank_batch", "dataclass", "field"]
