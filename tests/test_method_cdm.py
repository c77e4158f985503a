"""CDM (methods/cdm.py) against the checks of methods/notes/cdm.md sec. 10, on tiny toy
teachers (random weights: the identities hold for any network)."""
import torch
import pytest

from fewstep import losses
from fewstep.engine.context import Context, PromptPool
from fewstep.engine.distributed import DistInfo
from fewstep.engine.loop import Trainer
from fewstep.engine.method import student_spec
from fewstep.options import resolve
from fewstep.engine.run import build_method, toy_context
from fewstep.errors import FewstepError
from fewstep.sampling import sample_student
from fewstep.schedule import FlowSchedule
from fewstep.toy import teachers
from methods import cdm

FOUR = (1.0, 0.75, 0.5, 0.25)
B = 4


@pytest.fixture(scope="module")
def sit():
    teacher = teachers.build("sit", resolution=8, seed=0)
    return teacher, toy_context(teacher, "sit", 8, 0, DistInfo(), autocast=False)


@pytest.fixture(scope="module")
def sdxl():
    teacher = teachers.build("sdxl", resolution=8, seed=0)
    return teacher, toy_context(teacher, "sdxl", 8, 0, DistInfo(), autocast=False)


def make(pair, step=3, **overrides):
    teacher, ctx = pair
    method = build_method("cdm", teacher, ctx, "toy", {"batch": B, **overrides})
    ctx.step = step
    return method


@torch.no_grad()
def perturb(module, scale=0.02, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))


def grads(loss, module):
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


# -- 10.1 reduction to on-trajectory DM ------------------------------------------------------------
def test_reduction_to_on_trajectory_dm(sit):
    """Fixed schedule = inference anchors, CA and CDM off: the student update is the DM update at
    a random anchor of the deterministic 4-step rollout, recomputed here by hand."""
    method = make(sit, fixed_schedule=FOUR, loss_weights=(0.0, 1.0, 0.0), ca_w=0.0)
    perturb(method.critic.denoiser)  # F != T, so Delta_DM is not trivially zero
    G, T, F, ctx = method.generator, method.teacher, method.critic, method.ctx
    scratch = {}
    loss, stats = method.loss("generator", scratch)
    assert set(stats) == {"loss_dm", "delta_dm"} and scratch["times"] == student_spec(method).grid

    cond = ctx.prompts(B, cdm.S_PROMPTS).cond
    z = ctx.randn((B, *T.latent_shape), cdm.S_Z)
    i = ctx.randint(0, 3, B, cdm.S_INDEX)
    grid, xs = list(FOUR), [z]
    with torch.no_grad():
        for k, t in enumerate(grid):  # Euler: x_{k+1} = x_k + (t_{k+1} - t_k) v_k
            x0 = G.x0(xs[-1], torch.full((B,), t), cond)
            v = (xs[-1] - x0) / t
            xs.append(xs[-1] + ((grid + [0.0])[k + 1] - t) * v)
        final = sample_student(G, z, cond, grid, theta=0.0)
    torch.testing.assert_close(scratch["anchor"].x_final, final, rtol=1e-5, atol=1e-5)
    x_i = torch.stack(xs)[i, torch.arange(B)]
    t_i = torch.tensor(grid)[i]
    x0_g = G.x0(x_i, t_i, cond)
    tau = ctx.uniform(B, 0.0, 1.0, cdm.S_DM + "/tau").clamp(0.02, 0.98).float()
    eps = ctx.randn_like(x0_g, cdm.S_DM + "/eps")
    col = tau.view(-1, 1, 1, 1)
    x_tau = (1 - col) * x0_g.detach() + col * eps
    with torch.no_grad():
        p_t, p_f = T.x0(x_tau, tau, cond), F.x0(x_tau, tau, cond)
    nu = ((p_t - x0_g.detach()).abs().flatten(1).mean(1) + 1e-8).clamp_min(0.1).view(-1, 1, 1, 1)
    manual = ((x0_g - (x0_g.detach() + (p_t - p_f) / nu)) ** 2).mean()
    torch.testing.assert_close(loss, manual, rtol=1e-5, atol=1e-9)
    for a, b in zip(grads(loss, G.denoiser), grads(manual, G.denoiser)):
        if a is not None:  # float32 summation order differs: tolerance relative to the gradient
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


# -- 10.2 extrapolation identities -----------------------------------------------------------------
def anchor_of(method, times):
    ctx = method.ctx
    cond = ctx.prompts(B, "t").cond
    z = ctx.randn((B, *method.teacher.latent_shape), "z")
    index = torch.arange(B) % len(times)
    return cdm.backward_simulation(method.generator, z, cond, times, index)


def test_extrapolation_identities_flow(sit):
    method = make(sit)
    a = anchor_of(method, [1.0, 0.8, 0.55, 0.3])
    sched = method.teacher.schedule
    # the off-trajectory point of branch_cdm, x' = alpha(t') x0_{i+1} + sigma(t') eps_hat_i
    offtraj_point = sched.add_noise
    torch.testing.assert_close(offtraj_point(a.x0_next, a.eps, a.t), a.x, rtol=0, atol=1e-5)
    zero = torch.zeros(B)
    assert torch.equal(offtraj_point(a.x0_next, a.eps, zero), a.x0_next)
    t_prime = torch.tensor([0.02, 0.4, 0.7, 0.98])
    euler = a.x + (t_prime - a.t).view(-1, 1, 1, 1) * (a.eps - a.x0_next)  # x_i + (t' - t_i) v_i
    torch.testing.assert_close(offtraj_point(a.x0_next, a.eps, t_prime), euler,
                               rtol=0, atol=1e-5)


def test_extrapolation_identity_discrete(sdxl):
    method = make(sdxl)
    sched = method.teacher.schedule
    times = cdm.anchor_times(sched, torch.tensor([1.0, 0.8, 0.55, 0.3], dtype=torch.float64))
    assert [round(t * 999) for t in times] == [999, 799, 549, 300]
    a = anchor_of(method, times)
    torch.testing.assert_close(sched.add_noise(a.x0_next, a.eps, a.t), a.x, rtol=0, atol=1e-4)


# -- 10.3 equilibrium ------------------------------------------------------------------------------
def test_equilibrium_fake_equals_teacher(sit):
    method = make(sit, ca_w=0.0)
    perturb(method.generator.denoiser)  # a student that is not the teacher
    method.critic.denoiser.load_state_dict(method.teacher.denoiser.state_dict())
    scratch = {}
    anchor, batch, _ = method.trajectory(scratch)
    for branch in (method.branch_dm, method.branch_cdm):
        loss, delta = branch(anchor, batch.cond)
        assert torch.count_nonzero(delta) == 0 and float(loss.detach()) == 0.0
    loss, stats = method.loss("generator", scratch)
    assert "loss_ca" not in stats and float(loss.detach()) == 0.0


# -- 10.4 effective guidance -----------------------------------------------------------------------
def test_effective_guidance_common_teacher_point(sit):
    w = 3.0
    method = make(sit, ca_w=w)
    perturb(method.critic.denoiser)
    anchor, batch, _ = method.trajectory({})
    tau = torch.tensor([0.1, 0.3, 0.6, 0.9])
    eps = torch.randn(anchor.x.shape, generator=torch.Generator().manual_seed(5))
    # force one teacher point on both branches: same tau, same noise
    method.levels = lambda n, stream, hi=1.0: tau
    method.teacher_point = lambda x0_g, t, stream: method.teacher.schedule.add_noise(x0_g.detach(), eps, t)
    _, d_ca = method.branch_ca(anchor, batch.cond)
    _, d_dm = method.branch_dm(anchor, batch.cond)
    with torch.no_grad():
        x0_g = method.generator.x0(anchor.x, anchor.t, batch.cond)
        x_tau = method.teacher.schedule.add_noise(x0_g, eps, tau)
        guided = method.teacher.x0(x_tau, tau, batch.cond, guidance=1.0 + w)
        p_c = method.teacher.x0(x_tau, tau, batch.cond)
        p_f = method.critic.x0(x_tau, tau, batch.cond)
    expected = (guided.double() - p_f.double()) / cdm.normaliser(p_c, x0_g, 0.1)
    torch.testing.assert_close(d_ca + d_dm, expected, rtol=1e-4, atol=1e-5)


# -- 10.5 schedule ---------------------------------------------------------------------------------
def plain_context(rank):
    pool = PromptPool([{"class_label": 0}], {"y": torch.zeros(1, dtype=torch.long)})
    return Context(None, pool, seed=42, rank=rank, world_size=2)


def test_schedule_sd3_bounds_and_rank_agreement():
    ranks = [plain_context(0), plain_context(1)]
    lengths = set()
    for step in range(400):
        draws = []
        for ctx in ranks:
            ctx.step = step
            draws.append(cdm.draw_fractions(ctx, (1, 28), (0.25, 0.95)))
        assert torch.equal(draws[0], draws[1])
        times = cdm.anchor_times(FlowSchedule(), draws[0], 3.0)
        assert times[0] == 1.0 and all(a >= b for a, b in zip(times, times[1:]))
        assert all(0.5 <= t <= 0.9828 for t in times[1:]), times
        lengths.add(len(times))
    assert min(lengths) == 1 and max(lengths) == 28
    assert not torch.equal(ranks[0].randn((4,), "z"), ranks[1].randn((4,), "z"))  # ranks do differ


def test_schedule_identical_across_rank_methods(sit):
    teacher, ctx = sit
    methods = []
    for rank in (0, 1):
        c = toy_context(teacher, "sit", 8, 0, DistInfo(rank=rank, world_size=2), autocast=False)
        methods.append(build_method("cdm", teacher, c, "toy", {"batch": 2}))
        c.step = 7
    times = [m.trajectory({})[2] for m in methods]
    assert times[0] == times[1] and 1 <= len(times[0]) <= 8


def test_fixed_schedule_and_preset_grids(sit, sdxl, monkeypatch):
    assert cdm.anchor_times(FlowSchedule(), torch.tensor(FOUR, dtype=torch.float64), 3.0) == \
        pytest.approx([1.0, 0.9, 0.75, 0.5])
    teacher, ctx = sit
    paper = build_method("cdm", teacher, ctx, "cdm-sd3-paper")
    assert student_spec(paper).grid == pytest.approx([1.0, 0.9, 0.75, 0.5])
    assert student_spec(paper).theta == 0.0 and student_spec(paper).guidance == 1.0
    assert student_spec(make(sit)).grid == pytest.approx(list(FOUR))
    monkeypatch.setattr(teacher, "shift", 3.0, raising=False)  # default: the teacher's own shift
    assert make(sit).shift == 3.0
    monkeypatch.undo()
    ks = [round(t * 999) for t in student_spec(build_method("cdm", sdxl[0], sdxl[1], "cdm-sdxl-ext")).grid]
    assert ks == [999, 749, 499, 249]
    for pair in (sit, sdxl):  # fixed = inference anchors reproduces the inference grid exactly
        fixed = make(pair, fixed_schedule=[1.0, 0.75, 0.5, 0.25])
        for step in range(2):
            fixed.ctx.step = step
            assert fixed.trajectory({})[2] == student_spec(fixed).grid


def test_time_draws_clamped_and_capped(sit):
    method = make(sit, t_clamp=(0.02, 0.98))
    method.ctx.step = 0
    hi = torch.tensor([1.0, 0.5, 0.3, 0.01] * 50, dtype=torch.float64)
    t = method.levels(200, "x", hi)
    assert t.min() >= 0.02 and t.max() <= 0.98 and bool((t <= hi.clamp_min(0.02) + 1e-7).all())
    method.discrete = True  # the integer-grid rule of the discrete VP family, same draws
    k = torch.round(method.levels(200, "x") * 999)
    assert k.min() >= 20 and k.max() <= 980
    k_i = torch.tensor([300.0] * 200, dtype=torch.float64)
    capped = torch.round(method.levels(200, "y", k_i / 999) * 999)
    assert capped.max() <= 300


# -- 10.6 fake-teacher merge -----------------------------------------------------------------------
def test_fake_teacher_merge_elementwise(sit):
    method = make(sit)
    perturb(method.generator.denoiser, seed=2)
    perturb(method.critic.denoiser, seed=3)
    phi = {k: v.clone() for k, v in method.critic.denoiser.state_dict().items()}
    theta = {k: v.clone() for k, v in method.generator.denoiser.state_dict().items()}
    method.after_update("generator")  # only the fake-teacher step merges
    assert all(torch.equal(v, phi[k]) for k, v in method.critic.denoiser.state_dict().items())
    method.after_update("critic")
    for k, v in method.critic.denoiser.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, 0.999 * phi[k] + 0.001 * theta[k], rtol=0, atol=1e-7)


# -- 10.7 normaliser floor and gradient ------------------------------------------------------------
def test_normaliser_floor_and_gradient():
    g = torch.Generator().manual_seed(0)
    x0_g = torch.randn(3, 2, 4, 4, generator=g, requires_grad=True)
    p_real = x0_g.detach() + 0.05 * torch.randn(3, 2, 4, 4, generator=g)  # mean |.| ~ 0.04 < 0.1
    p_fake = p_real + torch.randn(3, 2, 4, 4, generator=g)
    floor = torch.full((3,), 0.1, dtype=torch.float64)
    assert torch.equal(cdm.normaliser(p_real, x0_g, 0.1).flatten(), floor)  # exactly the floor
    far = x0_g.detach() + 1.0
    assert cdm.normaliser(far, x0_g, 0.1).flatten() == pytest.approx([1.0 + 1e-8] * 3)
    delta = cdm.dm_delta(p_real, p_fake, x0_g, 0.1)
    torch.testing.assert_close(delta, (p_real - p_fake).double() / 0.1)
    (grad,) = torch.autograd.grad(losses.displacement_loss(x0_g, delta), x0_g)
    torch.testing.assert_close(grad, (-2 * delta / x0_g.numel()).float(), rtol=1e-5, atol=1e-9)
    delta[0, 0, 0, 0] = float("nan")  # non-finite entries are set to 0
    (grad,) = torch.autograd.grad(losses.displacement_loss(x0_g, delta), x0_g)
    assert grad[0, 0, 0, 0] == 0 and torch.isfinite(grad).all()


# -- update schedule, options, and the engine loop (methods/notes/cdm.md sec. 5, 6.2) --------------
def test_plan_options_and_errors(sit):
    method = make(sit)
    assert [method.plan(s) for s in range(4)] == [["critic"], ["critic", "generator"]] * 2
    assert method.opt.ema_on == "generator_update" and method.opt.ema_every == 1
    assert method.opt.ema_warmup and method.opt.ema_decay == 0.999
    paper, sit_ext, sdxl_ext = (resolve(cdm.CDMOptions, cdm.PRESETS, p, None, "cdm")
                                for p in ("cdm-sd3-paper", "cdm-sit-ext", "cdm-sdxl-ext"))
    assert (paper.lr, paper.critic_lr, paper.grad_clip, paper.warmup) == (1e-5, 5e-6, 1.0, 100)
    assert sit_ext.ca_w == 0.0 and sdxl_ext.ca_w == 7.0
    with pytest.raises(FewstepError, match="offtraj_mode.*'fresh'.*not implemented in the harness"):
        make(sit, offtraj_mode="fresh")
    with pytest.raises(FewstepError, match="offtraj_t_sampler"):
        make(sit, offtraj_t_sampler="beta")
    with pytest.raises(FewstepError, match="fixed_schedule"):
        make(sit, fixed_schedule=[0.9, 0.5])
    with pytest.raises(FewstepError, match="unknown cdm option"):
        make(sit, ca_weight=1.0)
    assert make(sit, **{"cdm.ca.w": 0.5, "cdm.loss.weights": [1, 0, 1]}).opt.loss_weights == (1, 0, 1)


def test_trainer_iterations(sit, tmp_path):
    method = make(sit, steps=4, batch=2, schedule_len=[1, 3], checkpoint_every=100)
    before = {k: v.clone() for k, v in method.critic.denoiser.state_dict().items()}
    trainer = Trainer(method, tmp_path / "run")
    state = trainer.run(progress=False)
    assert state.step == 4 and state.ema_updates == 2 and "generator/loss_dm" in state.last
    moved = [not torch.equal(v, before[k]) for k, v in method.critic.denoiser.state_dict().items()]
    assert any(moved)
