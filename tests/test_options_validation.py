"""Training options are checked by type and range when resolved, and a config's presets and
overrides are resolved at validation, so `snakemake -n` refuses them before any job runs."""
import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from fewstep import config
from fewstep.options import (TrainOptions, checked, choice, dataclass, in_range,
                                    option_names, resolve)
from fewstep.errors import FewstepError
from fewstep.registry import METHODS


def dmd2(**overrides):
    cls = METHODS.get("dmd2")
    return resolve(cls.Options, cls.PRESETS, "toy", overrides, "dmd2")


@pytest.mark.parametrize("overrides, message", [
    ({"steps": "abc"}, r"steps: expected an integer, got 'abc'"),
    ({"steps": -5}, r"steps = -5 is out of range: it must lie in \[1, inf\)"),
    ({"steps": 0}, r"steps = 0 is out of range"),
    ({"checkpoint_every": 0}, r"checkpoint_every = 0 is out of range"),
    ({"lr": 0}, r"lr = 0.0 is out of range: it must lie in \(0, inf\)"),
    ({"ema_decay": 1.0}, r"ema_decay = 1.0 is out of range: it must lie in \[0, 1\)"),
    ({"bf16": "yes"}, r"bf16: expected true or false"),
    ({"batch": True}, r"batch: expected an integer"),
    ({"batch": 2.5}, r"batch: expected an integer"),
    ({"betas": [0.9]}, r"betas: expected a list of 2 values"),
    ({"lr": float("nan")}, r"lr = nan is out of range"),
    ({"stepz": 3}, r"unknown dmd2 option 'stepz'. Did you mean 'steps'"),
])
def test_bad_options_are_refused_with_what_they_take(overrides, message):
    with pytest.raises(FewstepError, match=message):
        dmd2(**overrides)


def test_a_value_outside_an_options_choices_is_refused_with_a_did_you_mean():
    with pytest.raises(FewstepError, match=r"dmd2 option ema_on: 'generator_updates' is not one of "
                                           r"'iteration', 'generator_update'\. Did you mean "
                                           r"'generator_update'\?"):
        dmd2(ema_on="generator_updates")
    assert dmd2(ema_on="generator_update").ema_on == "generator_update"


@dataclass
class Stepped(TrainOptions):
    """A method's options as a test declares them: a choice, a paper's alias, a changed default."""
    mode: str = choice("plain", "fancy")
    generator_every: int = 1
    ema_on: str = "generator_update"  # a new default keeps TrainOptions' choices
    ALIASES = {"ttur_ratio": "generator_every"}
    RANGES = {"generator_every": "[1, inf)"}


def stepped(preset=None, **overrides):
    return resolve(Stepped, {"paper": {"generator_every": 5}, "paper-alias": {"ttur_ratio": 5}},
                   preset, overrides, "stepped")


def test_choices_are_declared_once_and_checked_on_every_options_object():
    assert Stepped().mode == "plain"  # the first choice is the default
    with pytest.raises(FewstepError, match=r"stepped option mode: 'fancyy' is not one of 'plain', "
                                           r"'fancy'\. Did you mean 'fancy'\?"):
        stepped(mode="fancyy")
    with pytest.raises(FewstepError, match=r"ema_on: 'epoch' is not one of"):
        stepped(ema_on="epoch")
    with pytest.raises(FewstepError, match=r"Stepped option mode: 'odd' is not one of"):
        Stepped(mode="odd")  # built directly, as tests and dataclasses.replace do
    with pytest.raises(ValueError, match="default 'x' is not one of"):
        choice("a", "b", default="x")


def test_ranges_are_checked_on_every_options_object():
    with pytest.raises(FewstepError, match=r"Stepped option generator_every = 0 is out of range: "
                                           r"it must lie in \[1, inf\)"):
        Stepped(generator_every=0)
    with pytest.raises(FewstepError, match=r"Stepped option ema_decay = 1\.0 is out of range"):
        Stepped(ema_decay=1.0)
    assert Stepped(generator_every=1, ema_decay=0.5).ema_decay == 0.5


def test_a_papers_name_is_an_alias_of_the_harness_option():
    assert stepped(ttur_ratio=3) == stepped(generator_every=3) == stepped(**{"stepped.ttur_ratio": 3})
    assert stepped("paper-alias") == stepped("paper") and stepped("paper").generator_every == 5
    assert stepped("paper", ttur_ratio=2).generator_every == 2  # an override wins, either name
    assert stepped("paper-alias", generator_every=2).generator_every == 2
    with pytest.raises(FewstepError, match=r"'ttur_ratio' and 'generator_every' are the same "
                                           r"option \(generator_every\); give it once"):
        stepped(ttur_ratio=3, generator_every=3)
    with pytest.raises(FewstepError, match=r"unknown stepped option 'ttur_raito'\. Did you mean "
                                           r"'ttur_ratio'"):
        stepped(ttur_raito=3)


def test_a_methods_choices_are_its_fields():
    cls = METHODS.get("cdm")
    with pytest.raises(FewstepError, match=r"cdm option offtraj_mode: 'fressh' is not one of "
                                           r"'trajectory_eps', 'fresh', .*\. Did you mean 'fresh'"):
        resolve(cls.Options, cls.PRESETS, "toy", {"offtraj_mode": "fressh"}, "cdm")
    cls = METHODS.get("amd")
    with pytest.raises(FewstepError, match=r"amd option amd\.advantage\.squash: 'tanch' is not one of "
                                           r"'clip', 'tanh'\. Did you mean 'tanh'"):
        resolve(cls.Options, cls.PRESETS, "toy", {"amd.advantage.squash": "tanch"}, "amd")


@pytest.mark.parametrize("method, alias, name, value", [
    ("dmd2", "ttur_ratio", "generator_every", 3), ("amd", "ttur_ratio", "generator_every", 2),
    ("cdm", "update_ratio", "generator_every", 3), ("cdm", "student_anchors", "generator_grid", (1.0, 0.5))])
def test_a_papers_name_for_an_option_resolves_to_the_harness_name(method, alias, name, value):
    cls = METHODS.get(method)
    by_alias = resolve(cls.Options, cls.PRESETS, "toy", {alias: list(value) if isinstance(value, tuple)
                                                         else value}, method)
    assert by_alias == resolve(cls.Options, cls.PRESETS, "toy", {name: value}, method)
    assert getattr(by_alias, name) == value != getattr(resolve(cls.Options, cls.PRESETS, "toy", None,
                                                              method), name)
    with pytest.raises(FewstepError, match="are the same option"):
        resolve(cls.Options, cls.PRESETS, "toy", {alias: value, name: value}, method)


def test_generator_every_keeps_each_papers_phase():
    """DMD2 updates the generator on iterations 0, r, 2r, ...; CDM and RTDMD stage 1 on r - 1,
    2r - 1, ... (the fake-teacher or critic steps come first)."""
    def generator_steps(method, r, **opt):
        opt = SimpleNamespace(generator_every=r, **opt)
        plan = METHODS.get(method).for_options(opt).plan  # a staged method: its stage's class
        return [s for s in range(2 * r) if "generator" in plan(SimpleNamespace(opt=opt), s)]

    assert generator_steps("dmd2", 3) == generator_steps("amd", 3) == [0, 3]
    assert generator_steps("cdm", 3) == generator_steps("rtdmd", 3, stage=1) == [2, 5]


def own_fields(cls) -> dict[str, str]:
    """{field: the options class declaring it} for the classes below TrainOptions."""
    declared = {}
    for klass in cls.__mro__[:cls.__mro__.index(TrainOptions)]:
        for name in vars(klass).get("__annotations__", {}):
            declared.setdefault(name, klass.__name__)
    return declared


@pytest.mark.parametrize("method", METHODS.names())
def test_each_default_is_declared_once(method):
    """A method's options never redeclare an inherited option: the engine's defaults stay neutral
    and a method's training recipe (batch, learning rates, EMA, ...) lives in its presets."""
    seen = {}
    for klass in reversed(METHODS.get(method).Options.__mro__):
        for name in vars(klass).get("__annotations__", {}):
            assert name not in seen, f"{klass.__name__} redeclares {name} of {seen[name]}"
            seen[name] = klass.__name__


@pytest.mark.parametrize("method", METHODS.names())
def test_no_preset_repeats_a_default_of_the_methods_own_options(method):
    """A method's own option has one source: its default, or the presets that change it. A
    LoRA's rank and alpha are the exception: every preset that uses LoRA states both."""
    cls = METHODS.get(method)
    defaults = {f.name: f.default for f in dataclasses.fields(cls.Options)}
    repeats = [f"{preset}: {name} = {value!r}"
               for preset, values in cls.PRESETS.items()
               for name, (key, value) in option_names(cls.Options, values, method).items()
               if name in own_fields(cls.Options) and not name.endswith(("lora_rank", "lora_alpha"))
               and checked(cls.Options, name, value, method, key) == defaults[name]]
    assert not repeats, f"presets repeat {method}'s defaults: {repeats}"


def test_good_options_are_coerced_as_before():
    opt = dmd2(lr=1, betas=[0.0, 0.99], critic_lr=None)
    assert opt.lr == 1.0 and isinstance(opt.lr, float)
    assert opt.betas == (0.0, 0.99) and opt.critic_lr is None


def test_every_preset_of_every_method_resolves():
    for name in METHODS.names():
        cls = METHODS.get(name)
        for preset in cls.PRESETS:
            resolve(cls.Options, cls.PRESETS, preset, None, name)


def test_in_range_reads_interval_brackets():
    assert in_range(0, "[0, 1)") and not in_range(1, "[0, 1)")
    assert not in_range(0, "(0, inf)") and in_range(1e9, "[1, inf)")
    assert not in_range(float("inf"), "[1, inf)")


def test_config_validation_resolves_overrides():
    cfg = config.load()
    cfg["distill"]["overrides"] = {"dmd2": {"stepz": 3}}
    with pytest.raises(config.ConfigError, match=r"distill/overrides.*'stepz'.*Did you mean 'steps'"):
        config.validate(cfg)
    cfg["distill"]["overrides"] = {"cdm": {"checkpoint_every": 0}}
    with pytest.raises(config.ConfigError, match="checkpoint_every = 0 is out of range"):
        config.validate(cfg)


def test_dry_run_refuses_a_bad_override(tmp_path):
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"distill": {"overrides": {"dmd2": {"stepz": 3}}}}))
    out = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(config.REPO / "Snakefile"),
                          "-d", str(tmp_path), "-n", "all", "--configfile", str(tmp_path / "bad.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "unknown dmd2 option 'stepz'" in out.stdout + out.stderr
    assert "train" not in (out.stdout.split("Job stats:")[1] if "Job stats:" in out.stdout else "")


@pytest.mark.parametrize("method, option, value", [("dmd2", "ttur_ratio", 0), ("amd", "ttur_ratio", 0),
                                                   ("amd", "coeff_s", 1.0), ("cdm", "update_ratio", 0),
                                                   ("rtdmd", "generator_every", 0)])
def test_a_methods_own_ranges_are_checked_down_its_inheritance(method, option, value):
    cls = METHODS.get(method)
    with pytest.raises(FewstepError, match=f"{option} = {value} is out of range"):
        resolve(cls.Options, cls.PRESETS, "toy", {option: value}, method)


def test_a_resume_past_the_requested_steps_is_refused(tmp_path):
    """A checkpoint already beyond `steps` would train zero iterations and export a model of
    another length under this run's name."""
    import torch

    from fewstep.engine.distributed import DistInfo
    from fewstep.engine.loop import Trainer
    from fewstep.engine.run import build_method, toy_context
    from fewstep.toy import teachers

    torch.manual_seed(0)
    teacher = teachers.build("sit", resolution=16, seed=0)

    def dummy(steps):
        ctx = toy_context(teacher, "sit", 16, 0, DistInfo())
        return build_method("dummy", teacher, ctx, "toy", {"steps": steps, "batch": 2})

    Trainer(dummy(4), tmp_path).run(progress=False)
    assert Trainer(dummy(4), tmp_path).run(progress=False).step == 4  # finished: export again
    with pytest.raises(FewstepError, match="iteration 4.*steps = 2"):
        Trainer(dummy(2), tmp_path).run(progress=False)
