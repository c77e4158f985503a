"""RTDMD's critic as the official configs build it (methods/notes/rtdmd.md sec. 2): a LoRA of rank
32, alpha 64 on the family's targets in stage 1; stage 2 merges it and puts a fresh LoRA on top.
Also: LoRA alpha is explicit (fewstep/engine/adapt.py), the presets state their recipe, and the
method's fidelity ledger."""
import types

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import methods.rtdmd as R
from fewstep.engine.adapt import LoraSpec, add_lora, trainable_copy
from fewstep.engine.distributed import DistInfo
from fewstep.engine.loop import Trainer
from fewstep.engine.run import build_method, export, toy_context
from fewstep.errors import FewstepError
from fewstep.fidelity import deviations, ledger
from fewstep.options import resolve
# one thread for tiny networks; tiny untrained teachers by family (the RTDMD method tests' fixtures)
from test_method_rtdmd import RES, one_thread, toy  # noqa: F401

PAPER = {"sd3": "rtdmd-sd3-paper", "sdxl": "rtdmd-sdxl-ext", "sit": "rtdmd-sit-ext"}
SMALL = {"batch": 2, "grad_checkpointing": False}



def toy_reward(images, metas):
    return -((images - 0.5) ** 2).mean((1, 2, 3))


def make(teacher, family, preset, **over):
    ctx = toy_context(teacher, family, RES, 0, DistInfo(), reward=toy_reward, autocast=False)
    return build_method("rtdmd", teacher, ctx, preset, {**SMALL, **over})


def matches(name: str, targets) -> bool:
    """peft's rule for a list of target names: the module's full name, or its last components."""
    return any(name == t or name.endswith("." + t) for t in targets)


def expected_lora_params(denoiser: nn.Module, rank: int, targets) -> int:
    """A rank-r LoRA's parameter count from the target modules' shapes: Linear in -> out adds
    A (r x in) and B (out x r); a k x k Conv2d adds A (r x in x k x k) and a 1 x 1 B (out x r)."""
    total = 0
    for name, module in denoiser.named_modules():
        if not matches(name, targets):
            continue
        if isinstance(module, nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += rank * module.in_channels * kh * kw + module.out_channels * rank
    assert total > 0, "no target module matched"
    return total


def trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def critic_out(critic, teacher, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, *teacher.latent_shape), generator=g)
    t = torch.tensor([0.3, 0.8])
    cond = teacher.encode(["a red cube", "a blue ball"] if teacher.family != "sit" else [1, 2])
    with torch.no_grad():
        return critic.native(x, t, cond)


# -- the critic's LoRA (item: the official fake_score_lora) ----------------------------------------
@pytest.mark.parametrize("family", ["sd3", "sdxl", "sit"])
def test_paper_critic_trains_a_rank32_lora_on_the_family_targets(toy, family):
    teacher = toy(family)
    method = make(teacher, family, PAPER[family])
    opt = method.opt
    assert (opt.critic_lora_rank, opt.critic_lora_alpha) == (32, 64)
    targets = opt.lora_targets or teacher.lora_targets
    params = trainable(method.critic.denoiser)
    assert params and all("lora_" in n for n in params)
    assert sum(p.numel() for p in params.values()) == expected_lora_params(teacher.denoiser, 32, targets)
    trainer_params = Trainer(method, "unused").params["critic"]  # what the optimiser steps
    assert sum(p.numel() for p in trainer_params) == sum(p.numel() for p in params.values())
    # B = 0 at init: the critic starts as the teacher (a LoRA that is not an identity would not)
    torch.testing.assert_close(critic_out(method.critic, teacher), critic_out(teacher, teacher))


def test_sd3_paper_targets_are_the_official_attention_projections():
    opt = resolve(R.RTDMDOptions, R.PRESETS, "rtdmd-sd3-paper", None, "rtdmd")
    assert set(opt.lora_targets) == {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                     "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                                     "attn.to_add_out"}


def test_toy_critic_is_full_and_the_ledger_marks_it(toy):
    method = make(toy("sit"), "sit", "toy")
    params = trainable(method.critic.denoiser)
    assert sum(p.numel() for p in params.values()) == sum(
        p.numel() for p in toy("sit").denoiser.parameters())
    marked = {d["what"] for d in deviations(type(method), method.opt)}
    assert {"critic_lora_rank", "lora_rank"} <= marked


def test_generator_and_critic_loras_start_from_different_draws(toy):
    method = make(toy("sit"), "sit", "rtdmd-sit-ext")
    gen, critic = trainable(method.generator.denoiser), trainable(method.critic.denoiser)
    key = next(n for n in gen if "lora_A" in n)
    assert not torch.equal(gen[key], critic[key])


@pytest.fixture(scope="module")
def lora_stage1(toy, tmp_path_factory):
    """A stage-1 model exported from the sd3 paper preset with a non-zero critic LoRA (so the merge
    matters), and that critic's outputs."""
    teacher = toy("sd3")
    method = make(teacher, "sd3", "rtdmd-sd3-paper", steps=1)
    with torch.no_grad():
        for name, p in trainable(method.critic.denoiser).items():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("rtdmd-lora")
    trainer = Trainer(method, root / "run")
    export(method, trainer, root / "model", {})
    return root / "model", critic_out(method.critic, teacher)


def test_stage1_critic_export_holds_merged_base_weights(toy, lora_stage1):
    folder, lora_out = lora_stage1
    teacher = toy("sd3")
    saved = load_file(str(folder / "critic.safetensors"))
    assert set(saved) == set(teacher.denoiser.state_dict())  # base names, no adapter keys
    assert not all(torch.equal(saved[k], v) for k, v in teacher.denoiser.state_dict().items())
    import copy
    merged = copy.deepcopy(teacher)
    merged.denoiser.load_state_dict(saved)
    torch.testing.assert_close(critic_out(merged, teacher), lora_out, atol=1e-5, rtol=1e-5)


def test_stage2_puts_a_fresh_lora_on_the_merged_critic(toy, lora_stage1):
    folder, lora_out = lora_stage1
    teacher = toy("sd3")
    method = make(teacher, "sd3", "rtdmd-sd3-paper-stage2", init_from=str(folder),
                  prompts_per_epoch=2, group_size=2)
    params = trainable(method.critic.denoiser)
    targets = method.opt.lora_targets
    assert sum(p.numel() for p in params.values()) == expected_lora_params(teacher.denoiser, 32, targets)
    assert all(float(p.detach().abs().max()) == 0 for n, p in params.items() if "lora_B" in n)
    # output at init = the merged stage-1 critic's
    torch.testing.assert_close(critic_out(method.critic, teacher), lora_out, atol=1e-5, rtol=1e-5)
    # the fresh A is drawn N(0, 1) as the official merge-then-reinit does, not peft's N(0, 1/r)
    a = torch.cat([p.flatten() for n, p in params.items() if "lora_A" in n])
    assert 0.9 < float(a.std()) < 1.1
    gen_a = torch.cat([p.flatten() for n, p in trainable(method.generator.denoiser).items()
                       if "lora_A" in n])
    assert 0.9 < float(gen_a.std()) < 1.1


def test_stage1_lora_a_is_peft_gaussian(toy):
    method = make(toy("sd3"), "sd3", "rtdmd-sd3-paper")
    a = torch.cat([p.flatten() for n, p in trainable(method.critic.denoiser).items() if "lora_A" in n])
    assert abs(float(a.std()) - 1 / 32) < 0.005


# -- LoRA alpha is explicit ------------------------------------------------------------------------
def test_lora_without_alpha_is_an_error_naming_the_option(toy):
    teacher = toy("sit")
    opt = types.SimpleNamespace(lora_rank=4, lora_alpha=0.0, lora_targets=(), seed=0,
                                grad_checkpointing=False)
    with pytest.raises(FewstepError, match="lora_alpha"):
        trainable_copy(teacher, opt)
    opt.lora_alpha = None
    with pytest.raises(FewstepError, match="lora_alpha"):
        trainable_copy(teacher, opt)
    import copy
    with pytest.raises(FewstepError, match="critic_lora_alpha"):
        add_lora(copy.deepcopy(teacher), LoraSpec(4, 0.0, names=("critic_lora_rank", "critic_lora_alpha")))
    with pytest.raises(FewstepError, match="critic_lora_alpha"):
        make(teacher, "sit", "rtdmd-sit-ext", critic_lora_alpha=0)
    opt.lora_alpha = 8.0  # an explicit alpha other than the rank is used as given
    lora = trainable_copy(teacher, opt)
    layer = next(m for m in lora.denoiser.modules() if hasattr(m, "scaling"))
    assert layer.scaling["default"] == pytest.approx(8.0 / 4)


def test_every_preset_states_its_lora_and_recipe():
    for name, preset in R.PRESETS.items():
        for rank, alpha in (("lora_rank", "lora_alpha"), ("critic_lora_rank", "critic_lora_alpha")):
            assert rank in preset, (name, rank)
            if preset[rank] > 0:
                assert preset.get(alpha, 0) > 0, (name, alpha)
        assert "steps" in preset and "bf16" in preset, name
    stage1 = resolve(R.RTDMDOptions, R.PRESETS, "rtdmd-sd3-paper", None, "rtdmd")
    assert (stage1.steps, stage1.warmup, stage1.ema_decay) == (15000, 0, 0.99)
    stage2 = resolve(R.RTDMDOptions, R.PRESETS, "rtdmd-sd3-paper-stage2", None, "rtdmd")
    assert (stage2.steps, stage2.prompts_per_epoch * stage2.group_size) == (1000, 512)
    eight = resolve(R.RTDMDOptions, R.PRESETS, "rtdmd-sd3-paper", None, "rtdmd", world_size=8)
    assert (eight.global_batch, eight.batch) == (72, 9)  # 9 per GPU on 8 GPUs
    sixteen = resolve(R.RTDMDOptions, R.PRESETS, "rtdmd-sd3-paper-stage2", None, "rtdmd",
                      world_size=16)
    assert (sixteen.global_batch, sixteen.batch) == (32, 2)  # rollout passes of 2 per GPU
    for name in ("toy", "toy-stage2"):  # the toy world: per-rank batches, one process
        assert resolve(R.RTDMDOptions, R.PRESETS, name, None, "rtdmd").global_batch is None


# -- the fidelity ledger ---------------------------------------------------------------------------
def test_ledger_is_declared_for_both_stages_and_paper_presets_are_clean():
    assert R.RTDMD.ledger is R.FIDELITY
    assert ledger(R.ACDMD) == ledger(R.RewardTiltedDMD) == R.FIDELITY
    whats = {d.what for d in R.FIDELITY}
    assert {"critic_lora_rank", "critic_lora_alpha", "lora_rank", "lora_alpha"} <= whats
    for name in ("rtdmd-sd3-paper", "rtdmd-sd3-paper-stage2"):
        opt = resolve(R.RTDMDOptions, R.PRESETS, name, None, "rtdmd")
        marked = {d["what"] for d in deviations(R.RTDMD.for_options(opt), opt)}
        assert not marked & {"critic_lora_rank", "critic_lora_alpha", "lora_rank", "lora_alpha",
                             "stage2_lora_init"}


# -- stage 2's kept samples: the official sub-batch padding ----------------------------------------
def test_kept_rows_are_padded_to_the_sub_batches_as_the_official_filter():
    g = torch.Generator().manual_seed(0)
    nonzero = torch.tensor([True, False, True, False, False, True, False, False, False, False])
    keep = R.kept_rows(nonzero, 4, g)
    assert int(keep.sum()) == 4 and bool(keep[nonzero].all())  # 3 kept + 1 zero-advantage pad
    none = torch.zeros(10, dtype=torch.bool)
    assert int(R.kept_rows(none, 4, g).sum()) == 4  # nothing survives: one per sub-batch
    few = torch.tensor([True, False, False])
    assert torch.equal(R.kept_rows(few, 4, g), few)  # too few to pad: as they are
    # sub_batches 0 (the toy stage 2): no padding, and every row when nothing survives
    assert torch.equal(R.kept_rows(nonzero, 0, g), nonzero)
    assert bool(R.kept_rows(none, 0, g).all())
    paper = resolve(R.RTDMDOptions, R.PRESETS, "rtdmd-sd3-paper-stage2", None, "rtdmd")
    toy_opt = resolve(R.RTDMDOptions, R.PRESETS, "toy-stage2", None, "rtdmd")
    assert (paper.sub_batches, toy_opt.sub_batches) == (16, 0)
    assert "sub_batches" in {d["what"] for d in deviations(R.RewardTiltedDMD, toy_opt)}


# -- stage 2 draws its re-noise times and consistency steps per rank ------------------------------
class Stage2FromTeacher(R.RewardTiltedDMD):
    def initial_networks(self):
        return self.teacher, self.teacher


def stage2_on_rank(teacher, rank, **over):
    ctx = toy_context(teacher, "sd3", RES, 0, DistInfo(rank=rank, world_size=2), reward=toy_reward,
                      autocast=False)
    options = resolve(R.RTDMDOptions, R.PRESETS, "rtdmd-sd3-paper-stage2",
                      {**SMALL, "lora_rank": 0, "critic_lora_rank": 0, **over}, "rtdmd")
    return Stage2FromTeacher(teacher, options, ctx)


def test_stage2_renoise_draws_are_rank_local_as_the_official_ac_mixin(toy):
    teacher = toy("sd3")
    a, b = stage2_on_rank(teacher, 0), stage2_on_rank(teacher, 1)
    assert not torch.equal(a.renoise_t(0.0, 8, "t"), b.renoise_t(0.0, 8, "t"))
    x = torch.zeros(8, 1)
    assert not torch.equal(a.consistency_delta(x, "c"), b.consistency_delta(x, "c"))
    a, b = (stage2_on_rank(teacher, r, stage2_shared_draws=True) for r in (0, 1))
    assert torch.equal(a.renoise_t(0.0, 8, "t"), b.renoise_t(0.0, 8, "t"))
    toy_opt = resolve(R.RTDMDOptions, R.PRESETS, "toy-stage2", None, "rtdmd")
    assert toy_opt.stage2_shared_draws  # the toy numbers' draws; marked in the ledger
    assert "stage2_shared_draws" in {d["what"] for d in deviations(R.RewardTiltedDMD, toy_opt)}
