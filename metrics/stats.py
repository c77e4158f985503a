"""Bootstrap confidence intervals over prompts, paired differences and per-prompt win rates.

Samples of one prompt are correlated (same text, same task), so the resampling unit is the prompt: a
cluster bootstrap draws prompt ids with replacement and keeps all seeds of each drawn prompt
(fewstep/notes/pitfalls.md B.9). Method comparisons use paired differences on the shared (prompt_id,
seed) grid.

Interval methods (INTERVAL_METHODS): "percentile" (the default) reads the bootstrap distribution's
quantiles; "bca" is Efron's bias-corrected and accelerated interval (Efron 1987, "Better
bootstrap confidence intervals", JASA 82; Efron & Tibshirani 1993, "An Introduction to the
Bootstrap", ch. 14), which moves the quantiles for the bootstrap distribution's median bias and for the skewness of the
estimator (metrics/notes/metrics.md, "Interval method").

p-values: every interval also records the two-sided bootstrap p-value of H0 "statistic = 0" read
from the same draws (BootstrapCI.p_value; meaningful for a difference A - B): the smallest level at
which the interval of that method would exclude 0 (Efron & Tibshirani 1993, ch. 15, hypothesis
tests from confidence intervals, and ch. 16, the achieved significance level of a bootstrap test).

Multiplicity control over a table of these p-values: metrics/multiplicity.py (Holm).

Training seeds: `two_level_bootstrap` resamples a cell's training seeds and then prompts (Davison
& Hinkley 1997, sec. 3.8, resampling both stages of a two-stage sample).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Hashable, Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
INTERVAL_METHODS = ("percentile", "bca", "studentized")
DEFAULT_INTERVAL = "percentile"


@dataclass(frozen=True)
class BootstrapCI:
    estimate: float
    low: float
    high: float
    level: float
    n_resamples: int
    n_groups: int
    seed: int
    method: str
    p_value: float | None = None   # two-sided bootstrap p-value of H0 statistic = 0 (a difference)

    def to_dict(self) -> dict:
        return asdict(self)

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high


def _check_settings(n_resamples: int, level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level}")
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be a positive integer; got {n_resamples}")


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_p_value(values) -> float:
    """Two-sided p-value of H0 "the statistic is 0" from bootstrap draws of it, by inverting the
    percentile interval: p = min(1, 2 (1 + min(#{v* <= 0}, #{v* >= 0})) / (R + 1)), the smallest
    2-tail level whose interval excludes 0, counted with the +1 that keeps a Monte Carlo p-value
    valid (Efron & Tibshirani 1993, ch. 15-16; Davison & Hinkley 1997, eq. 4.11)."""
    values = np.asarray(values, dtype=np.float64)
    tail = min(int(np.sum(values <= 0.0)), int(np.sum(values >= 0.0)))
    return float(min(1.0, 2.0 * (1 + tail) / (len(values) + 1)))


def bca_p_value(values: np.ndarray, estimate: float, acceleration: float) -> float:
    """Two-sided p-value of H0 "statistic = 0" by inverting the BCa interval (Efron & Tibshirani
    1993, sec. 15.4): the level q at which a BCa endpoint reaches 0 solves
    Phi^-1(share below 0) = z0 + (z0 + z_q) / (1 - a (z0 + z_q)), so z_q = w / (1 + a w) - z0 with
    w = Phi^-1(share) - z0. Shares and z0 are read as bca_interval reads them; with a = 0 and
    z0 = 0 this is the percentile p-value (floored like it at 2 / (R + 1))."""
    b = len(values)
    clip = (0.5 / b, 1.0 - 0.5 / b)
    share = np.sum(values < estimate) + 0.5 * np.sum(values == estimate)
    z0 = float(_normal_quantile(np.clip(share / b, *clip)))
    below = (np.sum(values < 0.0) + 0.5 * np.sum(values == 0.0)) / b
    w = float(_normal_quantile(np.clip(below, *clip))) - z0
    if 1.0 + acceleration * w <= 0.0:       # 0 lies past the end the BCa levels can reach
        return 2.0 / (b + 1)
    tail = float(_normal_cdf(w / (1.0 + acceleration * w) - z0))
    return float(min(1.0, max(2.0 * min(tail, 1.0 - tail), 2.0 / (b + 1))))


def _check_interval(method: str) -> None:
    if method not in INTERVAL_METHODS:
        from fewstep.errors import did_you_mean
        raise ValueError(f"interval method {method!r} is not known; choose one of "
                         f"{', '.join(INTERVAL_METHODS)} (bootstrap.interval in the config)."
                         + did_you_mean(method, INTERVAL_METHODS))


def _normal_cdf(x):
    from scipy.special import ndtr
    return ndtr(x)


def _normal_quantile(p):
    from scipy.special import ndtri
    return ndtri(p)


def bca_acceleration(jackknife_values, strata=None) -> float:
    """Acceleration a of the BCa interval from leave-one-cluster-out estimates.

    Unstratified: a = sum(d^3) / (6 * sum(d^2)^1.5) with d = mean(theta_(.)) - theta_(i) (Efron &
    Tibshirani 1993, eq. 14.15). Stratified: the jackknife runs within each stratum, d is scaled to
    the stratum's empirical influence (n_s - 1) * d / n_s and the sums run over all strata
    (Davison & Hinkley 1997, sec. 3.2 and eq. 5.20, the multi-sample skewness of the influence
    values). A stratum of one cluster is always redrawn, so it has no variance and adds nothing.
    """
    values = np.asarray(jackknife_values, dtype=np.float64)
    members = [np.arange(len(values))] if strata is None else strata
    cube = square = 0.0
    for m in members:
        if len(m) < 2:
            continue
        n = len(m)
        infl = (n - 1) * (values[m].mean() - values[m]) / n
        cube, square = cube + float(np.sum(infl ** 3)), square + float(np.sum(infl ** 2))
    return 0.0 if square <= 0.0 else cube / (6.0 * square ** 1.5)


def bca_interval(values: np.ndarray, estimate: float, acceleration: float,
                 level: float) -> tuple[float, float]:
    """BCa endpoints: quantiles of the bootstrap values at the adjusted levels
    Phi(z0 + (z0 + z_q) / (1 - a (z0 + z_q))) (Efron & Tibshirani 1993, eq. 14.10).

    z0 = Phi^-1(share of bootstrap values below the estimate), ties counted one half so that a
    discrete statistic (win rates, accuracies) is not biased by its ties (eq. 14.14 counts strictly
    below); the share is kept within [1/(2B), 1 - 1/(2B)] so z0 stays finite. Where 1 - a (z0 + z_q)
    <= 0 the adjusted level is past the distribution's end, so the endpoint is its min or max.
    """
    b = len(values)
    share = (np.sum(values < estimate) + 0.5 * np.sum(values == estimate)) / b
    z0 = float(_normal_quantile(np.clip(share, 0.5 / b, 1.0 - 0.5 / b)))
    tail = (1.0 - level) / 2.0
    probs = []
    for q in (tail, 1.0 - tail):
        shift = z0 + float(_normal_quantile(q))
        denom = 1.0 - acceleration * shift
        probs.append(float(_normal_cdf(z0 + shift / denom)) if denom > 0 else float(shift > 0))
    low, high = np.percentile(values, [100.0 * probs[0], 100.0 * probs[1]])
    return float(low), float(high)


def group_indices(prompt_ids: Sequence[Hashable]) -> tuple[list, list[np.ndarray]]:
    """Prompt ids in first-seen order and, for each, the indices of its samples."""
    order, members = [], {}
    for i, pid in enumerate(prompt_ids):
        if pid not in members:
            order.append(pid)
            members[pid] = []
        members[pid].append(i)
    return order, [np.asarray(members[p], dtype=np.int64) for p in order]


def _resample_counts(rng, n_resamples: int, n_groups: int, strata) -> np.ndarray:
    """(n_resamples, n_groups) multiplicities of a with-replacement draw, within strata if given."""
    counts = np.zeros((n_resamples, n_groups), dtype=np.int64)
    for members in strata:
        k = len(members)
        draws = rng.integers(0, k, size=(n_resamples, k))
        flat = (draws + np.arange(n_resamples)[:, None] * k).ravel()  # one bincount for all rows
        counts[:, members] += np.bincount(flat, minlength=n_resamples * k).reshape(n_resamples, k)
    return counts


def _strata_members(n_groups: int, strata) -> list[np.ndarray]:
    if strata is None:
        return [np.arange(n_groups)]
    if len(strata) != n_groups:
        raise ValueError(f"strata has {len(strata)} labels for {n_groups} groups; give one per group")
    _, members = group_indices(list(strata))
    return members


def _cluster_se(counts: np.ndarray, sums: np.ndarray, sizes: np.ndarray):
    """Means and cluster-robust (ratio-estimator) standard errors of the per-sample mean, one per
    row of cluster multiplicities: var = G / (G - 1) * sum_i c_i (s_i - m n_i)^2 / (sum_i c_i n_i)^2
    (Cochran 1977, sec. 6.11, the ratio estimator's variance over G sampled clusters)."""
    n_total = counts @ sizes
    mean = (counts @ sums) / n_total
    resid2 = (counts @ sums ** 2 - 2 * mean * (counts @ (sums * sizes))
              + mean ** 2 * (counts @ sizes ** 2))
    g = counts.sum(axis=-1)
    var = np.maximum(resid2, 0.0) * g / np.maximum(g - 1, 1) / n_total ** 2
    return mean, np.sqrt(var)


def _studentized_interval(counts, sums, sizes, level: float) -> tuple[float, float, float]:
    """Bootstrap-t interval (Efron & Tibshirani 1993, ch. 12.5, eq. 12.19): the quantiles of
    t* = (m* - m) / se* replace the normal's, se from the same cluster formula on every resample.
    Resamples with se* = 0 (every drawn prompt alike) give no t and are left out.

    Also the bootstrap-t p-value of H0 mean = 0 (Efron & Tibshirani 1993, sec. 16.4): t* stands
    in for the null distribution of t = m / se, counted as bootstrap_p_value counts (0 leaves the
    interval exactly when t leaves the t* quantiles)."""
    est, se = _cluster_se(np.ones((1, len(sums)), dtype=np.int64), sums, sizes)
    means, ses = _cluster_se(counts, sums, sizes)
    ok = ses > 0
    if not ok.any() or se[0] == 0:
        p = 1.0 if est[0] == 0 else 2.0 / (len(counts) + 1)   # no spread at all: a sure sign
        return float(est[0]), float(est[0]), p
    t = (means[ok] - est[0]) / ses[ok]
    tail = (1.0 - level) / 2.0 * 100.0
    t_low, t_high = np.percentile(t, [tail, 100.0 - tail])
    p = bootstrap_p_value(est[0] / se[0] - t)
    return float(est[0] - t_high * se[0]), float(est[0] - t_low * se[0]), p


def cluster_mean_ci(scores, prompt_ids, *, n_resamples: int = DEFAULT_RESAMPLES,
                    level: float = DEFAULT_LEVEL, seed: int = 0,
                    method: str = DEFAULT_INTERVAL) -> BootstrapCI:
    """CI of the mean of per-sample scores, resampling prompts (all seeds kept).

    method: "percentile" (default), "bca" or "studentized". BCa's acceleration comes from the
    jackknife that deletes one prompt with all its seeds, the same cluster the bootstrap resamples;
    "studentized" is the bootstrap-t with the cluster-robust standard error. All methods use the
    same resamples for a given seed. p_value: H0 mean = 0 read from the method's own draws
    (percentile: bootstrap_p_value; BCa: bca_p_value; studentized: the bootstrap-t), the test
    for a mean of paired differences."""
    _check_settings(n_resamples, level)
    _check_interval(method)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or len(scores) != len(prompt_ids) or len(scores) == 0:
        raise ValueError(f"need one score per prompt id; got {scores.shape} scores for "
                         f"{len(prompt_ids)} prompt ids")
    if not np.isfinite(scores).all():
        bad = np.flatnonzero(~np.isfinite(scores))[:10]
        raise ValueError(f"scores contain NaN/inf at indices {bad}")
    _, groups = group_indices(prompt_ids)
    sums = np.array([scores[g].sum() for g in groups])
    sizes = np.array([len(g) for g in groups], dtype=np.float64)
    rng = np.random.default_rng(seed)
    counts = _resample_counts(rng, n_resamples, len(groups), [np.arange(len(groups))])
    means = (counts @ sums) / (counts @ sizes)
    if method == "studentized":
        low, high, p = _studentized_interval(counts, sums, sizes, level)
        return BootstrapCI(float(scores.mean()), low, high, level, n_resamples, len(groups), seed,
                           "cluster studentized bootstrap-t (prompts; cluster-robust SE)", p)
    if method == "bca":
        estimate = float(scores.mean())
        jackknife = (sums.sum() - sums) / np.maximum(sizes.sum() - sizes, 1.0)
        accel = bca_acceleration(jackknife) if len(groups) > 1 else 0.0
        low, high = bca_interval(means, estimate, accel, level)
        return BootstrapCI(estimate, low, high, level, n_resamples, len(groups), seed,
                           "cluster BCa (prompts; jackknife acceleration over prompts)",
                           bca_p_value(means, estimate, accel))
    low, high = _percentiles(means, level)
    return BootstrapCI(float(scores.mean()), low, high, level, n_resamples, len(groups), seed,
                       "cluster percentile (prompts)", bootstrap_p_value(means))


def bootstrap(statistic_fn: Callable[[np.ndarray], float], groups: Sequence[np.ndarray], *,
              strata=None, n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
              seed: int = 0, recentre: bool = False,
              method: str = DEFAULT_INTERVAL) -> BootstrapCI:
    """CI of a set-level statistic (e.g. FID, GenEval overall), resampling groups.

    groups: one integer array of sample indices per prompt; statistic_fn receives the concatenated
    indices of a resample (duplicates included) and returns a float. strata: one label per group;
    groups are then drawn within each stratum so the composition is fixed (e.g. GenEval tasks).
    For a paired comparison, make statistic_fn return stat(A[idx]) - stat(B[idx]) on a shared grid.

    recentre: shift the bootstrap distribution so its median sits on the point estimate. Statistics
    such as FID are biased by the duplicates a resample contains (fewer distinct samples -> larger
    FID), so the plain percentile interval can miss the estimate; recentring keeps the bootstrap
    spread and removes that artificial offset.

    method: "percentile" (default) or "bca" (acceleration from the delete-one-group jackknife, run
    within each stratum when strata are given: statistic_fn is called once more per group of a
    stratum with at least two groups). BCa corrects the median bias itself, so it is not combined
    with recentre.

    p_value: H0 statistic = 0 from the same draws (recentred ones when recentre; BCa: bca_p_value),
    the test for a difference statistic.
    """
    _check_settings(n_resamples, level)
    _check_interval(method)
    if method == "studentized":
        raise ValueError("method='studentized' needs a standard error on every resample, which a "
                         "general statistic_fn does not give; use 'bca' (or cluster_mean_ci for "
                         "a plain mean)")
    if method == "bca" and recentre:
        raise ValueError("recentre=True and method='bca' both correct the bootstrap's offset; "
                         "use one (bca corrects bias and skewness, recentre only the median)")
    if len(groups) == 0:
        raise ValueError("bootstrap needs at least one group")
    groups = [np.asarray(g, dtype=np.int64) for g in groups]
    estimate = float(statistic_fn(np.concatenate(groups)))
    members = _strata_members(len(groups), strata)
    counts = _resample_counts(np.random.default_rng(seed), n_resamples, len(groups), members)
    values = _checked(np.array([statistic_fn(resample_indices(groups, row)) for row in counts],
                               dtype=np.float64))
    if method == "bca":
        accel = bca_acceleration(_jackknife_values(statistic_fn, groups, members), members)
        low, high = bca_interval(values, estimate, accel, level)
        label = "BCa, jackknife acceleration over groups"
        label += " within strata (groups, stratified)" if strata is not None else " (groups)"
        return BootstrapCI(estimate, low, high, level, n_resamples, len(groups), seed, label,
                           bca_p_value(values, estimate, accel))
    return _percentile_ci(values, estimate, level, recentre, n_resamples, len(groups), seed,
                          "percentile" + (", recentred on the estimate" if recentre else "")
                          + " (groups" + (", stratified)" if strata is not None else ")"))


def resample_indices(groups: Sequence[np.ndarray], row) -> np.ndarray:
    """The concatenated sample indices of one resample: group i repeated row[i] times, in group
    order (what a statistic_fn receives)."""
    return np.concatenate([np.repeat(g, c) for g, c in zip(groups, row) if c])


def _checked(values: np.ndarray) -> np.ndarray:
    if not np.isfinite(values).all():
        raise ValueError("statistic_fn returned NaN/inf on a resample; make it defined on any "
                         "non-empty resample (use strata to keep every category present)")
    return values


def _percentile_ci(values, estimate, level, recentre, n_resamples, n_groups, seed, label,
                   with_p: bool = True) -> BootstrapCI:
    """Percentile interval of bootstrap draws (recentred: median moved onto the estimate) and the
    p-value from the same draws."""
    if recentre:
        values = values - np.median(values) + estimate
    low, high = _percentiles(values, level)
    return BootstrapCI(estimate, low, high, level, n_resamples, n_groups, seed, label,
                       bootstrap_p_value(values) if with_p else None)


def two_level_bootstrap(stats_a: Sequence[Callable[[np.ndarray], float]],
                        stats_b: Sequence[Callable[[np.ndarray], float]] | None,
                        groups: Sequence[np.ndarray], *, strata=None,
                        n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                        seed: int = 0, recentre: bool = False) -> BootstrapCI:
    """Percentile CI of mean_s stat_s(A) - mean_s stat_s(B) over training seeds s, resampling
    training seeds and then prompts: the two-stage bootstrap of a nested design (Davison & Hinkley
    1997, sec. 3.8: resample the first-stage units, here training runs, with replacement, and the
    second-stage units, here prompts with all their images, within the draw).

    stats_a: one callable per training seed of A, f(idx) -> float, the metric's statistic on a
    resample given as concatenated sample indices of the shared (prompt_id, image seed) grid (the
    convention of `bootstrap`); stats_b: the same for B, or None for one cell's own interval.
    Per resample, prompts are drawn once (within strata) from default_rng(seed) exactly as
    `bootstrap` draws them, and shared by both sides and every seed (paired design: same prompts
    and noise); training seeds come from default_rng([seed, 1]), A's as integers(0, k_a,
    (n_resamples, k_a)) and then B's as integers(0, k_b, (n_resamples, k_b)), independently.
    A resample's value is the mean of f over the drawn A-seeds minus that over the drawn B-seeds
    (each distinct seed evaluated once); the estimate uses every sample and every seed once. With
    one seed per side this is `bootstrap` on f_a - f_b, bit for bit. recentre: as in `bootstrap`.
    p_value (stats_b given): H0 difference = 0 from the same (recentred) draws. With k seeds the
    seed-level draws carry (k - 1) / k of the between-seed variance, as any plain bootstrap of k
    units does, and only a handful of distinct seed draws exist, so few seeds give an interval on
    the narrow side where training seeds dominate the spread (simulated, plain means, 30 prompts:
    a 5 % test of a true null rejects about 15 % of the time with 3 seeds against 3 or against a
    fixed teacher when the seed sd is 3x the per-seed prompt-noise sd; about 3 % when it is 0).
    """
    _check_settings(n_resamples, level)
    sides = [list(stats_a)] + ([] if stats_b is None else [list(stats_b)])
    if not all(sides) or len(groups) == 0:
        raise ValueError(f"two_level_bootstrap needs one statistic per training seed in stats_a "
                         f"(got {len(sides[0])}) and in stats_b unless it is None, and at least "
                         f"one prompt group (got {len(groups)})")
    groups = [np.asarray(g, dtype=np.int64) for g in groups]
    everything = np.concatenate(groups)
    side_means = [float(np.mean([f(everything) for f in side])) for side in sides]
    members = _strata_members(len(groups), strata)
    counts = _resample_counts(np.random.default_rng(seed), n_resamples, len(groups), members)
    seed_rng = np.random.default_rng([seed, 1])
    draws = [seed_rng.integers(0, len(side), size=(n_resamples, len(side))) for side in sides]
    values = np.empty(n_resamples, dtype=np.float64)
    for r, row in enumerate(counts):
        idx = resample_indices(groups, row)
        drawn = [_drawn_seed_mean(side, d[r], idx) for side, d in zip(sides, draws)]
        values[r] = drawn[0] - drawn[1] if len(drawn) == 2 else drawn[0]
    estimate = side_means[0] - side_means[1] if len(sides) == 2 else side_means[0]
    label = ("two-level percentile" + (", recentred on the estimate" if recentre else "")
             + " (training seeds, then prompts" + (", stratified)" if strata is not None else ")"))
    return _percentile_ci(_checked(values), estimate, level, recentre, n_resamples, len(groups),
                          seed, label, with_p=stats_b is not None)


def _drawn_seed_mean(side, drawn_seeds, idx) -> float:
    """Mean of f_s(idx) over drawn training seeds (with repeats), each distinct seed called once."""
    weights = np.bincount(drawn_seeds, minlength=len(side))
    return sum(int(w) * float(side[j](idx)) for j, w in enumerate(weights) if w) / len(drawn_seeds)


def _jackknife_values(statistic_fn, groups: list[np.ndarray],
                      strata: list[np.ndarray]) -> np.ndarray:
    """statistic_fn with each group left out in turn (NaN for a group alone in its stratum: leaving
    it out would empty a stratum, and bca_acceleration skips such strata)."""
    out = np.full(len(groups), np.nan)
    for members in strata:
        if len(members) < 2:
            continue
        for j in members:
            kept = np.concatenate([g for i, g in enumerate(groups) if i != j])
            out[j] = float(statistic_fn(kept))
    used = [j for members in strata if len(members) > 1 for j in members]
    if not np.isfinite(out[used]).all():
        raise ValueError("statistic_fn returned NaN/inf with one group left out (BCa's jackknife); "
                         "make it defined on any non-empty subset or use method='percentile'")
    return out


def align_pairs(keys_a: Sequence, keys_b: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays that put the (prompt_id, seed) keys of B in A's order; refuse any mismatch."""
    pos_b = {tuple(k): i for i, k in enumerate(keys_b)}
    pos_a = {tuple(k): i for i, k in enumerate(keys_a)}
    if len(pos_a) != len(keys_a) or len(pos_b) != len(keys_b):
        raise ValueError("duplicate (prompt_id, seed) keys; each sample must appear once per set")
    only_a, only_b = sorted(set(pos_a) - set(pos_b), key=str), sorted(set(pos_b) - set(pos_a), key=str)
    if only_a or only_b:
        raise ValueError(f"paired comparison needs the same (prompt_id, seed) grid: {len(only_a)} keys "
                         f"only in A (e.g. {only_a[:3]}), {len(only_b)} only in B (e.g. {only_b[:3]}); "
                         "score both methods on the same prompts and seeds")
    idx_a = np.arange(len(keys_a))
    idx_b = np.array([pos_b[tuple(k)] for k in keys_a], dtype=np.int64)
    return idx_a, idx_b


def paired_difference_ci(scores_a, keys_a, scores_b, keys_b, **kw) -> BootstrapCI:
    """CI of mean(A - B) over the shared (prompt_id, seed) grid, resampling prompts."""
    ia, ib = align_pairs(keys_a, keys_b)
    diff = np.asarray(scores_a, dtype=np.float64)[ia] - np.asarray(scores_b, dtype=np.float64)[ib]
    return cluster_mean_ci(diff, [tuple(keys_a[i])[0] for i in ia], **kw)


def unpaired_difference_ci(scores_a, prompts_a, scores_b, prompts_b, *,
                           n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                           seed: int = 0) -> BootstrapCI:
    """CI of mean(A) - mean(B) resampling each set's prompts independently (ignores pairing)."""
    _check_settings(n_resamples, level)
    rng = np.random.default_rng(seed)
    draws = []
    for scores, prompts in ((scores_a, prompts_a), (scores_b, prompts_b)):
        scores = np.asarray(scores, dtype=np.float64)
        _, groups = group_indices(prompts)
        sums = np.array([scores[g].sum() for g in groups])
        sizes = np.array([len(g) for g in groups], dtype=np.float64)
        counts = _resample_counts(rng, n_resamples, len(groups), [np.arange(len(groups))])
        draws.append((counts @ sums) / (counts @ sizes))
    low, high = _percentiles(draws[0] - draws[1], level)
    estimate = float(np.mean(scores_a) - np.mean(scores_b))
    return BootstrapCI(estimate, low, high, level, n_resamples,
                       len(set(prompts_a)) + len(set(prompts_b)), seed, "unpaired percentile",
                       bootstrap_p_value(draws[0] - draws[1]))


def win_rate(scores_a, keys_a, scores_b, keys_b, *, higher_is_better: bool = True,
             n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
             seed: int = 0) -> dict:
    """Share of prompts on which A's mean score beats B's (ties count one half), with a CI."""
    ia, ib = align_pairs(keys_a, keys_b)
    a = np.asarray(scores_a, dtype=np.float64)[ia]
    b = np.asarray(scores_b, dtype=np.float64)[ib]
    prompts, groups = group_indices([tuple(keys_a[i])[0] for i in ia])
    margin = np.array([a[g].mean() - b[g].mean() for g in groups])
    margin = margin if higher_is_better else -margin
    outcome = np.where(margin > 0, 1.0, np.where(margin < 0, 0.0, 0.5))
    ci = cluster_mean_ci(outcome, prompts, n_resamples=n_resamples, level=level, seed=seed)
    return {"win_rate": float(outcome.mean()), "ci_low": ci.low, "ci_high": ci.high,
            "wins": int((margin > 0).sum()), "ties": int((margin == 0).sum()),
            "losses": int((margin < 0).sum()), "n_prompts": len(prompts)}

