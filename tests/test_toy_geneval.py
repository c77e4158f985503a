"""Toy GenEval: official rules on exact detections; renders score 1, broken renders score less."""
from dataclasses import dataclass

import numpy as np
import pytest

from fewstep.toy import world
from metrics.geneval import (TASKS, ToyGenEval, evaluate_image, group_detections, overall_score,
                             relative_position, task_scores)
from metrics.sampleset import SampleSetError, write_sample_set

SEEDS = (0, 1)


@dataclass
class Det:
    cls: str
    box: tuple
    score: float = 1.0
    color: str = "red"
    mask: object = None


def _records(metas, seeds=SEEDS):
    return [{"prompt_id": m["prompt_id"], "prompt": m["prompt"], "seed": s, "family": "toy",
             "method": "render", "nfe": 0, "meta": m} for m in metas for s in seeds]


def _write(folder, metas, edit=None, seeds=SEEDS):
    """Render every (prompt, seed); `edit(image, objs, meta)` may alter the image in place."""
    images = []
    for meta in metas:
        for seed in seeds:
            image, objs = world.render(meta, seed, 32)
            image = image.copy()
            if edit is not None:
                edit(image, objs, meta)
            images.append(image)
    return write_sample_set(folder, np.stack(images), _records(metas, seeds))


def _metric():
    return ToyGenEval(n_resamples=200)


def test_ground_truth_renders_score_one(tmp_path):
    metas = world.prompt_set("eval")
    res = _metric().score(_write(tmp_path / "gt", metas), expected=[
        (m["prompt_id"], s) for m in metas for s in SEEDS], resolution=32)
    assert res.value == 1.0 and res.ci_low == res.ci_high == 1.0
    assert res.details["tasks"] == {t: 1.0 for t in TASKS}
    assert res.n == 2 * len(metas) and all(r["reason"] == "" for r in res.per_sample)
    assert res.identity["detector"] == "toy-exact" and res.higher_is_better


def _remove_last_object(image, objs, meta):
    image[objs[-1].mask] = world.BACKGROUND


def _recolour_all(image, objs, meta):
    for obj in objs:
        other = world.COLORS[(world.COLORS.index(obj.color) + 1) % len(world.COLORS)]
        image[obj.mask] = world.PALETTE[other]


def test_removed_shapes_score_lower(tmp_path):
    metas = world.prompt_set("eval")
    # single-object scenes become empty canvases: constant images, refused unless allowed
    folder = _write(tmp_path / "removed", metas, _remove_last_object)
    with pytest.raises(SampleSetError, match="is blank"):
        _metric().score(folder)
    res = _metric().score(folder, allow_blank=True)
    assert res.value == 0.0 and res.details["blank_images_allowed"]
    assert res.details["tasks"]["single_object"] == 0.0
    assert res.details["tasks"]["two_object"] == 0.0
    assert res.details["task_ci"]["counting"] == [0.0, 0.0]
    assert res.ci_low <= res.value <= res.ci_high


def test_recoloured_shapes_fail_only_colour_tasks(tmp_path):
    metas = world.prompt_set("eval")
    res = _metric().score(_write(tmp_path / "recoloured", metas, _recolour_all))
    tasks = res.details["tasks"]
    assert tasks["colors"] == 0.0 and tasks["color_attr"] == 0.0
    for t in ("single_object", "two_object", "counting", "position"):
        assert tasks[t] == 1.0
    assert res.value == pytest.approx(4 / 6)


def test_overall_is_mean_over_tasks_not_images():
    tags = ["colors"] * 9 + ["counting"]
    correct = [1] * 9 + [0]
    assert task_scores(tags, correct) == {"counting": 0.0, "colors": 1.0}
    assert overall_score(tags, correct) == 0.5  # over images it would be 0.9


def test_relative_position_rule():
    a, b = (0, 10, 4, 14), (20, 10, 24, 14)
    assert relative_position(a, b) == {"left of"} and relative_position(b, a) == {"right of"}
    assert relative_position((10, 0, 14, 4), (10, 20, 14, 24)) == {"above"}
    assert relative_position((0, 0, 4, 4), (20, 20, 24, 24)) == {"left of", "above"}
    # centres 1 px apart, boxes 10 px wide: the 0.1 margin swallows the offset
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()


def test_counting_threshold_and_exclude():
    meta = {"tag": "counting", "include": [{"class": "circle", "count": 2}],
            "exclude": [{"class": "circle", "count": 3}]}
    two = [Det("circle", (0, 0, 4, 4)), Det("circle", (10, 0, 14, 4))]
    assert evaluate_image(meta, two) == (True, "")
    weak_third = two + [Det("circle", (20, 0, 24, 4), score=0.5)]
    assert evaluate_image(meta, weak_third)[0]          # 0.5 is below the counting threshold 0.9
    ok, why = evaluate_image(meta, two + [Det("circle", (20, 0, 24, 4), score=0.95)])
    assert not ok and "circle < 3" in why
    single = {"tag": "single_object", "include": [{"class": "circle", "count": 1}]}
    assert evaluate_image(single, [Det("circle", (0, 0, 4, 4), score=0.5)])[0]  # 0.5 > 0.3


def test_colour_checks_top_detections_only():
    meta = {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "blue"}]}
    dets = [Det("square", (0, 0, 4, 4), 0.6, "red"), Det("square", (9, 0, 13, 4), 0.9, "blue")]
    assert evaluate_image(meta, dets)[0]
    dets[0].score = 0.95
    assert not evaluate_image(meta, dets)[0]


def test_position_needs_matched_target():
    meta = {"tag": "position", "include": [{"class": "square", "count": 1},
                                           {"class": "circle", "count": 1, "position": ["left of", 0]}]}
    circle, square = Det("circle", (0, 0, 4, 4)), Det("square", (20, 0, 24, 4))
    assert evaluate_image(meta, [circle, square])[0]
    ok, why = evaluate_image(meta, [circle])
    assert not ok and "no target" in why
    ok, why = evaluate_image(meta, [Det("circle", (20, 0, 24, 4)), Det("square", (0, 0, 4, 4))])
    assert not ok and "right of" in why


def test_max_objects_per_class():
    dets = [Det("circle", (i, 0, i + 1, 1), score=1 - i / 100) for i in range(20)]
    assert len(group_detections(dets, 0.3)["circle"]) == 16


def test_refuses_sets_without_meta_or_tasks(tmp_path):
    metas = [m for m in world.prompt_set("eval") if m["tag"] == "colors"]
    folder = _write(tmp_path / "colours", metas)
    with pytest.raises(SampleSetError, match="have no images"):
        _metric().score(folder)
    partial = ToyGenEval(n_resamples=50, require_all_tasks=False).score(folder)
    assert partial.value == 1.0
    records = _records(metas[:1])
    for r in records:
        r["meta"] = None
    bad = write_sample_set(tmp_path / "nometa", np.stack(
        [world.render(metas[0], s, 32)[0] for s in SEEDS]), records)
    with pytest.raises(SampleSetError, match="meta must be a GenEval dict"):
        _metric().score(bad)


def test_uneven_images_per_prompt_are_refused(tmp_path):
    metas = world.prompt_set("eval")
    images = np.stack([world.render(m, s, 32)[0] for m in metas for s in SEEDS])
    # written without the first (prompt, seed): a verified set whose first prompt has one image
    folder = write_sample_set(tmp_path / "uneven", images[1:], _records(metas)[1:])
    with pytest.raises(SampleSetError, match="has 1 images, most prompts have 2"):
        _metric().score(folder)


def test_paired_difference_is_the_overall_score_difference_with_a_paired_ci(tmp_path):
    metas = world.prompt_set("eval")
    metric = _metric()
    good = metric.score(_write(tmp_path / "gt", metas))
    recoloured = metric.score(_write(tmp_path / "rc", metas, _recolour_all))
    diff = metric.paired_difference(recoloured, good)
    assert diff["difference"] == pytest.approx(recoloured.value - good.value)  # GenEval overall,
    assert diff["difference"] != pytest.approx(                                 # not the image mean
        np.mean([r["score"] for r in recoloured.per_sample]) - 1.0)
    assert diff["ci_high"] < 0 and diff["verdict"] == "worse"
    assert diff["win_rate"]["wins"] == 0 and diff["win_rate"]["losses"] > 0
    same = metric.paired_difference(good, good)
    assert same["difference"] == same["ci_low"] == same["ci_high"] == 0.0
    assert same["verdict"].startswith("tie")
