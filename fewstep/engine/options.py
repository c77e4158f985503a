"""Training options shared by every method, and presets resolved with did-you-mean errors.

A method's options are a dataclass that extends TrainOptions. Spec option names are dotted
(`amd.advantage.clip`); here the dots become underscores (`advantage_clip`), and overrides may be
written either way. Presets are plain dicts of overrides named `<method>-<backbone>-paper|ext|int`
(shared spec README section 7) plus a `toy` preset per method.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from fewstep.errors import FewstepError


@dataclass
class TrainOptions:
    steps: int = 1000                 # iterations (each one updates the networks of the plan)
    batch: int = 8                    # samples per rank per iteration
    lr: float = 1e-5                  # generator learning rate
    critic_lr: float | None = None    # None: same as lr
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    critic_weight_decay: float | None = None
    grad_clip: float = 10.0           # max global grad norm per network (0: off)
    warmup: int = 0                   # linear LR warm-up iterations (then constant)
    ema_decay: float = 0.0            # generator EMA (0: none); see ema_warmup
    ema_warmup: bool = False          # decay min(ema_decay, (1 + n) / (10 + n)) (CDM, RTDMD stage 2)
    ema_every: int = 1                # EMA ticks between EMA updates (see ema_on)
    ema_on: str = "iteration"         # what ticks the EMA: every "iteration" (RTDMD stage 1) or
                                      # every "generator_update" (CDM: EMA inside the student step)
    bf16: bool = True                 # bf16 autocast on CUDA (never on CPU)
    grad_checkpointing: bool = False
    lora_rank: int = 0                # 0: full fine-tune of the generator; > 0: peft LoRA
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = ()  # module-name patterns; () = the family's defaults
    checkpoint_every: int = 200
    log_every: int = 1                # every iteration: TTUR plans would hide generator rows otherwise
    seed: int = 0


def _canonical(key: str) -> str:
    return key.replace(".", "_").replace("-", "_")


def resolve(cls, presets: dict[str, dict], preset: str | None, overrides: dict | None = None,
            method: str = "method"):
    """Options of `cls` from a named preset and overrides; unknown names get did-you-mean errors."""
    values: dict = {}
    if preset is not None:
        if preset not in presets:
            close = difflib.get_close_matches(preset, presets, n=3, cutoff=0.4)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise FewstepError(f"unknown {method} preset {preset!r}.{hint} "
                               f"Known presets: {', '.join(sorted(presets))}.")
        values.update(presets[preset])
    values.update(overrides or {})
    names = {f.name: f for f in dataclasses.fields(cls)}
    clean = {}
    for key, value in values.items():
        name = _canonical(key)
        if name.startswith(method + "_"):
            name = name[len(method) + 1:]  # `dmd.lambda_reg` and `lambda_reg` are the same option
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise FewstepError(f"unknown {method} option {key!r}.{hint}")
        default = names[name].default
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        clean[name] = value
    return cls(**clean)


def as_dict(options) -> dict:
    return dataclasses.asdict(options)


__all__ = ["TrainOptions", "resolve", "as_dict", "dataclass", "field"]
