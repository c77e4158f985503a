"""Interval methods of the cluster bootstrap (metrics/stats.py): BCa and studentized against a
direct computation, the default percentile interval unchanged, and a coverage simulation for a
skewed metric (lognormal prompt effects) at the toy world's size, 61 prompts x 8 images."""
import numpy as np
import pytest

from metrics.stats import (INTERVAL_METHODS, bca_acceleration, bootstrap, cluster_mean_ci,
                           group_indices, paired_difference_ci)

N_PROMPTS, N_IMAGES, SIGMA, NOISE_SD = 61, 8, 1.0, 1.0
N_SIMS, N_RESAMPLES = 1000, 1000
TRUE_MEAN = float(np.exp(SIGMA ** 2 / 2))       # E exp(sigma Z), Z ~ N(0, 1); the noise has mean 0


def _skewed(rng, n_prompts=N_PROMPTS, n_images=N_IMAGES):
    """Per-image scores: a lognormal prompt effect shared by a prompt's images, plus noise."""
    effect = np.exp(SIGMA * rng.normal(size=n_prompts))
    scores = np.repeat(effect, n_images) + NOISE_SD * rng.normal(size=n_prompts * n_images)
    return scores, np.repeat(np.arange(n_prompts), n_images)


@pytest.fixture(scope="module")
def coverage():
    """(coverage, share below the truth's side, share above) per method over N_SIMS seeded data
    sets; all methods read the same resamples of each data set (same bootstrap seed)."""
    rng = np.random.default_rng(20261205)
    low_miss = {m: 0 for m in INTERVAL_METHODS}
    high_miss = dict(low_miss)
    for sim in range(N_SIMS):
        scores, prompts = _skewed(rng)
        for m in INTERVAL_METHODS:
            ci = cluster_mean_ci(scores, prompts, n_resamples=N_RESAMPLES, seed=sim, method=m)
            low_miss[m] += TRUE_MEAN < ci.low
            high_miss[m] += TRUE_MEAN > ci.high
    out = {m: (1 - (low_miss[m] + high_miss[m]) / N_SIMS, low_miss[m] / N_SIMS,
               high_miss[m] / N_SIMS) for m in INTERVAL_METHODS}
    print(f"\n95 % coverage, {N_PROMPTS} prompts x {N_IMAGES} images, lognormal sigma {SIGMA}, "
          f"{N_SIMS} data sets x {N_RESAMPLES} resamples: (coverage, truth below, truth above)")
    for m, v in out.items():
        print(f"  {m:12s} {v[0]:.3f}  {v[1]:.3f}  {v[2]:.3f}")
    return out


def test_percentile_undercovers_a_skewed_mean(coverage):
    # measured 0.894: the truth lies above the interval 12x as often as below it (0.098 vs 0.008)
    cov, below, above = coverage["percentile"]
    assert cov < 0.93 and above > 3 * below, coverage


def test_bca_balances_the_tails(coverage):
    # BCa moves both ends up (z0 > 0, a > 0 for a right-skewed mean): fewer misses above, more
    # below (measured 0.030 below / 0.077 above vs the percentile's 0.008 / 0.098), but it does not
    # widen the interval, so its coverage stays near the percentile's (0.893)
    _, below, above = coverage["bca"]
    _, p_below, p_above = coverage["percentile"]
    assert below > 2 * p_below and above < p_above, coverage


def test_studentized_covers_best(coverage):
    # measured 0.919, the closest of the three to 0.95: the bootstrap-t also widens the interval
    # where the prompts drawn miss the long tail (a small se), which BCa does not
    assert coverage["studentized"][0] >= 0.91, coverage
    assert coverage["studentized"][0] > max(coverage["percentile"][0], coverage["bca"][0])


@pytest.mark.xfail(strict=True, reason="measured at 61 prompts x 8 images, lognormal sigma 1: BCa "
                   "0.893, studentized 0.919, percentile 0.894; no interval here reaches 0.93")
def test_skewed_metric_reaches_093(coverage):
    assert max(coverage["bca"][0], coverage["studentized"][0]) >= 0.93, coverage


# -- the methods against direct computations ---------------------------------------------------

def test_default_is_the_percentile_interval_unchanged():
    scores, prompts = _skewed(np.random.default_rng(0))
    default = cluster_mean_ci(scores, prompts, n_resamples=500, seed=4)
    assert default == cluster_mean_ci(scores, prompts, n_resamples=500, seed=4, method="percentile")
    assert default.method == "cluster percentile (prompts)"
    # the percentile interval, computed directly from the same prompt draws
    rng = np.random.default_rng(4)
    draws = rng.integers(0, N_PROMPTS, size=(500, N_PROMPTS))
    prompt_sums = scores.reshape(N_PROMPTS, N_IMAGES).sum(axis=1)
    means = prompt_sums[draws].sum(axis=1) / (N_PROMPTS * N_IMAGES)
    low, high = np.percentile(means, [2.5, 97.5])
    assert (default.low, default.high) == pytest.approx((low, high), rel=1e-12)


def test_bca_matches_a_direct_computation():
    scores, prompts = _skewed(np.random.default_rng(1))
    ci = cluster_mean_ci(scores, prompts, n_resamples=2000, seed=2, method="bca")
    # the same resamples, drawn directly: rows of prompt indices, one bincount per row
    rng = np.random.default_rng(2)
    draws = rng.integers(0, N_PROMPTS, size=(2000, N_PROMPTS))
    per_prompt = scores.reshape(N_PROMPTS, N_IMAGES).mean(axis=1)
    boot = per_prompt[draws].mean(axis=1)
    theta = scores.mean()
    from statistics import NormalDist
    nd = NormalDist()
    z0 = nd.inv_cdf((np.sum(boot < theta) + 0.5 * np.sum(boot == theta)) / 2000)
    loo = (per_prompt.sum() - per_prompt) / (N_PROMPTS - 1)     # equal sizes: mean of the others
    d = loo.mean() - loo
    a = np.sum(d ** 3) / (6 * np.sum(d ** 2) ** 1.5)
    assert a > 0 and z0 > 0                                        # right skew: both push upwards
    quantiles = (nd.inv_cdf(0.025), nd.inv_cdf(0.975))
    adj = [nd.cdf(z0 + (z0 + z) / (1 - a * (z0 + z))) for z in quantiles]
    low, high = np.percentile(boot, [100 * adj[0], 100 * adj[1]])
    assert (ci.low, ci.high) == pytest.approx((low, high), rel=1e-9)
    pct = cluster_mean_ci(scores, prompts, n_resamples=2000, seed=2)
    assert ci.low > pct.low and ci.high > pct.high
    assert ci.method.startswith("cluster BCa")


def test_studentized_matches_a_direct_computation():
    scores, prompts = _skewed(np.random.default_rng(5))
    ci = cluster_mean_ci(scores, prompts, n_resamples=1000, seed=6, method="studentized")
    rng = np.random.default_rng(6)
    draws = rng.integers(0, N_PROMPTS, size=(1000, N_PROMPTS))
    per_prompt = scores.reshape(N_PROMPTS, N_IMAGES).mean(axis=1)   # equal sizes: mean of means
    se = per_prompt.std(ddof=1) / np.sqrt(N_PROMPTS)
    boot = per_prompt[draws]
    t = (boot.mean(axis=1) - per_prompt.mean()) / (boot.std(axis=1, ddof=1) / np.sqrt(N_PROMPTS))
    t_low, t_high = np.percentile(t, [2.5, 97.5])
    expect = (per_prompt.mean() - t_high * se, per_prompt.mean() - t_low * se)
    assert (ci.low, ci.high) == pytest.approx(expect, rel=1e-9)


def test_generic_bootstrap_bca_equals_cluster_mean_bca():
    scores, prompts = _skewed(np.random.default_rng(3))
    _, groups = group_indices(prompts)
    a = cluster_mean_ci(scores, prompts, n_resamples=400, seed=9, method="bca")
    b = bootstrap(lambda idx: scores[idx].mean(), groups, n_resamples=400, seed=9, method="bca")
    assert (a.low, a.high) == pytest.approx((b.low, b.high), rel=1e-9)


def test_stratified_acceleration_runs_within_strata():
    # two strata; a stratum of one group is skipped (it is always redrawn, so it has no variance)
    values = np.array([1.0, 2.0, 4.0, 7.0, 3.0, 3.5, 9.0])
    strata = [np.array([0, 1, 2, 3]), np.array([4, 5]), np.array([6])]
    infl = [3 * (values[:4].mean() - values[:4]) / 4, 1 * (values[4:6].mean() - values[4:6]) / 2]
    cube = sum(np.sum(u ** 3) for u in infl)
    square = sum(np.sum(u ** 2) for u in infl)
    assert bca_acceleration(values, strata) == pytest.approx(cube / (6 * square ** 1.5))
    assert bca_acceleration(values[:4]) == pytest.approx(
        np.sum((values[:4].mean() - values[:4]) ** 3)
        / (6 * np.sum((values[:4].mean() - values[:4]) ** 2) ** 1.5))


def test_stratified_bca_with_a_single_prompt_stratum():
    rng = np.random.default_rng(11)
    scores, prompts = _skewed(rng, n_prompts=13, n_images=2)
    _, groups = group_indices(prompts)
    strata = ["solo"] + ["a"] * 6 + ["b"] * 6
    ci = bootstrap(lambda idx: scores[idx].mean(), groups, strata=strata, n_resamples=300,
                   seed=0, method="bca")
    assert ci.low <= ci.estimate <= ci.high and "stratified" in ci.method


def test_paired_difference_takes_the_method():
    scores, prompts = _skewed(np.random.default_rng(8))
    keys = [(p, i % N_IMAGES) for i, p in enumerate(prompts)]
    other = scores - 0.2 + np.random.default_rng(9).normal(0, 0.1, scores.shape)
    ci = paired_difference_ci(scores, keys, other, keys, n_resamples=300, seed=1, method="bca")
    assert ci.method.startswith("cluster BCa") and ci.low < 0.2 < ci.high


def test_constant_scores_give_a_point():
    prompts = np.repeat(np.arange(5), 3)
    for m in INTERVAL_METHODS:
        ci = cluster_mean_ci(np.full(15, 2.0), prompts, n_resamples=50, method=m)
        assert (ci.low, ci.high) == (2.0, 2.0), m


def test_unknown_method_and_bad_combinations_are_refused():
    scores, prompts = _skewed(np.random.default_rng(0), n_prompts=5, n_images=2)
    expect = "'bcaa'.*percentile, bca, studentized.*Did you mean 'bca'"
    with pytest.raises(ValueError, match=expect):
        cluster_mean_ci(scores, prompts, method="bcaa")
    _, groups = group_indices(prompts)
    with pytest.raises(ValueError, match="recentre"):
        bootstrap(lambda idx: scores[idx].mean(), groups, method="bca", recentre=True)
    with pytest.raises(ValueError, match="studentized"):
        bootstrap(lambda idx: scores[idx].mean(), groups, method="studentized")
