"""ImageReward (Xu et al. 2023), sec. 2, through the installed image-reward package.

Model (sec. 2.1): BLIP, a ViT-L/16 image encoder and a BERT-base text encoder that
cross-attends to the image tokens; the [CLS] output goes through a 768-1024-128-64-16-1 head
without activations, and the reward is the z-score r = (raw - mean) / std with the package's
constants. The package's own classes are used (adapted at import time, image_reward_compat), so
the network is the package's network; only file locations, batching and inference mode are ours.

Files (sec. 2.2 and 6), from the weights cache only ($FEWSTEP_WEIGHTS/imagereward/): the plain fp32
state dict `ImageReward.pt` and `med_config.json` (Hugging Face THUDM/ImageReward), and the
`bert-base-uncased` tokenizer folder (`tokenizers/bert-base-uncased/`, its `vocab.txt`). The state
dict is loaded with strict=False as the package does, then checked: no unexpected keys, only
`position_ids` buffers missing.

Checkpoint identity (sec. 2.5): `ImageReward.pt` is recognised by its sha256, never by its name.
Before the model is built or the file read, its hash must be the published one (Hugging Face
THUDM/ImageReward's Git LFS pointer) or the hash the user pins (option expected_sha256, or
$FEWSTEP_IMAGEREWARD_SHA256, which the training reward reads); anything else is refused, naming the
file and both hashes. The identity records checkpoint_sha256, checkpoint_verified,
checkpoint_published and checkpoint_verified_by. `med_config.json` is not an LFS file and has no
published hash: its sha256 is recorded (med_config_sha256), not checked.

Preprocessing: the metric uses the package's own PIL transform (shorter side to 224 bicubic,
centre crop 224, RGB, CLIP mean/std); ImageReward centre-crops where HPSv2 letterboxes. Text:
BLIP's bert-base-uncased tokenizer, padded to and truncated at 35 tokens (longer prompts are cut).

Scale: the value is the mean z-scored reward (x1), as RTDMD reports it (1.3024); AMD reports x100
(88.37). The identity records the scale; the claims audit converts.

`ImageRewardReward` is the differentiable training reward with the tensor preprocessing of the
package's ReFL trainer (torchvision resize of the shorter side to 224, bicubic, then centre crop
and CLIP normalisation on tensors): on 224 x 224 images it equals the metric's per-image score.
Sections (sec. N) are those of metrics/notes/metrics.md.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fewstep.backbones.weights import WeightFile
from metrics import pins
from metrics.base import PerImageMetric
from metrics.pins import PIN_OPTION, CheckpointIdentityError
from metrics.image_reward_compat import (MAX_TEXT_TOKENS, build_image_reward, check_key_report)
from metrics.sampleset import SampleSet

INPUT_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HF_SOURCE = "Hugging Face THUDM/ImageReward"
TEXT_CACHE_LIMIT = 10_000

WEIGHTS = {
    "checkpoint": WeightFile("imagereward/ImageReward.pt", f"{HF_SOURCE}, file ImageReward.pt",
                             "ImageReward state dict (BLIP ViT-L/16 + BERT-base + head), 1.79 GB"),
    "med_config": WeightFile("imagereward/med_config.json", f"{HF_SOURCE}, file med_config.json",
                             "BLIP-BERT config, 485 B"),
    "tokenizer": WeightFile("tokenizers/bert-base-uncased/vocab.txt",
                            "Hugging Face google-bert/bert-base-uncased, file vocab.txt",
                            "BLIP's text tokenizer (the folder may also hold tokenizer_config.json)"),
}

# sha256 of the published ImageReward.pt, from the Git LFS pointer of Hugging Face THUDM/ImageReward
# (commit 7a9e21f, blob/main/ImageReward.pt, size 1786880927 bytes). A file is called ImageReward
# only when its bytes hash to this, or to a hash its user pins (sec. 2.5).
PUBLISHED_SHA256 = "d71dc8d4912bc633c06ab8ef1ef6a81e8199d4369f14b47b29baf1d19de561f6"
PUBLISHED_AT = f"{HF_SOURCE}, commit 7a9e21f"
PIN_ENV = "FEWSTEP_IMAGEREWARD_SHA256"



def resolve_files(checkpoint=None, med_config=None, tokenizer=None) -> dict[str, Path]:
    """Explicit paths where given, else the weights cache; every missing file is named."""
    from fewstep.backbones.weights import MissingWeightsError, require_entry

    given = {"checkpoint": checkpoint, "med_config": med_config, "tokenizer": tokenizer}
    paths = {}
    for key, entry in WEIGHTS.items():
        if given[key] is None:
            paths[key] = require_entry(entry.path, entry.source, f"ImageReward ({key})")
            continue
        path = Path(given[key]).expanduser()
        if key == "tokenizer" and path.is_dir():
            path = path / "vocab.txt"
        if not path.is_file():
            raise MissingWeightsError(
                f"ImageReward ({key}): {path} not found (source: {entry.source}). Pass an existing "
                f"file, or leave it unset to read $FEWSTEP_WEIGHTS/{entry.path}.")
        paths[key] = path
    return paths


# ----------------------------------------------------------------------- checkpoint identity

PUBLISHED = f"the published ImageReward.pt ({PUBLISHED_SHA256})"


def normalised_pin(pin, where: str = PIN_OPTION) -> str | None:
    return pins.normalised_pin(pin, where, PUBLISHED)


def requested_pin(pin=None) -> tuple[str | None, str]:
    """(pinned sha256 or None, where it came from): the option, else the variable."""
    return pins.requested_pin(pin, PIN_ENV, PUBLISHED)


def identity_error(path: Path, found: str, expected: str, by: str) -> str:
    """Why a checkpoint is refused: the file, both hashes, and what to do."""
    head = f"ImageReward: checkpoint {path} has sha256 {found}; expected sha256 {expected} ({by})."
    if found == PUBLISHED_SHA256:
        return f"{head} The file is the published ImageReward.pt: drop or fix the pin."
    if by.startswith("the published"):
        return (f"{head} The file is not the published ImageReward.pt (modified, truncated, "
                "converted, or another file). If you trust it, pin its hash: metric_options: "
                f"{{imagereward: {{{PIN_OPTION}: {found}}}}} in the config, or {PIN_ENV}={found} "
                "in the environment (the training reward reads only the variable). The identity "
                "then records the file as pinned, not published.")
    return f"{head} Fix the pin, or put the pinned file there."


def verify_checkpoint(path: Path, pin=None) -> dict:
    """The identity fields of a checkpoint whose sha256 is the published hash or the user's pin;
    CheckpointIdentityError otherwise. The hash is cached per (path, size, mtime) for the
    process, so the identity reuses it."""
    from fewstep.backbones.weights import file_sha256

    pin, where = requested_pin(pin)
    found = file_sha256(path)
    if found != (pin or PUBLISHED_SHA256):
        by = f"the published file, {PUBLISHED_AT}" if pin is None else f"the pin in {where}"
        raise CheckpointIdentityError(identity_error(Path(path), found, pin or PUBLISHED_SHA256,
                                                     by))
    published = found == PUBLISHED_SHA256
    how = (f"published sha256 ({PUBLISHED_AT})" if published
           else f"sha256 pinned by the user in {where} (not the published file)")
    return {"checkpoint_sha256": found, "checkpoint_verified": True,
            "checkpoint_published": published, "checkpoint_verified_by": how}


class LoadedImageReward:
    """The package's ImageReward model, frozen, with batched scoring under our control."""

    def __init__(self, model, files: dict[str, Path], verification: dict | None = None):
        self.model, self.files = model, files
        # how the checkpoint was recognised (verify_checkpoint), for the identity
        self.verification = verification or {"checkpoint_verified": False,
                                             "checkpoint_verified_by": "not checked"}
        self._text_cache: dict[str, tuple] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokens(self, prompts):
        """(input_ids, attention_mask) as the package tokenises: pad to / truncate at 35."""
        text = self.model.blip.tokenizer(list(prompts), padding="max_length", truncation=True,
                                         max_length=MAX_TEXT_TOKENS, return_tensors="pt")
        return text.input_ids.to(self.device), text.attention_mask.to(self.device)

    def cached_tokens(self, prompts):
        if len(self._text_cache) > TEXT_CACHE_LIMIT:
            self._text_cache.clear()
        missing = sorted({p for p in prompts if p not in self._text_cache})
        if missing:
            for prompt, ids, mask in zip(missing, *self.tokens(missing)):
                self._text_cache[prompt] = (ids, mask)
        ids, masks = zip(*(self._text_cache[p] for p in prompts))
        return torch.stack(ids), torch.stack(masks)

    def rewards(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """z-scored rewards of preprocessed pixels (B, 3, 224, 224) and their prompts' tokens: the
        package's `score` computation (ViT -> cross-attending BERT -> [CLS] -> head), batched."""
        blip = self.model.blip
        image_embeds = blip.visual_encoder(pixels.to(self.device))
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = blip.text_encoder(ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                encoder_attention_mask=image_atts, return_dict=True)
        raw = self.model.mlp(out.last_hidden_state[:, 0, :].float()).flatten()
        return (raw - self.model.mean) / self.model.std


def load_image_reward(device=None, checkpoint=None, med_config=None, tokenizer=None,
                      vision: dict | None = None,
                      expected_sha256: str | None = None) -> LoadedImageReward:
    """ImageReward from the weights cache (or explicit files), once the checkpoint's sha256 is
    the published one or the user's pin (expected_sha256, else $FEWSTEP_IMAGEREWARD_SHA256);
    `vision`: a smaller ViT (tests)."""
    files = resolve_files(checkpoint, med_config, tokenizer)  # fail fast, before building
    verification = verify_checkpoint(files["checkpoint"], expected_sha256)  # before reading it
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_image_reward(files["med_config"], files["tokenizer"].parent, device, vision)
    state = torch.load(files["checkpoint"], map_location=device, weights_only=True)
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{files['checkpoint']} is not a state dict (THUDM/ImageReward's "
                         "ImageReward.pt is a plain fp32 state dict)")
    try:
        report = model.load_state_dict(state, strict=False)  # as the package loads it
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{files['checkpoint']} does not fit the ImageReward model: {err}") from err
    check_key_report(report.missing_keys, report.unexpected_keys, files["checkpoint"])
    return LoadedImageReward(model.eval().requires_grad_(False), files, verification)


def reward_pixels(images01: torch.Tensor, antialias: bool = True) -> torch.Tensor:
    """Differentiable preprocessing of the package's ReFL trainer on float images in [0, 1]:
    shorter side to 224 (bicubic), centre crop 224, CLIP mean/std."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    if images01.ndim != 4 or images01.shape[1] != 3:
        raise ValueError(f"ImageReward needs images (B, 3, H, W) in [0, 1]; got "
                         f"{tuple(images01.shape)}")
    x = images01.float()
    if min(x.shape[-2:]) != INPUT_SIZE:
        x = TF.resize(x, INPUT_SIZE, interpolation=InterpolationMode.BICUBIC, antialias=antialias)
    x = TF.center_crop(x, [INPUT_SIZE, INPUT_SIZE])
    return TF.normalize(x, CLIP_MEAN, CLIP_STD)


def file_pixels(model, paths) -> torch.Tensor:
    """The package's own PIL transform of image files (metric path, the reference)."""
    from PIL import Image

    tensors = []
    for path in paths:
        with Image.open(path) as image:
            tensors.append(model.preprocess(image))
    return torch.stack(tensors)


@dataclass
class ImageRewardScore(PerImageMetric):
    """Mean ImageReward (x1) of a sample set against its prompts, bootstrap CI over prompts.

    checkpoint / med_config / tokenizer replace the cache files; vision_config replaces the
    ViT-L/16 by a smaller VisionTransformer of the same class (tests only).
    """
    name = "imagereward"
    version = "1"
    higher_is_better = True

    device: str | None = None
    batch_size: int = 16
    checkpoint: str | Path | None = None
    med_config: str | Path | None = None
    tokenizer: str | Path | None = None
    vision_config: dict | None = None
    expected_sha256: str | None = None      # the user's pin for a file that is not published
    _loaded: LoadedImageReward | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.expected_sha256 = normalised_pin(self.expected_sha256)

    def weight_files(self) -> list[WeightFile]:
        given = {"checkpoint": self.checkpoint, "med_config": self.med_config,
                 "tokenizer": self.tokenizer}
        return [entry for key, entry in WEIGHTS.items() if given[key] is None]

    def loaded(self) -> LoadedImageReward:
        if self._loaded is None:
            self._loaded = load_image_reward(self.device, self.checkpoint, self.med_config,
                                             self.tokenizer, self.vision_config,
                                             self.expected_sha256)
        return self._loaded

    def rewards(self, ss: SampleSet) -> np.ndarray:
        ir, out = self.loaded(), []
        with torch.inference_mode():
            for start in range(0, len(ss), self.batch_size):
                records = ss.records[start:start + self.batch_size]
                pixels = file_pixels(ir.model, (ss.folder / r["path"] for r in records))
                ids, mask = ir.tokens(r["prompt"] for r in records)
                out.append(ir.rewards(pixels, ids, mask).double().cpu().numpy())
        return np.concatenate(out)

    def identity(self, ss: SampleSet) -> dict:
        from fewstep.backbones.weights import file_sha256

        ir = self.loaded()
        vocab = ir.files["tokenizer"]
        model = ("BLIP ViT-L/16 + BERT-base (image-reward 1.5 classes)" if self.vision_config is None
                 else f"BLIP, custom ViT {json.dumps(self.vision_config, sort_keys=True)}")
        n_prompts = len(set(ss.prompt_ids()))
        return {"metric": self.name, "version": self.version, "model": model,
                "checkpoint_file": ir.files["checkpoint"].name,
                **ir.verification,  # checkpoint_sha256, _verified, _published, _verified_by
                "med_config_sha256": file_sha256(ir.files["med_config"]),
                "vocab_sha256": hashlib.sha256(vocab.read_bytes()).hexdigest(),
                "formula": f"(head([CLS]) - {ir.model.mean}) / {ir.model.std}",
                "scale": "x1 (z-scored reward; AMD reports x100)", "precision": "fp32",
                "preprocessing": "image-reward's PIL transform: shorter side to 224 bicubic, "
                                 "centre crop 224, RGB, CLIP mean/std",
                "text": f"bert-base-uncased + [DEC]/[ENC], padded/truncated to {MAX_TEXT_TOKENS}",
                "resolution": list(ss.resolution), "prompt_set_sha256": ss.prompt_set_sha256(),
                "n_prompts": n_prompts, "images_per_prompt": len(ss) // n_prompts,
                "implementation": "fewstep adapter over image-reward "
                                  f"{importlib.metadata.version('image-reward')}, transformers "
                                  f"{importlib.metadata.version('transformers')}"}

    def load_weights(self) -> None:
        self.loaded()  # a missing weight file fails before any image is read

    def image_scores(self, ss: SampleSet) -> dict:
        return {"score": self.rewards(ss)}

    def score_details(self, columns: dict) -> dict:
        return {"device": str(self.loaded().device), "batch_size": self.batch_size,
                "torch": torch.__version__}


class ImageRewardReward:
    """ImageReward as a training reward: reward(images01, metas) -> (B,), higher is better;
    the model is frozen, gradients flow to the images (ReFL's tensor preprocessing)."""

    def __init__(self, device=None, antialias: bool = True, loaded: LoadedImageReward | None = None,
                 **files):
        self.ir = loaded or load_image_reward(device, **files)
        self.antialias = antialias

    def __call__(self, images01: torch.Tensor, metas: list[dict]) -> torch.Tensor:
        if len(metas) != images01.shape[0]:
            raise ValueError(f"ImageRewardReward needs one prompt row per image; got "
                             f"{images01.shape[0]} images and {len(metas)} rows")
        ids, mask = self.ir.cached_tokens([m["prompt"] for m in metas])
        return self.ir.rewards(reward_pixels(images01, self.antialias), ids, mask)


def build_image_reward_reward(arg: str | None = None, device="cpu") -> ImageRewardReward:
    """REWARDS registry entry: `--reward imagereward`."""
    if arg:
        raise ValueError(f"the imagereward reward takes no argument; got {arg!r}")
    return ImageRewardReward(device=device)
