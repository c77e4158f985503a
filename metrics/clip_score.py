"""CLIP score (metrics/notes/metrics.md sec. 5): the cosine between CLIP's image and text
embeddings.

Per (image, prompt): cos = <e_img / |e_img|, e_txt / |e_txt|>; the model's logit scale plays no
role. Reported scales (part of the identity, fewstep/notes/pitfalls.md E.22):
* "cosine": the raw cosine (harness default; RTDMD reports it as logit / 100, DMD2 reports e.g.
  0.332),
* "torchmetrics": max(100 cos, 0) per image (the definition of torchmetrics' CLIPScore),
* "hessel": 2.5 max(cos, 0) per image (CLIP-S of Hessel et al., "CLIPScore", EMNLP 2021).

Variants (named identities; numbers of different variants are never compared):
* "clip-l14-openai" (default): open_clip `ViT-L-14-quickgelu` with OpenAI's weights. OpenAI CLIP
  uses QuickGELU and open_clip 3.x builds plain GELU for `ViT-L-14`, warning only (the QuickGELU
  trap, metrics/notes/metrics.md sec. 4.4), so the `-quickgelu` name is part of the identity, and a
  variant whose pretrained tag expects QuickGELU on an architecture without it is refused.
* "clip-g14-dmd2": open_clip `ViT-g-14` with `laion2b_s12b_b42k`, DMD2's protocol as read in
  tianweiy/DMD2 main/coco_eval/coco_evaluator.py: centre crop to a square, Lanczos resize to 256,
  then the CLIP transform; captions prefixed with "A photo depicts " (DMD2 inserts the prefix's
  tokens after the start token; CLIP's tokenizer splits on words, so prefixing the text gives the
  same tokens).

Weights come from the weights cache only ($FEWSTEP_WEIGHTS, see `weight_files`): open_clip is given
the local file as `pretrained` (a tag would make it download), and the tag's own preprocessing
settings (mean, std, interpolation, resize mode) are applied as an override, so the model and
transform are the ones the tag names. Preprocessing is open_clip's evaluation transform (PIL:
shorter side to 224 bicubic, centre crop, RGB, CLIP normalisation); text goes through open_clip's
tokenizer (77 tokens, truncated).

`CLIPReward` is the same score as a differentiable reward for training, `reward(images01, metas)`.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fewstep.backbones.weights import WeightFile
from metrics.base import PerImageMetric
from metrics.sampleset import SampleSet

SCALES = {"cosine": "raw cosine",
          "torchmetrics": "max(100 * cosine, 0) per image",
          "hessel": "2.5 * max(cosine, 0) per image"}
PRECISIONS = ("fp32", "fp16-autocast")
HF_FILES = "open_clip_model.safetensors|open_clip_pytorch_model.bin"  # open_clip's HF repo files


@dataclass(frozen=True)
class CLIPVariant:
    """One CLIP-score identity: architecture, the weights it was trained as, and the protocol."""
    key: str
    model_name: str                 # open_clip architecture name
    pretrained: str                 # the open_clip pretrained tag the weights file holds
    weights: WeightFile             # where the file lives in the weights cache, and its source
    caption_prefix: str = ""
    square_resize: int | None = None   # centre crop to a square, Lanczos to this size, first


VARIANTS = {
    "clip-l14-openai": CLIPVariant(
        "clip-l14-openai", "ViT-L-14-quickgelu", "openai",
        WeightFile("|".join(f"clip/vit-l-14-openai/{f}" for f in HF_FILES.split("|")),
                   "Hugging Face timm/vit_large_patch14_clip_224.openai (open_clip weights)",
                   "~1.7 GB fp32")),
    "clip-g14-dmd2": CLIPVariant(
        "clip-g14-dmd2", "ViT-g-14", "laion2b_s12b_b42k",
        WeightFile("|".join(f"clip/vit-g-14-laion2b-s12b-b42k/{f}" for f in HF_FILES.split("|")),
                   "Hugging Face laion/CLIP-ViT-g-14-laion2B-s12B-b42K (open_clip weights)",
                   "several GB"),
        caption_prefix="A photo depicts ", square_resize=256),
}


def resolve_variant(variant) -> CLIPVariant:
    if isinstance(variant, CLIPVariant):
        return variant
    if variant not in VARIANTS:
        raise ValueError(f"unknown CLIP-score variant {variant!r}; known: {sorted(VARIANTS)} "
                         "(or pass a CLIPVariant)")
    return VARIANTS[variant]


def apply_scale(cosines, scale: str) -> np.ndarray:
    """Per-image scores on the named scale (see SCALES)."""
    cos = np.asarray(cosines, dtype=np.float64)
    if scale == "cosine":
        return cos
    if scale == "torchmetrics":
        return np.maximum(100.0 * cos, 0.0)
    if scale == "hessel":
        return 2.5 * np.maximum(cos, 0.0)
    raise ValueError(f"unknown CLIP-score scale {scale!r}; one of {sorted(SCALES)}")


# ------------------------------------------------------------------------------ loading

def tag_preprocess_cfg(variant: CLIPVariant) -> dict:
    """The preprocessing open_clip attaches to the pretrained tag (empty for an unknown tag)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(variant.model_name, variant.pretrained) or {}
    return {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}


def check_quickgelu(variant: CLIPVariant) -> None:
    """Refuse OpenAI-style weights on an architecture built with plain GELU (fewstep/notes/pitfalls.md E.21)."""
    import open_clip

    tag_wants = (open_clip.get_pretrained_cfg(variant.model_name, variant.pretrained) or {}
                 ).get("quick_gelu", False)
    model_cfg = open_clip.get_model_config(variant.model_name)
    if model_cfg is None:
        raise ValueError(f"open_clip {importlib.metadata.version('open_clip_torch')} has no model "
                         f"config {variant.model_name!r}; check the variant's model name")
    if tag_wants and not model_cfg.get("quick_gelu", False):
        raise ValueError(f"{variant.key}: weights {variant.pretrained!r} were trained with "
                         f"QuickGELU but open_clip builds {variant.model_name!r} with plain GELU, "
                         f"which silently changes every score; use {variant.model_name}-quickgelu")


def load_clip(variant: CLIPVariant, device="cpu") -> "LoadedCLIP":
    """The variant's model, transform and tokenizer, from the local weights file (no download)."""
    from fewstep.backbones.weights import require_entry

    weights = variant.weights
    path = require_entry(weights.path, weights.source, f"CLIP score ({variant.key})")
    check_quickgelu(variant)
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    model = open_clip.create_model(variant.model_name, pretrained=str(path), device=device,
                                   force_preprocess_cfg=tag_preprocess_cfg(variant))
    model.eval().requires_grad_(False)
    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    return LoadedCLIP(model, transform, open_clip.get_tokenizer(variant.model_name), variant,
                      path, cfg)


class LoadedCLIP:
    """A frozen open_clip model with its transform and tokenizer; embeddings come L2-normalised."""

    def __init__(self, model, transform, tokenizer, variant: CLIPVariant, checkpoint: Path,
                 preprocess_cfg: dict):
        self.model, self.transform, self.tokenizer = model, transform, tokenizer
        self.variant, self.checkpoint = variant, Path(checkpoint)
        self.preprocess_cfg = preprocess_cfg

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def text_embeddings(self, prompts) -> torch.Tensor:
        tokens = self.tokenizer([self.variant.caption_prefix + p for p in prompts])
        return F.normalize(self.model.encode_text(tokens.to(self.device)).float(), dim=-1)

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixels.to(self.device)).float(), dim=-1)

    def pixels_from_files(self, paths) -> torch.Tensor:
        """The metric's path: PIL images through open_clip's evaluation transform."""
        return torch.stack([self.transform(self._prepared(Image.open(p).convert("RGB")))
                            for p in paths])

    def _prepared(self, image: Image.Image) -> Image.Image:
        if self.variant.square_resize is None:
            return image
        from metrics.fid import protocol_transform
        return Image.fromarray(protocol_transform(self.variant.square_resize, "center")(
            np.asarray(image)))

    def pixels_from_tensor(self, images01: torch.Tensor) -> torch.Tensor:
        """The reward's path: the same steps on a float tensor, differentiable (see CLIPReward)."""
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        cfg, x = self.preprocess_cfg, images01.float()
        if cfg.get("resize_mode", "shortest") != "shortest":
            raise ValueError(f"CLIPReward supports the 'shortest' resize mode only, but this "
                             f"model's preprocessing uses {cfg['resize_mode']!r}; use a CLIP "
                             "variant with a shortest-side resize for training rewards")
        cubic = InterpolationMode.BICUBIC
        if self.variant.square_resize is not None:
            side = self.variant.square_resize
            x = TF.center_crop(x, [min(x.shape[-2:])] * 2)
            x = TF.resize(x, [side, side], interpolation=cubic, antialias=True)
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        if min(x.shape[-2:]) != size:
            x = TF.resize(x, size, interpolation=cubic, antialias=True)
        x = TF.center_crop(x, [size, size])
        return TF.normalize(x, mean=list(cfg["mean"]), std=list(cfg["std"]))

    def cosine(self, pixels: torch.Tensor, prompts) -> torch.Tensor:
        return (self.image_embeddings(pixels) * self.text_embeddings(prompts)).sum(-1)


def precision_context(precision: str, device: torch.device):
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; one of {PRECISIONS}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise ValueError("precision 'fp16-autocast' needs a CUDA device; use 'fp32' on the CPU")
    return torch.autocast("cuda", dtype=torch.float16)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------- the metric

@dataclass
class CLIPScore(PerImageMetric):
    """Mean CLIP score of a sample set, with a cluster-bootstrap CI over prompts."""
    name = "clip_score"
    version = "1"
    higher_is_better = True

    variant: object = "clip-l14-openai"     # a key of VARIANTS or a CLIPVariant
    scale: str = "cosine"
    precision: str = "fp32"
    device: str | None = None               # None: CUDA when available
    batch_size: int = 32
    _clip: LoadedCLIP | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.variant = resolve_variant(self.variant)
        apply_scale([0.0], self.scale)  # validates the scale name
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; one of {PRECISIONS}")

    def weight_files(self) -> list[WeightFile]:
        return [self.variant.weights]

    def clip(self) -> LoadedCLIP:
        """The model, loaded on first use (building the metric reads no weights)."""
        if self._clip is None:
            self._clip = load_clip(self.variant, self.device or default_device())
        return self._clip

    def cosines(self, ss: SampleSet) -> np.ndarray:
        """One cosine per image, in manifest order; each distinct prompt is encoded once."""
        clip = self.clip()
        prompts = sorted({r["prompt"] for r in ss.records})
        out = []
        with torch.inference_mode(), precision_context(self.precision, clip.device):
            text = torch.cat([clip.text_embeddings(prompts[i:i + self.batch_size])
                              for i in range(0, len(prompts), self.batch_size)])
            row_of = {p: i for i, p in enumerate(prompts)}
            for start in range(0, len(ss), self.batch_size):
                records = ss.records[start:start + self.batch_size]
                image = clip.image_embeddings(clip.pixels_from_files(
                    [ss.folder / r["path"] for r in records]))
                rows = torch.tensor([row_of[r["prompt"]] for r in records], device=text.device)
                out.append((image * text[rows]).sum(-1).double().cpu().numpy())
        return np.concatenate(out)

    def identity(self, ss: SampleSet) -> dict:
        from fewstep.backbones.weights import file_sha256

        clip, v = self.clip(), self.variant
        n_prompts = len(set(ss.prompt_ids()))
        preprocessing = {"transform": "open_clip eval transform (PIL)", **clip.preprocess_cfg,
                         "square_resize": (f"centre square crop, PIL Lanczos to {v.square_resize}"
                                           if v.square_resize else None),
                         "caption_prefix": v.caption_prefix,
                         "text": "open_clip tokenizer, 77 tokens, truncated"}
        return {"metric": self.name, "version": self.version, "variant": v.key,
                "model": v.model_name, "pretrained": v.pretrained,
                "checkpoint_file": clip.checkpoint.name,
                "checkpoint_sha256": file_sha256(clip.checkpoint),
                "formula": "cosine of L2-normalised image and text embeddings",
                "scale": f"{self.scale}: {SCALES[self.scale]}", "precision": self.precision,
                "preprocessing": _jsonable(preprocessing), "resolution": list(ss.resolution),
                "prompt_set_sha256": ss.prompt_set_sha256(), "n_prompts": n_prompts,
                "images_per_prompt": len(ss) // n_prompts,
                "implementation": f"open_clip_torch {importlib.metadata.version('open_clip_torch')}"
                                  f", torch {torch.__version__}"}

    def image_scores(self, ss: SampleSet) -> dict:
        cosines = self.cosines(ss)
        return {"cosine": cosines, "score": apply_scale(cosines, self.scale)}

    def score_details(self, columns: dict) -> dict:
        return {"mean_cosine": float(np.mean(columns["cosine"])), "device": str(self.clip().device)}


@dataclass
class CLIPScoreDMD2(CLIPScore):
    """DMD2's CLIP score: ViT-g-14 (laion2b_s12b_b42k), 256 px square first, "A photo depicts "."""
    name = "clip_score_dmd2"
    variant: object = "clip-g14-dmd2"


def _jsonable(value):
    """Tuples to lists, so the identity survives a JSON round trip unchanged."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ------------------------------------------------------------------- differentiable reward

class CLIPReward:
    """The CLIP cosine as a training reward: reward(images01, metas) -> (B,), higher is better.

    images01: (B, 3, H, W) in [0, 1]; metas: prompt rows with "prompt". Gradients flow to the
    images (the model is frozen). The transform is the metric's, done on the tensor with
    torchvision's differentiable ops: identical to the metric when the images already have the
    model's input size and the variant has no square pre-resize; otherwise PIL's uint8 resizes
    (bicubic, and Lanczos for DMD2's 256 px step) are approximated by antialiased bicubic
    resizes of the float tensor. fp32 only.
    """

    def __init__(self, variant="clip-l14-openai", device="cpu", clip: LoadedCLIP | None = None):
        self.clip = clip or load_clip(resolve_variant(variant), device)
        self.variant = self.clip.variant
        self.sha256 = None  # filled on demand by checkpoint_sha256()

    def checkpoint_sha256(self) -> str:
        from fewstep.backbones.weights import file_sha256
        self.sha256 = self.sha256 or file_sha256(self.clip.checkpoint)
        return self.sha256

    def __call__(self, images01: torch.Tensor, metas: list[dict]) -> torch.Tensor:
        if images01.ndim != 4 or images01.shape[1] != 3 or len(metas) != images01.shape[0]:
            raise ValueError(f"CLIPReward needs images (B, 3, H, W) and B prompt rows; got "
                             f"{tuple(images01.shape)} and {len(metas)} rows")
        pixels = self.clip.pixels_from_tensor(images01.to(self.clip.device))
        return self.clip.cosine(pixels, [m["prompt"] for m in metas])


def build_clip_reward(variant: str | None = None, device="cpu") -> CLIPReward:
    """REWARDS registry entry: `--reward clip` (default variant) or `--reward clip:<variant>`."""
    return CLIPReward(variant or "clip-l14-openai", device=device)
