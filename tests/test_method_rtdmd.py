"""RTDMD (methods/rtdmd.py): the checks of methods/notes/rtdmd.md sec. 10, the general-schedule
reductions, and short in-process runs of both stages on tiny toy teachers."""
import math

import pytest
import torch

import methods.rtdmd as R
from fewstep import losses
from fewstep.engine.distributed import DistInfo
from fewstep.engine.loop import Trainer
from fewstep.engine.method import student_spec
from fewstep.options import resolve
from fewstep.engine.run import build_method, export, toy_context
from fewstep.errors import FewstepError
from fewstep.noise import prompt_noise
from fewstep.schedule import DiscreteVPSchedule, FlowSchedule
from fewstep.toy import teachers

FLOW = FlowSchedule()
VP = DiscreteVPSchedule.from_scheduler_config({})
THETA = 0.9 * math.pi / 2
RES = 8


def toy_reward(images, metas):
    return -((images - 0.5) ** 2).mean((1, 2, 3))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks: one thread is faster, and immune to a loaded shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy():
    """Tiny untrained teachers by family, built once."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = teachers.build(family, resolution=RES, seed=0)
        return cache[family]
    return get


def make(teacher, family, preset="toy", rank=0, world_size=1, reward=toy_reward, **over):
    info = DistInfo(rank=rank, world_size=world_size)
    ctx = toy_context(teacher, family, RES, 0, info, reward=reward, autocast=False)
    return build_method("rtdmd", teacher, ctx, preset, {"batch": 2, **over})


class Stage2FromTeacher(R.RewardTiltedDMD):
    """Stage 2 starting from the teacher itself: its sampling code without a stage-1 folder."""

    def initial_networks(self):
        if self.ctx.reward is None:
            return super().initial_networks()  # the error
        return self.teacher, self.teacher


def make_stage2(teacher, family, rank=0, world_size=1, reward=toy_reward, **over):
    info = DistInfo(rank=rank, world_size=world_size)
    ctx = toy_context(teacher, family, RES, 0, info, reward=reward, autocast=False)
    options = resolve(R.RTDMDOptions, R.PRESETS, "toy-stage2", {"batch": 2, **over}, method="rtdmd")
    ctx.seed = options.seed
    return Stage2FromTeacher(teacher, options, ctx)


@pytest.fixture(scope="module")
def stage1_model(toy, tmp_path_factory):
    """A stage-1 model folder after 10 iterations (one generator update) on the toy sd3 teacher."""
    root = tmp_path_factory.mktemp("rtdmd")
    method = make(toy("sd3"), "sd3", steps=10, checkpoint_every=100)
    trainer = Trainer(method, root / "run")
    trainer.run(progress=False)
    export(method, trainer, root / "model", {})
    return root / "model", trainer


def vec(v, n):
    return torch.full((n,), float(v), dtype=torch.float64)


# -- 10.1 ambient target at s = 0; general path = flow formulas ------------------------------------
def test_ambient_target_at_s0_is_eps_minus_x0(toy):
    sd3 = toy("sd3")
    x0, eps = torch.randn(4, 3, RES, RES), torch.randn(4, 3, RES, RES)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    a, sigma_ts, alpha_t, sigma_t = FLOW.kernel(torch.zeros(4), t)
    x_t = FLOW.renoise(x0, eps, a, sigma_ts)
    torch.testing.assert_close(x_t, FLOW.add_noise(x0, eps, t))
    target = sd3.native_target(x_t, t, R.ambient_x0(x_t, R.ambient_eps(eps, sigma_t, sigma_ts),
                                                     alpha_t, sigma_t))
    torch.testing.assert_close(target, eps - x0, atol=1e-5, rtol=1e-5)
    # SDXL at s = 0: eps~ = n and weight 1, i.e. DMD2's eps-MSE (methods/notes/rtdmd.md sec. 6.2)
    k = torch.tensor([20, 300, 700, 980])
    t_vp = VP.t_of_k(k).float()
    _, sts, _, st = VP.kernel(torch.zeros(4), t_vp)
    torch.testing.assert_close(R.ambient_eps(eps, st, sts), eps.double())
    torch.testing.assert_close(R.critic_weight("vp-discrete", st, sts), torch.ones(4, dtype=torch.float64))


def test_general_kernel_target_and_cps_reduce_to_flow_formulas(toy):
    sd3, sit = toy("sd3"), toy("sit")
    s = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.9])
    t = torch.tensor([0.3, 0.4, 0.62, 0.8, 0.97])
    a, sigma_ts, alpha_t, sigma_t = FLOW.kernel(s, t)
    s64, t64 = s.double(), t.double()
    torch.testing.assert_close(a, (1 - t64) / (1 - s64))
    torch.testing.assert_close(sigma_ts ** 2, t64 ** 2 - a ** 2 * s64 ** 2)
    x_s, n = torch.randn(5, 3, RES, RES).double(), torch.randn(5, 3, RES, RES).double()
    x_t = FLOW.renoise(x_s, n, a, sigma_ts)
    x0_tilde = R.ambient_x0(x_t, R.ambient_eps(n, sigma_t, sigma_ts), alpha_t, sigma_t)
    c = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    v_star = -x_s / c(1 - s64) + c((t64 + (1 - t64) * s64 ** 2 / (1 - s64) ** 2) / sigma_ts) * n
    v_star_2 = -x_t / c(1 - t64) + c(t64 / ((1 - t64) * sigma_ts)) * n
    torch.testing.assert_close(v_star, v_star_2)
    torch.testing.assert_close(sd3.native_target(x_t, t, x0_tilde), v_star)
    torch.testing.assert_close(sit.native_target(x_t, t, x0_tilde), -v_star)  # SiT u = x0 - eps
    torch.testing.assert_close(R.critic_weight("flow", sigma_t, sigma_ts),
                               torch.clamp(10 * sigma_ts ** 2, max=1.0))
    # CPS in DDIM form = the flow formula (1 - t') x0 + t' (cos eps_hat + sin xi) = ddim_step
    x, x0, xi = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    tt, tn = torch.tensor([1.0, 0.75, 0.5]), torch.tensor([0.75, 0.5, 0.25])
    eps_hat = (x - c(1 - tt) * x0) / c(tt)
    flow = c(1 - tn) * x0 + c(tn) * (math.cos(THETA) * eps_hat + math.sin(THETA) * xi)
    out = FLOW.cps_step(x, x0, tt, tn, xi, THETA)
    torch.testing.assert_close(out, flow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, FLOW.ddim_step(x, x0, tt, tn, xi, THETA))


# -- 10.2 unbiasedness -----------------------------------------------------------------------------
@pytest.mark.parametrize("sched", [FLOW, VP], ids=["flow", "vp"])
def test_ambient_target_is_unbiased_least_squares(sched):
    """x0 ~ N(0, v0): E[target | x_t] = c x_t with c known; regress the target on x_t."""
    gen, N, v0 = torch.Generator().manual_seed(0), 400_000, 0.5
    pairs = [(0.25, 0.5), (0.5, 0.8), (0.75, 0.9), (0.0, 0.3)] if sched is FLOW else \
        [(249 / 999, 499 / 999), (499 / 999, 800 / 999), (0.0, 300 / 999)]
    for s, t in pairs:
        x0 = math.sqrt(v0) * torch.randn(N, generator=gen, dtype=torch.float64)
        eps_s, n = torch.randn(N, generator=gen, dtype=torch.float64), \
            torch.randn(N, generator=gen, dtype=torch.float64)
        alpha_s, sigma_s = sched.level(vec(s, 1))
        x_s = alpha_s * x0 + sigma_s * eps_s
        a, sigma_ts, alpha_t, sigma_t = sched.kernel(vec(s, 1), vec(t, 1))
        x_t = a * x_s + sigma_ts * n
        eps_tilde = sigma_t / sigma_ts * n
        var = alpha_t ** 2 * v0 + sigma_t ** 2
        if sched is FLOW:  # target v* = eps~ - x0~, truth E[eps - x0 | x_t]
            target = eps_tilde - (x_t - sigma_t * eps_tilde) / alpha_t
            truth = (sigma_t - alpha_t * v0) / var
        else:  # target eps~, truth E[eps | x_t]
            target, truth = eps_tilde, sigma_t / var
        design = torch.stack([x_t, torch.ones_like(x_t)], 1)
        coef = torch.linalg.lstsq(design, target.unsqueeze(1)).solution.flatten()
        resid = target - design @ coef
        se = float(resid.std() / (x_t.std() * math.sqrt(N)))
        assert abs(float(coef[0] - truth)) < 5 * se, (s, t, float(coef[0]), float(truth), se)
        assert abs(float(coef[1])) < 5 * float(resid.std()) / math.sqrt(N)


# -- 10.3 kernel marginal --------------------------------------------------------------------------
def test_kernel_marginal_variance():
    v0 = 0.3
    for sched in (FLOW, VP):
        for s, t in [(0.0, 0.5), (0.25, 0.5), (0.5, 0.75), (0.75, 0.98), (0.3, 0.31)]:
            alpha_s, sigma_s = sched.level(vec(s, 1))
            a, sigma_ts, alpha_t, sigma_t = sched.kernel(vec(s, 1), vec(t, 1))
            composed = a ** 2 * (alpha_s ** 2 * v0 + sigma_s ** 2) + sigma_ts ** 2
            torch.testing.assert_close(composed, alpha_t ** 2 * v0 + sigma_t ** 2)
    gen = torch.Generator().manual_seed(1)
    x0 = math.sqrt(v0) * torch.randn(200_000, generator=gen, dtype=torch.float64)
    s, t = 0.5, 0.8
    x_s = (1 - s) * x0 + s * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    a, sigma_ts, _, _ = FLOW.kernel(vec(s, 1), vec(t, 1))
    x_t = a * x_s + sigma_ts * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    assert abs(float(x_t.var()) - ((1 - t) ** 2 * v0 + t ** 2)) < 0.01


# -- 10.4 noise cancellation -----------------------------------------------------------------------
def test_noise_cancels_with_shared_xi_and_s0_is_dmd():
    B, shape, f64 = 4, (4, 3, 5, 5), torch.float64
    t = torch.tensor([0.3, 0.5, 0.8, 0.95], dtype=f64)
    x_t, v_T, v_F, x_s = (torch.randn(shape, dtype=f64) for _ in range(4))
    c = lambda v: v.reshape(-1, 1, 1, 1)  # noqa: E731
    p_T, p_F = x_t - c(t) * v_T, x_t - c(t) * v_F
    for s in (0.0, 0.1, 0.25):
        s_vec = torch.full((B,), s, dtype=f64)
        coef = c(s * math.cos(THETA) * (1 - t) - (1 - s) * t)
        for seed in (0, 1):
            xi = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=f64)
            x_real = FLOW.cps_step(x_t, p_T, t, s_vec, xi, THETA)
            diff = FLOW.cps_step(x_t, p_F, t, s_vec, xi, THETA) - x_real
            torch.testing.assert_close(diff, coef * (v_F - v_T))
            # g's numerator is that xi-free difference; only its normaliser sees xi (4.3 step 4)
            g = R.acdmd_gradient(FLOW, x_s, x_t, t, s_vec, p_T, p_F, xi, THETA)
            torch.testing.assert_close(g * c(losses.mean_chw((x_s - x_real).abs())), diff)
    g = R.acdmd_gradient(FLOW, x_s, x_t, t, torch.zeros(B), p_T, p_F, torch.randn(shape), THETA)
    torch.testing.assert_close(g, losses.dm_gradient(x_s, p_T, p_F))  # s = 0: DMD on x0
    # general schedule: coefficient alpha_s - sigma_s cos(theta) alpha_t / sigma_t on x0
    t_vp, s_vp = VP.t_of_k(torch.tensor([500, 700, 900, 990])), VP.t_of_k(torch.tensor([250] * 4))
    alpha_s, sigma_s = VP.level(s_vp)
    alpha_t, sigma_t = VP.level(t_vp)
    diff = VP.cps_step(x_t, p_F, t_vp, s_vp, xi, THETA) - VP.cps_step(x_t, p_T, t_vp, s_vp, xi, THETA)
    torch.testing.assert_close(diff, c(alpha_s - sigma_s * math.cos(THETA) * alpha_t / sigma_t) * (p_F - p_T))


# -- 10.5 CPS limits -------------------------------------------------------------------------------
def test_cps_limits_euler_and_noise_free_last_step(toy):
    shape = (3, 3, RES, RES)
    x, x0, xi = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    t, tn = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.75, 0.2, 0.1])
    v_hat = (x - x0) / t.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(FLOW.cps_step(x, x0, t, tn, xi, 0.0),
                               x + (tn - t).reshape(-1, 1, 1, 1) * v_hat, atol=1e-5, rtol=1e-5)
    for sched in (FLOW, VP):
        zero = torch.zeros(3)
        mean = sched.cps_mean(x, x0, t, zero, THETA)
        x_next = sched.cps_step(x, x0, t, zero, xi, THETA)
        torch.testing.assert_close(x_next, x0, rtol=0, atol=0)
        logp = sched.cps_logprob(x_next, mean)
        assert torch.equal(logp, torch.zeros(3, dtype=torch.float64))
        adv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        assert float(losses.ppo_loss(logp, logp, adv, 1e-5)) == pytest.approx(float(-adv.mean()))
    # in a real rollout the last step's stored log-prob is exactly 0 (PPO ratio 1); the stage-2
    # sampling code runs on a stage-1 method here, which skips loading a stage-1 folder
    method = make_stage2(toy("sd3"), "sd3", prompts_per_epoch=1, group_size=2, batch=2)
    metas, cond, _ = method.epoch_prompts()
    _, logp = method.rollout_states(metas, cond, slice(0, 2), [0, 1])
    assert torch.equal(logp[-1], torch.zeros(2, dtype=torch.float64))
    assert (logp[0] < 0).all()


# -- 10.6 consistency estimator --------------------------------------------------------------------
def test_consistency_estimator_mean_and_eta0():
    gen = torch.Generator().manual_seed(0)
    M, C = 20_000, 3
    W = torch.randn(C, C, generator=gen, dtype=torch.float64) / 2
    h = lambda x, t: torch.einsum("ij,bjhw->bihw", W, x.double())  # noqa: E731 (linear x0-pred)
    x_t = torch.randn(1, C, 2, 2, generator=gen, dtype=torch.float64).expand(M, -1, -1, -1)
    h0 = torch.randn(1, C, 2, 2, generator=gen, dtype=torch.float64).expand(M, -1, -1, -1)
    t, t2 = torch.full((M,), 0.6), torch.full((M,), 0.45)
    xi1, xi2 = (torch.randn(x_t.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    est = R.consistency_loss(h, FLOW, x_t, t, t2, h0, xi1, xi2, THETA)
    mu = FLOW.cps_mean(x_t[:1], h0[:1], t[:1], t2[:1], THETA)  # E[x''] (xi has mean 0)
    exact = float(losses.mean_chw((h(mu, None) - h0[:1]) ** 2))
    terms = losses.mean_chw((h(FLOW.cps_step(x_t, h0, t, t2, xi1, THETA), None) - h0)
                            * (h(FLOW.cps_step(x_t, h0, t, t2, xi2, THETA), None) - h0))
    assert abs(float(est) - exact) < 5 * float(terms.std()) / math.sqrt(M)
    d = torch.randn(4, C, 2, 2, generator=gen)  # a product estimator, not a square: never clipped
    torch.testing.assert_close(R.consistency_term(h0[:4] + d, h0[:4] - d, h0[:4]), -(d ** 2).mean())
    # eta = 0: both paths coincide and the estimator is the squared error
    est0 = R.consistency_loss(h, FLOW, x_t[:8], t[:8], t2[:8], h0[:8], xi1[:8], xi2[:8], 0.0)
    x_det = FLOW.cps_step(x_t[:8], h0[:8], t[:8], t2[:8], None, 0.0)
    torch.testing.assert_close(est0, ((h(x_det, None) - h0[:8]) ** 2).mean().float())


# -- 10.7 advantages -------------------------------------------------------------------------------
def test_advantages_properties():
    gen = torch.Generator().manual_seed(0)
    groups = torch.arange(6).repeat_interleave(4)
    rewards = {"a": torch.randn(24, generator=gen, dtype=torch.float64),
               "b": 3 + 2 * torch.randn(24, generator=gen, dtype=torch.float64)}
    rewards["a"][groups == 2] = 0.7  # a prompt whose samples all score the same...
    rewards["b"][groups == 2] = 1.3  # ...on every reward: advantage exactly 0
    for name, r in rewards.items():
        _, a_k = R.advantages({name: r}, groups)
        for g in range(6):
            assert abs(float(a_k[groups == g].sum())) < 1e-9
    adv, pre = R.advantages(rewards, groups)
    assert abs(float(adv.mean())) < 1e-9
    assert float(adv.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    assert torch.equal(pre[groups == 2], torch.zeros(4, dtype=torch.float64))
    assert (pre[groups != 2] != 0).all()
    scaled = R.advantages({"a": rewards["a"] * 5}, groups)[1]  # global std: scale invariant
    torch.testing.assert_close(scaled, R.advantages({"a": rewards["a"]}, groups)[1], atol=1e-4, rtol=1e-3)


def test_zero_advantage_samples_never_reach_the_loss(toy):
    def reward(images, metas):  # the first prompt of the epoch gets a constant reward
        r = toy_reward(images, metas)
        first = [m["prompt"] == metas[0]["prompt"] for m in metas]
        return torch.where(torch.tensor(first), torch.zeros_like(r), r)

    method = make_stage2(toy("sd3"), "sd3", reward=reward, prompts_per_epoch=2, group_size=2,
                         batch=4)
    ep = method.sample_epoch()
    dropped = ~ep.keep
    assert dropped.sum() == 2 and ep.keep.sum() == 2
    for x in ep.xs:
        x[dropped] = float("nan")  # anything from a dropped sample would poison the loss
    for lp in ep.logp:
        lp[dropped] = float("nan")
    loss, stats = method.generator_loss(ep)
    assert torch.isfinite(loss) and stats["kept"] == 0.5


# -- 10.8 shared noise -----------------------------------------------------------------------------
def test_shared_noise_identical_across_group_and_ranks(toy):
    """One prompt, K = 4 images over 2 ranks: non-selected steps share noise, the rest differ."""
    sd3 = toy("sd3")
    ranks = [make_stage2(sd3, "sd3", rank=r, world_size=2, prompts_per_epoch=1, group_size=4)
             for r in (0, 1)]
    for m in ranks:
        m.ctx.step = 7
    rows = [m.epoch_prompts() for m in ranks]
    assert rows[0][0][0]["prompt"] == rows[1][0][0]["prompt"]  # one group, spread over ranks
    assert torch.equal(rows[0][2], rows[1][2])
    selected = [sorted(torch.randperm(3, generator=m.ctx.shared_gen("selected"))[:2].tolist())
                for m in ranks]
    assert selected[0] == selected[1]
    like = torch.zeros(2, *sd3.latent_shape)
    noise = [m.rollout_noise(r[0], [0, 2], "roll0") for m, r in zip(ranks, rows)]
    shared = [n(1, like) for n in noise]  # step 1: outside S = {0, 2} and not the last
    local = [n(2, like) for n in noise]   # a selected step
    for noise in shared:
        assert torch.equal(noise[0], noise[1])  # group members on one rank
    assert torch.equal(shared[0], shared[1])   # and across ranks
    assert not torch.equal(local[0][0], local[0][1]) and not torch.equal(local[0], local[1])
    z = [m.ctx.randn(like.shape, "roll0/z") for m in ranks]  # the initial noise differs
    assert not torch.equal(z[0][0], z[0][1]) and not torch.equal(z[0], z[1])
    other = prompt_noise(["another prompt"], like.shape[1:], "rtdmd/shared/step1/epoch7")
    assert not torch.equal(other[0], shared[0][0])
    later = prompt_noise([rows[0][0][0]["prompt"]], like.shape[1:], "rtdmd/shared/step1/epoch8")
    assert not torch.equal(later[0], shared[0][0])  # a new epoch, new noise


# -- the method: schedule, times, presets, both stages ---------------------------------------------
def test_plan_times_and_presets(toy):
    method = make(toy("sd3"), "sd3")
    plans = [method.plan(i) for i in range(20)]
    assert plans[9] == plans[19] == ["critic", "generator"]
    assert all(p == ["critic"] for i, p in enumerate(plans) if i not in (9, 19))
    for s in (0.0, 0.5, 0.75):
        t = method.renoise_t(s, 64, "t")
        assert float(t.min()) >= max(s + 0.01, 0.02) - 1e-6 and float(t.max()) <= 0.98 + 1e-6
    other = make(toy("sd3"), "sd3", rank=1, world_size=2)
    assert torch.equal(method.renoise_t(0.25, 8, "t"), other.renoise_t(0.25, 8, "t"))
    spec = student_spec(method)
    assert spec.grid == [1.0, 0.75, 0.5, 0.25] and spec.theta == pytest.approx(THETA)
    assert spec.guidance == 1.0 and spec.nfe == 4
    paper = make(toy("sd3"), "sd3", "rtdmd-sd3-paper", lora_rank=0, grad_checkpointing=False)
    assert paper.grid == pytest.approx([1.0, 0.9, 0.75, 0.5])
    assert (paper.opt.ema_decay, paper.opt.ema_every, paper.opt.ema_warmup) == (0.99, 1, False)
    for name in R.PRESETS:
        opt = resolve(R.RTDMDOptions, R.PRESETS, name, None, "rtdmd")
        if opt.stage == 2:
            assert (opt.ema_decay, opt.ema_every, opt.ema_warmup) == (0.9, 8, True)
    sdxl = make(toy("sdxl"), "sdxl", "toy")
    k = VP.k_of_t(sdxl.renoise_t(249 / 999, 32, "t"))
    assert int(k.min()) >= 259 and int(k.max()) <= 980
    assert [round(999 * t) for t in sdxl.grid] == [999, 749, 499, 249]


@pytest.mark.parametrize("family", ["sd3", "sit", "sdxl"])
def test_stage1_losses_reach_only_their_network(toy, family):
    method = make(toy(family), family, batch=2)
    gen_params = list(method.generator.denoiser.parameters())
    critic_params = list(method.critic.denoiser.parameters())
    loss, stats = method.loss("critic", {})
    assert torch.isfinite(loss) and {"ac", "cons"} <= set(stats)
    loss.backward()
    assert all(p.grad is None for p in gen_params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic_params)
    method.critic.denoiser.zero_grad(set_to_none=True)
    with torch.no_grad():  # a critic that differs from the teacher (zero-init heads otherwise agree)
        for p in critic_params:
            p.add_(0.05 * torch.randn_like(p))
    loss, stats = method.loss("generator", {})
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen_params)
    assert all(p.grad is None for p in critic_params)


def test_stage2_starts_from_stage1_and_trains(toy, stage1_model, tmp_path):
    folder, trainer1 = stage1_model
    ema = trainer1.emas["generator"].state_dict()
    method = make(toy("sd3"), "sd3", "toy-stage2", init_from=str(folder), steps=2,
                  prompts_per_epoch=2, group_size=2, batch=4, log_every=1)
    for key, value in method.generator.denoiser.state_dict().items():
        torch.testing.assert_close(value, ema[key])  # the stage-1 EMA, not the raw generator
    for key, value in method.critic.denoiser.state_dict().items():
        torch.testing.assert_close(value, trainer1.nets["critic"].state_dict()[key])
    assert method.plan(0) == ["critic", "generator"]
    state = Trainer(method, tmp_path / "run").run(progress=False)
    assert state.step == 2 and math.isfinite(state.last["generator/loss"])
    assert {"generator/ppo", "generator/bp", "generator/dm", "critic/ac"} <= set(state.last)


def test_stage2_errors_are_clear(toy, tmp_path):
    with pytest.raises(FewstepError, match="init_from"):
        make(toy("sd3"), "sd3", "toy-stage2")
    with pytest.raises(FewstepError, match="needs a reward"):
        make(toy("sd3"), "sd3", "toy-stage2", reward=None)
    with pytest.raises(FewstepError, match="stage: 3 is not one of 1, 2"):
        make(toy("sd3"), "sd3", stage=3)
