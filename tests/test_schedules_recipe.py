"""Learning-rate schedules per network, explicit LoRA alpha, and the papers' training recipes in
the `-paper` presets (global batch, iterations, warm-up, EMA, precision).

CDM's official training script steps each network's LambdaLR right after that network's own
optimiser step, under Accelerate, whose prepared scheduler ticks once per process per call
(methods/notes/cdm.md sec. 6.1); DMD2's steps both schedulers every iteration.
"""
import dataclasses

import pytest
import torch

from fewstep.engine.distributed import DistInfo
from fewstep.engine.loop import Trainer, check_same_run, run_config, warmup_factor
from fewstep.engine.run import build_method, toy_context
from fewstep.errors import FewstepError
from fewstep.fidelity import deviations
from fewstep.options import TrainOptions, option_names, per_rank_batch, resolve
from fewstep.registry import METHODS
from fewstep.toy import teachers
from methods import cdm


@pytest.fixture(scope="module")
def sit():
    teacher = teachers.build("sit", resolution=8, seed=0)
    return teacher, toy_context(teacher, "sit", 8, 0, DistInfo(), autocast=False)


def make_cdm(pair, **overrides):
    teacher, ctx = pair
    opts = {"batch": 2, "schedule_len": [1, 2], "checkpoint_every": 1000, **overrides}
    return build_method("cdm", teacher, ctx, "toy", opts)


def lr_of(trainer, net):
    return trainer.optimizers[net].param_groups[0]["lr"]


# -- item 5: schedulers step on each network's updates where the official code does -----------------
def test_cdm_warmup_counts_generator_updates(sit, tmp_path):
    """After k student updates (2k iterations: the student updates every second one) the student's
    LR is lr (k + 1) / warmup; the fake teacher, updated every iteration, is at (2k + 1) / warmup."""
    method = make_cdm(sit, warmup=10, steps=8)
    assert method.opt.lr_schedule_on == "update"
    trainer = Trainer(method, tmp_path / "run")
    lr, critic_lr = method.opt.lr, method.opt.critic_lr
    for k in range(1, 5):
        for _ in range(2):
            trainer.iteration()
            trainer.state.step += 1
        assert lr_of(trainer, "generator") == pytest.approx(lr * (k + 1) / 10)
        assert lr_of(trainer, "critic") == pytest.approx(critic_lr * (2 * k + 1) / 10)


def test_iteration_policy_steps_every_scheduler_every_iteration(sit, tmp_path):
    """The default (DMD2's rule): every scheduler ticks every iteration, updated or not."""
    assert TrainOptions().lr_schedule_on == "iteration"
    trainer = Trainer(make_cdm(sit, warmup=10, steps=8, lr_schedule_on="iteration"), tmp_path / "r")
    for _ in range(4):
        trainer.iteration()
        trainer.state.step += 1
    assert lr_of(trainer, "generator") == pytest.approx(trainer.method.opt.lr * 5 / 10)


def test_warmup_factor_rules():
    """fewstep's rule: step s at (s + 1) / warmup; the official codes' constant_with_warmup: s /
    warmup from LR 0, times the scheduler ticks per step (Accelerate: one per process)."""
    assert [warmup_factor(s, 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [warmup_factor(s, 4, start="zero") for s in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [warmup_factor(s, 100, ticks=8, start="zero") for s in (0, 1, 12, 13)] == \
        [0.0, 0.08, 0.96, 1.0]
    assert warmup_factor(0, 0) == 1.0  # no warm-up


def test_a_scheduler_policy_the_engine_does_not_know_is_refused(sit):
    with pytest.raises(FewstepError, match="lr_schedule_on.*'epoch'.*'iteration', 'update'"):
        make_cdm(sit, lr_schedule_on="epoch")


def test_resume_restores_per_update_schedulers_exactly(sit, tmp_path):
    straight = Trainer(make_cdm(sit, warmup=10, steps=6), tmp_path / "a")
    straight.run(progress=False)
    Trainer(make_cdm(sit, warmup=10, steps=3, checkpoint_every=3), tmp_path / "b").run(progress=False)
    resumed = Trainer(make_cdm(sit, warmup=10, steps=6), tmp_path / "b")
    assert resumed.run(progress=False).resumed_from == 3
    for net in ("generator", "critic"):
        assert resumed.schedulers[net].state_dict() == straight.schedulers[net].state_dict()
        assert lr_of(resumed, net) == lr_of(straight, net)
    gen = dict(straight.nets["generator"].state_dict())
    for name, value in resumed.nets["generator"].state_dict().items():
        assert torch.equal(value, gen[name])


def test_a_checkpoint_from_before_a_new_option_resumes_when_the_run_keeps_its_default(sit):
    """A config recorded before an option existed ran with that option's default (which keeps the
    old behaviour); a run that sets another value is another run."""
    method = make_cdm(sit)
    current = run_config(method)
    old = {k: v for k, v in current.items() if k not in ("global_batch", "warmup_ticks")}
    defaults = {f.name: f.default for f in dataclasses.fields(type(method.opt))}
    check_same_run(old, current, "ckpt", defaults=defaults)
    old.pop("lr_schedule_on")  # CDM's toy preset steps per update, unlike the old engine
    with pytest.raises(FewstepError, match="lr_schedule_on: None -> update"):
        check_same_run(old, current, "ckpt", defaults=defaults)


# -- item 6: LoRA alpha is explicit ----------------------------------------------------------------
def test_lora_without_alpha_is_an_error():
    with pytest.raises(FewstepError, match=r"lora_rank = 4.*lora_alpha.*set lora_alpha"):
        TrainOptions(lora_rank=4)
    with pytest.raises(FewstepError, match="lora_alpha"):
        resolve(cdm.CDMOptions, cdm.PRESETS, "toy", {"lora_rank": 8}, "cdm")
    assert TrainOptions(lora_rank=64, lora_alpha=8).lora_alpha == 8.0


def lora_pairs(cls) -> list[tuple[str, str]]:
    """Every (rank, alpha) option pair of an options class: lora_rank/lora_alpha and any
    <net>_lora_rank/<net>_lora_alpha."""
    names = {f.name for f in dataclasses.fields(cls)}
    return [(n, n[:-len("rank")] + "alpha") for n in sorted(names)
            if n.endswith("lora_rank") and n[:-len("rank")] + "alpha" in names]


def all_presets():
    return [(name, preset) for name in METHODS.names() for preset in METHODS.get(name).PRESETS]


@pytest.mark.parametrize("method,preset", all_presets())
def test_every_preset_using_lora_states_rank_and_alpha(method, preset):
    cls = METHODS.get(method)
    options = resolve(cls.Options, cls.PRESETS, preset, None, method)
    stated = option_names(cls.Options, cls.PRESETS[preset], method)
    for rank, alpha in lora_pairs(cls.Options):
        if getattr(options, rank) > 0:
            assert rank in stated and alpha in stated, f"{preset}: uses LoRA ({rank}) but does " \
                f"not state both {rank} and {alpha}"


# -- item 7: global batch --------------------------------------------------------------------------
def test_global_batch_is_split_over_the_ranks():
    assert per_rank_batch(128, 8) == 16 and per_rank_batch(128, 64) == 2
    with pytest.raises(FewstepError, match=r"global_batch = 128.*world size 3"):
        per_rank_batch(128, 3)
    eight = resolve(cdm.CDMOptions, cdm.PRESETS, "cdm-sd3-paper", None, "cdm", world_size=8)
    sixty_four = resolve(cdm.CDMOptions, cdm.PRESETS, "cdm-sd3-paper", None, "cdm", world_size=64)
    assert (eight.batch, sixty_four.batch, eight.global_batch) == (16, 2, 128)
    assert dataclasses.replace(eight, batch=2) == sixty_four  # the same recipe otherwise


def test_batch_and_global_batch_resolve_as_one_idea():
    """An override of either replaces the preset's; both in one source must agree."""
    paper = "cdm-sd3-paper"
    small = resolve(cdm.CDMOptions, cdm.PRESETS, paper, {"batch": 2}, "cdm", world_size=8)
    assert (small.batch, small.global_batch) == (2, None)
    toy = resolve(cdm.CDMOptions, cdm.PRESETS, "toy", {"global_batch": 32}, "cdm", world_size=2)
    assert (toy.batch, toy.global_batch) == (16, 32)
    with pytest.raises(FewstepError, match=r"batch = 4 and global_batch = 32.*world size 2"):
        resolve(cdm.CDMOptions, cdm.PRESETS, None, {"batch": 4, "global_batch": 32}, "cdm",
                world_size=2)
    with pytest.raises(FewstepError, match="global_batch"):
        resolve(cdm.CDMOptions, cdm.PRESETS, paper, None, "cdm", world_size=3)


def test_train_refuses_a_per_rank_batch_that_misses_the_global_batch():
    from fewstep.commands.train import check_global_batch

    options = resolve(cdm.CDMOptions, cdm.PRESETS, "cdm-sd3-paper", None, "cdm", world_size=8)
    check_global_batch(options, 8)
    with pytest.raises(FewstepError, match=r"global_batch = 128.*16 per rank.*4 processes"):
        check_global_batch(options, 4)


def paper_presets():
    return [(name, preset) for name, preset in all_presets() if "-paper" in preset]


def stated(method, preset) -> dict:
    cls = METHODS.get(method)
    return option_names(cls.Options, cls.PRESETS[preset], method)


@pytest.mark.parametrize("method,preset", paper_presets())
def test_paper_presets_state_their_iterations_and_global_batch(method, preset):
    missing = [k for k in ("steps", "global_batch") if k not in stated(method, preset)]
    assert not missing, f"{preset} does not state {missing} (the paper's recipe)"


@pytest.mark.parametrize("method,preset", paper_presets())
def test_paper_presets_state_their_scheduler_policy(method, preset):
    """Which updates tick each network's LR scheduler is the paper's (CDM: its own updates;
    DMD2: every iteration), stated in the preset rather than left to the engine's default."""
    assert "lr_schedule_on" in stated(method, preset), f"{preset} does not state lr_schedule_on"


# -- CDM's recipe and ledger -----------------------------------------------------------------------
def test_cdm_paper_recipe():
    """SD3 config (methods/notes/cdm.md sec. 6.1): 4001 iterations, 16 per GPU x 8, EMA 0.999
    with warm-up, 100-tick warm-up from LR 0 ticked 8 times per update (Accelerate on 8
    processes), per-update schedulers, bf16."""
    for preset in ("cdm-sd3-paper", "cdm-sdxl-ext", "cdm-sit-ext"):
        opt = resolve(cdm.CDMOptions, cdm.PRESETS, preset, None, "cdm", world_size=8)
        assert (opt.steps, opt.global_batch, opt.batch) == (4001, 128, 16)
        assert (opt.ema_decay, opt.ema_warmup, opt.ema_on) == (0.999, True, "generator_update")
        assert (opt.warmup, opt.warmup_ticks, opt.warmup_start) == (100, 8, "zero")
        assert opt.lr_schedule_on == "update" and opt.bf16


def test_cdm_ledger():
    assert cdm.CDM.ledger == cdm.FIDELITY and cdm.FIDELITY
    fields = {f.name for f in dataclasses.fields(cdm.CDMOptions)}
    paper = resolve(cdm.CDMOptions, cdm.PRESETS, "cdm-sd3-paper", None, "cdm")
    applied = deviations(cdm.CDM, paper)
    assert not [d for d in applied if d["what"] in fields]  # the paper preset keeps every value
    toy = resolve(cdm.CDMOptions, cdm.PRESETS, "toy", None, "cdm")
    marked = {d["what"] for d in deviations(cdm.CDM, toy)}
    assert {"steps", "global_batch", "lr", "warmup_ticks", "schedule_len", "ca_w"} <= marked


def test_a_method_built_for_a_data_parallel_run_trains_its_share_of_the_global_batch():
    from fewstep.engine.distributed import DistInfo
    from fewstep.engine.run import build_method, toy_context
    from fewstep.toy import teachers

    teacher = teachers.load(teachers.SHIPPED / "sit")
    ctx = toy_context(teacher, "sit", 16, 0, DistInfo())
    ctx.world_size = 4  # as torchrun's fourth of four ranks would build it
    method = build_method("cdm", teacher, ctx, "toy", {"global_batch": 8})
    assert method.opt.batch == 2


def test_the_dag_refuses_a_global_batch_its_processes_do_not_divide():
    from fewstep import config

    cfg = config.load(config.REPO / "workflows/config/paper/sit-imagenet256-train.yaml")
    cfg["distill"]["overrides"] = {"dmd2": {"global_batch": 12}}
    cfg["distill"]["processes"] = 8
    with pytest.raises(config.ConfigError, match="global_batch = 12"):
        config.validate(cfg)
