"""Bootstrap CIs over prompts: coverage, paired vs unpaired width, determinism, win rates."""
import numpy as np
import pytest

from metrics.stats import (bootstrap, cluster_mean_ci, group_indices, paired_difference_ci,
                           unpaired_difference_ci, win_rate)


def _clustered(rng, n_prompts=40, seeds=4, mu=1.0, prompt_sd=1.0, noise_sd=1.0):
    """Scores with a random prompt effect shared by the seeds of each prompt."""
    effect = rng.normal(0, prompt_sd, n_prompts)
    scores = mu + np.repeat(effect, seeds) + rng.normal(0, noise_sd, n_prompts * seeds)
    prompts = [f"p{i}" for i in np.repeat(np.arange(n_prompts), seeds)]
    return scores, prompts


def test_cluster_ci_coverage_on_normal_data():
    rng = np.random.default_rng(123)
    reps, hits = 300, 0
    for r in range(reps):
        scores, prompts = _clustered(rng)
        hits += cluster_mean_ci(scores, prompts, n_resamples=400, seed=r).contains(1.0)
    # Percentile bootstrap with 40 clusters: nominal 95 %, slightly lower in practice.
    assert 0.89 <= hits / reps <= 0.99, hits / reps


def test_generic_bootstrap_matches_cluster_mean():
    scores, prompts = _clustered(np.random.default_rng(0))
    _, groups = group_indices(prompts)
    a = cluster_mean_ci(scores, prompts, seed=5)
    b = bootstrap(lambda idx: scores[idx].mean(), groups, seed=5)
    assert a.estimate == pytest.approx(b.estimate)
    assert a.low == pytest.approx(b.low) and a.high == pytest.approx(b.high)


def test_determinism_given_seed():
    scores, prompts = _clustered(np.random.default_rng(1))
    assert cluster_mean_ci(scores, prompts, seed=3) == cluster_mean_ci(scores, prompts, seed=3)
    assert cluster_mean_ci(scores, prompts, seed=3) != cluster_mean_ci(scores, prompts, seed=4)


def test_paired_ci_narrower_than_unpaired_with_shared_noise():
    rng = np.random.default_rng(7)
    base, prompts = _clustered(rng, prompt_sd=2.0, noise_sd=1.0)   # shared prompt + seed noise
    a = base + 0.3 + rng.normal(0, 0.2, base.shape)
    b = base + rng.normal(0, 0.2, base.shape)
    keys = [(p, i % 4) for i, p in enumerate(prompts)]
    paired = paired_difference_ci(a, keys, b, keys, seed=0)
    unpaired = unpaired_difference_ci(a, prompts, b, prompts, seed=0)
    assert paired.estimate == pytest.approx(unpaired.estimate)
    assert (paired.high - paired.low) < 0.3 * (unpaired.high - unpaired.low)
    assert paired.low > 0  # the 0.3 improvement is resolved only by the paired design


def test_paired_aligns_keys_and_refuses_mismatch():
    keys = [("p0", 0), ("p0", 1), ("p1", 0), ("p1", 1)]
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 1.0, 2.0, 3.0])
    shuffled = [2, 0, 3, 1]
    ci = paired_difference_ci(a, keys, b[shuffled], [keys[i] for i in shuffled], n_resamples=50)
    assert ci.estimate == pytest.approx(1.0) and ci.low == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same .prompt_id, seed. grid"):
        paired_difference_ci(a, keys, b[:3], keys[:3])


def test_win_rate_counts_prompts_and_ties():
    keys = [(f"p{i // 2}", i % 2) for i in range(8)]
    a = np.array([1, 1, 0, 0, 5, 5, 2, 2], float)
    b = np.array([0, 0, 1, 1, 5, 5, 0, 0], float)
    wr = win_rate(a, keys, b, keys, n_resamples=100)
    assert (wr["wins"], wr["ties"], wr["losses"]) == (2, 1, 1)
    assert wr["win_rate"] == pytest.approx(2.5 / 4)
    assert win_rate(a, keys, b, keys, higher_is_better=False)["win_rate"] == pytest.approx(1.5 / 4)


def test_stratified_bootstrap_keeps_every_stratum():
    # Two strata of very different size; a statistic undefined without one of them.
    labels = ["x"] * 3 + ["y"] * 30
    groups = [np.array([i]) for i in range(33)]
    values = np.array([1.0] * 3 + [0.0] * 30)

    def per_stratum_mean(idx):
        xs = [values[i] for i in idx if i < 3]
        ys = [values[i] for i in idx if i >= 3]
        return (np.mean(xs) + np.mean(ys)) / 2  # NaN if a stratum vanished

    ci = bootstrap(per_stratum_mean, groups, strata=labels, n_resamples=200)
    assert ci.low == ci.high == 0.5 and "stratified" in ci.method


def test_recentred_bootstrap_contains_biased_estimate():
    _, groups = group_indices(range(50))

    def distinct_count(idx):  # strongly biased downward under resampling with replacement
        return float(len(np.unique(idx)))

    plain = bootstrap(distinct_count, groups, n_resamples=200)
    fixed = bootstrap(distinct_count, groups, n_resamples=200, recentre=True)
    assert not plain.contains(plain.estimate) and fixed.contains(fixed.estimate)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="level"):
        cluster_mean_ci([1.0, 2.0], ["a", "b"], level=95)
    with pytest.raises(ValueError, match="NaN"):
        cluster_mean_ci([1.0, float("nan")], ["a", "b"])
    with pytest.raises(ValueError, match="one score per prompt"):
        cluster_mean_ci([1.0, 2.0], ["a"])


def test_a_plain_mean_metric_pairs_by_the_vectorised_bootstrap_with_the_same_resamples():
    """Metric.paired_difference takes the vectorised cluster bootstrap of per-sample differences
    for plain-mean metrics; it must give what the general set-statistic path gives."""
    from metrics.base import Metric, MetricResult

    class Mean(Metric):
        name, version, n_resamples, level, seed = "mean", "1", 300, 0.9, 4

    class MeanGeneral(Mean):
        def set_statistic(self, rows):  # the same statistic, through the general path
            return float(np.mean([r["score"] for r in rows]))

    rng = np.random.default_rng(0)
    keys = [(f"p{p}", s) for p in range(17) for s in range(3)]
    a, b = rng.normal(size=len(keys)), rng.normal(size=len(keys)) + 0.3

    def result(scores, order):
        rows = [{"prompt_id": keys[i][0], "seed": keys[i][1], "score": float(scores[i])}
                for i in order]
        return MetricResult("mean", "1", True, float(np.mean(scores)), 0.0, 0.0, len(rows), rows)

    shuffled = rng.permutation(len(keys))
    fast = Mean().paired_difference(result(a, range(len(keys))), result(b, shuffled))
    general = MeanGeneral().paired_difference(result(a, range(len(keys))), result(b, shuffled))
    assert fast["method"] != general["method"]  # really two paths
    for key in ("difference", "ci_low", "ci_high"):
        assert fast[key] == pytest.approx(general[key], abs=1e-12), key
    assert fast["verdict"] == general["verdict"] and fast["win_rate"] == general["win_rate"]
