"""The toy FID (and KID) through clean-fid, with the toy feature net, against renders of the
sample set's prompt set.

How the toy FID keeps to clean-fid's code path (sec. 3):
* Images are read and featurised by clean-fid itself: `cleanfid.fid.get_files_features`, i.e. its
  ResizeDataset (PIL -> RGB uint8 -> resizer -> float tensor in [0, 255]) and its batch loop that
  calls the custom extractor under no_grad on the device. This is what `compute_fid` runs inside;
  we call that layer because `compute_fid` returns only a number and we need per-image features
  for the bootstrap over prompts and for KID.
* Mode "clean", with one deviation: clean mode resizes to 299 px for Inception, which would make a
  32 px toy extractor see an upsampled-then-downsampled image. We pass clean-fid's own clean
  resizer (`make_resizer("PIL", quantize_after=False, "bicubic")`, float32 per channel, no
  re-quantisation) with the output size set to the extractor's input size instead of 299. For
  samples at the extractor's resolution this resize is the identity. The identity records
  mode "clean" and this resize policy.
* The file list is the manifest's, never a glob, so stray files cannot enter
  (fewstep/notes/pitfalls.md A.7).
* The Frechet distance is ours (same formula; matrix square root by symmetric eigendecomposition),
  so it does not depend on `scipy.linalg.sqrtm`'s signature (`disp=` was removed in SciPy 1.18).
* KID uses clean-fid's `kernel_distance`, with NumPy's global RNG seeded and then restored.
* Reference statistics are built once from renders of the prompt set and cached in a file keyed by
  (reference set, resolution, extractor hash, resize policy); never in the package folder.

Sections (sec. N) are those of metrics/notes/metrics.md.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from metrics.base import Metric, MetricResult
from metrics.fid_features import (MODE, _load_extractor, default_cache_dir, extract_features,
                                  resize_policy)
from metrics.fid_frechet import (FrechetCells, frechet_distance, gaussian_stats, kid_from_features,
                                 single_blas_thread)
from metrics.fid_reference import ReferenceStats, _stats, cached_features
from metrics.sampleset import SampleSet, load_sample_set
from metrics.stats import BootstrapCI, align_pairs, bootstrap, group_indices

REFERENCE_VERSION = "1"


@dataclass(frozen=True)
class ReferenceSpec:
    """Renders of a prompt set: renders_per_prompt images per prompt, seeds seed_offset + j.

    The prompts are a toy-world split, or (prompt_file) a prompt .jsonl of GenEval-format rows,
    such as a family's held-out set (class-conditional SiT sets included). Only the file's
    content enters the identity, through its sha256, never its path.
    """
    split: str = "eval"
    n_prompts: int | None = None          # None: the whole split
    renders_per_prompt: int = 32
    seed_offset: int = 1_000_000          # far from sampling seeds, so renders are independent
    resolution: int = 32
    prompt_file: str | None = None

    def metas(self) -> list[dict]:
        if self.prompt_file is not None:
            from fewstep.prompts import read_prompts
            return read_prompts(self.prompt_file)[:self.n_prompts]
        from fewstep.toy import world
        return world.prompt_set(self.split, n=self.n_prompts)

    def identity(self) -> dict:
        lines = "\n".join(json.dumps(m, sort_keys=True) for m in self.metas())
        fields = {k: v for k, v in asdict(self).items() if k != "prompt_file"}
        if self.prompt_file is not None:
            fields["split"] = "prompt-file"
        return {"kind": "toy-render", "version": REFERENCE_VERSION, **fields,
                "prompt_set_sha256": hashlib.sha256(lines.encode()).hexdigest()}


def _render_reference_folder(spec: ReferenceSpec, folder: Path) -> list[Path]:
    """Write the reference renders as PNGs, so they take the same decode path as samples."""
    from fewstep.toy import world
    paths = []
    for i, meta in enumerate(spec.metas()):
        for j in range(spec.renders_per_prompt):
            image, _ = world.render(meta, spec.seed_offset + j, spec.resolution)
            paths.append(folder / f"{i:05d}_{j:04d}.png")
            Image.fromarray(image, mode="RGB").save(paths[-1], format="PNG")
    return paths


def reference_key(spec: ReferenceSpec, extractor) -> tuple[str, dict]:
    ident = {"reference": spec.identity(), "extractor_sha256": extractor.sha256,
             "mode": MODE, "resize": resize_policy(extractor.size)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest(), ident


def build_reference(spec: ReferenceSpec, extractor, cache_dir=None, *, device="cpu",
                    batch_size: int = 64) -> ReferenceStats:
    """Reference features and statistics, from the cache file if present, else rendered now."""
    key, ident = reference_key(spec, extractor)
    path = Path(cache_dir or default_cache_dir()) / "toy_fid" / f"reference-{key[:20]}.npz"

    def render_and_extract():
        with tempfile.TemporaryDirectory(prefix="toyfid-ref-") as tmp:
            return extract_features(_render_reference_folder(spec, Path(tmp)), extractor,
                                    device=device, batch_size=batch_size)

    feats = cached_features(path, ident, render_and_extract)
    return _stats(feats, [m["prompt_id"] for m in spec.metas()], ident)


@dataclass
class ToyFID(FrechetCells, Metric):
    """FID of a sample set against renders of its prompt set, in toy feature-net space."""
    name = "toy_fid"
    version = "1"
    higher_is_better = False

    feature_net: object = field(default=None, repr=False)  # ToyFeatureNet, .safetensors path, None
    reference_split: str = "eval"
    reference_prompts: str | None = None    # a prompt .jsonl instead of a split (see ReferenceSpec)
    renders_per_prompt: int = 32
    cache_dir: str | Path | None = None
    device: str = "cpu"
    batch_size: int = 64
    min_n: int = 1000                       # fewer samples: marked not comparable (fewstep/notes/pitfalls.md B.8)

    def __post_init__(self):
        self.extractor = _load_extractor(self.feature_net, self.cache_dir)

    @classmethod
    def context_defaults(cls, context) -> dict:
        """The scoring job's feature net, cache and reference renders: `reference_images` renders
        of the job's prompt file in all (rounded up to whole renders per prompt)."""
        per_prompt = math.ceil(context.reference_images / len(context.prompt_rows))
        return {"feature_net": context.feature_net, "reference_prompts": str(context.prompts),
                "renders_per_prompt": per_prompt, "cache_dir": context.cache}

    def reference(self, resolution: int) -> ReferenceStats:
        spec = ReferenceSpec(self.reference_split, None, self.renders_per_prompt,
                             resolution=resolution, prompt_file=self.reference_prompts)
        return build_reference(spec, self.extractor, self.cache_dir, device=self.device,
                               batch_size=self.batch_size)

    def features(self, ss: SampleSet) -> np.ndarray:
        return extract_features(ss.image_paths(), self.extractor, device=self.device,
                                batch_size=self.batch_size)

    def identity(self, ref: ReferenceStats, ss: SampleSet) -> dict:
        cleanfid_version = importlib.metadata.version("clean-fid")
        return {"metric": self.name, "version": self.version, "mode": MODE,
                "implementation": f"clean-fid {cleanfid_version} get_files_features + fewstep "
                                  "frechet_distance (eigh)",
                "resize": resize_policy(self.extractor.size), "extractor": self.extractor.name,
                "extractor_sha256": self.extractor.sha256, "resolution": list(ss.resolution),
                "sample_prompt_set_sha256": ss.prompt_set_sha256(),
                "reference": ref.identity["reference"], "reference_stats_sha256": ref.stats_sha256,
                "batch_size": self.batch_size}

    def checked_reference(self, ss: SampleSet) -> ReferenceStats:
        """The reference at the set's (square) size, the set's prompts checked against it."""
        height, width = ss.resolution
        if height != width:
            raise ValueError(f"toy FID needs square images; {ss.folder} holds {height}x{width}")
        ref = self.reference(height)
        _check_prompts(ss, ref, self.reference_split)
        return ref

    def image_columns(self, ss: SampleSet) -> dict:
        """Each image's feature vector (a shard's are the whole set's rows: fewstep score
        --partial); the Frechet distance and its bootstrap need all of them (result_from_columns)."""
        self.checked_reference(ss)
        return {"features": self.features(ss)}

    def result_from_columns(self, ss: SampleSet, columns: dict, allow_blank: bool) -> MetricResult:
        ref = self.checked_reference(ss)
        feats = columns["features"]
        _, groups = group_indices(ss.prompt_ids())

        def fid_of(idx):
            mu, sigma = gaussian_stats(feats[idx])
            return frechet_distance(mu, sigma, ref.mu, ref.sigma, ref.sqrt_sigma)

        with single_blas_thread():
            ci = bootstrap(fid_of, groups, n_resamples=self.n_resamples, level=self.level,
                           seed=self.seed, recentre=True)
            kid = kid_from_features(feats, ref.features, self.seed)
        details = {"kid": kid,
                   "ci_method": ci.method, "ci_level": self.level, "n_resamples": self.n_resamples,
                   "n_reference": int(len(ref.features)), "min_n": self.min_n,
                   "comparable": len(ss) >= self.min_n, "blank_images_allowed": bool(allow_blank)}
        per_sample = [{"prompt_id": r["prompt_id"], "seed": r["seed"], "path": r["path"]}
                      for r in ss.records]
        # FID >= 0: a recentred interval around a near-zero FID may dip below 0; clip it there.
        return self.result(ci.estimate, (max(ci.low, 0.0), ci.high), len(ss), per_sample,
                           self.identity(ref, ss), details)

    def paired_difference(self, a, b, folder_a=None, folder_b=None, **load_kw) -> dict:
        """FID is a set statistic: resample prompts and recompute both FIDs (see compare)."""
        from metrics.base import paired_summary

        if folder_a is None or folder_b is None:
            raise ValueError("a paired FID difference needs both sample-set folders (features)")
        return paired_summary(self.compare(folder_a, folder_b, **load_kw), self.higher_is_better)

    def replicate_statistic(self, result, folder, keys, **load_kw):
        """fid(idx): toy FID of the replicate's images at rows idx of `keys` against the fixed
        reference, computed as score_set and compare compute it."""
        ss = load_sample_set(folder, **load_kw)
        if ss.resolution[0] != ss.resolution[1]:
            raise ValueError(f"toy FID needs square images; {folder} holds {ss.resolution}")
        ref = self.reference(ss.resolution[0])
        _check_prompts(ss, ref, self.reference_split)
        _, order = align_pairs(keys, ss.keys())
        feats = self.columns_of(ss)["features"][order]
        return lambda idx: frechet_distance(*gaussian_stats(feats[idx]), ref.mu, ref.sigma,
                                            ref.sqrt_sigma)

    def compare(self, folder_a, folder_b, **load_kw) -> BootstrapCI:
        """Paired CI of FID(A) - FID(B) on a shared (prompt_id, seed) grid, resampling prompts.

        Both sets are featurised once; each resample draws prompts and recomputes both FIDs on
        the same prompts and seeds, so shared prompt difficulty cancels (paired design).
        """
        a, b = load_sample_set(folder_a, **load_kw), load_sample_set(folder_b, **load_kw)
        if a.resolution != b.resolution or a.resolution[0] != a.resolution[1]:
            raise ValueError(f"compare needs square images of one size; got {a.resolution} and "
                             f"{b.resolution}")
        _, order_b = align_pairs(a.keys(), b.keys())
        ref = self.reference(a.resolution[0])
        _check_prompts(a, ref, self.reference_split)
        feats_a, feats_b = self.columns_of(a)["features"], self.columns_of(b)["features"][order_b]
        _, groups = group_indices(a.prompt_ids())

        def fid_of(feats, idx):
            return frechet_distance(*gaussian_stats(feats[idx]), ref.mu, ref.sigma, ref.sqrt_sigma)

        with single_blas_thread():
            return bootstrap(lambda idx: fid_of(feats_a, idx) - fid_of(feats_b, idx), groups,
                             n_resamples=self.n_resamples, level=self.level, seed=self.seed,
                             recentre=True)


def _check_prompts(ss: SampleSet, ref: ReferenceStats, split: str) -> None:
    """Samples must come from the reference's prompt set, or the comparison is meaningless."""
    unknown = sorted(set(ss.prompt_ids()) - set(ref.prompt_ids))
    if unknown:
        raise ValueError(f"{len(unknown)} prompt ids of {ss.folder} are not in the reference prompt "
                         f"set ({split!r}), e.g. {unknown[:3]}; sample from that split or set "
                         "reference_split to the split the samples were generated from")
