"""GenEval route B, "geneval-hf-m2f" (sec. 4.8 B): an APPROXIMATION of GenEval.

Never compare its numbers with published GenEval numbers, nor mix them with route A (the exact
legacy mmdet environment, see metrics/geneval_official.py) in one table; compare the two routes on
several hundred images before relying on it. Only the detector differs; the rules (thresholds,
counting, colour and position checks, the overall score) are metrics/geneval.py's, unchanged.

Detector (`M2FDetector`): transformers' `Mask2FormerForUniversalSegmentation` with the weights
of `facebook/mask2former-swin-small-coco-instance` (the official Detectron2-trained Swin-S COCO
instance model, not mmdet's checkpoint), read from the weights cache folder
`$FEWSTEP_WEIGHTS/hf/facebook--mask2former-swin-small-coco-instance/` (a local
`from_pretrained` folder: config.json + model.safetensors). fp32.
* Preprocessing as mmdet's test pipeline (sec. 4.8): bilinear resize of the uint8 image so
  the shorter side is 800 and the longer at most 1333 (mmcv's keep-ratio rescale: one scale
  factor, sizes rounded half up; mmcv resizes the uint8 image with cv2, so the resized values are
  rounded to integers here too; cv2's fixed-point weights may still differ by one grey level),
  ImageNet mean/std on 0..255 RGB (read from the folder's preprocessor_config.json when present),
  then zero padding (after normalisation, as mmdet) to a multiple of 32 at the right and bottom.
* Post-processing as mmdet's MaskFormer instance post-processing: class probabilities = softmax
  over the 81 logits with the no-object column dropped; the top-k (query, class) pairs by class
  probability (k = 100); mask logits upsampled bilinearly to the padded input, the padding cut
  off, upsampled to the image size; binary mask = sigmoid > 0.5; score = class probability x
  mean mask probability inside the binary mask (an empty mask scores 0); box = the mask's tight
  box in mmdet's convention (x0, y0, last x + 1, last y + 1; an empty mask gives a zero box).
* Label ids 0..79 are GenEval classes by position (COCO order, `GENEVAL_CLASSES`); the config's
  own label names are not used, and names that differ from COCO's are reported in the identity.

Colour classifier (`CLIPColourClassifier`, sec. 4.4): open_clip `ViT-L-14-quickgelu` with
OpenAI's weights, loaded by metrics/clip_score.py's loader from its cache entry; zero-shot over
the 10 colours with the three GenEval templates (class embedding = mean of the unit template
embeddings, renormalised; logits = 100 cos; argmax). The crop pastes the masked object onto a
#999 grey canvas of the image size and cuts out its box (float boxes rounded as PIL's crop
rounds them), then open_clip's evaluation transform (shorter side 224 bicubic, centre crop, CLIP
mean/std). fp16 autocast on CUDA (the reference's clip_benchmark runs under autocast), fp32 on
the CPU, stated in the identity. Architectures with plain GELU are refused (the QuickGELU trap).
Sections (sec. N) are those of metrics/notes/metrics.md.
"""
from __future__ import annotations

import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fewstep.backbones.weights import WeightFile
from fewstep.geneval_prompts import COLOURS
from metrics.clip_score import LoadedCLIP, _jsonable, load_clip, resolve_variant
from metrics.geneval import ToyGenEval
from metrics.hpsv2 import default_device, effective_precision, precision_context, precision_label

ROUTE = "geneval-hf-m2f"
APPROXIMATE = ("approximate: transformers Mask2Former (Detectron2-trained weights), not the "
               "official mmdet route; never compare with published GenEval numbers")

# COCO's 80 thing classes in COCO order, with GenEval's spellings (sec. 4.1): COCO's
# "mouse", "remote" and "keyboard" are "computer mouse", "tv remote", "computer keyboard".
GENEVAL_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse",
    "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
GENEVAL_RENAMES = {"mouse": "computer mouse", "remote": "tv remote",
                   "keyboard": "computer keyboard"}
COCO_CLASSES = tuple({v: k for k, v in GENEVAL_RENAMES.items()}.get(c, c) for c in GENEVAL_CLASSES)

DETECTOR_REPO = "facebook/mask2former-swin-small-coco-instance"
DETECTOR_WEIGHTS = WeightFile(
    "hf/facebook--mask2former-swin-small-coco-instance/",
    f"Hugging Face {DETECTOR_REPO} (the full repository: config.json, model.safetensors)",
    "~263 MB; official Detectron2-trained weights, GenEval route B only")
DETECTOR_FILES = ["config.json", "model.safetensors|pytorch_model.bin"]
HASHED_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "preprocessor_config.json")

# mmdet 2.x test pipeline of the GenEval config (Resize keep_ratio to (1333, 800), Normalize, Pad)
SHORT_SIDE = 800
LONG_SIDE = 1333
PAD_DIVISOR = 32
IMAGENET_MEAN = (123.675, 116.28, 103.53)   # RGB, 0..255 (= HF's 0.485, 0.456, 0.406 x 255)
IMAGENET_STD = (58.395, 57.12, 57.375)      # RGB, 0..255 (= HF's 0.229, 0.224, 0.225 x 255)
# mmdet MaskFormer instance post-processing
TOP_K = 100                 # test_cfg.max_per_image
MASK_THRESHOLD = 0.5        # on the mask probability (= logit > 0)
MASK_SCORE_EPS = 1e-6       # mmdet's guard in the mean mask probability

# colour classification (sec. 4.4)
COLOUR_TEMPLATES = ("a photo of a {colour} {object}", "a photo of a {colour}-colored {object}",
                    "a photo of a {colour} object")
GREY = (0x99, 0x99, 0x99)   # GenEval's bgcolor "#999"
CLIP_LOGIT_SCALE = 100.0


@dataclass
class Detection:
    """One detected object: GenEval class name, box (x0, y0, x1, y1) in image pixels, score,
    binary mask (H, W), and the model's label id."""
    cls: str
    box: tuple
    score: float
    mask: np.ndarray
    label: int


# ------------------------------------------------------------------------- labels (pure)

def label_names(config) -> tuple[str, ...]:
    """GenEval class names for label ids 0..79 (by position); refuse another label count."""
    if int(config.num_labels) != len(GENEVAL_CLASSES):
        raise ValueError(f"the Mask2Former config has {config.num_labels} labels, but GenEval "
                         f"route B needs the {len(GENEVAL_CLASSES)} COCO thing classes in COCO "
                         f"order ({DETECTOR_REPO}); is this a panoptic or non-COCO checkpoint?")
    return GENEVAL_CLASSES


def label_name_differences(config) -> list[str]:
    """Config label names that are neither COCO's name at that id nor a default "LABEL_i"."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    return [f"{i}: {name!r} (COCO {COCO_CLASSES[i]!r})" for i, name in sorted(id2label.items())
            if i < len(COCO_CLASSES) and name not in (COCO_CLASSES[i], f"LABEL_{i}")]


# ----------------------------------------------------------------- preprocessing (pure)

def resized_shape(height: int, width: int, short_side: int = SHORT_SIDE,
                  long_side: int = LONG_SIDE) -> tuple[int, int]:
    """mmcv keep-ratio rescale: one factor so the shorter side is at most `short_side` and the
    longer at most `long_side` (the smaller of the two factors); sizes rounded half up."""
    scale = min(long_side / max(height, width), short_side / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def padded_shape(height: int, width: int, divisor: int = PAD_DIVISOR) -> tuple[int, int]:
    return -(-height // divisor) * divisor, -(-width // divisor) * divisor


def normalisation(folder: Path | None) -> tuple[tuple, tuple, str]:
    """(mean, std) on 0..255 and where they came from: the folder's preprocessor_config.json
    (HF stores them on the 0..1 scale) or the ImageNet constants."""
    config = Path(folder) / "preprocessor_config.json" if folder else None
    if config is not None and config.is_file():
        cfg = json.loads(config.read_text())
        if "image_mean" in cfg and "image_std" in cfg:
            return (tuple(255.0 * float(v) for v in cfg["image_mean"]),
                    tuple(255.0 * float(v) for v in cfg["image_std"]), "preprocessor_config.json")
    return IMAGENET_MEAN, IMAGENET_STD, "ImageNet constants"


def preprocess(image: np.ndarray, mean, std, short_side: int = SHORT_SIDE,
               long_side: int = LONG_SIDE, divisor: int = PAD_DIVISOR, device="cpu"):
    """uint8 (H, W, 3) -> (pixels (1, 3, Hp, Wp), resized (h, w), padded (Hp, Wp))."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"the detector needs a uint8 (H, W, 3) RGB image, got {image.dtype} "
                         f"{image.shape}")
    x = torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1)[None].float()
    resized = resized_shape(*image.shape[:2], short_side, long_side)
    if resized != tuple(image.shape[:2]):
        # mmcv resizes the uint8 image (cv2 bilinear, no antialias): the result is uint8 again
        x = F.interpolate(x, size=resized, mode="bilinear", align_corners=False)
        x = x.round().clamp(0, 255)
    x = (x - torch.tensor(mean, device=x.device).view(1, 3, 1, 1)) / torch.tensor(
        std, device=x.device).view(1, 3, 1, 1)
    padded = padded_shape(*resized, divisor)
    x = F.pad(x, (0, padded[1] - resized[1], 0, padded[0] - resized[0]))  # zeros, after Normalize
    return x, resized, padded


# ---------------------------------------------------------------- post-processing (pure)

def class_probabilities(class_logits: torch.Tensor) -> torch.Tensor:
    """(Q, C + 1) logits -> (Q, C): softmax over all C + 1, then the no-object column dropped."""
    return class_logits.float().softmax(-1)[:, :-1]


def top_pairs(probs: torch.Tensor, k: int = TOP_K):
    """The k (query, class) pairs of highest class probability, best first:
    (class probabilities, query indices, label ids)."""
    n_classes = probs.shape[1]
    scores, flat = probs.flatten().topk(min(int(k), probs.numel()))
    return scores, flat // n_classes, flat % n_classes


def mask_logits_to_image(mask_logits: torch.Tensor, padded: tuple, resized: tuple,
                         image_hw: tuple) -> torch.Tensor:
    """(Q, h, w) mask logits at 1/4 of the padded input -> (Q, H, W) at the image size: upsample
    to the padded input, cut the padding off, resize to the original size (as mmdet does)."""
    x = F.interpolate(mask_logits[None].float(), size=tuple(padded), mode="bilinear",
                      align_corners=False)
    x = x[..., :resized[0], :resized[1]]
    return F.interpolate(x, size=tuple(image_hw), mode="bilinear", align_corners=False)[0]


def mask_scores(mask_probs: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
    """Mean mask probability inside each binary mask; 0 for an empty mask."""
    inside = binary.flatten(1).float()
    return (mask_probs.flatten(1) * inside).sum(1) / (inside.sum(1) + MASK_SCORE_EPS)


def masks_to_boxes(binary: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, 4) float boxes (x0, y0, last x + 1, last y + 1), mmdet's mask2bbox
    convention; an empty mask gives (0, 0, 0, 0)."""
    n, height, width = binary.shape
    rows, cols = binary.any(2), binary.any(1)                  # (N, H), (N, W)
    ys = torch.arange(height, device=binary.device).expand(n, height)
    xs = torch.arange(width, device=binary.device).expand(n, width)
    boxes = torch.stack([torch.where(cols, xs, width).amin(1),
                         torch.where(rows, ys, height).amin(1),
                         torch.where(cols, xs, -1).amax(1) + 1,
                         torch.where(rows, ys, -1).amax(1) + 1], dim=1).float()
    boxes[~rows.any(1)] = 0.0
    return boxes


def instance_postprocess(class_logits: torch.Tensor, image_mask_logits: torch.Tensor,
                         k: int = TOP_K, threshold: float = MASK_THRESHOLD) -> dict:
    """mmdet's MaskFormer instance post-processing on one image's outputs: class_logits (Q, C + 1),
    image_mask_logits (Q, H, W) already at the image size. Tensors of the k detections, best
    class probability first."""
    class_scores, queries, labels = top_pairs(class_probabilities(class_logits), k)
    mask_probs = image_mask_logits[queries].float().sigmoid()
    binary = mask_probs > threshold
    return {"labels": labels, "class_scores": class_scores, "queries": queries,
            "scores": class_scores * mask_scores(mask_probs, binary),
            "boxes": masks_to_boxes(binary), "masks": binary}


def to_detections(result: dict, class_names=GENEVAL_CLASSES) -> list[Detection]:
    labels = result["labels"].cpu().tolist()
    scores = result["scores"].cpu().tolist()
    boxes = result["boxes"].cpu().tolist()
    masks = result["masks"].cpu().numpy()
    return [Detection(class_names[lab], tuple(box), float(s), masks[i], int(lab))
            for i, (lab, s, box) in enumerate(zip(labels, scores, boxes))]


# ------------------------------------------------------------------------------ detector

def detector_folder(folder=None) -> Path:
    """The detector's from_pretrained folder (the cache entry unless given), checked complete."""
    from fewstep.backbones.weights import require_entry, require_files

    what = f"GenEval route B detector ({DETECTOR_REPO})"
    if folder is None:
        folder = require_entry(DETECTOR_WEIGHTS.path, DETECTOR_WEIGHTS.source, what)
    return require_files(folder, DETECTOR_FILES, f"{what}, source: {DETECTOR_WEIGHTS.source}")


def folder_hashes(folder: Path) -> dict:
    from fewstep.backbones.weights import file_sha256

    return {name: file_sha256(folder / name) for name in HASHED_FILES if (folder / name).is_file()}


class M2FDetector:
    """transformers Mask2Former with mmdet-style pre- and post-processing (module docstring)."""
    name = "hf-mask2former-swin-small-coco-instance"

    def __init__(self, folder=None, device=None, top_k: int = TOP_K, short_side: int = SHORT_SIDE,
                 long_side: int = LONG_SIDE, pad_divisor: int = PAD_DIVISOR):
        self.folder = detector_folder(folder)   # before any heavy import: fail fast
        from transformers import Mask2FormerForUniversalSegmentation

        model = Mask2FormerForUniversalSegmentation.from_pretrained(str(self.folder),
                                                                    local_files_only=True)
        self.class_names = label_names(model.config)
        self.label_differences = label_name_differences(model.config)
        self.model = model.to(device or default_device()).eval().requires_grad_(False)
        self.mean, self.std, self.norm_source = normalisation(self.folder)
        self.top_k, self.pad_divisor = int(top_k), int(pad_divisor)
        self.short_side, self.long_side = int(short_side), int(long_side)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def detect(self, image: np.ndarray) -> list[Detection]:
        pixels, resized, padded = preprocess(image, self.mean, self.std, self.short_side,
                                             self.long_side, self.pad_divisor, self.device)
        with torch.inference_mode():
            out = self.model(pixel_values=pixels)
            masks = mask_logits_to_image(out.masks_queries_logits[0], padded, resized,
                                         image.shape[:2])
            result = instance_postprocess(out.class_queries_logits[0], masks, self.top_k)
        return to_detections(result, self.class_names)

    def identity(self) -> dict:
        return {"model": f"transformers Mask2FormerForUniversalSegmentation, {DETECTOR_REPO} "
                         "(Detectron2-trained weights)",
                "folder": self.folder.name, "files_sha256": folder_hashes(self.folder),
                "num_queries": int(self.model.config.num_queries), "precision": "fp32",
                "preprocessing": {"resize": f"bilinear, shorter side {self.short_side}, longer "
                                            f"at most {self.long_side} (mmcv keep-ratio), uint8",
                                  "mean": list(self.mean), "std": list(self.std),
                                  "mean_std_from": self.norm_source,
                                  "pad": f"zeros after normalisation to a multiple of "
                                         f"{self.pad_divisor}"},
                "post_processing": {"top_k": self.top_k, "mask_threshold": MASK_THRESHOLD,
                                    "score": "class prob x mean mask prob inside the mask",
                                    "box": "tight box of the binary mask (x1, y1 exclusive)"},
                "labels": "ids 0..79 -> GENEVAL_CLASSES by position (COCO order)",
                "label_names_differing_from_coco": self.label_differences,
                "implementation": f"transformers {importlib.metadata.version('transformers')}, "
                                  f"torch {torch.__version__}"}


# --------------------------------------------------------------------- colour classifier

def crop_box(box, height: int, width: int) -> tuple[int, int, int, int]:
    """Integer crop box as PIL's crop rounds a float box, clipped to the image."""
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    return max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)


def grey_canvas_crop(image: np.ndarray, mask, box, grey=GREY) -> np.ndarray:
    """sec. 4.4: the masked object pasted onto a uniform grey canvas of the image size, cut
    out at its box. Without a mask (a detector that has none) GenEval keeps the whole image."""
    if mask is None:
        canvas = image.copy()
    else:
        canvas = np.empty_like(image)
        canvas[...] = np.asarray(grey, dtype=image.dtype)
        canvas[mask] = image[mask]
    x0, y0, x1, y1 = crop_box(box, *image.shape[:2])
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"cannot classify the colour of a detection with an empty box {box}")
    return canvas[y0:y1, x0:x1]


def colour_class_embeddings(encode_text, object_class: str, colours=COLOURS,
                            templates=COLOUR_TEMPLATES) -> torch.Tensor:
    """(n_colours, D): per colour the mean of the unit template embeddings, renormalised.
    encode_text(list of str) must return unit-length rows."""
    rows = []
    for colour in colours:
        emb = encode_text([t.format(colour=colour, object=object_class) for t in templates])
        rows.append(F.normalize(F.normalize(emb.float(), dim=-1).mean(0), dim=-1))
    return torch.stack(rows)


def require_quickgelu_config(model_name: str) -> None:
    """Refuse an open_clip architecture built with plain GELU: OpenAI's weights need QuickGELU
    (the QuickGELU trap, sec. 4.4: open_clip 3.x only warns)."""
    import open_clip

    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"open_clip {importlib.metadata.version('open_clip_torch')} has no model "
                         f"config {model_name!r}")
    if not cfg.get("quick_gelu", False):
        raise ValueError(f"GenEval's colour classifier is OpenAI CLIP, which uses QuickGELU, but "
                         f"open_clip builds {model_name!r} with plain GELU (the QuickGELU trap, "
                         "sec. 4.4); use ViT-L-14-quickgelu")


def uses_plain_gelu(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.GELU) for m in model.modules())


class CLIPColourClassifier:
    """GenEval's zero-shot CLIP colour classifier (module docstring); classify(image, detection)."""

    def __init__(self, variant="clip-l14-openai", device=None, precision: str = "fp16-autocast"):
        self.variant = resolve_variant(variant)
        require_quickgelu_config(self.variant.model_name)   # before loading the weights
        effective_precision(precision, torch.device("cpu"))  # validates the name
        self.clip: LoadedCLIP = load_clip(self.variant, device or default_device())
        if uses_plain_gelu(self.clip.model):
            raise ValueError(f"{self.variant.model_name} was built with plain GELU; GenEval's "
                             "colour classifier needs QuickGELU (sec. 4.4)")
        self.precision = precision
        self.name = f"clip-{self.variant.model_name}-{self.variant.pretrained}"
        self._classes: dict[str, torch.Tensor] = {}

    def class_embeddings(self, object_class: str) -> torch.Tensor:
        """(10, D) colour embeddings for one object class, computed once per class."""
        if object_class not in self._classes:
            with torch.inference_mode(), precision_context(self.precision, self.clip.device):
                self._classes[object_class] = colour_class_embeddings(self.clip.text_embeddings,
                                                                      object_class)
        return self._classes[object_class]

    def logits(self, image: np.ndarray, detection) -> torch.Tensor:
        """(10,) logits = 100 cos(crop embedding, colour embedding)."""
        crop = grey_canvas_crop(image, getattr(detection, "mask", None), detection.box)
        pixels = self.clip.transform(Image.fromarray(crop))[None]
        classes = self.class_embeddings(detection.cls)
        with torch.inference_mode(), precision_context(self.precision, self.clip.device):
            return (CLIP_LOGIT_SCALE * self.clip.image_embeddings(pixels) @ classes.T)[0].float()

    def classify(self, image: np.ndarray, detection) -> str:
        return COLOURS[int(self.logits(image, detection).argmax())]

    def identity(self) -> dict:
        from fewstep.backbones.weights import file_sha256

        return {"model": self.variant.model_name, "pretrained": self.variant.pretrained,
                "checkpoint_file": self.clip.checkpoint.name,
                "checkpoint_sha256": file_sha256(self.clip.checkpoint),
                "colours": list(COLOURS), "templates": list(COLOUR_TEMPLATES),
                "class_embedding": "mean of unit template embeddings, renormalised",
                "logits": f"{CLIP_LOGIT_SCALE:g} x cosine, argmax",
                "crop": "mask pasted on a #999 grey canvas, cut at the box, then the CLIP "
                        "transform", "preprocessing": _jsonable(self.clip.preprocess_cfg),
                "precision": precision_label(self.precision, self.clip.device),
                "implementation": "open_clip_torch "
                                  f"{importlib.metadata.version('open_clip_torch')}"}


# ------------------------------------------------------------------------------ the metric

@dataclass
class GenEvalM2F(ToyGenEval):
    """GenEval route B (approximate): GenEval's rules with `M2FDetector` and
    `CLIPColourClassifier`, loaded on first score. Tests inject tiny models through
    `detector_folder` (a from_pretrained folder) and `clip_variant` (a CLIPVariant), or pass
    ready `detector` / `colour` objects. require_all_tasks=False allows a partial diagnostic set.
    """
    name = "geneval_hf_m2f"
    version = "1"
    higher_is_better = True

    device: str | None = None               # None: CUDA when available
    detector_folder: str | Path | None = None   # None: the weights-cache entry
    clip_variant: object = "clip-l14-openai"    # a clip_score VARIANTS key or a CLIPVariant
    precision: str = "fp16-autocast"        # the colour classifier's (fp32 on the CPU)
    top_k: int = TOP_K
    short_side: int = SHORT_SIDE
    long_side: int = LONG_SIDE

    def __post_init__(self):  # ToyGenEval's would plug in the toy detector: models load lazily
        self.clip_variant = resolve_variant(self.clip_variant)
        effective_precision(self.precision, torch.device("cpu"))  # validates the name

    @classmethod
    def context_defaults(cls, context) -> dict:
        """Nothing: the real route scores GenEval's official prompt set, which holds all six tasks;
        a partial set is a deliberate require_all_tasks=False in the config."""
        return {}

    def weight_files(self) -> list[WeightFile]:
        detector = [] if self.detector_folder is not None else [DETECTOR_WEIGHTS]
        return detector + [self.clip_variant.weights]

    def load_models(self) -> None:
        """Detector and colour classifier, built on first use (building the metric reads no
        weights)."""
        if self.detector is None:
            self.detector = M2FDetector(self.detector_folder, self.device, self.top_k,
                                        self.short_side, self.long_side)
        if self.colour is None:
            self.colour = CLIPColourClassifier(self.clip_variant, self.device, self.precision)

    def judge(self, ss) -> list[dict]:
        self.load_models()
        return super().judge(ss)

    def identity(self, ss) -> dict:
        self.load_models()
        ident = super().identity(ss)
        describe = lambda part: getattr(part, "identity", dict)()  # noqa: E731
        ident.update({"route": ROUTE, "approximate": APPROXIMATE,
                      "detector_model": f"{DETECTOR_REPO} via transformers (not mmdet)",
                      "colour_model": f"open_clip {self.clip_variant.model_name} "
                                      f"({self.clip_variant.pretrained})",
                      "detector_details": describe(self.detector),
                      "colour_details": describe(self.colour)})
        return ident
