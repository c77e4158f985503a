"""FID (and KID) through clean-fid: the toy route (`ToyFID`, toy feature net; metrics/fid_toy.py)
and the real route (`FID`, clean-fid's Inception; here). Both, and every helper they are built
from, are importable from this module:

* metrics/fid_frechet.py: the Frechet distance, KID, the resampled FID, FrechetCells;
* metrics/fid_features.py: image files to features through clean-fid's loop; the toy feature net;
* metrics/fid_inception.py: clean-fid's Inception from the weights cache;
* metrics/fid_protocol.py: evaluation resolution and crop policy (sec. 3.8);
* metrics/fid_reference.py: cached reference statistics; reference image folders;
* metrics/fid_toy.py: the toy route (ToyFID, its reference renders).

The real route (`FID`, sec. 3.1-3.8) shares the toy route's machinery, with clean-fid's Inception:
* Mode "clean" by default (clean-fid's PIL bicubic float resizer to 299 and the TorchScript
  Inception); "legacy_tensorflow" and "legacy_pytorch" are named options; the mode is recorded.
* The Inception file is the one clean-fid would download (its name is read from the installed
  package) and comes from the weights cache, `$FEWSTEP_WEIGHTS/cleanfid/`: clean-fid's wrapper
  is built on that folder with download disabled (legacy_pytorch: its state-dict fetch is served
  the local file), so nothing is fetched and the hard-coded /tmp cache is never used.
* Protocol (sec. 3.8): samples and reference images are brought to the evaluation
  resolution by the crop policy (centre square crop + Lanczos as DMD/DMD2 do; or patch crops)
  before clean-fid's resizer. Reference features are built once per (reference folder listing,
  resolution, crop policy, mode, Inception sha256) and cached like the toy references.
* The CI resamples prompts and recomputes FID on each resample in float64 torch (same formula;
  2048-d resamples run on the GPU when there is one); KID as in the toy route.

Training seeds (both routes, FrechetCells): a replicate's statistic on a resample is its FID
against the same fixed reference; a cell's interval and a comparison of cells come from
metrics.seed_level (default t: prompt-bootstrap variance plus between-seed variance / k; the
`bootstrap` level is recentred like the one-seed interval).
Sections (sec. N) are those of metrics/notes/metrics.md.
"""
from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fewstep.backbones.weights import WeightFile
from metrics.base import Metric, MetricResult
from metrics.fid_features import default_cache_dir, files_features
from metrics.fid_frechet import FrechetCells, fid_resampler, kid_from_features
from metrics.fid_inception import InceptionExtractor, inception_weight_file, load_inception
from metrics.fid_protocol import check_mode_and_crop, protocol_policy, protocol_transform
from metrics.fid_reference import (REFERENCE_SOURCES, REFERENCES_DIR, ReferenceStats, _stats,
                                   cached_features, list_reference_images, real_reference_key,
                                   reference_folder, reference_identity)
from metrics.sampleset import SampleSet, load_sample_set
from metrics.stats import BootstrapCI, align_pairs, bootstrap, group_indices

# The other FID helpers, re-exported: callers (metrics, commands, tests) import them from here.
from metrics.fid_features import (MODE, _load_extractor, clean_resizer,  # noqa: F401
                                  default_feature_net, extract_features, resize_policy)
from metrics.fid_frechet import (frechet_distance, gaussian_stats, psd_sqrt,  # noqa: F401
                                 single_blas_thread, trace_sqrt_product)
from metrics.fid_inception import (CLEANFID_DIR, INCEPTION_MODES, MODE_RESIZE,  # noqa: F401
                                   _local_state_dict, inception_url)
from metrics.fid_protocol import CROP_POLICIES, _centre_crop  # noqa: F401
from metrics.fid_reference import REAL_REFERENCE_VERSION, REFERENCE_EXTENSIONS  # noqa: F401
from metrics.fid_toy import (REFERENCE_VERSION, ReferenceSpec, ToyFID, _check_prompts,  # noqa: F401
                             _render_reference_folder, build_reference, reference_key)


def build_real_reference(files: list[Path], name: str, extractor: InceptionExtractor,
                         resolution: int, crop: str, cache_dir=None, *, device="cpu",
                         batch_size: int = 64) -> ReferenceStats:
    """Reference Inception features, from the cache when this key was built before."""
    key, ident = real_reference_key(reference_identity(name, files), extractor.sha256,
                                    extractor.mode, resolution, crop)
    path = Path(cache_dir or default_cache_dir()) / "fid" / f"reference-{key[:20]}.npz"
    feats = cached_features(path, ident, lambda: files_features(
        files, extractor, mode=extractor.mode, image_transform=protocol_transform(resolution, crop),
        device=device, batch_size=batch_size).astype(np.float32))  # Inception emits float32
    return _stats(feats, [], ident)


@dataclass
class FID(FrechetCells, Metric):
    """FID (and KID) of a sample set against a folder of reference images, clean-fid Inception.

    Samples and references go through the same protocol: crop policy and evaluation resolution
    (PIL Lanczos, uint8), then clean-fid's mode resizer and Inception. Reference features are
    built once per (reference set, resolution, crop policy, mode, Inception file) and cached in
    `cache_dir`/fid. The CI resamples prompts (all seeds of a drawn prompt) and recomputes FID.
    """
    name = "fid"
    version = "1"
    higher_is_better = False

    reference: str = "coco2014-val"     # bare name: $FEWSTEP_WEIGHTS/refs/<name>/; else a folder
    eval_resolution: int | None = None  # None: the sample set's size (square sets only)
    crop: str = "center"
    mode: str = "clean"
    cache_dir: str | Path | None = None
    device: str | None = None           # None: CUDA when available
    batch_size: int = 64                # fixed and recorded (fewstep/notes/pitfalls.md A.2)
    min_n: int = 10_000                 # fewer samples: marked not comparable (fewstep/notes/pitfalls.md B.8)
    _extractor: InceptionExtractor | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        check_mode_and_crop(self.mode, self.crop)

    def weight_files(self) -> list[WeightFile]:
        from fewstep.backbones.weights import is_bare_name

        files = [inception_weight_file(self.mode)]
        if is_bare_name(os.fspath(self.reference)):
            source = REFERENCE_SOURCES.get(self.reference, "your reference images, one flat folder")
            files.append(WeightFile(f"{REFERENCES_DIR}/{self.reference}/", source,
                                    "reference images; FID statistics are built from them once"))
        return files

    def _device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def extractor(self) -> InceptionExtractor:
        """The Inception, loaded on first use (building the metric reads no weights)."""
        if self._extractor is None:
            self._extractor = load_inception(self.mode, self._device())
        return self._extractor

    def resolution_for(self, ss: SampleSet) -> int:
        if self.eval_resolution is not None:
            return int(self.eval_resolution)
        height, width = ss.resolution
        if height != width:
            raise ValueError(f"FID: {ss.folder} holds {height}x{width} images; set eval_resolution "
                             "(and crop) to say how they are brought to a square")
        return height

    def reference_stats(self, resolution: int) -> ReferenceStats:
        files = list_reference_images(reference_folder(self.reference))
        return build_real_reference(files, Path(os.fspath(self.reference)).name, self.extractor(),
                                    resolution, self.crop, self.cache_dir, device=self._device(),
                                    batch_size=self.batch_size)

    def features(self, ss: SampleSet, resolution: int) -> np.ndarray:
        return files_features(ss.image_paths(), self.extractor(), mode=self.mode,
                              image_transform=protocol_transform(resolution, self.crop),
                              device=self._device(), batch_size=self.batch_size)

    def identity(self, ref: ReferenceStats, ss: SampleSet, resolution: int) -> dict:
        ex = self.extractor()
        return {"metric": self.name, "version": self.version, "mode": self.mode,
                "implementation": f"clean-fid {importlib.metadata.version('clean-fid')} "
                                  "get_files_features + fewstep frechet_distance (eigh, float64), "
                                  f"torch {torch.__version__}",
                "extractor": ex.name, "extractor_sha256": ex.sha256,
                "resolution": resolution, "crop": self.crop,
                "policy": protocol_policy(resolution, self.crop, self.mode),
                "sample_resolution": list(ss.resolution),
                "sample_prompt_set_sha256": ss.prompt_set_sha256(),
                "reference": ref.identity["reference"], "reference_stats_sha256": ref.stats_sha256,
                "batch_size": self.batch_size}

    def image_columns(self, ss: SampleSet) -> dict:
        """Each image's Inception features (a shard's are the whole set's rows: fewstep score
        --partial); the FID and its bootstrap need all of them (result_from_columns)."""
        return {"features": self.features(ss, self.resolution_for(ss))}

    def result_from_columns(self, ss: SampleSet, columns: dict, allow_blank: bool) -> MetricResult:
        size = self.resolution_for(ss)
        ref = self.reference_stats(size)
        feats = columns["features"]
        _, groups = group_indices(ss.prompt_ids())
        ci = bootstrap(fid_resampler(feats, ref, self._device()), groups,
                       n_resamples=self.n_resamples, level=self.level, seed=self.seed,
                       recentre=True)
        details = {"kid": kid_from_features(feats, ref.features, self.seed),
                   "ci_method": ci.method, "ci_level": self.level, "n_resamples": self.n_resamples,
                   "n_reference": int(len(ref.features)), "min_n": self.min_n,
                   "comparable": len(ss) >= self.min_n, "device": self._device(),
                   "blank_images_allowed": bool(allow_blank)}
        per_sample = [{"prompt_id": r["prompt_id"], "seed": r["seed"], "path": r["path"]}
                      for r in ss.records]
        # FID >= 0: a recentred interval around a near-zero FID may dip below 0; clip it there.
        return self.result(ci.estimate, (max(ci.low, 0.0), ci.high), len(ss), per_sample,
                           self.identity(ref, ss, size), details)

    def paired_difference(self, a, b, folder_a=None, folder_b=None, **load_kw) -> dict:
        """FID is a set statistic: resample prompts and recompute both FIDs (see compare)."""
        from metrics.base import paired_summary

        if folder_a is None or folder_b is None:
            raise ValueError("a paired FID difference needs both sample-set folders (features)")
        return paired_summary(self.compare(folder_a, folder_b, **load_kw), self.higher_is_better)

    def replicate_statistic(self, result, folder, keys, **load_kw):
        """fid(idx): FID of the replicate's images at rows idx of `keys` against the fixed
        reference statistics, by fid_resampler as score_set and compare compute it."""
        ss = load_sample_set(folder, **load_kw)
        size = self.resolution_for(ss)
        _, order = align_pairs(keys, ss.keys())
        return fid_resampler(self.columns_of(ss)["features"][order], self.reference_stats(size),
                             self._device())

    def compare(self, folder_a, folder_b, **load_kw) -> BootstrapCI:
        """Paired CI of FID(A) - FID(B) on a shared (prompt_id, seed) grid, resampling prompts."""
        a, b = load_sample_set(folder_a, **load_kw), load_sample_set(folder_b, **load_kw)
        size = self.resolution_for(a)
        if self.resolution_for(b) != size:
            raise ValueError(f"compare needs one evaluation resolution; got {a.resolution} and "
                             f"{b.resolution} without eval_resolution")
        _, order_b = align_pairs(a.keys(), b.keys())
        ref = self.reference_stats(size)
        fid_a = fid_resampler(self.columns_of(a)["features"], ref, self._device())
        fid_b = fid_resampler(self.columns_of(b)["features"][order_b], ref, self._device())
        _, groups = group_indices(a.prompt_ids())
        return bootstrap(lambda idx: fid_a(idx) - fid_b(idx), groups, n_resamples=self.n_resamples,
                         level=self.level, seed=self.seed, recentre=True)
