"""Two-sided bootstrap p-values of H0 difference = 0, read from the same bootstrap draws that give
the interval (percentile inversion; bootstrap-t for the studentized interval; BCa inversion)."""
import numpy as np
import pytest

from metrics.base import MetricResult, PerImageMetric, paired_summary
from metrics.stats import (bootstrap, bootstrap_p_value, cluster_mean_ci, group_indices,
                           paired_difference_ci)

R = 199


def _paired(rng, n_prompts=20, seeds=2, shift=0.0):
    """Per-sample differences A - B with a shared prompt effect cancelled and a mean `shift`."""
    effect = rng.normal(0, 1.0, n_prompts)
    diffs = shift + np.repeat(effect, seeds) * 0.3 + rng.normal(0, 1.0, n_prompts * seeds)
    prompts = [f"p{i}" for i in np.repeat(np.arange(n_prompts), seeds)]
    return diffs, prompts


def test_formula_counts_the_smaller_tail():
    values = np.array([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0])
    # #{v <= 0} = 3, #{v >= 0} = 5: p = 2 (1 + 3) / 8
    assert bootstrap_p_value(values) == pytest.approx(1.0)
    assert bootstrap_p_value(values + 10) == pytest.approx(2 / 8)
    assert bootstrap_p_value(np.array([-1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0])) == pytest.approx(4 / 8)


@pytest.mark.parametrize("method", ["percentile", "bca", "studentized"])
def test_far_from_zero_gives_the_smallest_p(method):
    diffs, prompts = _paired(np.random.default_rng(0), shift=5.0)
    ci = cluster_mean_ci(diffs, prompts, n_resamples=R, seed=1, method=method)
    assert ci.p_value == pytest.approx(2 / (R + 1))


@pytest.mark.parametrize("method", ["percentile", "bca", "studentized"])
def test_identical_sets_give_p_one(method):
    ci = cluster_mean_ci(np.zeros(40), [f"p{i // 2}" for i in range(40)], n_resamples=R,
                         method=method)
    assert ci.p_value == 1.0


def test_set_statistic_difference_and_recentred_draws():
    diffs, prompts = _paired(np.random.default_rng(2), shift=5.0)
    _, groups = group_indices(prompts)
    assert bootstrap(lambda i: diffs[i].mean(), groups, n_resamples=R).p_value == \
        pytest.approx(2 / (R + 1))
    assert bootstrap(lambda i: 0.0, groups, n_resamples=R).p_value == 1.0
    # recentred: the p-value reads the shifted draws (median on the estimate), not the raw ones
    biased = bootstrap(lambda i: diffs[i].mean() - 0.35 * (len(i) - len(np.unique(i))), groups,
                       n_resamples=R, recentre=True)
    raw = bootstrap(lambda i: diffs[i].mean() - 0.35 * (len(i) - len(np.unique(i))), groups,
                    n_resamples=R)
    assert biased.p_value == pytest.approx(2 / (R + 1)) and raw.p_value > 0.2


@pytest.mark.parametrize("method", ["percentile", "bca", "studentized"])
def test_rejection_rate_under_the_null(method):
    """Simulated null (mean difference 0): a 5 % test rejects about 5 % of the time."""
    rng = np.random.default_rng(7)
    reps = 300
    rejected = sum(cluster_mean_ci(*_paired(rng), n_resamples=R, seed=r, method=method).p_value
                   <= 0.05 for r in range(reps))
    assert 0.015 <= rejected / reps <= 0.11, rejected / reps


def test_p_value_agrees_with_the_interval():
    """0 outside the 95 % percentile interval <=> p < 0.05, up to the +1 of the p-value's count."""
    rng = np.random.default_rng(11)
    for r in range(60):
        ci = cluster_mean_ci(*_paired(rng, shift=0.4), n_resamples=999, seed=r)
        if ci.low > 0.01 or ci.high < -0.01:
            assert ci.p_value <= 0.06
        if ci.low < -0.01 < 0.01 < ci.high:
            assert ci.p_value >= 0.04


def test_interval_numbers_do_not_move():
    diffs, prompts = _paired(np.random.default_rng(3))
    ci = cluster_mean_ci(diffs, prompts, n_resamples=R, seed=4)
    rng = np.random.default_rng(4)
    _, groups = group_indices(prompts)
    counts = np.zeros((R, len(groups)), dtype=np.int64)
    draws = rng.integers(0, len(groups), size=(R, len(groups)))
    for r in range(R):
        counts[r] = np.bincount(draws[r], minlength=len(groups))
    sums = np.array([diffs[g].sum() for g in groups])
    means = (counts @ sums) / (counts @ np.array([len(g) for g in groups], dtype=float))
    assert (ci.low, ci.high) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), rel=1e-12)
    assert ci.p_value == bootstrap_p_value(means)


def test_paired_difference_ci_and_summary_carry_p():
    diffs, prompts = _paired(np.random.default_rng(5), shift=5.0)
    keys = [(p, i % 2) for i, p in enumerate(prompts)]
    ci = paired_difference_ci(diffs, keys, np.zeros(len(diffs)), keys, n_resamples=R)
    assert ci.p_value == pytest.approx(2 / (R + 1))
    assert paired_summary(ci, True)["p_value"] == ci.p_value


class Plain(PerImageMetric):
    name = "plain"
    version = "1"


def _result(scores, prompts):
    rows = [{"prompt_id": p, "seed": i % 2, "score": float(s)}
            for i, (p, s) in enumerate(zip(prompts, scores))]
    return MetricResult("plain", "1", True, float(np.mean(scores)), float(np.min(scores)),
                        float(np.max(scores)), len(rows), rows, {"metric": "plain"})


def test_metric_paired_difference_has_p_value():
    diffs, prompts = _paired(np.random.default_rng(6), shift=5.0)
    metric = Plain(n_resamples=R)
    out = metric.paired_difference(_result(diffs, prompts), _result(np.zeros(len(diffs)), prompts))
    assert out["p_value"] == pytest.approx(2 / (R + 1))
    same = metric.paired_difference(_result(diffs, prompts), _result(diffs, prompts))
    assert same["p_value"] == 1.0



def test_holm_on_bootstrap_p_values_controls_the_family_wise_error():
    """Ten true nulls: raw bootstrap p-values reject at least one far more often than 5 %; Holm's
    adjustment (metrics.multiplicity) of the same p-values about 5 % of the time or less, so the
    p-values are valid at the small levels Holm tests them at (alpha / m). The smallest bootstrap
    p-value is 2 / (R + 1), so Holm can reject anything only when m * 2 / (R + 1) <= alpha: 999
    resamples here (10 * 0.002 = 0.02). Measured (200 families, 60 prompts): Holm family-wise
    error 0.06 percentile, 0.04 studentized, 0.075 BCa; with 20 prompts 0.095, 0.04, 0.135 (the
    percentile tails are thin with few prompts)."""
    from metrics.multiplicity import holm

    rng = np.random.default_rng(9)
    reps, raw_any, holm_any = 150, 0, 0
    for r in range(reps):
        p = [cluster_mean_ci(*_paired(rng, n_prompts=60), n_resamples=999, seed=10 * r + j).p_value
             for j in range(10)]
        raw_any += min(p) <= 0.05
        holm_any += min(holm(p)) <= 0.05
    assert raw_any / reps > 0.2 and holm_any / reps <= 0.1, (raw_any / reps, holm_any / reps)
    far = [cluster_mean_ci(*_paired(rng, shift=5.0), n_resamples=999, seed=j).p_value
           for j in range(10)]
    assert max(holm(far)) <= 0.05          # with enough resamples Holm still rejects real effects
