"""The real FID protocol (sec. 3.8): samples and reference images are brought to the evaluation
resolution by the crop policy (centre square crop + Lanczos as DMD/DMD2 do; or patch crops)
before clean-fid's resizer; the FID mode and crop policy are checked and recorded.
Sections (sec. N) are those of metrics/notes/metrics.md.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from metrics.fid_features import MODE
from metrics.fid_inception import INCEPTION_MODES, MODE_RESIZE

CROP_POLICIES = {
    "center": "centre square crop (shorter side), then PIL Lanczos to the evaluation resolution",
    "none": "PIL Lanczos to the evaluation resolution, no crop (non-square images are squashed)",
    "patch": "centre crop of the evaluation resolution, no resize (patch FID, e.g. 299 px)",
}


def check_mode_and_crop(mode: str, crop: str) -> None:
    if mode not in INCEPTION_MODES:
        raise ValueError(f"unknown FID mode {mode!r}; one of {INCEPTION_MODES} (clean is the "
                         "default; the legacy modes reproduce older TF/pytorch-fid numbers)")
    if crop not in CROP_POLICIES:
        raise ValueError(f"unknown crop policy {crop!r}; one of {sorted(CROP_POLICIES)}")


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
