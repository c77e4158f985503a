"""AMD (reconstructed): the checks of sec. 10, and the reduction to DMD2.

Tiny random SiT teachers at 8x8 pixels (non-zero output heads) with the toy world's classes; the
critic is perturbed so that teacher and critic disagree and every direction is non-trivial.
Sections (sec. N) are those of methods/notes/amd.md.
"""
import math

import pytest
import torch
from torch import nn

from fewstep import losses
from fewstep.backbones.sit import SiTBackbone
from fewstep.engine.distributed import DistInfo
from fewstep.options import resolve
from fewstep.engine.run import toy_context
from fewstep.errors import FewstepError
from fewstep.registry import METHODS
from fewstep.toy import teachers, world
from methods import amd
from methods.amd import AMD, AMDOptions
from methods.dmd2 import DMD2, DMD2Options

RES, K = 16, 4
FOUR = (1.0, 0.75, 0.5, 0.25)


def tiny_teacher(family: str = "sit"):
    if family == "sit":
        return SiTBackbone.tiny(resolution=RES, num_classes=len(world.CLASSES), hidden=32, depth=2,
                                num_heads=2, adaln_zero=False, seed=0)
    return teachers.build(family, RES, 0)


def brightness(images01, metas):
    """A differentiable reward: mean brightness per image."""
    return images01.mean((1, 2, 3))


def context(teacher, family="sit", reward=brightness, info=None):
    return toy_context(teacher, family, RES, 0, info or DistInfo(), reward=reward, autocast=False)


def options(cls, **over):
    base = dict(batch=8, group_size=K, teacher_guidance=2.0, generator_grid=FOUR, backsim=True,
                generator_every=2, warmup=1)
    base.update(over)
    names = cls.__dataclass_fields__
    return cls(**{k: v for k, v in base.items() if k in names})


def perturb(module: nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def make_amd(family="sit", reward=brightness, **over):
    teacher = tiny_teacher(family)
    torch.manual_seed(0)  # the GAN head's random init
    method = AMD(teacher, options(AMDOptions, **over), context(teacher, family, reward))
    perturb(method.critic.denoiser)
    return method


def run_step(method, step: int) -> dict:
    """One iteration's losses and gradients, without optimiser steps (state stays identical)."""
    method.ctx.step = step
    nets, scratch, out = method.networks(), {}, {}
    for name in method.plan(step):
        params = [p for p in nets[name].parameters() if p.requires_grad]
        for p in params:
            p.grad = None
        loss, stats = method.loss(name, scratch)
        loss.backward(inputs=params)
        out[name] = (loss.detach(), [None if p.grad is None else p.grad.clone() for p in params], stats)
    return out


def grouped_prompts(ctx, k: int):
    """DMD2 draws `batch` prompts; give it AMD's B x K batch from the same streams."""
    draw = ctx.prompts

    def prompts(n, stream="prompts", repeat=1):
        if stream in ("prompts", "prompts_critic"):
            return draw(n // k, stream, repeat=k)
        return draw(n, stream, repeat)

    ctx.prompts = prompts


def seen(method, x, cond, step=0):
    method.ctx.step = step
    return method.teacher_critic_branches(x, cond)


# -- 10.1 reduction to DMD2 ------------------------------------------------------------------------
@pytest.mark.parametrize("family,omega,grid", [("sit", 2.0, FOUR), ("sit", 1.0, (1.0,)),
                                                ("sdxl", 2.0, FOUR)])
def test_s0_without_rls_is_dmd2_bit_for_bit(family, omega, grid):
    calls = []

    def reward(images, metas):
        calls.append(len(metas))
        return brightness(images, metas)

    method = make_amd(family, reward, coeff_s=0.0, rls_enabled=False, teacher_guidance=omega,
                      generator_grid=grid)
    teacher = method.teacher
    torch.manual_seed(0)
    base = DMD2(teacher, options(DMD2Options, teacher_guidance=omega, generator_grid=grid),
                context(teacher, family))
    grouped_prompts(base.ctx, K)
    for name, net in method.networks().items():
        base.networks()[name].load_state_dict(net.state_dict())
    for step in (0, 1):  # a generator + critic turn, then a critic-only turn (r = 2)
        a, b = run_step(method, step), run_step(base, step)
        assert list(a) == list(b) == base.plan(step)
        for name in a:
            assert torch.equal(a[name][0], b[name][0]), (step, name)
            for ga, gb in zip(a[name][1], b[name][1]):
                assert (ga is None and gb is None) or torch.equal(ga, gb), (step, name)
    assert calls, "the reward was computed (and left every draw untouched)"
    assert "reward" in a["critic"][2] and "reward" in run_step(method, 0)["generator"][2]


# -- 10.2 decomposition identity -------------------------------------------------------------------
def test_decomposition_identity():
    omega = 3.0
    method = make_amd(teacher_guidance=omega)
    teacher, critic = method.teacher, method.critic
    cond = method.ctx.prompts(2, repeat=K).cond
    x = torch.randn(8, *teacher.latent_shape, generator=torch.Generator().manual_seed(3))
    t = torch.full((8,), 0.6)
    x_t = teacher.schedule.add_noise(x, torch.randn_like(x), t)
    with torch.no_grad():
        p_c, p_u = teacher.x0(x_t, t, cond), teacher.x0(x_t, t, teacher.null(cond))
        p_g, p_f = teacher.x0(x_t, t, cond, omega), critic.x0(x_t, t, cond)
        b_c, b_g = amd.teacher_branches(teacher, x_t, t, cond, omega)
    d_rc, d_ru, d_f = p_c - x, p_u - x, p_f - x
    d_ca = d_rc - d_ru
    ones = torch.ones(8)
    literal = 1.0 * (d_rc - d_f) + 1.0 * (omega - 1) * d_ca   # Eq. 10 with alpha = beta = 1
    torch.testing.assert_close(literal, p_g - p_f, rtol=1e-5, atol=1e-5)
    assert torch.equal(b_g, p_g)  # the batched call is Backbone.x0's, bit for bit
    torch.testing.assert_close(b_c, p_c, rtol=1e-5, atol=1e-5)
    h = amd.dsa_direction(b_g, b_c, p_f, ones, ones)
    assert torch.equal(h, b_g.double() - p_f.double())
    torch.testing.assert_close(h.float(), literal, rtol=1e-5, atol=1e-5)
    alpha, beta = 1 + 0.3 * torch.randn(8), 1 + 0.3 * torch.randn(8)
    col = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    eq10 = col(beta) * (d_rc - d_f) + col(alpha) * (omega - 1) * d_ca
    torch.testing.assert_close(amd.dsa_direction(b_g, b_c, p_f, alpha, beta).float(), eq10,
                               rtol=1e-4, atol=1e-5)


def test_weights_multiply_the_components_not_the_whole_vector():
    """sec. 8 item 1: beta scales the DM term, alpha the CA term."""
    pc, pf, pg = torch.zeros(1, 1, 1, 1), -torch.ones(1, 1, 1, 1), 3 * torch.ones(1, 1, 1, 1)
    h = amd.dsa_direction(pg, pc, pf, torch.tensor([0.5]), torch.tensor([2.0]))
    assert float(h) == 2.0 * (0 - (-1)) + 0.5 * (3 - 0)


# -- 10.3 omega = 1 --------------------------------------------------------------------------------
def test_omega_one_scales_each_sample_by_beta():
    method = make_amd(teacher_guidance=1.0, coeff_s=0.3)
    cond = method.ctx.prompts(2, repeat=K).cond
    x = torch.randn(8, *method.teacher.latent_shape, generator=torch.Generator().manual_seed(4))
    adv = amd.squash(torch.randn(8, dtype=torch.float64), "clip", 1.0)
    alpha, beta = amd.coefficients(adv, 0.3)
    p_g, p_c, p_f = seen(method, x, cond)
    torch.testing.assert_close(amd.dsa_direction(p_g, p_c, p_f, alpha, beta),
                               beta.reshape(-1, 1, 1, 1) * (p_c - p_f).double())
    x = x.requires_grad_(True)
    method.ctx.step = 0
    g_amd = torch.autograd.grad(method.dsa_loss(x, cond, adv)[0], x)[0]
    g_dmd2 = torch.autograd.grad(method.dm_loss(x, cond)[0], x)[0]  # DMD2's DM loss, same draws
    assert g_dmd2.abs().sum() > 0 and not torch.allclose(g_amd, g_dmd2)
    # float32 surrogate: x - sg(x - g) rounds g to the precision of x, hence the tolerance
    torch.testing.assert_close(g_amd, beta.float().reshape(-1, 1, 1, 1) * g_dmd2, rtol=1e-3,
                               atol=1e-3 * float(g_dmd2.abs().max()))


# -- 10.4 tied rewards -----------------------------------------------------------------------------
@pytest.mark.parametrize("k,value", [(4, 0.37), (3, 0.1), (5, -2.3)])
def test_tied_group_gives_unit_weights(k, value):
    groups = torch.arange(2).repeat_interleave(k)
    r = torch.cat([torch.full((k,), value), torch.linspace(0, 1, k)])
    adv = amd.advantages(r, groups)
    tied = groups == 0
    assert torch.equal(adv[tied], torch.zeros(k, dtype=adv.dtype))
    alpha, beta = amd.coefficients(adv, 0.1)
    assert torch.all(alpha[tied] == 1) and torch.all(beta[tied] == 1)
    for norm in ("group_mean", "none"):
        assert torch.all(amd.rls_weights(adv, groups, norm)[tied] == 1)
    assert adv[~tied].abs().max() > 0


def test_constant_reward_leaves_the_method_unweighted():
    method = make_amd(reward=lambda images, metas: torch.full((len(metas),), 0.25))
    method.ctx.step = 0
    x, batch, stop = method.sample(grad=False)
    adv, stats = method.group_signal(x, batch, stop)
    assert torch.equal(adv, torch.zeros_like(adv)) and stats["reward"] == 0.25


# -- 10.5 direction and range ----------------------------------------------------------------------
@pytest.mark.parametrize("squash", ["clip", "tanh"])
def test_direction_and_range(squash):
    s, groups = 0.1, torch.arange(3).repeat_interleave(K)
    r = torch.randn(3 * K, generator=torch.Generator().manual_seed(5))
    adv = amd.advantages(r, groups, kind=squash)
    alpha, beta = amd.coefficients(adv, s)
    w = amd.rls_weights(adv, groups, "none")
    for g in range(3):
        idx = torch.nonzero(groups == g).flatten()
        lo, hi = idx[r[idx].argmin()], idx[r[idx].argmax()]
        assert beta[lo] > 1 > alpha[lo] and alpha[hi] > 1 > beta[hi]
        assert w[lo] > 1 > w[hi]
    assert torch.all((alpha >= 1 - s) & (alpha <= 1 + s) & (beta >= 1 - s) & (beta <= 1 + s))
    assert torch.all((w >= math.exp(-1)) & (w <= math.exp(1)))


def test_two_sample_groups_hit_the_extremes():
    """sec. 3.3: with K = 2, |a| = sigma_g / (sigma_g + eps), a sign up to eps / sigma_g, so
    alpha, beta sit at 1 +- s whatever the reward gap (once it is large against eps)."""
    adv = amd.advantages(torch.tensor([0.0, 1.0, 5.0, 5.1]), torch.tensor([0, 0, 1, 1]))
    alpha, beta = amd.coefficients(adv, 0.1)
    torch.testing.assert_close(alpha, torch.tensor([0.9, 1.1, 0.9, 1.1], dtype=alpha.dtype),
                               rtol=0, atol=3e-3 * 0.1)
    torch.testing.assert_close(beta, torch.tensor([1.1, 0.9, 1.1, 0.9], dtype=beta.dtype),
                               rtol=0, atol=3e-3 * 0.1)


def test_global_std_centres_per_group():
    groups = torch.tensor([0, 0, 1, 1])
    r = torch.tensor([0.0, 2.0, 10.0, 10.5])
    a = amd.advantages(r, groups, norm="group_std_global", clip=100.0)
    std = r.double().std(unbiased=False)
    torch.testing.assert_close(a, torch.stack([-1 / std, 1 / std, -0.25 / std, 0.25 / std]),
                               rtol=1e-3, atol=0)


def test_hard_gate_applies_dsa_only_to_failing_samples():
    adv = torch.tensor([-1.0, -0.2, 0.0, 0.7], dtype=torch.float64)
    alpha, beta = amd.coefficients(adv, 0.1, gate="hard", threshold=0.1)
    torch.testing.assert_close(alpha, torch.tensor([0.9, 0.98, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(beta, torch.tensor([1.1, 1.02, 1.0, 1.0], dtype=torch.float64))


# -- 10.6 RLS normalisation ------------------------------------------------------------------------
def test_group_mean_weights_average_one_and_keep_equal_losses():
    groups = torch.arange(3).repeat_interleave(K)
    adv = amd.advantages(torch.randn(3 * K, generator=torch.Generator().manual_seed(6)), groups)
    w = amd.rls_weights(adv, groups, "group_mean")
    for g in range(3):
        assert w[groups == g].mean().item() == pytest.approx(1.0, abs=1e-12)
    assert w.std() > 0
    # per-sample denoising losses equal within each group (different across groups)
    level = torch.tensor([0.5, 1.0, 2.0]).repeat_interleave(K).reshape(-1, 1, 1, 1)
    sign = torch.where(torch.rand(3 * K, 3, RES, RES) > 0.5, 1.0, -1.0)
    pred, target = level * sign, torch.zeros(3 * K, 3, RES, RES)
    torch.testing.assert_close(losses.native_mse(pred, target, w), losses.native_mse(pred, target))


def test_critic_loss_is_the_rls_weighted_native_loss():
    method = make_amd(gan_w_G=0.0, gan_w_D=0.0, generator_grid=(1.0,), generator_every=1)
    out = run_step(method, 0)
    method.ctx.step = 0
    x, batch, _ = method.sample(grad=True)
    adv, _ = method.group_signal(x, batch, 0)
    w = amd.rls_weights(adv, batch.groups, "group_mean")
    # the critic's per-sample native loss over the full range, with the critic's own draws
    x = x.detach()
    t = method.draw_t(method.critic_times, 8, "critic/t")
    eps = method.ctx.randn_like(x, "critic/eps")
    with torch.no_grad():
        x_t = method.critic.schedule.add_noise(x, eps, t)
        per = losses.mean_chw((method.critic.native(x_t, t, batch.cond)
                               - method.critic.native_target(x_t, t, x)) ** 2)
    assert method.critic_times.lo <= 0.001 and method.critic_times.hi >= 0.999  # full range (8.7)
    torch.testing.assert_close(out["critic"][0], (w.float() * per).mean(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(out["critic"][0], per.mean())


# -- 10.7 reward isolation -------------------------------------------------------------------------
class NetReward(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, images01, metas):
        return self.conv(images01).pow(2).mean((1, 2, 3))


def test_reward_gets_no_gradient_and_changes_nothing():
    reward = NetReward()
    method = make_amd(reward=reward)
    grads = []
    for trainable in (True, False):
        reward.requires_grad_(trainable)
        out = run_step(method, 0)
        grads.append(out)
        assert all(p.grad is None for p in reward.parameters())
    for name in grads[0]:
        assert torch.equal(grads[0][name][0], grads[1][name][0])
        for a, b in zip(grads[0][name][1], grads[1][name][1]):
            assert (a is None and b is None) or torch.equal(a, b)
    method.ctx.step = 0
    x, batch, stop = method.sample(grad=True)
    assert x.requires_grad and not method.rewards(x, batch, stop).requires_grad


# -- groups, options, plumbing ---------------------------------------------------------------------
def test_groups_share_prompt_and_stop_index():
    method = make_amd()
    other = AMD(method.teacher, method.opt, context(method.teacher, info=DistInfo(rank=1, world_size=2)))
    for step in range(4):
        method.ctx.step = other.ctx.step = step
        x, batch, stop = method.sample(grad=False)
        _, _, stop_other = other.sample(grad=False)
        assert stop == stop_other and 0 <= stop < len(FOUR)  # one stop for batch and ranks
        assert torch.equal(batch.groups, torch.arange(2).repeat_interleave(K))
        for g in range(2):
            rows = [batch.metas[i] for i in range(g * K, (g + 1) * K)]
            assert all(r == rows[0] for r in rows)
            assert batch.cond["y"][g * K:(g + 1) * K].unique().numel() == 1
            assert not torch.equal(x[g * K], x[g * K + 1])  # K noises per prompt


def test_options_presets_and_errors():
    for preset in ("amd-sdxl-int", "amd-sit-int", "amd-sd3-ext", "toy"):
        opt = resolve(AMDOptions, AMD.PRESETS, preset, method="amd")
        assert opt.group_size == 4 and opt.coeff_s == 0.1 and opt.batch % opt.group_size == 0
    assert resolve(AMDOptions, AMD.PRESETS, "amd-sdxl-int", method="amd").teacher_guidance == 8.0
    assert resolve(AMDOptions, AMD.PRESETS, "amd-sit-int", method="amd").teacher_guidance == 1.0
    assert resolve(AMDOptions, AMD.PRESETS, "amd-sd3-ext", method="amd").teacher_guidance == 7.0
    toy = resolve(AMDOptions, AMD.PRESETS, "toy", {"amd.advantage.clip": 2.0, "amd.rls.normalise": "none"},
                  method="amd")
    assert toy.batch == 16 and toy.advantage_clip == 2.0 and toy.rls_normalise == "none"
    assert METHODS.get("amd") is AMD and AMD.fidelity == "reconstructed"
    teacher = tiny_teacher()
    bad = [dict(group_layout="cross_rank"), dict(batch=6), dict(group_size=1),
           dict(advantage_squash="sigmoid"), dict(coeff_s=1.0), dict(normaliser="global")]
    for over in bad:
        with pytest.raises(FewstepError):
            AMD(teacher, options(AMDOptions, **over), context(teacher))
    with pytest.raises(FewstepError, match="reward"):
        AMD(teacher, options(AMDOptions), context(teacher, reward=None))
    AMD(teacher, options(AMDOptions, dsa_enabled=False, rls_enabled=False), context(teacher, reward=None))


def test_critic_only_turns_follow_reward_every_iteration():
    calls = []

    def reward(images, metas):
        calls.append(1)
        return brightness(images, metas)

    for every, expected in ((True, 1), (False, 0)):
        calls.clear()
        method = make_amd(reward=reward, reward_every_iteration=every)
        out = run_step(method, 1)  # generator_every 2: a critic-only turn
        assert list(out) == ["critic"] and len(calls) == expected
        assert ("rls_w_max" in out["critic"][2]) == every


def test_final_rollout_rewards_the_finished_sample():
    seen_images = []

    def reward(images, metas):
        seen_images.append(images)
        return brightness(images, metas)

    method = make_amd(reward=reward, reward_input="final_rollout")
    method.ctx.step = 0
    x, batch, _ = method.sample(grad=False)
    method.rewards(x, batch, 0)
    method.rewards(x, batch, len(FOUR) - 1)  # already at the last grid time: x itself
    assert not torch.allclose(seen_images[0], method.teacher.decode(x))
    assert torch.equal(seen_images[1], method.teacher.decode(x))


def test_trainer_runs_amd(tmp_path):
    from fewstep.engine.loop import Trainer

    method = make_amd()
    method.opt.steps, method.opt.checkpoint_every = 3, 100
    state = Trainer(method, tmp_path / "run").run(progress=False)
    assert state.step == 3 and math.isfinite(state.last["critic/loss"])
    assert "critic/rls_w_max" in state.last
