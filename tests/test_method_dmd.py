"""DMD and DMD2 fidelity: the "Checks a faithful implementation passes" of methods/notes/dmd.md and
methods/notes/dmd2.md.

Sections (sec. N) are those of methods/notes/dmd.md.
"""
import math

import pytest
import torch

from fewstep import losses
from fewstep.engine.distributed import DistInfo
from fewstep.engine.gan import DiscriminatorHead
from fewstep.engine.loop import Trainer
from fewstep.engine.method import student_spec
from fewstep.engine.run import build_method, toy_context
from fewstep.errors import FewstepError
from fewstep.sampling import sample_student
from fewstep.toy import teachers

RES = 16


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    return {f: teachers.build(f, resolution=RES, seed=0) for f in ("sdxl", "sd3", "sit")}


def method(teacher, name="dmd2", **overrides):
    ctx = toy_context(teacher, teacher.family, RES, 0, DistInfo())
    opts = dict(batch=2, warmup=1, teacher_guidance=1.0, checkpoint_every=1000)
    if name == "dmd":
        opts["lambda_reg"] = 0.0
    opts.update(overrides)
    return build_method(name, teacher, ctx, "toy", opts)


def grads(module):
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in module.named_parameters()}


# sec. 10 item 1 / methods/notes/dmd2.md sec. 10 item 1
@pytest.mark.parametrize("family", ["sdxl", "sd3", "sit"])
def test_zero_dm_gradient_at_equilibrium(built, family):
    m = method(built[family], "dmd", generator_grid=[1.0])
    x = torch.randn(3, *m.teacher.latent_shape, requires_grad=True)
    cond = m.teacher.encode([0, 1, 2] if family == "sit" else ["a red circle"] * 3)
    loss, _ = m.dm_loss(x, cond)
    loss.backward()
    assert torch.count_nonzero(x.grad) == 0


# sec. 10 item 2
def test_surrogate_gradient_is_g_over_n():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    losses.dm_surrogate(x, g).backward()
    assert torch.allclose(x.grad, g / x.numel(), atol=1e-15)


# sec. 10 item 3
def test_normaliser_is_per_sample():
    x, p_t, p_f = (torch.randn(2, 3, 4, 4, dtype=torch.float64) for _ in range(3))
    both = losses.dm_gradient(x, p_t, p_f)
    for i in range(2):
        alone = losses.dm_gradient(x[i:i + 1], p_t[i:i + 1], p_f[i:i + 1])
        assert torch.allclose(both[i:i + 1], alone)
    scaled_x = x.clone()
    scaled_x[0] = p_t[0] + 3.0 * (x[0] - p_t[0])  # residual of sample 0 times 3
    scaled = losses.dm_gradient(scaled_x, p_t, p_f)
    assert torch.allclose(scaled[0], both[0] / 3.0) and torch.allclose(scaled[1], both[1])


def test_nonfinite_entries_are_zeroed():
    x = torch.zeros(1, 1, 2, 2)
    g = losses.dm_gradient(x, torch.zeros_like(x), torch.ones_like(x))  # normaliser 0
    assert torch.count_nonzero(g) == 0


# sec. 10 item 4 / methods/notes/dmd2.md sec. 10 item 8: guidance in x0 space equals native-space guidance (eps, v, SiT u)
@pytest.mark.parametrize("family", ["sdxl", "sd3", "sit"])
def test_x0_guidance_equals_native_guidance(built, family):
    bb = built[family]
    x = torch.randn(2, *bb.latent_shape)
    t = torch.full((2,), 0.6)
    cond = bb.encode([1, 2] if family == "sit" else ["a red circle", "two blue squares"])
    with torch.no_grad():
        o_c, o_u = bb.native(x, t, cond), bb.native(x, t, bb.null(cond))
        native = bb.x0_from_native(x.double(), t, (o_u + 4.0 * (o_c - o_u)).double())
        ours = bb.x0(x, t, cond, guidance=4.0)
    assert torch.allclose(ours.double(), native, atol=1e-4)


# sec. 10 item 5
def test_generator_step_changes_only_generator_and_critic_step_only_critic(built, tmp_path):
    m = method(built["sit"], "dmd", teacher_guidance=2.0, lr=1e-3)
    trainer = Trainer(m, tmp_path)
    snap = lambda: {n: {k: v.clone() for k, v in mod.state_dict().items()} for n, mod in trainer.nets.items()}
    teacher_before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    scratch, before = {}, snap()
    m.ctx.step = 0
    trainer.update("generator", scratch)
    after_gen = snap()
    assert any(not torch.equal(before["generator"][k], after_gen["generator"][k]) for k in before["generator"])
    assert all(torch.equal(before["critic"][k], after_gen["critic"][k]) for k in before["critic"])
    trainer.update("critic", scratch)
    after_critic = snap()
    assert all(torch.equal(after_gen["generator"][k], after_critic["generator"][k]) for k in before["generator"])
    assert any(not torch.equal(after_gen["critic"][k], after_critic["critic"][k]) for k in before["critic"])
    assert all(torch.equal(v, m.teacher.state_dict()[k]) for k, v in teacher_before.items())


# sec. 10 item 6
def test_sdxl_timestep_ranges(built):
    m = method(built["sdxl"], "dmd")
    sched = m.teacher.schedule
    k_dm = sched.k_of_t(m.dm_times.sample(100_000, torch.Generator().manual_seed(0)))
    k_critic = sched.k_of_t(m.critic_times.sample(100_000, torch.Generator().manual_seed(1)))
    assert int(k_dm.min()) == 20 and int(k_dm.max()) == 980
    assert set(k_critic.tolist()) == set(range(1000))


# sec. 10 item 7
def test_regression_is_zero_when_generator_reproduces_pairs(built, tmp_path):
    from safetensors.torch import save_file

    from fewstep.io import write_json
    from fewstep.toy import world

    bb = built["sdxl"]
    metas = world.prompt_set("train", n=4, seed=1)
    z = torch.randn(4, *bb.latent_shape)
    y = torch.randn(4, *bb.latent_shape)
    save_file({"z": z, "y": y, "prompt_index": torch.arange(4)}, str(tmp_path / "p.safetensors"))
    write_json(tmp_path / "p.json", {"metas": metas, "guidance": 3.0})
    with pytest.raises(FewstepError, match="sampled with guidance 3.0 but the DM teacher uses 1.0"):
        method(bb, "dmd", lambda_reg=0.25, pairs=str(tmp_path / "p.safetensors"))
    m = method(bb, "dmd", lambda_reg=0.25, pairs=str(tmp_path / "p.safetensors"), teacher_guidance=3.0)
    z_ref, y_ref, c_ref = m.pairs.draw(3, torch.Generator().manual_seed(0), "cpu")
    rows = [int(torch.nonzero((z == zr).all(dim=(1, 2, 3)))[0]) for zr in z_ref]
    assert torch.equal(y_ref, y[rows])  # the noise is paired with its own teacher sample
    assert float(m.regression(y_ref, y_ref)) == 0.0
    assert float(m.regression(y_ref + 0.5, y_ref)) > 0.0


# sec. 10 item 8 / methods/notes/dmd2.md sec. 10 item 3
@pytest.mark.parametrize("family", ["sdxl", "sit"])
def test_dmd_without_regression_equals_dmd2_without_gan_at_ratio_one(built, family):
    common = dict(teacher_guidance=2.0, generator_grid=[1.0])
    dmd = method(built[family], "dmd", concat_pairs_in_dm=False, **common)
    dmd2 = method(built[family], "dmd2", ttur_ratio=1, gan_w_G=0.0, gan_w_D=0.0, backsim=False, **common)
    assert dmd.plan(3) == dmd2.plan(3) == ["generator", "critic"]
    s1, s2 = {}, {}
    for m in (dmd, dmd2):
        m.ctx.step = 3
    for net in ("generator", "critic"):
        l1, _ = dmd.loss(net, s1)
        l2, _ = dmd2.loss(net, s2)
        assert torch.equal(l1, l2), net
        p1 = [p for p in dmd.networks()[net].parameters() if p.requires_grad]
        p2 = [p for p in dmd2.networks()[net].parameters() if p.requires_grad]
        for a, b in zip(torch.autograd.grad(l1, p1), torch.autograd.grad(l2, p2)):
            assert torch.equal(a, b)


# methods/notes/dmd2.md sec. 10 item 4
def test_backward_simulation(built):
    m = method(built["sd3"], "dmd2", generator_grid=[1.0, 0.75, 0.5, 0.25])
    m.ctx.step = 0
    z = torch.randn(2, *m.teacher.latent_shape)
    cond = m.teacher.encode(["a red circle"] * 2)
    seen = []
    original = m.generator.x0

    def spy(x, t, c, guidance=1.0):
        seen.append((x.clone(), float(t[0]), torch.is_grad_enabled()))
        return original(x, t, c, guidance)

    m.generator.x0 = spy
    m.generate(z, cond, grad=True, stop=0)
    assert torch.equal(seen[0][0], z) and seen[0][1] == 1.0
    seen.clear()
    x_hat = m.generate(z, cond, grad=True, stop=2)
    assert [g for _, _, g in seen] == [False, False, True]  # rollout without gradient, last call with
    assert [round(t, 4) for _, t, _ in seen] == [1.0, 0.75, 0.5]
    assert x_hat.requires_grad
    # the stop index is drawn from the rank-synchronised stream: equal on every rank
    other = toy_context(m.teacher, "sd3", RES, 0, DistInfo(rank=1, world_size=2))
    for step in range(5):
        m.ctx.step = other.step = step
        assert torch.equal(m.ctx.randint(0, 3, 1, "stop", shared=True), other.randint(0, 3, 1, "stop", shared=True))


# methods/notes/dmd2.md sec. 10 item 5
def test_discriminator_loss_trains_head_and_critic_not_generator(built):
    m = method(built["sit"], "dmd2", generator_grid=[1.0], backsim=False, teacher_guidance=2.0)
    m.ctx.step = 0
    x, batch = m.sample(grad=True)[:2]
    real, real_batch = m.ctx.real(2)
    loss_d = losses.gan_discriminator_loss(m.logits(x.detach(), batch.cond, "f"),
                                           m.logits(real, real_batch.cond, "r"))
    gen = list(m.networks()["generator"].parameters())
    head = list(m.head.parameters())
    critic = [p for p in m.critic.denoiser.parameters()]
    assert all(g is None for g in torch.autograd.grad(loss_d, gen, allow_unused=True, retain_graph=True))
    assert all(g is not None for g in torch.autograd.grad(loss_d, head, retain_graph=True))
    assert any(g is not None and g.abs().sum() > 0
               for g in torch.autograd.grad(loss_d, critic, allow_unused=True))  # the encoder learns


def test_engine_applies_gan_generator_loss_to_generator_only(built, tmp_path):
    m = method(built["sit"], "dmd2", generator_grid=[1.0], backsim=False, teacher_guidance=2.0, lr=1e-3)
    trainer = Trainer(m, tmp_path)
    m.ctx.step = 0
    trainer.update("generator", {})
    assert all(p.grad is None for p in trainer.params["critic"])


# methods/notes/dmd2.md sec. 10 item 6
def test_sdxl_four_step_sampler_visits_dmd2_timesteps(built):
    m = method(built["sdxl"], "dmd2", generator_grid=[1.0, 0.75, 0.5, 0.25])
    spec = student_spec(m)
    sched = m.teacher.schedule
    assert sched.k_of_t(torch.tensor(spec.grid)).tolist() == [999, 749, 499, 249]
    assert math.isclose(spec.theta, math.pi / 2)
    visits, renoise = [], []
    gen = m.generator
    original_x0, original_step = gen.x0, gen.schedule.ddim_step
    gen.x0 = lambda x, t, c, g=1.0: (visits.append(int(sched.k_of_t(t[0]))), original_x0(x, t, c, g))[1]

    def step(x, x0, t, t_next, xi, theta):
        renoise.append(int(sched.k_of_t(t_next[0])))
        return original_step(x, x0, t, t_next, xi, theta)

    gen.schedule.ddim_step = step
    z = torch.randn(1, *gen.latent_shape)
    sample_student(gen, z, gen.encode(["a red circle"]), spec.grid, spec.theta, lambda i: torch.randn_like(z))
    gen.schedule.ddim_step = original_step
    assert visits == [999, 749, 499, 249] and renoise == [749, 499, 249]


def test_one_step_sdxl_conditioning_timestep_is_399(built):
    m = method(built["sdxl"], "dmd2", generator_grid=[0.4], backsim=False)
    assert m.teacher.schedule.k_of_t(torch.tensor(student_spec(m).grid)).tolist() == [399]


# methods/notes/dmd2.md sec. 10 item 7
@pytest.mark.parametrize("size,n_down", [(32, 3), (8, 1)])
def test_discriminator_head_shapes(size, n_down):
    head = DiscriminatorHead(1280, size)
    assert head.n_down == n_down
    assert head(torch.randn(2, 1280, size, size)).shape == (2,)
