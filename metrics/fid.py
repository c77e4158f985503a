"""FID (and KID) through clean-fid: the toy route (toy feature net) and the real route (Inception).

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

The real route (`FID`, sec. 3.1-3.8) shares that machinery with clean-fid's own Inception:
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

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fewstep.backbones.weights import WeightFile
from metrics.base import Metric, MetricResult
from metrics.sampleset import SampleSet, load_sample_set
from metrics.stats import BootstrapCI, align_pairs, bootstrap, group_indices

MODE = "clean"
REFERENCE_VERSION = "1"


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


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEWSTEP_CACHE_DIR", "results/cache"))


# ------------------------------------------------------------------------------- the formula

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


# --------------------------------------------------------------- features through clean-fid

def clean_resizer(size: int):
    """clean-fid's clean-mode resizer (PIL bicubic on float32 channels), to the extractor's size."""
    from cleanfid.resize import make_resizer
    return make_resizer("PIL", False, "bicubic", (size, size))


def resize_policy(size: int) -> str:
    return f"clean-fid make_resizer(PIL, bicubic, float32, no re-quantisation) -> {size}x{size}"


def extract_features(paths, extractor, *, device="cpu", batch_size: int = 64) -> np.ndarray:
    """(N, D) features of image files in the given order, via clean-fid's file-feature loop."""
    return files_features(paths, extractor, mode=MODE, fn_resize=clean_resizer(extractor.size),
                          device=device, batch_size=batch_size)


def files_features(paths, extractor, *, mode: str, fn_resize=None, image_transform=None,
                   device="cpu", batch_size: int = 64) -> np.ndarray:
    """(N, D) float64 features of image files in order, through clean-fid's get_files_features.

    fn_resize: None uses the mode's own resizer; image_transform: uint8 HxWx3 -> uint8, applied
    by clean-fid before the resizer (the protocol's crop and resize)."""
    from cleanfid.fid import get_files_features
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("no image files to featurise")
    feats = get_files_features(paths, model=extractor, num_workers=0, batch_size=batch_size,
                               device=torch.device(device), mode=mode, custom_fn_resize=fn_resize,
                               custom_image_tranform=image_transform, verbose=False)
    if feats.shape[0] != len(paths) or not np.isfinite(feats).all():
        raise RuntimeError(f"feature extraction returned {feats.shape} for {len(paths)} files, "
                           "or non-finite values")
    return feats.astype(np.float64)


# ----------------------------------------------------------------------- reference statistics

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


@dataclass
class ReferenceStats:
    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    sqrt_sigma: np.ndarray
    prompt_ids: list[str]
    identity: dict

    @property
    def stats_sha256(self) -> str:
        return hashlib.sha256(self.mu.tobytes() + self.sigma.tobytes()).hexdigest()


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


def cached_features(path: Path, ident: dict, compute) -> np.ndarray:
    """Features stored at `path` with their identity; computed by `compute()` and written
    atomically (temporary file, then rename) when the file is absent or holds another identity."""
    if path.is_file():
        with np.load(path) as data:
            if json.loads(str(data["identity"])) == ident:
                return data["features"]
    feats = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}.npz")
    np.savez(tmp_path, features=feats, identity=json.dumps(ident, sort_keys=True))
    os.replace(tmp_path, path)
    return feats


def _stats(feats: np.ndarray, prompt_ids: list[str], ident: dict) -> ReferenceStats:
    mu, sigma = gaussian_stats(feats)
    return ReferenceStats(np.asarray(feats, np.float64), mu, sigma, psd_sqrt(sigma), prompt_ids, ident)


# --------------------------------------------------------------------------------- the metric

def _load_extractor(feature_net, cache_dir):
    from fewstep.toy.features import ToyFeatureNet, load_feature_net, toy_feature_extractor
    if isinstance(feature_net, ToyFeatureNet):
        return toy_feature_extractor(feature_net)
    if feature_net is not None:
        return toy_feature_extractor(load_feature_net(feature_net))
    return toy_feature_extractor(default_feature_net(cache_dir))


def default_feature_net(cache_dir=None):
    """The default-recipe feature net, trained once (about a minute) and cached by its recipe."""
    from fewstep.toy.features import (FEATURE_NET_VERSION, TrainRecipe, load_feature_net,
                                      save_feature_net, train_feature_net)
    recipe = json.dumps({"version": FEATURE_NET_VERSION, **asdict(TrainRecipe())}, sort_keys=True)
    name = f"feature-net-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}.safetensors"
    path = Path(cache_dir or default_cache_dir()) / "toy_fid" / name
    if path.is_file():
        return load_feature_net(path)
    print(f"toy_fid: training the default feature net once; cached at {path}")
    net = train_feature_net()
    save_feature_net(net, path)
    return net


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


# =================================================================================================
# Real FID/KID: clean-fid's Inception, weights from the weights cache (sec. 3)
# =================================================================================================

INCEPTION_MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")
MODE_RESIZE = {
    "clean": "clean-fid clean: PIL bicubic on float32 channels to 299x299, no re-quantisation",
    "legacy_tensorflow": "clean-fid legacy_tensorflow: no outside resize, the network resizes",
    "legacy_pytorch": "clean-fid legacy_pytorch: torch bilinear (align_corners=False) to 299x299",
}
CROP_POLICIES = {
    "center": "centre square crop (shorter side), then PIL Lanczos to the evaluation resolution",
    "none": "PIL Lanczos to the evaluation resolution, no crop (non-square images are squashed)",
    "patch": "centre crop of the evaluation resolution, no resize (patch FID, e.g. 299 px)",
}
CLEANFID_DIR = "cleanfid"                      # folder of the Inception files in the weights cache
REFERENCES_DIR = "refs"                        # folder of reference image folders in the cache
REFERENCE_SOURCES = {"coco2014-val": "COCO 2014 val images (cocodataset.org val2014.zip, 40,504 "
                                     "JPEGs), unpacked into one flat folder"}
REFERENCE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REAL_REFERENCE_VERSION = "1"


def check_mode_and_crop(mode: str, crop: str) -> None:
    if mode not in INCEPTION_MODES:
        raise ValueError(f"unknown FID mode {mode!r}; one of {INCEPTION_MODES} (clean is the "
                         "default; the legacy modes reproduce older TF/pytorch-fid numbers)")
    if crop not in CROP_POLICIES:
        raise ValueError(f"unknown crop policy {crop!r}; one of {sorted(CROP_POLICIES)}")


# ------------------------------------------------------------------ the Inception weights file

def inception_url(mode: str) -> str:
    """Where clean-fid downloads the mode's Inception weights, read from the installed package."""
    if mode == "legacy_pytorch":
        from cleanfid.inception_pytorch import FID_WEIGHTS_URL
        return FID_WEIGHTS_URL
    from cleanfid.downloads_helper import inception_url as torchscript_url
    return torchscript_url


def inception_weight_file(mode: str) -> WeightFile:
    url = inception_url(mode)
    kind = "pytorch-fid state dict" if mode == "legacy_pytorch" else "TorchScript, ~0.1 GB"
    name = url.rsplit("/", 1)[-1]
    return WeightFile(f"{CLEANFID_DIR}/{name}", url, f"Inception for FID ({kind})")


@contextlib.contextmanager
def _local_state_dict(path: Path):
    """clean-fid's pytorch-fid Inception fetches its state dict by URL; serve our local file."""
    import cleanfid.inception_pytorch as module

    def load_local(url, *args, **kwargs):
        if url.rsplit("/", 1)[-1] != path.name:
            raise RuntimeError(f"clean-fid asked for {url}, but the local file is {path.name}")
        return torch.load(path, map_location="cpu", weights_only=True)

    original = module.load_state_dict_from_url
    module.load_state_dict_from_url = load_local
    try:
        yield
    finally:
        module.load_state_dict_from_url = original


class InceptionExtractor:
    """clean-fid's feature network for a mode, built from the local file with download disabled.

    Called by clean-fid on float batches (B, 3, H, W) in [0, 255] (299 px except in
    legacy_tensorflow mode, whose network resizes inside); returns (B, 2048)."""

    def __init__(self, mode: str, path: Path, device="cpu"):
        from fewstep.backbones.weights import file_sha256

        self.mode, self.path = mode, Path(path)
        self.sha256 = file_sha256(self.path)
        self.name = f"clean-fid {mode} Inception ({self.path.name})"
        self.net = self._build(torch.device(device))

    def _build(self, device):
        if self.mode == "legacy_pytorch":
            from cleanfid.features import feature_extractor
            with _local_state_dict(self.path):
                return feature_extractor("pytorch_inception", device=device, use_dataparallel=False)
        from cleanfid.inception_torchscript import InceptionV3W
        # InceptionV3W loads <folder>/inception-2015-12-05.pt: our file, never downloaded
        net = InceptionV3W(str(self.path.parent), download=False,
                           resize_inside=self.mode == "legacy_tensorflow")
        return net.to(device).eval()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_inception(mode: str, device="cpu") -> InceptionExtractor:
    """The mode's Inception from $FEWSTEP_WEIGHTS/cleanfid/, or MissingWeightsError."""
    from fewstep.backbones.weights import require_entry

    wf = inception_weight_file(mode)
    return InceptionExtractor(mode, require_entry(wf.path, wf.source, f"FID ({mode} mode)"), device)


# ------------------------------------------------------ protocol: evaluation resolution and crop

def _centre_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    # offsets rounded as torchvision's center_crop does (DMD2's protocol uses it)
    top = int(round((image.height - height) / 2.0))
    left = int(round((image.width - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def protocol_transform(resolution: int, crop: str):
    """uint8 HxWx3 -> uint8 HxWx3: the protocol's crop and resize, applied to samples and
    references alike before clean-fid's own resizer (DMD/DMD2 COCO protocols, sec. 3.8)."""
    check_mode_and_crop(MODE, crop)

    def apply(arr: np.ndarray) -> np.ndarray:
        image = Image.fromarray(np.asarray(arr, dtype=np.uint8))
        if crop == "patch":
            if min(image.size) < resolution:
                raise ValueError(f"patch FID needs images of at least {resolution} px; got "
                                 f"{image.width}x{image.height}")
            return np.asarray(_centre_crop(image, resolution, resolution))
        if crop == "center":
            side = min(image.size)
            image = _centre_crop(image, side, side)
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.LANCZOS)
        return np.asarray(image)

    return apply


def protocol_policy(resolution: int, crop: str, mode: str) -> str:
    return f"{CROP_POLICIES[crop]} ({resolution} px); then {MODE_RESIZE[mode]}"


# ----------------------------------------------------------------------- reference image folders

def reference_folder(reference: str) -> Path:
    """A bare name is a folder under $FEWSTEP_WEIGHTS/refs/; anything else is a path."""
    from fewstep.backbones.weights import is_bare_name, weights_root

    text = os.fspath(reference)
    if is_bare_name(text):
        return weights_root() / REFERENCES_DIR / text
    return Path(text).expanduser()


def list_reference_images(folder: Path) -> list[Path]:
    """The folder's images, sorted; a subfolder or another file stops it (fewstep/notes/pitfalls.md A.7)."""
    if not folder.is_dir():
        from fewstep.backbones.weights import MissingWeightsError
        raise MissingWeightsError(
            f"FID reference folder {folder} does not exist. Put the reference images there (one "
            f"flat folder; a bare name is looked up under $FEWSTEP_WEIGHTS/{REFERENCES_DIR}/) or "
            "pass the folder's path.")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    strays = [p.name for p in entries if p.is_dir() or p.suffix.lower() not in REFERENCE_EXTENSIONS]
    if strays:
        raise ValueError(f"FID reference folder {folder} holds {len(strays)} entries that are not "
                         f"images ({', '.join(REFERENCE_EXTENSIONS)}), e.g. {strays[:3]}; keep "
                         "one flat folder of reference images")
    if len(entries) < 2:
        raise ValueError(f"FID reference folder {folder} holds {len(entries)} image(s); need >= 2")
    return entries


def reference_identity(name: str, files: list[Path]) -> dict:
    """Names the reference set by the hash of its sorted (file name, byte size) list."""
    listing = "\n".join(f"{p.name}\t{p.stat().st_size}" for p in files)
    return {"kind": "image-folder", "version": REAL_REFERENCE_VERSION, "name": name,
            "n_images": len(files), "list_sha256": hashlib.sha256(listing.encode()).hexdigest()}


def real_reference_key(reference: dict, extractor_sha256: str, mode: str, resolution: int,
                       crop: str) -> tuple[str, dict]:
    """Cache key of reference features: (reference set, resolution, crop policy, extractor)."""
    ident = {"reference": reference, "extractor_sha256": extractor_sha256, "mode": mode,
             "resolution": int(resolution), "crop": crop,
             "policy": protocol_policy(resolution, crop, mode)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest(), ident


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


# ------------------------------------------------------------------- resampled FID (bootstrap)

def fid_resampler(feats: np.ndarray, ref: ReferenceStats, device="cpu"):
    """fid(idx): FID of the rows idx (duplicates allowed) against the reference, same formula as
    frechet_distance, in float64 torch on `device` (2048-d resamples are far faster on a GPU)."""
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


# ------------------------------------------------------------------------------ the FID metric

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
