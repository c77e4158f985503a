"""The Frechet distance and KID on feature arrays, the resampled FID of the bootstrap, and what
both FID routes share on cells of training seeds (FrechetCells).

* The Frechet distance is ours (same formula; matrix square root by symmetric eigendecomposition),
  so it does not depend on `scipy.linalg.sqrtm`'s signature (`disp=` was removed in SciPy 1.18).
* KID uses clean-fid's `kernel_distance`, with NumPy's global RNG seeded and then restored.
* The real route's CI resamples prompts and recomputes FID on each resample in float64 torch (same
  formula; 2048-d resamples run on the GPU when there is one): fid_resampler.
Sections (sec. N) are those of metrics/notes/metrics.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np
import torch

from metrics.base import MetricResult


def single_blas_thread():
    """Limit BLAS to one thread for small linear algebra; a no-op without threadpoolctl.

    Once torch is imported, OpenBLAS's thread pool fights torch's OpenMP pool: a 64x64 eigvalsh
    or KID's kernel sums run 10-20x slower (measured). One thread is faster at these sizes.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def psd_sqrt(mat: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative eigenvalues -> 0)."""
    sym = (mat + mat.T) / 2.0
    values, vectors = np.linalg.eigh(sym)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def trace_sqrt_product(sigma: np.ndarray, sqrt_ref: np.ndarray) -> float:
    """Tr((sigma @ ref)^1/2) = sum of sqrt(eigenvalues of R sigma R), R = ref^1/2 (symmetric)."""
    inner = sqrt_ref @ sigma @ sqrt_ref
    values = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    return float(np.sqrt(np.clip(values, 0.0, None)).sum())


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D); got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, sqrt_sigma2=None) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), without scipy's sqrtm."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape} vs {mu2.shape}; "
                         "were both sets featurised by the same extractor?")
    root = psd_sqrt(sigma2) if sqrt_sigma2 is None else sqrt_sigma2
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, root)
    return float(max(value, 0.0))  # tiny negatives are rounding, not information


def kid_from_features(feats1: np.ndarray, feats2: np.ndarray, seed: int = 0) -> float:
    """clean-fid's KID on precomputed features; its subsets come from NumPy's global RNG."""
    from cleanfid.fid import kernel_distance
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(kernel_distance(np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)))
    finally:
        np.random.set_state(state)


def fid_resampler(feats: np.ndarray, ref, device="cpu"):
    """fid(idx): FID of the rows idx (duplicates allowed) against the reference `ref` (its mu,
    sigma and sqrt_sigma: a metrics.fid_reference.ReferenceStats, whose module imports this one),
    same formula as frechet_distance, in float64 torch on `device` (2048-d resamples are far
    faster on a GPU)."""
    dev = torch.device(device)
    x = torch.as_tensor(np.asarray(feats, np.float64), device=dev)
    mu_ref = torch.as_tensor(ref.mu, device=dev)
    root = torch.as_tensor(ref.sqrt_sigma, device=dev)
    trace_ref = float(np.trace(ref.sigma))

    def fid_of(idx) -> float:
        rows = x[torch.as_tensor(np.asarray(idx), device=dev)]
        mu = rows.mean(0)
        scaled = (rows - mu) / math.sqrt(len(rows) - 1)     # sigma = scaled.T @ scaled
        projected = scaled @ root                            # R sigma R = projected.T @ projected
        # the non-zero eigenvalues of P.T P and P P.T agree: use the smaller of the two matrices
        small = projected @ projected.T if len(rows) < x.shape[1] else projected.T @ projected
        tr_sqrt = torch.linalg.eigvalsh((small + small.T) / 2).clamp_min(0).sqrt().sum()
        diff = mu - mu_ref
        value = diff @ diff + (scaled * scaled).sum() + trace_ref - 2.0 * tr_sqrt
        return max(float(value), 0.0)  # tiny negatives are rounding, not information

    return fid_of


class FrechetCells:
    """What both FID routes share on cells of training seeds (Metric.cell_result,
    paired_difference_cells): two-level intervals recentred on the estimate, as the one-seed FID
    interval is (duplicates in a resample inflate FID; stats.bootstrap, recentre), BLAS held to
    one thread for the many small eigendecompositions, and the cell's lower end clipped at 0."""
    recentred = True

    def bootstrap_context(self):
        return single_blas_thread()

    def cell_result(self, replicates: list, seeds: list | None = None, **load_kw) -> MetricResult:
        out = super().cell_result(replicates, seeds, **load_kw)
        return dataclasses.replace(out, ci_low=max(out.ci_low, 0.0))   # FID >= 0
