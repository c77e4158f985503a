"""The training-seed level of a cell's interval (SEED_LEVELS, config `bootstrap.seed_level`).

A cell is k training runs of one method scored on the same prompts and noise. Its value is the
mean over the k runs, and its uncertainty has two sources: which prompts were drawn (the prompt
bootstrap sees it) and which training runs happened (only the k runs show it).

"bootstrap": the two-stage bootstrap (metrics.stats.two_level_bootstrap): runs drawn with
replacement, then prompts. With k = 3 a plain bootstrap of k units keeps (k - 1) / k of their
variance and has normal tails where the truth has t tails with k - 1 degrees of freedom: a 5 %
test of a true null rejects 10-16 % of the time when training seeds dominate
(tests/test_seed_level.py).

"t" (default): the classical nested-design interval. Var = V_prompt + sum over sides of s^2 / k,
s^2 the sample variance (ddof 1) of the side's per-run values on all prompts and V_prompt the
variance of the prompt bootstrap of the seed-mean difference (prompts drawn within strata exactly
as metrics.stats.bootstrap draws them, every run kept); the interval is estimate +- t_q(df) sqrt(Var)
with Welch-Satterthwaite degrees of freedom (Satterthwaite 1946, Biometrics Bulletin 2(6); Welch
1947, Biometrika 34), the prompt term counting n_prompts - n_strata. The seed term also holds the
seed-by-prompt interaction once more (it is in V_prompt / k too): slightly conservative, never
narrow. The interval is symmetric: with several runs the seed term dominates and is normal-theory;
a one-run side (a single trained seed, or the fixed teacher) adds no seed term, and with one run a
side the result is the plain prompt bootstrap, bit for bit.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from metrics.stats import (DEFAULT_LEVEL, DEFAULT_RESAMPLES, BootstrapCI, _check_settings,
                           _checked, _resample_counts, _strata_members, resample_indices,
                           two_level_bootstrap)

SEED_LEVELS = ("t", "bootstrap")
DEFAULT_SEED_LEVEL = "t"


def check_seed_level(name: str) -> str:
    if name not in SEED_LEVELS:
        raise ValueError(f"seed level {name!r} is not known; use one of {', '.join(SEED_LEVELS)} "
                         "(bootstrap.seed_level in the config)")
    return name


def satterthwaite_df(terms: Sequence[tuple[float, float]]) -> float:
    """Degrees of freedom of a sum of variance estimates [(variance, its df)]."""
    total = sum(v for v, _ in terms)
    denominator = sum(v * v / df for v, df in terms if v > 0)
    return total * total / denominator if denominator > 0 else float("inf")


def seed_level_interval(stats_a: Sequence[Callable[[np.ndarray], float]],
                        stats_b: Sequence[Callable[[np.ndarray], float]] | None,
                        groups: Sequence[np.ndarray], *, strata=None,
                        n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                        seed: int = 0, recentre: bool = False,
                        seed_level: str = DEFAULT_SEED_LEVEL) -> BootstrapCI:
    """CI of mean_s stat_s(A) - mean_s stat_s(B) (B None: A's own interval) over training runs s,
    the callables as in metrics.stats.two_level_bootstrap; seed_level picks the seed level (module
    doc). With one run a side both levels are the plain prompt bootstrap."""
    check_seed_level(seed_level)
    sides = [list(stats_a)] + ([] if stats_b is None else [list(stats_b)])
    if seed_level == "bootstrap" or all(len(side) == 1 for side in sides):
        return two_level_bootstrap(stats_a, stats_b, groups, strata=strata,
                                   n_resamples=n_resamples, level=level, seed=seed,
                                   recentre=recentre)
    _check_settings(n_resamples, level)
    groups = [np.asarray(g, dtype=np.int64) for g in groups]
    members = _strata_members(len(groups), strata)
    per_run = [np.array([f(np.concatenate(groups)) for f in side]) for side in sides]
    sign = [1.0, -1.0]
    estimate = float(sum(s * runs.mean() for s, runs in zip(sign, per_run)))

    def seed_mean_difference(idx):
        return sum(s * np.mean([f(idx) for f in side]) for s, side in zip(sign, sides))

    counts = _resample_counts(np.random.default_rng(seed), n_resamples, len(groups), members)
    draws = _checked(np.array([seed_mean_difference(resample_indices(groups, row))
                               for row in counts], dtype=np.float64))
    terms = [(float(np.var(draws, ddof=1)) if n_resamples > 1 else 0.0,
              float(max(1, len(groups) - len(members))))]
    terms += [(float(np.var(runs, ddof=1)) / len(runs), float(len(runs) - 1))
              for runs in per_run if len(runs) > 1]
    return _t_interval(estimate, terms, level, n_resamples, len(groups), seed,
                       strata is not None, with_p=stats_b is not None)


def _t_interval(estimate, terms, level, n_resamples, n_groups, seed, stratified,
                with_p) -> BootstrapCI:
    from scipy import stats as sps

    variance = sum(v for v, _ in terms)
    df = satterthwaite_df(terms)
    se = float(np.sqrt(variance))
    half = float(sps.t.ppf(0.5 + level / 2.0, df)) * se
    if with_p:
        p = float(2.0 * sps.t.sf(abs(estimate) / se, df)) if se > 0 else float(estimate == 0.0)
    label = (f"t, Welch-Satterthwaite df {df:.1f} (training seeds: between-run variance / k; "
             f"prompts: {'stratified ' if stratified else ''}bootstrap variance)")
    return BootstrapCI(estimate, estimate - half, estimate + half, level, n_resamples, n_groups,
                       seed, label, p if with_p else None)
