"""The toy detector: exact on rendered scenes, graceful on noisy ones, honest scores."""

import numpy as np
import pytest

from fewstep.toy import detector, world
from fewstep.toy.detector import Detection, classify_shape, detect
from fewstep.toy.world import BACKGROUND, PALETTE, SHAPES, prompt_set, render


def scenes(size, n_train, seed_base):
    """(image, objects) for every eval prompt plus a train slice: all tasks, many combinations."""
    metas = prompt_set("eval") + prompt_set("train", n_train, seed=size)
    return [render(meta, seed_base + i, size) for i, meta in enumerate(metas)]


def box_iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def assert_matches(detections, objects, min_iou=1.0, min_score=0.9):
    """One detection per object with its class and colour, box IoU >= min_iou, nothing else."""
    assert len(detections) == len(objects), ([(d.cls, d.color, d.box) for d in detections],
                                             [(o.shape, o.color, o.box) for o in objects])
    unmatched = list(detections)
    for obj in objects:
        same = [d for d in unmatched if (d.cls, d.color) == (obj.shape, obj.color)]
        best = max(same, key=lambda d: box_iou(d.box, obj.box), default=None)
        assert best is not None and box_iou(best.box, obj.box) >= min_iou, (obj.shape, obj.color, obj.box)
        assert best.score >= min_score
        unmatched.remove(best)


@pytest.mark.parametrize("size", (24, 32, 48))
def test_exact_on_rendered_scenes(size):
    rendered = scenes(size, n_train=50, seed_base=10 * size)
    assert len(rendered) >= 110  # >= 330 scenes over the three sizes
    for image, objects in rendered:
        detections = detect(image)
        assert_matches(detections, objects, min_iou=1.0, min_score=1.0)
        for det in detections:
            obj = next(o for o in objects if o.box == det.box)
            assert np.array_equal(det.mask, obj.mask)
            assert det.score == pytest.approx(1.0)


def test_exact_at_the_smallest_size():
    for image, objects in scenes(16, n_train=40, seed_base=1):
        assert_matches(detect(image), objects, min_iou=1.0, min_score=1.0)


def add_gaussian_noise(image, std, rng):
    noisy = image.astype(np.float64) + rng.normal(0.0, std * 255.0, image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def test_robust_to_gaussian_pixel_noise():
    rng = np.random.default_rng(0)
    scores = []
    for image, objects in scenes(32, n_train=40, seed_base=5):
        detections = detect(add_gaussian_noise(image, 0.05, rng))
        assert_matches(detections, objects, min_iou=0.8, min_score=0.9)
        scores += [d.score for d in detections]
    assert np.mean(scores) > 0.97


def jitter_object_colours(image, objects, amplitude, rng):
    """Shift each object's colour by its own random offset (a generator's colour drift)."""
    jittered = image.astype(np.int64)
    for obj in objects:
        jittered[obj.mask] += rng.integers(-amplitude, amplitude + 1, size=3)
    return np.clip(jittered, 0, 255).astype(np.uint8)


def sprinkle_pixels(image, n_pixels, rng):
    """A few isolated pixels of arbitrary colour, anywhere (inside objects too)."""
    speckled = image.copy()
    ys, xs = rng.integers(0, image.shape[0], n_pixels), rng.integers(0, image.shape[1], n_pixels)
    speckled[ys, xs] = rng.integers(0, 256, size=(n_pixels, 3))
    return speckled


def test_robust_to_colour_jitter_and_stray_pixels():
    rng = np.random.default_rng(1)
    for image, objects in scenes(32, n_train=40, seed_base=9):
        shifted = jitter_object_colours(image, objects, amplitude=25, rng=rng)
        assert_matches(detect(shifted), objects, min_iou=1.0, min_score=0.9)
        speckled = sprinkle_pixels(image, n_pixels=4, rng=rng)
        assert_matches(detect(speckled), objects, min_iou=0.8, min_score=0.7)
        both = add_gaussian_noise(sprinkle_pixels(shifted, 4, rng), 0.03, rng)
        assert_matches(detect(both), objects, min_iou=0.8, min_score=0.7)


def canvas(size=32):
    return np.full((size, size, 3), BACKGROUND, np.uint8)


def test_blank_canvas_and_specks_give_nothing():
    assert detect(canvas()) == []
    specks = canvas()
    specks[3, 3] = PALETTE["red"]
    specks[10:12, 20] = PALETTE["blue"]
    assert detect(specks) == []
    assert len(detect(specks, min_area=1)) == 2


def test_scores_fall_for_unclean_components():
    image = canvas()
    image[2:6, 2:18] = PALETTE["red"]  # a stretched bar, not a rendered shape
    rng = np.random.default_rng(0)
    blob = rng.random((10, 10)) < 0.6
    image[15:25, 15:25][blob] = PALETTE["blue"]  # a ragged smudge
    scores = {d.color: d.score for d in detect(image)}
    assert scores["red"] < 0.5 and scores["blue"] < 0.7


def test_touching_objects_merge_and_fail_the_counting_threshold():
    image = canvas()
    image[10:18, 4:12] = PALETTE["green"]
    image[10:18, 12:20] = PALETTE["green"]  # two squares with no gap: one 8x16 component
    (merged,) = detect(image)
    assert merged.box == (4, 10, 20, 18) and merged.score < 0.9


def test_blurred_render_keeps_objects_with_lower_scores():
    image, objects = render(prompt_set("eval")[1], seed=3, size=48)
    padded = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    blurred = sum(padded[dy:dy + 48, dx:dx + 48] for dy in range(3) for dx in range(3)) / 9
    detections = detect(np.rint(blurred).astype(np.uint8))
    assert_matches(detections, objects, min_iou=0.6, min_score=0.0)
    assert all(d.score < 1.0 for d in detections)


def test_detections_are_sorted_by_score():
    image, _ = render(prompt_set("eval")[5], seed=0, size=32)
    image[0:3, 0:12] = PALETTE["yellow"]  # a low-scoring bar in a corner
    scores = [d.score for d in detect(image)]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3


@pytest.mark.parametrize("height, width", [(9, 9), (12, 7), (7, 12), (20, 14)])
def test_templates_classify_themselves_at_any_box(height, width):
    for shape in SHAPES:
        assert classify_shape(world.shape_mask(shape, height, width)) == (shape, 1.0)


def test_colour_radii_leave_no_ambiguity():
    assert detector.PURE_RADIUS < detector.ASSIGN_RADIUS < detector.COLOR_SEPARATION / 2


@pytest.mark.parametrize("image, culprit", [
    (np.zeros((8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8), np.uint8), "HxWx3"),
    (np.zeros((8, 8, 4), np.uint8), "HxWx3"),
    ([[0, 0, 0]], "numpy array"),
])
def test_bad_images_are_rejected_clearly(image, culprit):
    with pytest.raises(ValueError, match=culprit):
        detect(image)


@pytest.mark.parametrize("min_area", [0, -3, 2.5, True])
def test_bad_min_area_is_rejected_clearly(min_area):
    with pytest.raises(ValueError, match="min_area"):
        detect(canvas(), min_area=min_area)


def test_detection_fields():
    image, (obj,) = render(world.class_meta("purple triangle"), seed=2, size=32)
    (det,) = detect(image)
    assert isinstance(det, Detection)
    assert (det.cls, det.color, det.box) == ("triangle", "purple", obj.box)
    assert det.mask.dtype == bool and det.mask.shape == (32, 32)
