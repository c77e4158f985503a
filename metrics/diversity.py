"""Per-prompt diversity: how different the images of one prompt are across their seeds
(metrics/notes/metrics.md, "Diversity").

Distribution-matching students are mode-seeking: they may draw nearly the same image for every
seed of a prompt, which no fidelity or preference column shows. For each image, the score is the
mean feature distance to the other images of its prompt,

    d_i = 1 / (m - 1) * sum_{j != i, same prompt} (1 - cos(f_i, f_j)),

so the mean of d_i over a prompt's m images is the prompt's mean pairwise distance, and the value
(the mean over images) is the mean over prompts of that when every prompt has the same number of
seeds, as the harness's sample sets do. A collapsed generator (one image per prompt, whatever the
seed) scores exactly 0, the lowest possible; higher is more diverse. The distance is computed as
0.5 |u_i - u_j|^2 of the unit feature vectors, equal to 1 - cos but exactly 0 for identical
features (no cancellation).

Being a per-image mean, it is a PerImageMetric: the cluster bootstrap over prompts, the paired
comparison against the teacher on the same prompts and seeds and the per-prompt win rate apply
unchanged. Its value depends on the number of images per prompt only through noise (the pairwise
mean is unbiased for the expected distance between two seeds), but the identity records it.

Features:
* toy ("toy_diversity"): a toy feature net (fewstep/toy/features.py) with its own seed,
  DIVERSITY_SEED = 4 (the toy FID extractor is seed 0, the AMD/RTDMD training reward seed 1,
  toy_hps seed 2, toy_imagereward seed 3), trained on clean renders only: the toy FID's recipe
  with degrade_share 0, so its features carry what is drawn (colours, shapes, counts) and where
  (a 2x2 layout pool), not image quality. With the FID recipe's quality head, per-image noise
  swamped the cosine (noisy varied renders kept about a third of their diversity; this net keeps
  about 0.8, and
  a collapsed generator with noise stays near 0: tests/test_diversity.py). Shipped as a file with
  its hash pinned here (trained once, ~15 s, deterministic: `train_feature_net(seed=4, size=16,
  recipe=TrainRecipe(degrade_share=0.0))`, then `save_feature_net`), so toy diversities compare
  across runs and machines, and the DAG needs no rule for it.
* real ("diversity_dinov2"): DINOv2's image embedding (the CLS token after the final layer norm,
  transformers Dinov2Model.pooler_output), the encoder Stein et al. 2023 ("Exposing flaws of
  generative model evaluation metrics", NeurIPS) recommend for generative evaluation, ViT-L/14 by
  default, preprocessed by the checkpoint's own image processor (BitImageProcessor: shorter side
  to 256 bicubic, centre crop 224, ImageNet normalisation). Files come from the weights cache
  ($FEWSTEP_WEIGHTS/dinov2/<variant>/), never downloaded.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fewstep.backbones.weights import WeightFile
from metrics.base import PerImageMetric
from metrics.sampleset import SampleSet

DIVERSITY_SEED = 4
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "fewstep" / "toy" / "feature_nets"
SHIPPED_FILE = "toy_diversity_{size}.safetensors"
SHIPPED_SHA256 = {16: "29074c28a2394e0a543cc7b383182e93f5d577820c7b2663e3de6c2194327de4"}
DISTANCE = "1 - cosine of the image features (computed as 0.5 |u_i - u_j|^2 of unit vectors)"
AGGREGATION = ("per image: mean distance to the other images of its prompt; per prompt: the mean "
               "pairwise distance; value: mean over images")


# ------------------------------------------------------------------------------- the formula

def unit_rows(features) -> np.ndarray:
    """Rows scaled to unit length (float64); a zero row has no direction and is refused."""
    feats = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    if feats.ndim != 2 or not np.isfinite(feats).all() or (norms < 1e-12).any():
        raise ValueError(f"diversity needs finite, non-zero feature rows (N, D); got shape "
                         f"{feats.shape} with {int((norms < 1e-12).sum())} zero rows")
    return feats / norms


def per_image_diversity(features, prompt_ids) -> np.ndarray:
    """d_i: mean cosine distance of image i to the other images of its prompt (module docstring)."""
    from metrics.stats import group_indices

    unit = unit_rows(features)
    order, groups = group_indices(list(prompt_ids))
    lone = [pid for pid, g in zip(order, groups) if len(g) < 2]
    if lone:
        raise ValueError(f"diversity needs at least 2 images per prompt (seeds); prompts "
                         f"{lone[:5]} have one; sample each prompt with several seeds")
    out = np.empty(len(unit), dtype=np.float64)
    for g in groups:
        u = unit[g]
        dist = 0.5 * ((u[:, None, :] - u[None, :, :]) ** 2).sum(-1)
        out[g] = dist.sum(1) / (len(g) - 1)
    return out


# ------------------------------------------------------------------------------ the base

@dataclass
class Diversity(PerImageMetric):
    """Per-prompt diversity from an image feature map; subclasses give `features` and
    `feature_identity`."""
    higher_is_better = True

    def features(self, ss: SampleSet) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} must implement features(ss): one "
                                  "feature vector per image, in manifest order")

    def feature_identity(self, ss: SampleSet) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement feature_identity(ss): "
                                  "what identifies its feature extractor")

    def image_scores(self, ss: SampleSet) -> dict:
        return {"score": per_image_diversity(self.features(ss), ss.prompt_ids())}

    def image_columns(self, ss: SampleSet) -> dict:
        """The feature vectors, not the scores: an image's score needs every image of its prompt,
        and a shard may hold only some of a prompt's seeds (fewstep score --partial)."""
        return {"features": self.features(ss)}

    def result_from_columns(self, ss: SampleSet, columns: dict, allow_blank: bool):
        scores = per_image_diversity(columns["features"], ss.prompt_ids())
        return super().result_from_columns(ss, {"score": scores}, allow_blank)

    def score_details(self, columns: dict) -> dict:
        scores = np.asarray(columns["score"])
        return {"share_of_images_identical_to_their_prompt": float(np.mean(scores == 0.0))}

    def identity(self, ss: SampleSet) -> dict:
        n_prompts = len(set(ss.prompt_ids()))
        return {"metric": self.name, "version": self.version, "distance": DISTANCE,
                "aggregation": AGGREGATION, **self.feature_identity(ss),
                "resolution": list(ss.resolution), "prompt_set_sha256": ss.prompt_set_sha256(),
                "n_prompts": n_prompts, "images_per_prompt": len(ss) // n_prompts}


# ------------------------------------------------------------------------------ the toy route

def shipped_diversity_net(size: int) -> Path:
    """The shipped toy diversity net for this image size, verified against the pinned hash."""
    from fewstep.toy.features import load_feature_net

    if size not in SHIPPED_SHA256:
        raise ValueError(f"no shipped toy diversity net for {size} px images (shipped: "
                         f"{sorted(SHIPPED_SHA256)}); train one with fewstep.toy.features."
                         f"train_feature_net(seed={DIVERSITY_SEED}, size={size}, recipe="
                         "TrainRecipe(degrade_share=0.0)), save it with save_feature_net and set "
                         "metric_options/toy_diversity/net_path to the file")
    path = SHIPPED_DIR / SHIPPED_FILE.format(size=size)
    if not path.is_file():
        raise FileNotFoundError(f"shipped toy diversity net missing: expected {path} (reinstall "
                                "fewstep)")
    sha = load_feature_net(path).sha256
    if sha != SHIPPED_SHA256[size]:
        raise ValueError(f"{path}: hash {sha[:12]} is not the pinned {SHIPPED_SHA256[size][:12]}; "
                         "the shipped file was replaced")
    return path


@dataclass
class ToyDiversity(Diversity):
    """Toy diversity: cosine distances in the features of the shipped seed-4 toy net."""
    name = "toy_diversity"
    version = "1"

    net_path: str | None = None         # default: the shipped net for the set's image size
    batch_size: int = 256
    _nets: dict = field(default_factory=dict, init=False, repr=False)   # image size -> net

    def net_for(self, ss: SampleSet):
        from fewstep.toy.features import load_feature_net

        size = ss.resolution[0]
        if size not in self._nets:
            self._nets[size] = load_feature_net(self.net_path or shipped_diversity_net(size))
        net = self._nets[size]
        if net.config.size != size or ss.resolution[1] != size:
            raise ValueError(f"toy_diversity: the net sees {net.config.size} px square images but "
                             f"{ss.folder} holds {ss.resolution[0]}x{ss.resolution[1]}")
        return net

    def features(self, ss: SampleSet) -> np.ndarray:
        net, out = self.net_for(ss), []
        previous = torch.get_num_threads()
        torch.set_num_threads(1)   # convolutions this small run ~10x slower on 2 shared threads
        try:
            with torch.inference_mode():
                for start in range(0, len(ss), self.batch_size):
                    idx = range(start, min(start + self.batch_size, len(ss)))
                    images = torch.from_numpy(np.stack([ss.load_image(i) for i in idx]))
                    out.append(net.features(images.permute(0, 3, 1, 2).float() / 255.0).double())
        finally:
            torch.set_num_threads(previous)
        return torch.cat(out).numpy()

    def feature_identity(self, ss: SampleSet) -> dict:
        net = self.net_for(ss)
        return {"features": f"toy feature net features (fewstep/toy/features.py), seed "
                            f"{(net.recipe or {}).get('seed')}",
                "feature_net_sha256": net.sha256}


# ----------------------------------------------------------------------------- the real route

@dataclass(frozen=True)
class DINOv2Variant:
    key: str
    folder: str          # relative to the weights cache
    source: str          # the Hugging Face repository the files come from


DINOV2_VARIANTS = {v.key: v for v in (
    DINOv2Variant("dinov2-vitl14", "dinov2/dinov2-large", "Hugging Face facebook/dinov2-large"),
    DINOv2Variant("dinov2-vitb14", "dinov2/dinov2-base", "Hugging Face facebook/dinov2-base"),
    DINOv2Variant("dinov2-vits14", "dinov2/dinov2-small", "Hugging Face facebook/dinov2-small"),
)}
DINOV2_FILES = (("config.json", "model config"), ("model.safetensors", "weights"),
                ("preprocessor_config.json", "image processor settings"))


def dinov2_variant(key: str) -> DINOv2Variant:
    from fewstep.errors import did_you_mean

    if key not in DINOV2_VARIANTS:
        raise ValueError(f"unknown DINOv2 variant {key!r}.{did_you_mean(key, DINOV2_VARIANTS)} "
                         f"Known: {sorted(DINOV2_VARIANTS)}")
    return DINOV2_VARIANTS[key]


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)   # e.g. PIL's Resampling enum


@dataclass
class DINOv2Diversity(Diversity):
    """Diversity in DINOv2's CLS embedding (transformers Dinov2Model), weights from the cache."""
    name = "diversity_dinov2"
    version = "1"

    variant: str = "dinov2-vitl14"
    device: str | None = None               # None: CUDA when available
    batch_size: int = 32
    _loaded: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        dinov2_variant(self.variant)

    def weight_files(self) -> list[WeightFile]:
        v = dinov2_variant(self.variant)
        return [WeightFile(f"{v.folder}/{name}", f"{v.source} ({name})", f"DINOv2 {note}")
                for name, note in DINOV2_FILES]

    def load_weights(self) -> None:
        self.model()

    def require_files(self) -> Path:
        """The variant's folder in the weights cache, or MissingWeightsError naming every missing
        file, where it goes, where it comes from and the check command."""
        from fewstep.backbones.weights import (WEIGHTS_ENV, MissingWeightsError, cache_state,
                                               find_entry, weights_root)

        v = dinov2_variant(self.variant)
        missing = [wf.path for wf in self.weight_files() if find_entry(wf.path) is None]
        if missing:
            listing = ", ".join(str(weights_root() / p) for p in missing)
            raise MissingWeightsError(
                f"diversity_dinov2 ({v.key}): weights not found: expected {listing} (source: "
                f"{v.source}: {', '.join(name for name, _ in DINOV2_FILES)}). Put them there: the "
                f"environment variable {WEIGHTS_ENV} names the weights cache ({cache_state()}). "
                "The harness never downloads weights; `fewstep weights check` lists every file a "
                "config needs.")
        return weights_root() / v.folder

    def model(self):
        """(model, processor, folder), loaded on first use from the weights cache only."""
        if self._loaded is None:
            folder = self.require_files()
            from transformers import BitImageProcessor, Dinov2Model

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = Dinov2Model.from_pretrained(folder, local_files_only=True).to(device).eval()
            processor = BitImageProcessor.from_pretrained(folder, local_files_only=True)
            self._loaded = (model.requires_grad_(False), processor, folder)
        return self._loaded

    def features(self, ss: SampleSet) -> np.ndarray:
        from PIL import Image

        model, processor, _ = self.model()
        device, out = next(model.parameters()).device, []
        with torch.inference_mode():
            for start in range(0, len(ss), self.batch_size):
                images = [Image.open(p).convert("RGB")
                          for p in ss.image_paths()[start:start + self.batch_size]]
                pixels = processor(images=images, return_tensors="pt")["pixel_values"]
                out.append(model(pixel_values=pixels.to(device)).pooler_output.double().cpu())
        return torch.cat(out).numpy()

    def feature_identity(self, ss: SampleSet) -> dict:
        from fewstep.backbones.weights import file_sha256

        model, processor, folder = self.model()
        keys = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
                "rescale_factor", "do_normalize", "image_mean", "image_std")
        settings = processor.to_dict()
        return {"features": "CLS token after the final layer norm (Dinov2Model pooler_output)",
                "variant": self.variant, "model": type(model).__name__,
                "source": dinov2_variant(self.variant).source,
                "checkpoint_sha256": file_sha256(folder / "model.safetensors"),
                "preprocessing": _jsonable({"processor": type(processor).__name__,
                                            **{k: settings.get(k) for k in keys}}),
                "implementation": f"transformers {importlib.metadata.version('transformers')}, "
                                  f"torch {torch.__version__}"}
