import math

import pytest
import torch

from fewstep.schedule import (DiscreteVPSchedule, FlowSchedule, TimeSampler, draw_times,
                              sampling_grid, shift)

SDXL_SCHED = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "num_train_timesteps": 1000}


def test_vp_endpoints_match_sdxl_spec():
    s = DiscreteVPSchedule.from_scheduler_config(SDXL_SCHED)
    # fewstep/notes/conventions.md sec. 4: abar_0 = 0.99915, abar_999 ~ 0.00466
    assert s.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=1e-6)
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.00466, abs=2e-5)
    assert s.k_of_t(torch.tensor(1.0)).item() == 999
    assert s.alpha(torch.tensor(0.5)) ** 2 + s.sigma(torch.tensor(0.5)) ** 2 == pytest.approx(1.0)


@pytest.mark.parametrize("sched", [FlowSchedule(), DiscreteVPSchedule.from_scheduler_config(SDXL_SCHED)])
def test_add_noise_and_inverses_roundtrip(sched):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    if sched.kind != "flow":
        t = sched.t_of_k(sched.k_of_t(t))
    x_t = sched.add_noise(x0, eps, t)
    torch.testing.assert_close(sched.x0_from_eps(x_t, eps, t), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sched.eps_from_x0(x_t, x0, t), eps, atol=1e-4, rtol=1e-4)


def test_flow_native_conversions():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9])
    x_t = FlowSchedule().add_noise(x0, eps, t)
    torch.testing.assert_close(FlowSchedule.x0_from_v(x_t, eps - x0, t), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(FlowSchedule.x0_from_sit_u(x_t, x0 - eps, t), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(FlowSchedule.v_from_x0(x_t, x0, t), eps - x0, atol=1e-5, rtol=0)


def test_ddim_step_is_euler_on_flow():
    g = torch.Generator().manual_seed(2)
    x_t, x0 = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    t, t_next = torch.tensor(0.8), torch.tensor(0.55)
    v = FlowSchedule.v_from_x0(x_t, x0, t)
    torch.testing.assert_close(FlowSchedule().ddim_step(x_t, x0, t, t_next), x_t + (t_next - t) * v,
                               atol=1e-5, rtol=0)


def test_shift_and_samplers():
    assert shift(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    assert shift(torch.tensor(0.3), 1.0).item() == pytest.approx(0.3)
    g = torch.Generator().manual_seed(0)
    u = TimeSampler("uniform", lo=0.02, hi=0.98).sample(10000, g)
    assert u.min() >= 0.02 and u.max() <= 0.98
    ln = TimeSampler("logit_normal").sample(10000, g)
    assert abs(ln.median().item() - 0.5) < 0.02
    k = (TimeSampler("grid", lo=0.02, hi=0.98).sample(20000, g) * 999).round()
    # DMD2's integer range rule: floor(0.02 T) = 20 .. floor(0.98 T) = 980 inclusive
    assert k.min().item() == 20 and k.max().item() == 980
    with pytest.raises(ValueError, match="time sampler kind"):
        TimeSampler("beta")


def test_sampling_grids():
    flow = sampling_grid(4, "flow")
    assert flow.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    vp = sampling_grid(4, "vp-discrete")
    assert [round(v * 999) for v in vp.tolist()] == [999, 749, 499, 249, 0]
    assert len(sampling_grid(32, "vp-discrete")) == 33
    assert math.isclose(sampling_grid(1, "flow", shift_s=3.0)[0].item(), 1.0)
    with pytest.raises(ValueError, match="at least one step"):
        sampling_grid(0)


SCHEDULES = [FlowSchedule(), DiscreteVPSchedule.from_scheduler_config(SDXL_SCHED)]


@pytest.mark.parametrize("sched", SCHEDULES, ids=["flow", "vp"])
def test_level_is_exactly_clean_at_zero_and_the_kernel_composes(sched):
    alpha, sigma = sched.level(torch.tensor([0.0, 0.5]))
    assert alpha[0] == 1.0 and sigma[0] == 0.0  # also on VP, whose k = 0 is slightly noisy
    assert alpha.dtype == torch.float64
    s, t = torch.tensor([0.0, 0.25, 0.5]), torch.tensor([0.5, 0.5, 0.75])
    a, sigma_ts, alpha_t, sigma_t = sched.kernel(s, t)
    alpha_s, sigma_s = sched.level(s)
    torch.testing.assert_close(a, alpha_t / alpha_s)
    torch.testing.assert_close(a ** 2 * sigma_s ** 2 + sigma_ts ** 2, sigma_t ** 2)


@pytest.mark.parametrize("sched", SCHEDULES, ids=["flow", "vp"])
def test_ddim_step_and_kernel_step_agree_to_float32_rounding(sched):
    """The engine's ddim_step and the float64 cps_step are one step in two roundings."""
    g = torch.Generator().manual_seed(0)
    x, x0, xi = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    t, t_next = torch.tensor([1.0, 0.75, 0.5]), torch.tensor([0.75, 0.5, 0.25])
    for theta in (0.0, 0.9 * math.pi / 2, math.pi / 2):
        engine = sched.ddim_step(x, x0, t, t_next, xi, theta)
        kernel = sched.cps_step(x, x0, t, t_next, xi, theta)
        torch.testing.assert_close(engine, kernel, rtol=1e-6, atol=1e-6)
        mean = sched.cps_mean(x, x0, t, t_next, theta)
        assert torch.equal(sched.cps_step(x, x0, t, t_next, xi, theta, mean=mean), kernel)
    # the kernel step lands exactly on x0 at t = 0, on every family
    assert torch.equal(sched.cps_step(x, x0, t, torch.zeros(3), xi, 0.9 * math.pi / 2), x0)


def test_steps_earlier_counts_training_timesteps():
    flow, vp = SCHEDULES
    delta = torch.tensor([1, 100, 900])
    t = torch.tensor([0.5, 0.5, 0.5])
    torch.testing.assert_close(flow.steps_earlier(t, delta), torch.tensor([0.499, 0.4, 0.0]))
    k = vp.k_of_t(vp.steps_earlier(vp.t_of_k(torch.tensor([500, 500, 500])).float(), delta))
    assert k.tolist() == [499, 400, 0]


class Draws:
    """The two draws of a run context: uniform and randint from named streams."""

    def __init__(self):
        self.device, self.calls = torch.device("cpu"), []

    def uniform(self, n, low, high, stream, shared=False):
        self.calls.append(("uniform", low, high, stream, shared))
        g = torch.Generator().manual_seed(len(stream))
        return low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)

    def randint(self, low, high, n, stream, shared=False):
        self.calls.append(("randint", low, high, stream, shared))
        return torch.randint(low, high + 1, (n,), generator=torch.Generator().manual_seed(1))


def test_draw_times_bounds_grids_and_streams():
    ctx = Draws()
    bound = torch.tensor([1.0, 0.5, 0.1, 0.01] * 50, dtype=torch.float64)
    t = draw_times(ctx, 200, "a", 0.0, 1.0, (0.02, 0.98), bound=bound)
    assert t.dtype == torch.float32 and t.min() >= 0.02 and t.max() <= 0.98
    assert bool((t.double() <= bound.clamp_min(0.02) + 1e-7).all())
    steps = draw_times(ctx, 200, "b", 510.0, 1000.0, (20, 980), unit=1000.0, shared=True)
    assert steps.min() >= 0.51 and steps.max() <= 0.98
    k = draw_times(ctx, 200, "c", 0.0, 1.0, (0.02, 0.98), grid=1000) * 999
    assert torch.equal(k, k.round()) and k.min() >= 20 and k.max() <= 980
    k = draw_times(ctx, 200, "d", 259, 999, (20, 980), grid=1000, integers=True) * 999
    assert k.round().min() >= 259 and k.round().max() <= 980
    assert ctx.calls == [("uniform", 0.0, 1.0, "a", False), ("uniform", 510.0, 1000.0, "b", True),
                         ("uniform", 0.0, 1.0, "c", False), ("randint", 259, 999, "d", False)]
