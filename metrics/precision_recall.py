"""Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019) and density and coverage
(Naeem et al., ICML 2020) of a sample set against the FID's reference set, in the FID's feature
space (metrics/notes/metrics.md, "Precision and recall").

Each set's manifold is the union of balls around its feature vectors, each ball reaching the k-th
nearest other vector of the same set (Kynkaanniemi et al. sec. 2, eq. 1-2; k = 3 as the paper
recommends; Euclidean distance):
* precision: share of generated images inside the reference manifold (fidelity);
* recall: share of reference images inside the generated manifold (coverage of the reference
  distribution: a mode-seeking, collapsed generator has a small generated manifold, so low recall);
* density (Naeem et al. eq. 5): (1 / kM) sum over generated images of the number of reference
  balls holding it; coverage (eq. 6): share of reference balls holding a generated image.
All four are computed; the metric's `statistic` option picks the reported value (the others go to
the details). Higher is better for all four.

These are set-level statistics against a fixed reference, like FID: the CI resamples prompts (all
seeds of a drawn prompt) and recomputes the statistic, with the reference fixed, so it covers the
statistic at this sample size; paired differences resample the same prompts for both sets and
recompute both. A resample's generated manifold is built from its distinct images: a duplicate
adds no point to a union of balls, and counting it would make a point's copies its own nearest
neighbours at distance 0. Fewer distinct images shrink the manifold, so a resample's recall is
biased low; as for FID, the percentile interval is recentred on the estimate (BCa when asked).

Sample counts: the paper compares equal numbers of real and generated images, and the radii shrink
as a set grows, so `reference_n: match` (default) draws as many reference images as the sample set
holds, by a fixed seed; `all` uses the whole reference. Numbers at different N or with another
reference are another protocol (the identity records both).

Features: the toy route ("toy_precision", "toy_recall") uses the toy FID's extractor and its cached
reference renders (metrics/fid_toy.py ToyFID); the real route ("precision", "recall") uses the real
FID's clean-fid Inception and its cached reference features (the paper used VGG-16 fc2 features;
Inception pool features are the FID's and are recorded as such in the identity).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fewstep.backbones.weights import WeightFile
from metrics.base import Metric, MetricResult, paired_summary
from metrics.sampleset import SampleSet, load_sample_set
from metrics.stats import BootstrapCI, bootstrap, group_indices

STATISTICS = {"precision": "share of generated images inside the reference manifold",
              "recall": "share of reference images inside the generated manifold",
              "density": "mean number of reference balls holding a generated image, over k",
              "coverage": "share of reference balls holding a generated image"}
BOUNDED = ("precision", "recall", "coverage")          # in [0, 1]; density is >= 0
REFERENCE_N = {"match": "as many reference images as samples, drawn with a fixed seed",
               "all": "the whole reference set"}
REFERENCE_SUBSAMPLE_SEED = 0
EXACT_LIMIT = 2e8    # below this many (rows x cols x dims), distances without the matmul shortcut


# ------------------------------------------------------------------------------- the formulas

def pairwise_distances(a, b, device="cpu") -> torch.Tensor:
    """Euclidean distances (len(a), len(b)) in float64; exact (no |a|^2 + |b|^2 - 2ab shortcut,
    so identical vectors are exactly 0 apart) unless the sets are large."""
    x = torch.as_tensor(np.asarray(a, np.float64), device=device)
    y = torch.as_tensor(np.asarray(b, np.float64), device=device)
    exact = x.shape[0] * y.shape[0] * x.shape[1] <= EXACT_LIMIT
    mode = "donot_use_mm_for_euclid_dist" if exact else "use_mm_for_euclid_dist"
    return torch.cdist(x, y, compute_mode=mode).clamp_min(0.0)


def _kth_smallest(rows, k: int):
    """Per row, the (k+1)-th smallest entry (k = 0 is the smallest): numpy on the CPU (np.partition
    is ~50x faster there than torch.kthvalue on a shared CPU), torch.topk on a GPU."""
    if isinstance(rows, np.ndarray):
        return np.partition(rows, k, axis=1)[:, k]
    return torch.topk(rows, k + 1, dim=1, largest=False).values[:, -1]


def _radii(square, k: int):
    """Per row of a set's own distance matrix, the distance to its k-th nearest other point: the
    (k+1)-th smallest entry, the point's own 0 being one of the smallest."""
    return _kth_smallest(square, k)


def knn_radii(points, k: int = 3) -> np.ndarray:
    """k-NN radius of every point of a set (Kynkaanniemi et al. eq. 1)."""
    points = np.asarray(points, np.float64)
    if len(points) < k + 1:
        raise ValueError(f"k = {k} needs at least {k + 1} points; got {len(points)}")
    return _radii(pairwise_distances(points, points).numpy(), k)


class ManifoldResampler:
    """Precision, recall, density and coverage of generated rows `idx` (duplicates allowed)
    against a fixed reference; distances computed once, so each bootstrap resample is cheap
    (numpy arrays on the CPU, torch tensors on a GPU)."""

    def __init__(self, reference, generated, k: int = 3, device="cpu", use_torch=None):
        """use_torch: keep the distances as torch tensors (None: on a GPU only)."""
        if len(reference) < k + 1 or len(generated) < 2:
            raise ValueError(f"k = {k} needs at least {k + 1} reference and 2 generated feature "
                             f"vectors; got {len(reference)} and {len(generated)}")
        self.k = k
        self.gpu = torch.device(device).type != "cpu" if use_torch is None else bool(use_torch)
        self.d_rg = self._array(pairwise_distances(reference, generated, device))   # (R, G)
        self.d_gg = self._array(pairwise_distances(generated, generated, device))   # (G, G)
        self.r_ref = _radii(self._array(pairwise_distances(reference, reference, device)), k)
        inside = self.d_rg <= self.r_ref[:, None]                                   # ball j holds i
        self._inside = np.asarray(self._host(inside.any(0)))
        self._counts = np.asarray(self._host(inside.sum(0)), dtype=np.float64)

    def _array(self, tensor: torch.Tensor):
        return tensor if self.gpu else tensor.numpy()

    def _host(self, value):
        return value.cpu().numpy() if isinstance(value, torch.Tensor) else value

    def _distinct(self, idx):
        u = np.unique(np.asarray(idx))
        return torch.as_tensor(u, device=self.d_rg.device) if self.gpu else u

    def in_reference(self, idx) -> np.ndarray:
        return self._inside[np.asarray(idx)]

    def precision(self, idx) -> float:
        return float(self._inside[np.asarray(idx)].mean())

    def density(self, idx) -> float:
        idx = np.asarray(idx)
        return float(self._counts[idx].sum() / (self.k * len(idx)))

    def coverage(self, idx) -> float:
        nearest = self._min_cols(self._distinct(idx))          # each reference's nearest draw
        return float((nearest <= self.r_ref).sum()) / len(self.r_ref)

    def _min_cols(self, u):
        return self.d_rg[:, u].amin(1) if self.gpu else self.d_rg[:, u].min(1)

    def recall(self, idx) -> float:
        """Generated manifold of the distinct drawn rows (k capped at their number less one)."""
        u = self._distinct(idx)
        if len(u) < 2:
            return 0.0
        own = self.d_gg[u][:, u] if self.gpu else self.d_gg[np.ix_(u, u)]
        radii = _radii(own, min(self.k, len(u) - 1))
        return float((self.d_rg[:, u] <= radii[None, :]).any(1).sum()) / len(self.r_ref)

    def scores(self, idx=None) -> dict:
        idx = np.arange(len(self._inside)) if idx is None else np.asarray(idx)
        return {name: getattr(self, name)(idx) for name in STATISTICS}


def manifold_scores(reference, generated, k: int = 3) -> dict:
    """All four statistics of whole sets (features (N, D) each)."""
    return ManifoldResampler(reference, generated, k).scores()


def match_reference(features: np.ndarray, n: int, how: str) -> np.ndarray:
    """The reference rows used: all, or n drawn without replacement by a fixed seed (match)."""
    if how == "all" or len(features) <= n:
        return features
    rng = np.random.default_rng(REFERENCE_SUBSAMPLE_SEED)
    return features[np.sort(rng.choice(len(features), size=n, replace=False))]


# --------------------------------------------------------------------------------- the metric

@dataclass
class PrecisionRecall(Metric):
    """k-NN manifold statistics of a sample set against a fixed reference (module docstring);
    subclasses give the features (`sample_features`, `reference_features`, `feature_identity`)."""
    higher_is_better = True
    recentred = True     # two-level intervals too: a resample's manifold has fewer distinct images
    prefix = ""

    statistic: str = "recall"
    k: int = 3
    reference_n: str = "match"
    min_n: int = 10_000        # fewer samples: marked not comparable with published numbers (as FID)
    _refs: dict = field(default_factory=dict, init=False, repr=False)   # resolution -> stats

    def __post_init__(self):
        from fewstep.errors import did_you_mean

        if self.statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {self.statistic!r}."
                             f"{did_you_mean(self.statistic, STATISTICS)} One of "
                             f"{sorted(STATISTICS)}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"k must be a positive integer (the paper's is 3); got {self.k!r}")
        if self.reference_n not in REFERENCE_N:
            raise ValueError(f"unknown reference_n {self.reference_n!r}; one of "
                             f"{sorted(REFERENCE_N)}")
        self.name = f"{self.prefix}{self.statistic}"

    # -- what subclasses give ----------------------------------------------------------------
    def sample_features(self, ss: SampleSet) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} must implement sample_features(ss): "
                                  "one feature vector per image, in manifest order")

    def reference_features(self, ss: SampleSet):
        """The reference's ReferenceStats (features, identity, stats_sha256) for this set."""
        raise NotImplementedError(f"{type(self).__name__} must implement reference_features(ss)")

    def feature_identity(self, ss: SampleSet) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement feature_identity(ss): "
                                  "what identifies its feature extractor")

    def resampler_device(self) -> str:
        return "cpu"

    # -- scoring ----------------------------------------------------------------------------
    def cached_reference(self, ss: SampleSet):
        """reference_features, built (or read from its cache file) once per image size."""
        key = tuple(ss.resolution)
        if key not in self._refs:
            self._refs[key] = self.reference_features(ss)
        return self._refs[key]

    def resampler(self, ss: SampleSet, feats: np.ndarray) -> ManifoldResampler:
        ref = match_reference(self.cached_reference(ss).features, len(ss), self.reference_n)
        return ManifoldResampler(ref, feats, self.k, self.resampler_device())

    def _ci(self, statistic_fn, prompt_ids) -> BootstrapCI:
        method = self.set_interval()
        _, groups = group_indices(prompt_ids)
        return bootstrap(statistic_fn, groups, n_resamples=self.n_resamples, level=self.level,
                         seed=self.seed, method=method, recentre=method == "percentile")

    def _clip(self, low: float, high: float) -> tuple[float, float]:
        top = 1.0 if self.statistic in BOUNDED else math.inf
        return max(low, 0.0), min(high, top)

    def image_columns(self, ss: SampleSet) -> dict:
        """Each image's feature vector (a shard's are the whole set's rows: fewstep score
        --partial); the manifolds and their bootstrap need all of them (result_from_columns)."""
        return {"features": self.sample_features(ss)}

    def result_from_columns(self, ss: SampleSet, columns: dict, allow_blank: bool) -> MetricResult:
        res = self.resampler(ss, columns["features"])
        ci = self._ci(getattr(res, self.statistic), ss.prompt_ids())
        inside = res.in_reference(np.arange(len(ss)))
        per_sample = [{"prompt_id": r["prompt_id"], "seed": r["seed"], "path": r["path"],
                       "in_reference_manifold": float(inside[i])}
                      for i, r in enumerate(ss.records)]
        details = {**res.scores(), "ci_method": ci.method, "ci_level": self.level,
                   "n_resamples": self.n_resamples, "n_reference_used": len(res.r_ref),
                   # like FID's: the interval covers the statistic at this N with the reference
                   # fixed, and numbers at another N are not compared (fewstep.audit reads min_n)
                   "min_n": self.min_n, "comparable": len(ss) >= self.min_n,
                   "blank_images_allowed": bool(allow_blank)}
        low, high = self._clip(ci.low, ci.high)
        return self.result(ci.estimate, (low, high), len(ss), per_sample,
                           self.identity(ss, len(res.r_ref)), details)

    def identity(self, ss: SampleSet, n_reference_used: int) -> dict:
        ref = self.cached_reference(ss)
        return {"metric": self.name, "version": self.version, "statistic": self.statistic,
                "definition": STATISTICS[self.statistic], "k": self.k, "distance": "euclidean",
                "formulas": "Kynkaanniemi et al. 2019 eq. 1-2 (precision, recall); Naeem et al. "
                            "2020 eq. 5-6 (density, coverage)",
                **self.feature_identity(ss),
                "reference": ref.identity["reference"], "reference_stats_sha256": ref.stats_sha256,
                "reference_n": self.reference_n, "n_reference_used": n_reference_used,
                "reference_subsample_seed": REFERENCE_SUBSAMPLE_SEED,
                "resolution": list(ss.resolution), "n_samples": len(ss),
                "sample_prompt_set_sha256": ss.prompt_set_sha256()}

    # -- paired comparisons and replicates --------------------------------------------------
    def replicate_statistic(self, result: MetricResult, folder, keys, **load_kw):
        """callable(idx) -> the statistic on rows idx of `keys` ((prompt_id, seed) pairs, the
        caller's order) of the set in `folder`, against the fixed reference; the generated
        manifold is rebuilt on each call's rows (a set-level statistic, like FID's)."""
        ss = load_sample_set(folder, **load_kw)
        position = {tuple(k): i for i, k in enumerate(ss.keys())}
        missing = [k for k in keys if tuple(k) not in position]
        if missing:
            raise ValueError(f"{len(missing)} (prompt_id, seed) keys are not in {folder}, e.g. "
                             f"{missing[:3]}; replicates must share the prompts and seeds")
        order = np.array([position[tuple(k)] for k in keys], dtype=np.int64)
        stat = getattr(self.resampler(ss, self.columns_of(ss)["features"]), self.statistic)
        return lambda idx: stat(order[np.asarray(idx, dtype=np.int64)])

    def paired_difference(self, a, b, folder_a=None, folder_b=None, **load_kw) -> dict:
        """A set statistic: resample prompts, recompute both on the same prompts and seeds."""
        if folder_a is None or folder_b is None:
            raise ValueError(f"a paired {self.name} difference needs both sample-set folders "
                             "(features)")
        ci = self.compare(folder_a, folder_b, **load_kw)
        if self.statistic in BOUNDED:   # a recentred interval may leave [-1, 1]; a share cannot
            ci = dataclasses.replace(ci, low=max(ci.low, -1.0), high=min(ci.high, 1.0))
        return paired_summary(ci, self.higher_is_better)

    def paired_difference_cells(self, cell_a: list, cell_b: list, **load_kw) -> dict:
        """Metric.paired_difference_cells, a difference of shares kept inside [-1, 1]."""
        out = super().paired_difference_cells(cell_a, cell_b, **load_kw)
        if self.statistic in BOUNDED:
            out.update(ci_low=max(out["ci_low"], -1.0), ci_high=min(out["ci_high"], 1.0))
        return out

    def cell_result(self, replicates: list, seeds=None, **load_kw) -> MetricResult:
        """Metric.cell_result, the recentred interval clipped to the statistic's range."""
        result = super().cell_result(replicates, seeds, **load_kw)
        low, high = self._clip(result.ci_low, result.ci_high)
        return dataclasses.replace(result, ci_low=low, ci_high=high)

    def compare(self, folder_a, folder_b, **load_kw) -> BootstrapCI:
        """Paired CI of stat(A) - stat(B) on a shared (prompt_id, seed) grid."""
        a = load_sample_set(folder_a, **load_kw)
        keys = a.keys()
        stat_a = self.replicate_statistic(None, folder_a, keys, **load_kw)
        stat_b = self.replicate_statistic(None, folder_b, keys, **load_kw)
        if len(load_sample_set(folder_b, **load_kw)) != len(keys):
            raise ValueError(f"paired comparison needs the same (prompt_id, seed) grid; "
                             f"{folder_a} and {folder_b} differ in size")
        return self._ci(lambda idx: stat_a(idx) - stat_b(idx), a.prompt_ids())


# ------------------------------------------------------------------------------ the toy route

@dataclass
class ToyPrecisionRecall(PrecisionRecall):
    """Against the toy FID's reference renders, in the toy FID extractor's features."""
    name = "toy_recall"
    version = "1"
    prefix = "toy_"

    feature_net: object = field(default=None, repr=False)  # None: the shipped toy FID net
    reference_split: str = "eval"
    reference_prompts: str | None = None
    renders_per_prompt: int = 32
    cache_dir: str | Path | None = None
    device: str = "cpu"
    batch_size: int = 64
    min_n: int = 1000                       # as the toy FID's
    _fids: dict = field(default_factory=dict, init=False, repr=False)   # image size -> ToyFID

    @classmethod
    def context_defaults(cls, context) -> dict:
        """The toy FID's: the job's feature net, cache and reference renders (ToyFID)."""
        from metrics.fid import ToyFID
        return ToyFID.context_defaults(context)

    def toy_fid(self, ss: SampleSet):
        from fewstep.toy.features import shipped_feature_net
        from metrics.fid import ToyFID

        height, width = ss.resolution
        if height != width:
            raise ValueError(f"{self.name} needs square images; {ss.folder} holds {height}x{width}")
        if height not in self._fids:
            net = self.feature_net if self.feature_net is not None else shipped_feature_net(height)
            self._fids[height] = ToyFID(
                feature_net=net, reference_split=self.reference_split,
                reference_prompts=self.reference_prompts,
                renders_per_prompt=self.renders_per_prompt, cache_dir=self.cache_dir,
                device=self.device, batch_size=self.batch_size)
        return self._fids[height]

    def reference_features(self, ss: SampleSet):
        return self.toy_fid(ss).reference(ss.resolution[0])

    def sample_features(self, ss: SampleSet) -> np.ndarray:
        from metrics.fid import _check_prompts

        fid = self.toy_fid(ss)
        _check_prompts(ss, self.cached_reference(ss), self.reference_split)
        return fid.features(ss)

    def feature_identity(self, ss: SampleSet) -> dict:
        from metrics.fid import MODE, resize_policy

        ex = self.toy_fid(ss).extractor
        return {"features": "toy FID extractor (the toy FID's reference renders and features)",
                "extractor": ex.name, "extractor_sha256": ex.sha256, "mode": MODE,
                "resize": resize_policy(ex.size)}


@dataclass
class ToyPrecision(ToyPrecisionRecall):
    name = "toy_precision"
    statistic: str = "precision"


@dataclass
class ToyRecall(ToyPrecisionRecall):
    name = "toy_recall"
    statistic: str = "recall"


# ----------------------------------------------------------------------------- the real route

@dataclass
class InceptionPrecisionRecall(PrecisionRecall):
    """Against the real FID's reference images, in its clean-fid Inception features (cached)."""
    name = "recall"
    version = "1"
    prefix = ""

    reference: str = "coco2014-val"     # as metrics.fid.FID: a bare name is under refs/
    eval_resolution: int | None = None
    crop: str = "center"
    mode: str = "clean"
    cache_dir: str | Path | None = None
    device: str | None = None           # None: CUDA when available
    batch_size: int = 64
    _fid_metric: object = field(default=None, init=False, repr=False)

    def fid(self):
        from metrics.fid import FID

        if self._fid_metric is None:
            self._fid_metric = FID(reference=self.reference, eval_resolution=self.eval_resolution,
                                   crop=self.crop, mode=self.mode, cache_dir=self.cache_dir,
                                   device=self.device, batch_size=self.batch_size)
        return self._fid_metric

    def weight_files(self) -> list[WeightFile]:
        return self.fid().weight_files()

    def load_weights(self) -> None:
        self.fid().extractor()

    def resampler_device(self) -> str:
        return self.fid()._device()

    def reference_features(self, ss: SampleSet):
        fid = self.fid()
        return fid.reference_stats(fid.resolution_for(ss))

    def sample_features(self, ss: SampleSet) -> np.ndarray:
        fid = self.fid()
        return fid.features(ss, fid.resolution_for(ss))

    def feature_identity(self, ss: SampleSet) -> dict:
        from metrics.fid import protocol_policy

        fid, ex = self.fid(), self.fid().extractor()
        size = fid.resolution_for(ss)
        return {"features": "clean-fid Inception pool features, the FID's (paper: VGG-16 fc2)",
                "extractor": ex.name, "extractor_sha256": ex.sha256, "mode": self.mode,
                "eval_resolution": size, "crop": self.crop,
                "policy": protocol_policy(size, self.crop, self.mode)}


@dataclass
class InceptionPrecision(InceptionPrecisionRecall):
    name = "precision"
    statistic: str = "precision"


@dataclass
class InceptionRecall(InceptionPrecisionRecall):
    name = "recall"
    statistic: str = "recall"
