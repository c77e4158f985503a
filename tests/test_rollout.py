"""The shared generator rollout (fewstep/engine/rollout.py) and the small core helpers the
methods share: tie-zeroed group advantages, prompt-keyed noise, the all-gather, the EMA lerp."""
import math

import pytest
import torch

from fewstep import losses
from fewstep.engine.distributed import all_gather
from fewstep.engine.loop import ema_update, lerp_toward
from fewstep.engine.rollout import rollout
from fewstep.noise import prompt_noise
from fewstep.schedule import FlowSchedule

THETA = 0.9 * math.pi / 2
GRID = [1.0, 0.75, 0.5, 0.25, 0.0]


class Generator:
    """x0 = w x: one parameter, and a log of whether each call could take gradient."""

    def __init__(self):
        self.schedule = FlowSchedule()
        self.w = torch.tensor(0.5, requires_grad=True)
        self.grad_modes = []

    def x0(self, x, t, cond):
        self.grad_modes.append(torch.is_grad_enabled())
        return self.w * x


def noise_of(seed):
    return lambda i, x: torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + i))


def test_ddim_rollout_is_the_engine_step_loop_and_stop0_is_z():
    gen, z = Generator(), torch.randn(2, 3, 4, 4)
    assert rollout(gen, z, None, GRID, 0).x is z
    x = z
    with torch.no_grad():
        for i in range(3):
            t, t_next = torch.full((2,), GRID[i]), torch.full((2,), GRID[i + 1])
            x = gen.schedule.ddim_step(x, gen.x0(x, t, None), t, t_next, noise_of(7)(i, x), THETA)
    assert torch.equal(rollout(gen, z, None, GRID, 3, noise_of(7), theta=THETA).x, x)


def test_gradient_only_on_the_last_step_and_last_step_rule():
    gen, z = Generator(), torch.randn(2, 3, 4, 4)
    run = rollout(gen, z, None, GRID, 3, noise_of(1), theta=THETA, last_step="kernel", grad=True)
    assert gen.grad_modes == [False, False, True] and run.x.requires_grad
    warm = rollout(gen, z, None, GRID, 2, noise_of(1), theta=THETA).x
    t, t_next = torch.full((2,), GRID[2]), torch.full((2,), GRID[3])
    with torch.no_grad():
        last = gen.schedule.cps_step(warm, gen.x0(warm, t, None), t, t_next, noise_of(1)(2, warm), THETA)
    assert torch.equal(run.x.detach(), last)


def test_recorded_states_means_and_visits():
    gen, z = Generator(), torch.randn(2, 3, 4, 4)
    seen = []
    run = rollout(gen, z, None, GRID, 4, noise_of(3), theta=THETA, step="kernel", record=True,
                  visit=lambda i, x, x0, t: seen.append((i, float(t[0]))))
    assert seen == [(i, GRID[i]) for i in range(4)]
    assert len(run.states) == 5 and run.states[0] is z and run.states[-1] is run.x
    assert len(run.means) == 4 and run.means[0].dtype == torch.float64
    logp = [gen.schedule.cps_logprob(x, m) for x, m in zip(run.states[1:], run.means)]
    assert torch.equal(logp[-1], torch.zeros(2, dtype=torch.float64))  # t = 0: no noise
    assert (logp[0] < 0).all()
    with pytest.raises(ValueError, match="rollout step"):
        rollout(gen, z, None, GRID, 1, step="euler")


def test_group_advantages_zero_ties_exactly():
    r = torch.tensor([0.1, 0.1, 0.1, 1.0, 2.0, 4.0], dtype=torch.float64) / 3
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    plain = losses.group_advantages(r, groups, std="global")
    tied = losses.group_advantages(r, groups, std="global", zero_ties=True)
    assert torch.equal(tied[:3], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(tied[3:], plain[3:])
    with pytest.raises(ValueError, match="std"):
        losses.group_advantages(r, groups, std="batch")


def test_prompt_noise_keyed_by_prompt_and_stream():
    a = prompt_noise(["a cat", "a dog", "a cat"], (2, 3), "s")
    assert torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])
    assert torch.equal(prompt_noise(["a cat"], (2, 3), "s")[0], a[0])  # order-free
    assert not torch.equal(prompt_noise(["a cat"], (2, 3), "t")[0], a[0])
    assert not torch.equal(prompt_noise(["a cat"], (2, 3), "s", seed=1)[0], a[0])


def test_all_gather_on_one_process_is_the_identity():
    x = torch.arange(3.0)
    assert all_gather(x, 1) is x


def test_lerp_toward_floats_only_and_ema_copies_the_rest():
    target, source = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        source.weight.fill_(3.0)
        source.num_batches_tracked.fill_(5)
    lerp_toward(target, source.state_dict(), 0.75, copy_others=False)
    assert torch.equal(target.weight, torch.full((2,), 1.5))  # 1 + (3 - 1) / 4
    assert int(target.num_batches_tracked) == 0
    ema_update(target, source, 0.75)
    assert torch.equal(target.weight, torch.full((2,), 1.875)) and int(target.num_batches_tracked) == 5
