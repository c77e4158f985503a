"""HPSv2 (Human Preference Score v2.0 / v2.1), sec. 1, by the open_clip route.

Model (sec. 1.2): open_clip's ViT-H-14 with plain GELU, built by open_clip 3.x and loaded
strictly from the HPS checkpoint (`HPS_v2_compressed.pt` for v2.0, `HPS_v2.1_compressed.pt` for
v2.1; the state dict sits under a "state_dict" key). Both towers are fine-tuned, so the LAION
ViT-H-14 weights are never needed. The files come from the weights cache only:
`$FEWSTEP_WEIGHTS/hps/<file>` (source: Hugging Face xswu/HPSv2).

Checkpoint identity (sec. 1.6): a file is v2.0 or v2.1 by its sha256, never by its name. Before
the model is read, the file's hash must be the published hash of the version asked for, or the
hash the user pins (option expected_sha256, or $FEWSTEP_HPS_V2_1_SHA256 / $FEWSTEP_HPS_V2_0_SHA256,
which the training reward reads); anything else is refused, naming the file, the version, both
hashes, and "this is the v2.0 checkpoint" when the bytes are the other version's. The identity
records checkpoint_sha256, checkpoint_verified, checkpoint_published and checkpoint_verified_by.

The .pt files are read with torch's tensor-only loader and nothing else: a file it refuses is
never unpickled fully (a crafted pickle runs any code, and the path can come from a config's
metric_options). Such a file, if trusted, is converted once with `fewstep weights convert
--trust-pickle FILE.pt --out FILE.safetensors`; a `.safetensors` beside the cache's `.pt` is used
in its place, and a `.safetensors` checkpoint path holds the state dict itself.

Score per (image, prompt): the cosine between the unit-length image and text embeddings; the
model's logit scale plays no role. Tables report 100 x the mean cosine (e.g. 27.86); per-sample
rows hold both the raw cosine and the x100 score. v2.0 and v2.1 are separate metrics ("hpsv2.0",
"hpsv2.1"): their scales differ and must never be mixed (README of tgxs002/HPSv2).

Preprocessing (sec. 1.3, the reference "val" transform with letterboxing): RGB (alpha
dropped), float in [0, 1], bicubic resize of the float tensor so the longer side is 224
(antialias is a named option, on by default as current torchvision does), black zero padding to
224 x 224 with floor(pad / 2) on the left and top, CLIP mean/std. No centre crop. The reference
pads only when it resizes; an image whose longer side already is 224 but is not square is padded
here too, since the model needs a square input.

Precision (sec. 1.2): fp16 autocast on CUDA is the reference (it causes ties, as the HPSv2
maintainers report) and the default; "fp32" is a separate identity. On the CPU autocast fp16 is
not available, so the computation is fp32 and the identity says so. The cosine is taken as a
batched matmul inside the precision context so that under autocast it is rounded to fp16 like the
reference's `image_features @ text_features.T`.

`HPSv2Reward` is the same score as a differentiable training reward, `reward(images01, metas)`.
Sections (sec. N) are those of metrics/notes/metrics.md.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fewstep.backbones.weights import WeightFile
from metrics import pins
from metrics.base import PerImageMetric
from metrics.pins import PIN_OPTION, CheckpointIdentityError
from metrics.sampleset import SampleSet

ARCHITECTURE = "ViT-H-14"
INPUT_SIZE = 224
CONTEXT_LENGTH = 77
# OpenAI CLIP's normalisation constants, which the HPS transform uses (sec. 1.3 step 5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PRECISIONS = ("fp16-autocast", "fp32")
SCALE = 100.0
TEXT_CACHE_LIMIT = 10_000  # prompts whose text embedding the reward keeps
HF_SOURCE = "Hugging Face xswu/HPSv2"

CHECKPOINTS = {
    "v2.0": WeightFile("hps/HPS_v2_compressed.pt", f"{HF_SOURCE}, file HPS_v2_compressed.pt",
                       "HPSv2.0 ViT-H-14 checkpoint, about 1.9 GB"),
    "v2.1": WeightFile("hps/HPS_v2.1_compressed.pt", f"{HF_SOURCE}, file HPS_v2.1_compressed.pt",
                       "HPSv2.1 ViT-H-14 checkpoint, about 1.9 GB"),
}


# sha256 of the published files, from the Git LFS pointers of Hugging Face xswu/HPSv2, commit
# 697403c78157020a1ae59d23f111aa58ced35b0a ("Upload 2 files": HPS_v2.1_compressed.pt, size
# 1972490005 bytes; HPS_v2_compressed.pt, size 1972484501 bytes). A file is called v2.0 or v2.1
# only when its bytes hash to one of these, or to a hash its user pins (sec. 1.6).
PUBLISHED_SHA256 = {
    "v2.0": "07cb0d20626232204ca3a6ec53ff5984e7e53212a8a7b0e0ec2bac1bdaf125a1",
    "v2.1": "c57a38fb4a2f7e7c15bf00da2ea377cdf165448b4dd1052a484c215a998c9837",
}
PUBLISHED_AT = "Hugging Face xswu/HPSv2, commit 697403c"
PIN_ENV = {"v2.0": "FEWSTEP_HPS_V2_0_SHA256", "v2.1": "FEWSTEP_HPS_V2_1_SHA256"}



def checkpoint_entry(hps_version: str) -> WeightFile:
    if hps_version not in CHECKPOINTS:
        raise ValueError(f"unknown HPS version {hps_version!r}; use one of {sorted(CHECKPOINTS)} "
                         "(the package's 'v2' is not a version either)")
    return CHECKPOINTS[hps_version]


# ---------------------------------------------------------------------------- preprocessing

def image_to_tensor01(image: Image.Image) -> torch.Tensor:
    """A PIL image as float (3, H, W) in [0, 1]; alpha is dropped (the reference would keep RGBA
    as 4 channels, which breaks the model, sec. 1.3 step 1)."""
    arr = np.asarray(image.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def letterbox_geometry(height: int, width: int, size: int = INPUT_SIZE):
    """(resized (h, w), padding (left, right, top, bottom)) of the HPS letterbox.

    Scale 224 / longer side, sizes rounded with Python's round as the reference does; the pad is
    split with floor(pad / 2) on the left and top."""
    scale = size / float(max(height, width))
    new_h, new_w = height, width
    if scale != 1.0:
        new_h, new_w = round(height * scale), round(width * scale)
    pad_h, pad_w = size - new_h, size - new_w
    return (new_h, new_w), (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)


def letterbox(images01: torch.Tensor, antialias: bool = True,
              size: int = INPUT_SIZE) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, size, size): bicubic resize of the float tensor (no
    clamping, as torchvision's tensor resize), then black zero padding. Differentiable."""
    (new_h, new_w), padding = letterbox_geometry(*images01.shape[-2:], size=size)
    x = images01
    if (new_h, new_w) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False,
                          antialias=antialias)
    return F.pad(x, padding, value=0.0)


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return (pixels - mean) / std


def hps_pixels(images01: torch.Tensor, antialias: bool = True) -> torch.Tensor:
    """The model input of a batch of float images in [0, 1] (sec. 1.3 steps 3-5)."""
    if images01.ndim != 4 or images01.shape[1] != 3:
        raise ValueError(f"HPS preprocessing needs images (B, 3, H, W) in [0, 1]; got shape "
                         f"{tuple(images01.shape)}")
    return normalise(letterbox(images01.float(), antialias=antialias))


def preprocessing_identity(antialias: bool) -> dict:
    return {"steps": "RGB (alpha dropped); float [0, 1]; bicubic resize of the float tensor, "
                     f"longer side to {INPUT_SIZE}; black zero pad to {INPUT_SIZE}x{INPUT_SIZE}, "
                     "left/top floor(pad/2); no centre crop; CLIP mean/std",
            "antialias": bool(antialias), "size": INPUT_SIZE,
            "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
            "text": f"open_clip SimpleTokenizer, {CONTEXT_LENGTH} tokens, truncated"}


# ------------------------------------------------------------------------------- precision

def effective_precision(precision: str, device: torch.device) -> str:
    """What actually runs: autocast fp16 is CUDA-only, so the CPU computes in fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; one of {PRECISIONS}")
    return precision if device.type == "cuda" else "fp32"


def precision_label(precision: str, device: torch.device) -> str:
    """The identity's precision field (the CPU fallback is stated, not hidden)."""
    if device.type == "cuda":
        return effective_precision(precision, device)
    return "fp32 (cpu: fp16 autocast is CUDA-only)"


def precision_context(precision: str, device: torch.device):
    if effective_precision(precision, device) == "fp16-autocast":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# -------------------------------------------------------------------------------- the model

def model_config(config: dict | None = None) -> dict:
    """open_clip's ViT-H-14 config, or an injected one of the same classes (tests: a tiny one)."""
    import open_clip

    cfg = copy.deepcopy(config) if config is not None else open_clip.get_model_config(ARCHITECTURE)
    if cfg is None:
        raise ValueError(f"open_clip {importlib.metadata.version('open_clip_torch')} has no "
                         f"{ARCHITECTURE} config; install open_clip_torch 3.3")
    if cfg.get("quick_gelu", False):
        raise ValueError("HPSv2 is a ViT-H-14 with plain GELU; the model config asks for QuickGELU "
                         "(remove quick_gelu from the config)")
    context = cfg.get("text_cfg", {}).get("context_length")
    if context != CONTEXT_LENGTH:
        raise ValueError(f"HPSv2 tokenises to {CONTEXT_LENGTH} tokens; the model config has "
                         f"context_length {context}")
    return cfg


def config_sha256(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def refused_pickle(path: Path, err: Exception) -> str:
    """The error for a checkpoint the tensor-only loader refuses: how to convert it once."""
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return (f"{path} holds pickled objects beyond tensors, which the tensor-only loader refuses "
            f"({reason}). Unpickling it fully could run any code, so fewstep never does. If you "
            f"trust the file, convert it once: `fewstep weights convert --trust-pickle {path} "
            f"--out {path.with_suffix('.safetensors')}` (a .safetensors beside the cache's .pt "
            "is used in its place; elsewhere, give its path as the metric's checkpoint option)")


def read_state_dict(path: Path) -> dict:
    """The HPS state dict from its checkpoint file ({"state_dict": {...}} in a .pt, or the state
    dict itself in a .safetensors written by `fewstep weights convert`)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(refused_pickle(path, err)) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        keys = sorted(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path} is not an HPS checkpoint: expected a dict with a 'state_dict' "
                         f"key (the layout of xswu/HPSv2's files), found {keys}")
    return checkpoint["state_dict"]


def build_model(cfg: dict, checkpoint: Path, device: torch.device):
    """open_clip's CLIP built from the config and loaded strictly from the HPS checkpoint."""
    from open_clip.model import CLIP

    with torch.device(device):  # initialise on the target device (ViT-H-14 is ~1 B parameters)
        model = CLIP(**cfg)
    try:
        model.load_state_dict(read_state_dict(checkpoint), strict=True)
    except RuntimeError as err:
        raise ValueError(f"{checkpoint} does not match the HPS model ({ARCHITECTURE}, plain GELU); "
                         f"is it an HPS_v2*_compressed.pt file? {err}") from err
    return model.eval().requires_grad_(False)


def resolve_checkpoint(hps_version: str, checkpoint=None) -> Path:
    """An explicit checkpoint path, or the version's file in the weights cache."""
    from fewstep.backbones.weights import MissingWeightsError, find_entry, require_entry

    entry = checkpoint_entry(hps_version)
    if checkpoint is None:
        # a converted copy (`fewstep weights convert`) beside the .pt is read in its place
        converted = find_entry(str(Path(entry.path).with_suffix(".safetensors")))
        return converted or require_entry(entry.path, entry.source, f"HPSv2 ({hps_version})")
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise MissingWeightsError(
            f"HPSv2 ({hps_version}): checkpoint {path} not found (source: {entry.source}). "
            "Pass an existing file, or leave the path unset to read "
            f"$FEWSTEP_WEIGHTS/{entry.path} from the weights cache.")
    return path


# ----------------------------------------------------------------------- checkpoint identity

def published_files() -> str:
    """What an unset pin accepts, for the pin's error."""
    files = ", ".join(f"{version}: {sha}" for version, sha in sorted(PUBLISHED_SHA256.items()))
    return f"the published files ({files})"


def normalised_pin(pin, where: str = PIN_OPTION) -> str | None:
    return pins.normalised_pin(pin, where, published_files())


def requested_pin(hps_version: str, pin=None) -> tuple[str | None, str]:
    """(pinned sha256 or None, where it came from): the option, else the version's variable."""
    return pins.requested_pin(pin, PIN_ENV[hps_version], published_files())


def published_version(sha: str) -> str | None:
    return next((version for version, h in PUBLISHED_SHA256.items() if h == sha), None)


def how_to_pin(hps_version: str, found: str) -> str:
    return (f"If you trust this file as HPS{hps_version} (e.g. a .safetensors that `fewstep "
            "weights convert` made from a .pt whose `sha256sum` is the published hash), pin its "
            f"hash: metric_options: {{hps{hps_version}: {{{PIN_OPTION}: {found}}}}} in the config, "
            f"or {PIN_ENV[hps_version]}={found} in the environment (the training reward reads "
            "only the variable). The identity then records the file as pinned, not published.")


def identity_error(path: Path, hps_version: str, found: str, expected: str, by: str) -> str:
    """Why a checkpoint is not the version asked for: file, version, both hashes, what to do."""
    head = (f"HPSv2 ({hps_version}): checkpoint {path} has sha256 {found}; expected sha256 "
            f"{expected} ({by}).")
    other = published_version(found)
    if other is not None and other != hps_version:
        return (f"{head} Refused: this is the {other} checkpoint (the published file "
                f"{Path(CHECKPOINTS[other].path).name}), not {hps_version}: put the {hps_version} "
                f"file there ({CHECKPOINTS[hps_version].source}), or score it as hps{other}.")
    if other == hps_version:
        return f"{head} The file is the published {hps_version} checkpoint: drop or fix the pin."
    if by.startswith("the published"):
        return (f"{head} The file is neither published HPS checkpoint (modified, truncated, "
                f"converted, or another file). {how_to_pin(hps_version, found)}")
    return f"{head} Fix the pin, or put the pinned file there."


def verify_checkpoint(path: Path, hps_version: str, pin=None) -> dict:
    """The identity fields of a checkpoint whose sha256 is the version's published hash or the
    user's pin; CheckpointIdentityError otherwise. The hash is cached per (path, size, mtime) for
    the process, so the identity reuses it."""
    from fewstep.backbones.weights import file_sha256

    pin, where = requested_pin(hps_version, pin)
    published = PUBLISHED_SHA256[hps_version]
    other = published_version(pin) if pin is not None else None
    if other not in (None, hps_version):
        raise CheckpointIdentityError(
            f"HPSv2 ({hps_version}): {where} = {pin} is the published {other} checkpoint's hash: "
            f"a file with it is the {other} checkpoint, and a pin cannot make it {hps_version}. "
            f"Score it as hps{other}, or pin the hash of a {hps_version} file.")
    found = file_sha256(path)
    if found != (pin or published):   # the other version's file never matches either
        by = (f"the published {hps_version} file, {PUBLISHED_AT}" if pin is None
              else f"the pin in {where}")
        raise CheckpointIdentityError(identity_error(Path(path), hps_version, found,
                                                     pin or published, by))
    how = (f"published sha256 ({PUBLISHED_AT})" if found == published
           else f"sha256 pinned by the user in {where} (not a published file)")
    return {"checkpoint_sha256": found, "checkpoint_verified": True,
            "checkpoint_published": found == published, "checkpoint_verified_by": how}


class LoadedHPS:
    """A frozen HPS model with its tokenizer; embeddings are unit length."""

    def __init__(self, model, checkpoint: Path, hps_version: str, cfg: dict,
                 verification: dict | None = None):
        import open_clip

        self.model, self.checkpoint, self.hps_version = model, Path(checkpoint), hps_version
        self.cfg = cfg
        # how the file was recognised as hps_version (verify_checkpoint), for the identity
        self.verification = verification or {"checkpoint_verified": False,
                                             "checkpoint_verified_by": "not checked"}
        self.tokenizer = open_clip.get_tokenizer(ARCHITECTURE)  # bundled BPE, 77 tokens
        self._text_cache: dict[tuple, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def text_embeddings(self, prompts) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens), dim=-1)

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixels.to(self.device)), dim=-1)

    def paired_cosines(self, pixels: torch.Tensor, text_emb: torch.Tensor,
                       precision: str) -> torch.Tensor:
        """cos(image i, text i) for preprocessed pixels; only the model runs under autocast, as
        in the reference (preprocessing happens before it, in fp32)."""
        with precision_context(precision, self.device):
            return paired_cosines(self.image_embeddings(pixels), text_emb).float()

    def cached_text_embeddings(self, prompts, precision: str) -> torch.Tensor:
        """Text embeddings of prompts (they need no gradient), each encoded once per precision."""
        missing = sorted({p for p in prompts if (p, precision) not in self._text_cache})
        if len(self._text_cache) + len(missing) > TEXT_CACHE_LIMIT:  # bound long training runs
            self._text_cache.clear()
            missing = sorted(set(prompts))
        if missing:
            with torch.no_grad(), precision_context(precision, self.device):
                for prompt, emb in zip(missing, self.text_embeddings(missing)):
                    self._text_cache[(prompt, precision)] = emb
        return torch.stack([self._text_cache[(p, precision)] for p in prompts])


def load_hps(hps_version: str = "v2.1", device=None, checkpoint=None,
             config: dict | None = None, expected_sha256: str | None = None) -> LoadedHPS:
    """The HPS model of a version from the weights cache (or an explicit checkpoint file), once
    the file's sha256 shows it is that version (published hash, or expected_sha256 / the
    version's environment variable as the user's pin)."""
    path = resolve_checkpoint(hps_version, checkpoint)  # before any heavy work: fail fast
    cfg = model_config(config)
    verification = verify_checkpoint(path, hps_version, expected_sha256)  # before reading it
    device = torch.device(device or default_device())
    return LoadedHPS(build_model(cfg, path, device), path, hps_version, cfg, verification)


def paired_cosines(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """cos of row i with row i, as a batched matmul: under fp16 autocast it is rounded to fp16 as
    the reference's `image_features @ text_features.T` is (the ties HPSv2 reports)."""
    return torch.bmm(image_emb[:, None, :], text_emb[:, :, None]).flatten()


def read_images01(paths) -> torch.Tensor:
    """Image files as one float batch (B, 3, H, W) in [0, 1] (a sample set has one size)."""
    tensors = []
    for path in paths:
        with Image.open(path) as image:
            tensors.append(image_to_tensor01(image))
    return torch.stack(tensors)


# --------------------------------------------------------------------------------- the metric

@dataclass
class HPSv2(PerImageMetric):
    """Mean HPS (x100) of a sample set against its prompts, with a bootstrap CI over prompts.

    hps_version "v2.1" (default) or "v2.0" (use HPSv20); precision "fp16-autocast" (reference,
    fp32 on the CPU) or "fp32"; antialias: the resize option of sec. 1.3. checkpoint and
    model_config replace the cache file and ViT-H-14 (tests use a tiny config of the same classes).
    """
    name = "hpsv2.1"
    version = "1"
    higher_is_better = True

    hps_version: str = "v2.1"
    precision: str = "fp16-autocast"
    antialias: bool = True
    device: str | None = None               # None: CUDA when available
    batch_size: int = 16
    checkpoint: str | Path | None = None
    model_config: dict | None = None
    expected_sha256: str | None = None      # the user's pin for a file that is not published
    _hps: LoadedHPS | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        checkpoint_entry(self.hps_version)          # validates the version
        effective_precision(self.precision, torch.device("cpu"))  # validates the name
        self.expected_sha256 = normalised_pin(self.expected_sha256)
        self.name = f"hps{self.hps_version}"        # "hpsv2.1" / "hpsv2.0"

    def weight_files(self) -> list[WeightFile]:
        return [] if self.checkpoint is not None else [checkpoint_entry(self.hps_version)]

    def hps(self) -> LoadedHPS:
        """The model, loaded on first use (building the metric reads no weights)."""
        if self._hps is None:
            self._hps = load_hps(self.hps_version, self.device, self.checkpoint, self.model_config,
                                 self.expected_sha256)
        return self._hps

    def cosines(self, ss: SampleSet) -> np.ndarray:
        """One cosine per image in manifest order; each distinct prompt is encoded once."""
        hps = self.hps()
        prompts = sorted({r["prompt"] for r in ss.records})
        row_of = {p: i for i, p in enumerate(prompts)}
        out = []
        with torch.inference_mode():
            with precision_context(self.precision, hps.device):
                text = torch.cat([hps.text_embeddings(prompts[i:i + self.batch_size])
                                  for i in range(0, len(prompts), self.batch_size)])
            for start in range(0, len(ss), self.batch_size):
                records = ss.records[start:start + self.batch_size]
                pixels = hps_pixels(read_images01(ss.folder / r["path"] for r in records),
                                    self.antialias)
                rows = torch.tensor([row_of[r["prompt"]] for r in records], device=text.device)
                cos = hps.paired_cosines(pixels, text[rows], self.precision)
                out.append(cos.double().cpu().numpy())
        return np.concatenate(out)

    def identity(self, ss: SampleSet) -> dict:
        hps = self.hps()
        n_prompts = len(set(ss.prompt_ids()))
        model = (f"open_clip {ARCHITECTURE}, plain GELU" if self.model_config is None
                 else f"open_clip CLIP, custom config sha256 {config_sha256(hps.cfg)[:16]}")
        return {"metric": self.name, "version": self.version, "hps_version": self.hps_version,
                "model": model, "checkpoint_file": hps.checkpoint.name,
                **hps.verification,     # checkpoint_sha256, _verified, _published, _verified_by
                "formula": "cosine of unit-normalised image and text embeddings (no logit scale)",
                "scale": f"x{SCALE:g}: value = {SCALE:g} x mean cosine",
                "precision": precision_label(self.precision, hps.device),
                "preprocessing": preprocessing_identity(self.antialias),
                "resolution": list(ss.resolution), "prompt_set_sha256": ss.prompt_set_sha256(),
                "n_prompts": n_prompts, "images_per_prompt": len(ss) // n_prompts,
                "implementation": "fewstep open_clip route, open_clip "
                                  f"{importlib.metadata.version('open_clip_torch')}"}

    def image_scores(self, ss: SampleSet) -> dict:
        cosines = self.cosines(ss)
        return {"cosine": cosines, "score": SCALE * cosines}

    def score_details(self, columns: dict) -> dict:
        return {"mean_cosine": float(np.mean(columns["cosine"])), "device": str(self.hps().device),
                "precision_requested": self.precision, "batch_size": self.batch_size,
                "torch": torch.__version__,
                "note": "scores compare best between images of one prompt (HPSv2 maintainers)"}


@dataclass
class HPSv20(HPSv2):
    """HPSv2.0: the same model on the v2.0 checkpoint; a separate identity and scale."""
    name = "hpsv2.0"
    hps_version: str = "v2.0"


# ------------------------------------------------------------------- differentiable reward

class HPSv2Reward:
    """The HPS cosine as a training reward: reward(images01, metas) -> (B,), higher is better.

    images01: (B, 3, H, W) in [0, 1]; metas: prompt rows with "prompt". The preprocessing is the
    metric's own (the same torch ops, differentiable), so on the same images the reward equals the
    metric's per-sample "cosine" (the raw cosine, not x100). The model is frozen; gradients flow
    to the images. Precision as the metric (fp16 autocast on CUDA, fp32 on the CPU).
    """

    def __init__(self, hps_version: str = "v2.1", device=None, precision: str = "fp16-autocast",
                 antialias: bool = True, checkpoint=None, model_config: dict | None = None,
                 hps: LoadedHPS | None = None, expected_sha256: str | None = None):
        effective_precision(precision, torch.device("cpu"))  # validates the name
        self.hps = hps or load_hps(hps_version, device, checkpoint, model_config, expected_sha256)
        self.hps_version = self.hps.hps_version
        self.precision, self.antialias = precision, antialias

    def __call__(self, images01: torch.Tensor, metas: list[dict]) -> torch.Tensor:
        if images01.ndim != 4 or images01.shape[1] != 3 or len(metas) != images01.shape[0]:
            raise ValueError(f"HPSv2Reward needs images (B, 3, H, W) and B prompt rows; got "
                             f"{tuple(images01.shape)} and {len(metas)} rows")
        text = self.hps.cached_text_embeddings([m["prompt"] for m in metas], self.precision)
        pixels = hps_pixels(images01.to(self.hps.device), self.antialias)
        return self.hps.paired_cosines(pixels, text, self.precision)


def build_hps_reward(arg: str | None = None, device="cpu") -> HPSv2Reward:
    """REWARDS registry entry: `--reward hpsv2` (v2.1) or `--reward hpsv2:v2.0`."""
    return HPSv2Reward(arg or "v2.1", device=device)
