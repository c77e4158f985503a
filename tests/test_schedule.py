import math

import pytest
import torch

from fewstep.schedule import (DiscreteVPSchedule, FlowSchedule, TimeSampler, sampling_grid,
                              shift)

SDXL_SCHED = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "num_train_timesteps": 1000}


def test_vp_endpoints_match_sdxl_spec():
    s = DiscreteVPSchedule.from_scheduler_config(SDXL_SCHED)
    # shared spec README section 4: abar_0 = 0.99915, abar_999 ~ 0.00466
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
