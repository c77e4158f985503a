"""Bootstrap confidence intervals over prompts, paired differences and per-prompt win rates.

Samples of one prompt are correlated (same text, same task), so the resampling unit is the prompt: a
cluster bootstrap draws prompt ids with replacement and keeps all seeds of each drawn prompt
(fewstep/notes/pitfalls.md B.9). Method comparisons use paired differences on the shared (prompt_id,
seed) grid.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Hashable, Sequence

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95


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


def cluster_mean_ci(scores, prompt_ids, *, n_resamples: int = DEFAULT_RESAMPLES,
                    level: float = DEFAULT_LEVEL, seed: int = 0) -> BootstrapCI:
    """Percentile CI of the mean of per-sample scores, resampling prompts (all seeds kept)."""
    _check_settings(n_resamples, level)
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
    low, high = _percentiles(means, level)
    return BootstrapCI(float(scores.mean()), low, high, level, n_resamples, len(groups), seed,
                       "cluster percentile (prompts)")


def bootstrap(statistic_fn: Callable[[np.ndarray], float], groups: Sequence[np.ndarray], *,
              strata=None, n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
              seed: int = 0, recentre: bool = False) -> BootstrapCI:
    """Percentile CI of a set-level statistic (e.g. FID, GenEval overall), resampling groups.

    groups: one integer array of sample indices per prompt; statistic_fn receives the concatenated
    indices of a resample (duplicates included) and returns a float. strata: one label per group;
    groups are then drawn within each stratum so the composition is fixed (e.g. GenEval tasks).
    For a paired comparison, make statistic_fn return stat(A[idx]) - stat(B[idx]) on a shared grid.

    recentre: shift the bootstrap distribution so its median sits on the point estimate. Statistics
    such as FID are biased by the duplicates a resample contains (fewer distinct samples -> larger
    FID), so the plain percentile interval can miss the estimate; recentring keeps the bootstrap
    spread and removes that artificial offset.
    """
    _check_settings(n_resamples, level)
    if len(groups) == 0:
        raise ValueError("bootstrap needs at least one group")
    groups = [np.asarray(g, dtype=np.int64) for g in groups]
    estimate = float(statistic_fn(np.concatenate(groups)))
    rng = np.random.default_rng(seed)
    counts = _resample_counts(rng, n_resamples, len(groups), _strata_members(len(groups), strata))
    values = np.array([statistic_fn(np.concatenate([np.repeat(g, c) for g, c in zip(groups, row)
                                                    if c])) for row in counts], dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError("statistic_fn returned NaN/inf on a resample; make it defined on any "
                         "non-empty resample (use strata to keep every category present)")
    if recentre:
        values = values - np.median(values) + estimate
    low, high = _percentiles(values, level)
    method = "percentile" + (", recentred on the estimate" if recentre else "")
    method += " (groups" + (", stratified)" if strata is not None else ")")
    return BootstrapCI(estimate, low, high, level, n_resamples, len(groups), seed, method)


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
                       len(set(prompts_a)) + len(set(prompts_b)), seed, "unpaired percentile")


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
