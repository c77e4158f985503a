"""Training data: the prompt rows a method draws, the prompt stream, the GAN's real images.

* Prompt rows: a PromptPool of conditions encoded once (the toy world's training split), drawn by
  index into a PromptBatch; the engine's Context draws from it (the engine sits above this module).
* Prompt stream: a fewstep prompt file (JSONL rows with `prompt_id` and `prompt`; SiT rows carry
  `class_label`), e.g. LAION-Aesthetic 6.25+ captions for DMD2 on SDXL (methods/notes/dmd2.md sec.
  6.1), the PickScore training prompts for RTDMD's stage 1 (methods/notes/rtdmd.md sec. 6),
  ImageNet's class ids for SiT. Drawn rows are encoded per batch: a pool of millions of captions
  cannot be held encoded.
* Real images: a folder in the Hugging Face *imagefolder* layout, image files plus a
  `metadata.jsonl` whose rows name the file (`file_name`) and its own caption (`prompt` or `text`)
  or `class_label`. DMD2's GAN sees real images with their own captions (methods/notes/dmd2.md sec.
  3.2); images are resized (shorter side) and centre-cropped to the teacher's resolution, then
  VAE-encoded by the engine.

Draws take the engine's per-(iteration, stream, rank) generator, so a resumed run reads the same
rows the uninterrupted run read, without data-loader state.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fewstep.backbones.base import Backbone, Cond, cond_index
from fewstep.errors import FewstepError
from fewstep.prompts import condition_of, read_prompts

METADATA = "metadata.jsonl"
CAPTION_KEYS = ("prompt", "text", "class_label")


def resolve_data(path) -> Path:
    """A data path as given when it exists, else a bare name inside the weights cache (like
    checkpoints); the error of a missing one names both places."""
    from fewstep.backbones.weights import resolve

    given = Path(path).expanduser()
    return given if given.exists() else Path(resolve(str(path)))


@dataclass
class PromptBatch:
    """A batch of conditions: metadata rows (toy world: GenEval format), their conditioning,
    and a group id per row (rows drawn as K repeats of one prompt share a group)."""

    metas: list[dict]
    cond: Cond
    groups: torch.Tensor

    def __len__(self) -> int:
        return len(self.metas)


class PromptPool:
    """A fixed pool of training conditions, encoded once, drawn from by index."""

    def __init__(self, metas: list[dict], cond: Cond):
        if not metas:
            raise ValueError("the training prompt pool is empty")
        self.metas, self.cond = metas, cond

    def draw(self, n: int, gen: torch.Generator, repeat: int = 1) -> PromptBatch:
        """n rows drawn with replacement, each repeated `repeat` times (one group per row)."""
        idx = torch.randint(len(self.metas), (n,), generator=gen)
        cond = {k: v.repeat_interleave(repeat, dim=0) for k, v in self.conditions(idx).items()}
        rows = [self.metas[i] for i in idx.repeat_interleave(repeat).tolist()]
        return PromptBatch(rows, cond, torch.arange(n).repeat_interleave(repeat))

    def conditions(self, idx: torch.Tensor) -> Cond:
        return cond_index(self.cond, idx)


class PromptStream(PromptPool):
    """Training prompts read from a file, encoded when drawn (the toy PromptPool's `draw`)."""

    def __init__(self, path, teacher: Backbone):
        self.path, self.teacher = Path(path), teacher
        super().__init__(read_prompts(self.path), cond={})
        if teacher.family == "sit" and any("class_label" not in m for m in self.metas):
            raise FewstepError(f"training prompts {self.path}: SiT trains on class labels, every "
                               "row needs `class_label` (e.g. `fewstep prompts --set "
                               "imagenet-classes`)")

    def conditions(self, idx: torch.Tensor) -> Cond:
        return encode_rows(self.teacher, [self.metas[i] for i in idx.tolist()])


def encode_rows(teacher: Backbone, rows: list[dict]) -> Cond:
    """Conditioning of drawn rows, outside the backbone's per-set cache (every batch differs)."""
    return teacher.encode_uncached([condition_of(r) for r in rows])


def image_size(teacher: Backbone) -> tuple[int, int]:
    """The (height, width) of the images the teacher's codec encodes to its latent shape."""
    factor = teacher.codec.downsampling
    return teacher.latent_shape[1] * factor, teacher.latent_shape[2] * factor


class ImageFolder:
    """Real images with their own captions (imagefolder layout), at the teacher's resolution."""

    def __init__(self, folder, resolution):
        self.folder = resolve_data(folder)
        if not self.folder.is_dir():
            raise FewstepError(f"real-image folder {folder} not found (looked at {Path(folder)} "
                               f"and {self.folder}); put the captioned images there (images plus "
                               f"{METADATA}) or point FEWSTEP_WEIGHTS at the cache holding them")
        self.size = tuple(resolution) if isinstance(resolution, (tuple, list)) else (resolution,) * 2
        meta = self.folder / METADATA
        if not meta.is_file():
            raise FewstepError(f"real-image folder {self.folder}: {METADATA} is missing; it needs "
                               "one JSON row per image: {\"file_name\": \"0001.jpg\", \"prompt\": "
                               "\"...\"} (or \"class_label\": 207 for SiT)")
        self.rows = [self._check(json.loads(line), i, meta)
                     for i, line in enumerate(meta.read_text().split("\n"), 1) if line.strip()]
        if not self.rows:
            raise FewstepError(f"real-image folder {self.folder}: {METADATA} lists no images")

    def _check(self, row: dict, line: int, meta: Path) -> dict:
        if "file_name" not in row or not any(k in row for k in CAPTION_KEYS):
            raise FewstepError(f"{meta}, line {line}: needs `file_name` and one of {CAPTION_KEYS}")
        if "prompt" not in row and "text" in row:
            row = {**row, "prompt": row["text"]}
        return row

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, row: dict) -> np.ndarray:
        from PIL import Image

        path = self.folder / row["file_name"]
        try:
            with Image.open(path) as image:
                return centre_crop_resize(image.convert("RGB"), self.size)
        except OSError as err:
            raise FewstepError(f"real image {path} (listed in {self.folder / METADATA}) cannot be "
                               f"read: {err}") from None

    def draw_rows(self, n: int, gen: torch.Generator) -> list[dict]:
        """n rows drawn with replacement, without reading their images (DMD2's multi-step
        generator takes only the captions, methods/notes/dmd2.md sec. 5.2)."""
        return [self.rows[i] for i in torch.randint(len(self.rows), (n,), generator=gen).tolist()]

    def draw(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, list[dict]]:
        """n images in [0, 1] (B, 3, H, W) and their rows (the rows `draw_rows` draws)."""
        rows = self.draw_rows(n, gen)
        pixels = np.stack([self.load(r) for r in rows]).transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(pixels, np.float32) / 255.0), rows


def centre_crop_resize(image, size: tuple[int, int]) -> np.ndarray:
    """Resize so the image covers (h, w) (bicubic), then crop the centre: no letterbox, no stretch."""
    from PIL import Image

    h, w = size
    scale = max(h / image.height, w / image.width)
    resized = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))),
                           Image.BICUBIC)
    left, top = (resized.width - w) // 2, (resized.height - h) // 2
    return np.asarray(resized.crop((left, top, left + w, top + h)), dtype=np.uint8)
