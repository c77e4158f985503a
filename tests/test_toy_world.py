"""The toy world: GenEval-format prompts, deterministic renders that satisfy their metadata."""

import copy
import itertools
import time
from collections import Counter

import numpy as np
import pytest
from scipy import ndimage

from fewstep.toy import world
from fewstep.toy.world import (
    BACKGROUND, CLASSES, COLORS, PALETTE, RELATIONS, SHAPES, TASKS, VOCAB,
    class_index, class_meta, prompt_set, render, render_batch, render_class, spatial_relations,
)

SIZES = (16, 24, 32, 48)


def scene_metas():
    """Every eval prompt plus a slice of the train stream: all six tasks, many combinations."""
    return prompt_set("eval") + prompt_set("train", 60, seed=7)


# --- palette, vocabulary, metadata format ------------------------------------------------------


def test_palette_is_far_apart_and_from_background():
    references = [np.array(PALETTE[c], float) for c in COLORS] + [np.array(BACKGROUND, float)]
    distances = [np.linalg.norm(a - b) for a, b in itertools.combinations(references, 2)]
    assert len(COLORS) == 6 and min(distances) > 140


def test_vocab_is_exactly_the_words_of_all_prompts():
    words = {w for tag in TASKS for m in world._task_space(tag) for w in m["prompt"].split()}
    assert words == set(VOCAB)
    assert list(VOCAB) == sorted(VOCAB)


def test_metadata_mirrors_geneval_conventions():
    by_tag = {tag: world._task_space(tag) for tag in TASKS}
    assert [m["include"] for m in by_tag["single_object"]][0] == [{"class": "circle", "count": 1}]
    counting = {m["prompt"]: m for m in by_tag["counting"]}["a photo of three squares"]
    assert counting["include"] == [{"class": "square", "count": 3}]
    assert counting["exclude"] == [{"class": "square", "count": 4}]
    position = {m["prompt"]: m for m in by_tag["position"]}["a photo of a circle left of a triangle"]
    # GenEval lists the reference object first and points the described object at clause 0
    assert position["include"] == [{"class": "triangle", "count": 1},
                                   {"class": "circle", "count": 1, "position": ["left of", 0]}]
    attr = {m["prompt"]: m for m in by_tag["color_attr"]}["a photo of a red circle and a blue square"]
    assert attr["include"] == [{"class": "circle", "count": 1, "color": "red"},
                               {"class": "square", "count": 1, "color": "blue"}]
    for tag, metas in by_tag.items():
        assert all(m["tag"] == tag and set(m) == {"prompt", "tag", "include", "exclude"} for m in metas)
        assert len({m["prompt"] for m in metas}) == len(metas)
    two = by_tag["two_object"] + by_tag["position"] + by_tag["color_attr"]
    assert all(m["include"][0]["class"] != m["include"][1]["class"] for m in two)
    assert all(m["include"][0]["color"] != m["include"][1]["color"] for m in by_tag["color_attr"])


# --- splits ------------------------------------------------------------------------------------


def test_eval_split_is_fixed_with_balanced_prefixes():
    full = prompt_set("eval")
    assert full == prompt_set("eval", seed=123)
    assert prompt_set("eval", 10) == full[:10] and prompt_set("eval", 0) == []
    assert [m["tag"] for m in full[:6]] == list(TASKS)
    assert set(Counter(m["tag"] for m in full)) == set(TASKS)
    assert len({m["prompt_id"] for m in full}) == len({m["prompt"] for m in full}) == len(full)
    assert all(set(m) >= {"prompt_id", "prompt", "tag", "include", "exclude"} for m in full)


def test_eval_and_train_prompts_are_disjoint():
    eval_prompts = {m["prompt"] for m in prompt_set("eval")}
    train_prompts = {m["prompt"] for seed in (0, 1) for m in prompt_set("train", 3000, seed)}
    assert not eval_prompts & train_prompts
    # held-out prompts recombine words the training stream has seen
    train_words = {w for p in train_prompts for w in p.split()}
    assert {w for p in eval_prompts for w in p.split()} <= train_words
    assert {m["tag"] for m in prompt_set("train", 300)} == set(TASKS)


def test_train_stream_is_deterministic_per_seed():
    first = prompt_set("train", 50, seed=3)
    assert first == prompt_set("train", 50, seed=3)
    assert first[:20] == prompt_set("train", 20, seed=3)
    assert [m["prompt"] for m in first] != [m["prompt"] for m in prompt_set("train", 50, seed=4)]
    assert first == list(itertools.islice(world.iter_train_prompts(3), 50))
    assert len({m["prompt_id"] for m in first}) == 50


def test_returned_metadata_can_be_mutated_safely():
    meta = prompt_set("eval", 1)[0]
    meta["include"].append({"class": "square", "count": 1})
    assert prompt_set("eval", 1)[0]["include"] != meta["include"]


# --- renders -----------------------------------------------------------------------------------


def test_render_is_deterministic_and_seed_dependent():
    meta = prompt_set("eval")[4]
    image, objects = render(meta, seed=11)
    again, objects_again = render(copy.deepcopy(meta), seed=11)
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
    assert np.array_equal(image, again)
    assert [o.box for o in objects] == [o.box for o in objects_again]
    others = [render(meta, seed)[0] for seed in range(12, 18)]
    assert sum(not np.array_equal(image, other) for other in others) >= 5


def _check_objects_against_meta(meta, objects):
    """GenEval's include / exclude rules, applied to the rendered objects themselves."""
    groups = []
    for clause in meta["include"]:
        group = [o for o in objects if o.shape == clause["class"] and o not in itertools.chain(*groups)]
        group = group[:clause["count"]]
        assert len(group) == clause["count"], (meta["prompt"], clause)
        if "color" in clause:
            assert all(o.color == clause["color"] for o in group), meta["prompt"]
        if "position" in clause:
            relation, target = clause["position"]
            for obj, ref in itertools.product(group, groups[target]):
                assert spatial_relations(obj.box, ref.box) == {relation}, meta["prompt"]
        groups.append(group)
    assert len(objects) == sum(len(g) for g in groups)
    for clause in meta["exclude"]:
        assert sum(o.shape == clause["class"] for o in objects) < clause["count"]


def _check_pixels_and_geometry(image, objects, size):
    low, high = world.object_size_range(size, len(objects))
    dilated = []
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        assert x1 - x0 == y1 - y0 and low <= x1 - x0 <= high
        rows, cols = np.nonzero(obj.mask)
        assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == obj.box  # tight box
        assert np.all(image[obj.mask] == PALETTE[obj.color])
        dilated.append(ndimage.binary_dilation(obj.mask, np.ones((3, 3), bool)))
    for a, b in itertools.combinations(range(len(objects)), 2):
        assert not (dilated[a] & objects[b].mask).any(), "objects touch"
    covered = np.any([o.mask for o in objects], axis=0)
    assert np.all(image[~covered] == BACKGROUND)


@pytest.mark.parametrize("size", SIZES)
def test_rendered_scenes_satisfy_their_metadata(size):
    for i, meta in enumerate(scene_metas()):
        image, objects = render(meta, seed=1000 + i, size=size)
        assert image.shape == (size, size, 3)
        _check_objects_against_meta(meta, objects)
        _check_pixels_and_geometry(image, objects, size)


def test_unspecified_colours_vary():
    meta = {"tag": "counting", "include": [{"class": "circle", "count": 4}],
            "exclude": [{"class": "circle", "count": 5}]}
    colours = {o.color for seed in range(10) for o in render(meta, seed)[1]}
    assert len(colours) >= 4


def test_object_sizes_scale_with_canvas():
    assert world.object_size_range(32) == (7, 12)
    assert world.object_size_range(16, 4) == (5, 5)
    assert world.object_size_range(64)[0] > world.object_size_range(32)[1]


@pytest.mark.parametrize("side", range(5, 21))
def test_shape_templates_fill_their_box(side):
    ratios = {}
    for shape in SHAPES:
        mask = world.shape_mask(shape, side, side)
        assert mask.any(axis=0).all() and mask.any(axis=1).all(), shape  # touches all sides
        ratios[shape] = mask.mean()
    assert ratios["square"] == 1.0 and ratios["triangle"] < ratios["circle"] < 1.0
    assert abs(ratios["circle"] - np.pi / 4) < 0.12 and abs(ratios["triangle"] - 0.5) < 0.15
    triangle_widths = world.shape_mask("triangle", side, side).sum(axis=1)
    assert np.all(np.diff(triangle_widths) >= 0) and triangle_widths[-1] == side  # upward


def test_spatial_relations_follow_geneval_rule():
    left, right = (0, 10, 8, 18), (20, 10, 28, 18)
    assert spatial_relations(left, right) == {"left of"}
    assert spatial_relations(right, left) == {"right of"}
    assert spatial_relations((10, 0, 18, 8), (10, 20, 18, 28)) == {"above"}
    assert spatial_relations((0, 0, 8, 8), (20, 20, 28, 28)) == {"left of", "above"}
    assert spatial_relations((0, 0, 10, 10), (1, 1, 11, 11)) == set()  # inside the 0.1 margin


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("size", (16, 33))
def test_grid_fallback_honours_relations(relation, size):
    boxes = world.grid_layout(2, [(0, 1, relation)], size)
    assert spatial_relations(boxes[0], boxes[1]) == {relation}
    assert world._apart(*boxes)


def test_render_batch_matches_render_and_is_fast():
    metas = prompt_set("train", 64, seed=5)
    seeds = list(range(64))
    batch = render_batch(metas, seeds, size=32)
    assert tuple(batch.shape) == (64, 3, 32, 32) and str(batch.dtype) == "torch.float32"
    assert batch.is_contiguous() and 0.0 <= float(batch.min()) and float(batch.max()) <= 1.0
    for i in (0, 17, 63):
        expected = render(metas[i], seeds[i], 32)[0].transpose(2, 0, 1) / 255.0
        assert np.allclose(batch[i].numpy(), expected, atol=1e-6)
    best = min(_timed(render_batch, metas, seeds, 32) for _ in range(3))
    assert best < 0.06, f"render_batch took {best * 1e3:.1f} ms for 64 images"  # ~6 ms unloaded


def _timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


# --- class-conditional variant -----------------------------------------------------------------


def test_classes_round_trip():
    assert len(CLASSES) == len(COLORS) * len(SHAPES) == len(set(CLASSES))
    for index, name in enumerate(CLASSES):
        meta = class_meta(index)
        assert meta == class_meta(name) and class_index(name) == index
        assert meta["class_label"] == index and meta["tag"] == "colors"
        (clause,) = meta["include"]
        assert f"{clause['color']} {clause['class']}" == name
        assert meta["prompt"] == f"a photo of a {name}"
        image, (obj,) = render_class(index, seed=index, size=24)
        assert f"{obj.color} {obj.shape}" == name and image.shape == (24, 24, 3)


# --- bad input ---------------------------------------------------------------------------------


def _meta(**changes):
    meta = {"tag": "colors", "prompt": "p", "include": [{"class": "circle", "count": 1}], "exclude": []}
    meta.update(changes)
    return meta


@pytest.mark.parametrize("meta, culprit", [
    (_meta(tag="counting_things"), "counting_things"),
    (_meta(include=[{"class": "circle", "count": 5}]), "count 5"),
    (_meta(include=[{"class": "circle", "count": 0}]), "count 0"),
    (_meta(include=[{"class": "hexagon", "count": 1}]), "hexagon"),
    (_meta(include=[{"class": "circle", "count": 1, "color": "orange"}]), "orange"),
    (_meta(include=[{"class": "circle", "count": "two"}]), "count"),
    (_meta(include=[]), "include"),
    (_meta(include=[{"class": "circle", "count": 3}, {"class": "square", "count": 2}]), "5 objects"),
    (_meta(include=[{"class": "circle", "count": 1, "position": ["left of", 0]}]), "earlier"),
    (_meta(include=[{"class": "circle", "count": 1},
                    {"class": "square", "count": 1, "position": ["beside", 0]}]), "beside"),
    (_meta(include=[{"class": "circle", "count": 2}], exclude=[{"class": "circle", "count": 2}]),
     r"exclude\[0\]"),
    ("a photo of a circle", "metadata must be a dict"),
])
def test_bad_metadata_is_rejected_clearly(meta, culprit):
    with pytest.raises(ValueError, match=culprit):
        render(meta, seed=0)


def test_bad_arguments_are_rejected_clearly():
    meta = prompt_set("eval", 1)[0]
    with pytest.raises(ValueError, match="size 15 is too small"):
        render(meta, 0, size=15)
    with pytest.raises(ValueError, match="seed"):
        render(meta, seed=1.5)
    with pytest.raises(ValueError, match="unknown split 'test'"):
        prompt_set("test")
    with pytest.raises(ValueError, match="exceeds"):
        prompt_set("eval", 10_000)
    with pytest.raises(ValueError, match="pass n"):
        prompt_set("train")
    with pytest.raises(ValueError, match="n must be >= 0"):
        prompt_set("eval", -1)
    with pytest.raises(ValueError, match="2 metas but 1 seeds"):
        render_batch([meta, meta], [0])
    with pytest.raises(ValueError, match="out of range"):
        class_meta(len(CLASSES))
    with pytest.raises(ValueError, match="orange circle"):
        class_meta("orange circle")
    with pytest.raises(ValueError, match="cannot be laid out"):
        world.grid_layout(3, [(0, 1, "left of"), (1, 0, "left of")], 32)
