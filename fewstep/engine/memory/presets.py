"""The paper presets a plan covers: their methods, families and resolved options, and the
rows and legend notes of each."""
from __future__ import annotations

from fewstep.engine.memory.activations import activations, real_trace
from fewstep.engine.memory.architectures import (extra_params, frozen_extras, real_denoiser,
                                                 real_head)
from fewstep.engine.memory.census import FP32
from fewstep.engine.memory.networks import frozen_extra_names, method_forwards
from fewstep.engine.memory.table import ENGINES, Row, engine_row, largest_block, static_of
from fewstep.errors import FewstepError, did_you_mean

FAMILY_OF_PRESET = ("sdxl", "sd3", "sit")  # the family a preset names (<method>-<family>-...)


def paper_presets() -> dict[str, str]:
    """{preset: method} of every method's non-toy preset (the papers' and their extensions)."""
    from fewstep.registry import METHODS

    found = {}
    for method in METHODS.names():
        for preset in METHODS.get(method).PRESETS:
            if not preset.startswith("toy"):
                found[preset] = method
    return found


def method_of(preset: str) -> str:
    """The method of a paper preset, or an error with a did-you-mean."""
    known = paper_presets()
    if preset not in known:
        raise FewstepError(f"unknown preset {preset!r} (option --preset)."
                           f"{did_you_mean(preset, known, cutoff=0.4)} Known presets: "
                           f"{', '.join(sorted(known))} (toy presets have no real architecture)")
    return known[preset]


def family_of(preset: str) -> str:
    """The backbone family a preset names (<method>-<family><variant>-...)."""
    for token in preset.split("-")[1:]:
        for family in FAMILY_OF_PRESET:
            if token.startswith(family):
                return family
    raise FewstepError(f"the preset {preset!r} names no family of "
                       f"{', '.join(FAMILY_OF_PRESET)}")


def preset_options(preset: str, world: int):
    """The resolved options of a paper preset at `world` processes; a global batch the world size
    does not divide is an error naming both."""
    from fewstep.options import resolve
    from fewstep.registry import METHODS

    method = method_of(preset)
    if world < 1:
        raise FewstepError(f"--world-size {world}: give a number of processes >= 1")
    cls = METHODS.get(method)
    try:
        return method, resolve(cls.Options, cls.PRESETS, preset, {}, method, world)
    except FewstepError as err:
        raise FewstepError(f"preset {preset} at --world-size {world}: {err}") from None


def real_extras(method: str, options, family: str) -> dict:
    extras = dict(frozen_extras(family))
    for name in frozen_extra_names(method, options):
        base = name.split(":", 1)[-1]
        extras[name] = extra_params(base) * FP32
    return extras


def plan_preset(preset: str, worlds, engines=ENGINES, teachers=("replicate",)) -> list[Row]:
    """The rows of one paper preset: each world size, engine (and FSDP teacher placement)."""
    from fewstep.registry import BACKBONES

    family = family_of(preset)
    denoiser = real_denoiser(family)
    targets = BACKBONES.get(family).lora_targets
    traces = {mode: real_trace(family, mode) for mode in ("full", "features")}
    rows = []
    for world in worlds:
        method, options = preset_options(preset, world)
        static = static_of(method, options, denoiser, targets, real_head(family),
                           real_extras(method, options, family))
        acts = activations(method, options, options.batch, traces)
        for engine in engines:
            for teacher in (teachers if engine == "fsdp" else ("replicate",)):
                rows.append(engine_row(preset, static, engine, teacher, world, options.batch, acts,
                                       largest_block(denoiser), bool(options.bf16)))
    return rows


def not_computed(preset: str) -> list[str]:
    """What the plan leaves out for this preset (printed in the legend)."""
    method = method_of(preset)
    options = preset_options(preset, 1)[1] if preset_divides(preset, 1) else None
    notes = []
    if options is not None and "lpips" in frozen_extra_names(method, options):
        notes.append("VAE-decoder and LPIPS activations of the regression loss")
    if method == "rtdmd" and options is not None and options.stage == 2:
        notes.append("VAE-decoder and reward activations of the reward back-propagation")
    return notes


def forwards_text(preset: str) -> str:
    """The forwards with gradient of each update of a preset, as the legend prints them."""
    method = method_of(preset)
    options = preset_options(preset, 1)[1] if preset_divides(preset, 1) else \
        preset_options(preset, _a_divisor(preset))[1]
    updates = method_forwards(method, options)
    return "; ".join(f"{update}: " + " + ".join(f"{n:g} x {net}" + (" to the GAN features"
                                                                    if mode == "features" else "")
                                                 for net, mode, n in forwards)
                     for update, forwards in updates.items())


def _a_divisor(preset: str) -> int:
    return next(w for w in range(1, 1025) if preset_divides(preset, w))


def preset_divides(preset: str, world: int) -> bool:
    try:
        preset_options(preset, world)
    except FewstepError:
        return False
    return True
