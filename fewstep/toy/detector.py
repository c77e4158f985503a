"""Exact detector for toy-world images, standing in for GenEval's Mask2Former + CLIP colour step.

Method: assign every pixel to the nearest palette colour (or to nothing when it is far from all
of them, or nearest the background), split each colour into 4-connected components, drop tiny
ones, and name each component's shape by fitting the renderer's own templates (circle, square,
upward triangle) to its bounding box. The template IoU carries the geometric cues (fill ratio of
the box: 1 for the square, ~0.785 for the circle, ~0.5 for the triangle; and the row-width
profile that separates an upward triangle from everything else) in one number, and is exactly 1
on rendered objects. The score multiplies that fit by the colour purity of the component and a
penalty for stretched boxes, so clean objects score 1 and smudges of generated images score low.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fewstep.toy.world import BACKGROUND, COLORS, PALETTE, SHAPES, shape_mask

_REFERENCE = np.array([PALETTE[c] for c in COLORS] + [BACKGROUND], np.float32)
_BACKGROUND_INDEX = len(COLORS)
# smallest distance between two reference colours (background included), in 0..255 units
COLOR_SEPARATION = float(min(np.linalg.norm(a - b) for a, b in itertools.combinations(_REFERENCE, 2)))
# a pixel within ASSIGN_RADIUS of a colour belongs to it (below half the separation: never ambiguous)
ASSIGN_RADIUS = 0.45 * COLOR_SEPARATION
# pixels within PURE_RADIUS count fully towards purity; purity falls linearly to 0 at ASSIGN_RADIUS
PURE_RADIUS = 0.3 * COLOR_SEPARATION
# boxes more elongated than this start to lose score (rendered objects have square boxes)
MIN_CLEAN_ASPECT = 0.75


@dataclass(eq=False)
class Detection:
    """One detected object; box is (x0, y0, x1, y1), inclusive-exclusive; mask is HxW bool."""

    cls: str
    color: str
    box: tuple[int, int, int, int]
    mask: np.ndarray
    score: float


def _check_image(image) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be HxWx3 RGB, got shape {image.shape}")
    return image


def default_min_area(height: int, width: int) -> int:
    """1 % of the image, at least 4 px: well below the smallest rendered object (13 px at 16x16)."""
    return max(4, (height * width) // 100)


def assign_colors(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: index into COLORS (-1 for background or unassigned) and distance to that colour."""
    diff = image[:, :, None, :].astype(np.float32) - _REFERENCE
    distance = np.sqrt(np.einsum("hwkc,hwkc->hwk", diff, diff))
    nearest = distance.argmin(axis=2)
    nearest_distance = np.take_along_axis(distance, nearest[..., None], axis=2)[..., 0]
    is_object = (nearest != _BACKGROUND_INDEX) & (nearest_distance <= ASSIGN_RADIUS)
    return np.where(is_object, nearest, -1), nearest_distance


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Best-fitting shape for a component cropped to its box, and that template's IoU."""
    height, width = mask.shape
    best_shape, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        template = shape_mask(shape, height, width)
        iou = np.count_nonzero(template & mask) / np.count_nonzero(template | mask)
        if iou > best_iou:
            best_shape, best_iou = shape, iou
    return best_shape, float(best_iou)


def _purity(distance: np.ndarray, own: np.ndarray, filled: np.ndarray) -> float:
    """Mean closeness to the palette colour over the filled component (holes count as 0)."""
    closeness = np.clip((ASSIGN_RADIUS - distance) / (ASSIGN_RADIUS - PURE_RADIUS), 0.0, 1.0)
    return float(np.where(own, closeness, 0.0)[filled].mean())


def _aspect_factor(height: int, width: int) -> float:
    aspect = min(height, width) / max(height, width)
    return min(1.0, aspect / MIN_CLEAN_ASPECT)


def _detect_color(labels: np.ndarray, distance: np.ndarray, color_index: int, min_area: int) -> list[Detection]:
    components, _ = ndimage.label(labels == color_index)
    detections = []
    for k, (rows, cols) in enumerate(ndimage.find_objects(components), start=1):
        own = components[rows, cols] == k
        if np.count_nonzero(own) < min_area:
            continue
        # holes are generator noise inside an object, not part of its outline
        filled = ndimage.binary_fill_holes(own)
        shape, fit = classify_shape(filled)
        score = fit * _purity(distance[rows, cols], own, filled) * _aspect_factor(*filled.shape)
        mask = np.zeros(labels.shape, bool)
        mask[rows, cols] = filled
        box = (cols.start, rows.start, cols.stop, rows.stop)
        detections.append(Detection(shape, COLORS[color_index], box, mask, score))
    return detections


def detect(image: np.ndarray, min_area: int | None = None) -> list[Detection]:
    """All objects of a uint8 HxWx3 toy image, highest score first (GenEval's expected order)."""
    image = _check_image(image)
    if min_area is None:
        min_area = default_min_area(*image.shape[:2])
    elif isinstance(min_area, bool) or not isinstance(min_area, (int, np.integer)) or min_area < 1:
        raise ValueError(f"min_area must be a positive integer, got {min_area!r}")
    labels, distance = assign_colors(image)
    detections = []
    for color_index in range(len(COLORS)):
        detections += _detect_color(labels, distance, color_index, int(min_area))
    detections.sort(key=lambda d: (-d.score, d.box[1], d.box[0]))
    return detections
