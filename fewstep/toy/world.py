"""The toy world: flat-coloured shapes on a grey canvas, prompted in GenEval's grammar.

It is the embedded default domain of the harness: tiny diffusion models can learn it on a CPU in
minutes, and `fewstep.toy.detector` recovers every rendered object exactly, so the toy GenEval
runs the real GenEval rules without a neural detector.

Metadata mirrors GenEval's `evaluation_metadata.jsonl` (djghosh13/geneval,
prompts/create_prompts.py): include clauses {class, count, optional color, optional position =
[relation, target clause index]}, exclude clauses {class, count} ("fewer than count"). As in
GenEval, a position prompt "a photo of a A left of a B" lists the reference B first and A second
with position ["left of", 0], because the evaluator only resolves targets that were already matched.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import operator
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fewstep.geneval_prompts import RELATIONS, TASKS  # the official GenEval tasks the toy world mirrors

SHAPES = ("circle", "square", "triangle")
# GenEval colour names, chosen near corners of the RGB cube so that every pair (and each colour
# against the background) is at least ~150 apart: nearest-colour assignment survives noise.
PALETTE = {
    "red": (225, 20, 20),
    "green": (20, 195, 20),
    "blue": (20, 50, 240),
    "yellow": (245, 225, 20),
    "purple": (180, 0, 200),
    "white": (245, 245, 245),
}
COLORS = tuple(PALETTE)
BACKGROUND = (128, 128, 128)
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}

MIN_SIZE = 16
DEFAULT_SIZE = 32
MAX_COUNT = 4  # per include clause, as in GenEval's counting prompts
MAX_OBJECTS = 4  # per scene: four objects still fit a 16 px canvas without touching
MIN_OBJECT_PX = 5  # below 5 px the three shapes are no longer distinct pixel patterns
POSITION_THRESHOLD = 0.1  # GenEval's position margin (share of the summed box sizes)
POSITION_MARGIN = 0.1  # renders keep the relation's direction cosine >= 0.5 + this margin
EVAL_FRACTION = 0.25  # share of each task's prompt space held out for the eval split
LAYOUT_ATTEMPTS = 200
PLACEMENT_TRIES = 20

VOCAB = tuple(sorted(
    {"a", "photo", "of", "and", "left", "right", "above", "below"}
    | set(NUMBER_WORDS.values())
    | set(SHAPES)
    | {shape + "s" for shape in SHAPES}
    | set(COLORS)
))

CLASSES = tuple(f"{color} {shape}" for color in COLORS for shape in SHAPES)

Box = tuple[int, int, int, int]


@dataclass(eq=False)
class Obj:
    """One rendered object; box is (x0, y0, x1, y1), inclusive-exclusive; mask is HxW bool."""

    shape: str
    color: str
    box: Box
    mask: np.ndarray


# ---------------------------------------------------------------------------------------------
# Prompts and metadata


def _meta(tag: str, prompt: str, include: list[dict], exclude: list[dict] | None = None) -> dict:
    return {"prompt": prompt, "tag": tag, "include": include, "exclude": exclude or []}


def _task_space(tag: str) -> list[dict]:
    """Every prompt of one task (the toy grammar is small enough to enumerate)."""
    pairs = list(itertools.permutations(SHAPES, 2))  # GenEval draws distinct classes
    if tag == "single_object":
        return [_meta(tag, f"a photo of a {s}", [{"class": s, "count": 1}]) for s in SHAPES]
    if tag == "two_object":
        return [_meta(tag, f"a photo of a {a} and a {b}",
                      [{"class": a, "count": 1}, {"class": b, "count": 1}]) for a, b in pairs]
    if tag == "counting":
        return [_meta(tag, f"a photo of {NUMBER_WORDS[n]} {s}s", [{"class": s, "count": n}],
                      [{"class": s, "count": n + 1}])
                for s in SHAPES for n in NUMBER_WORDS]
    if tag == "colors":
        return [_meta(tag, f"a photo of a {c} {s}", [{"class": s, "count": 1, "color": c}])
                for c in COLORS for s in SHAPES]
    if tag == "position":
        return [_meta(tag, f"a photo of a {a} {rel} a {b}",
                      [{"class": b, "count": 1},
                       {"class": a, "count": 1, "position": [rel, 0]}])
                for a, b in pairs for rel in RELATIONS]
    if tag == "color_attr":
        return [_meta(tag, f"a photo of a {ca} {a} and a {cb} {b}",
                      [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}])
                for a, b in pairs for ca, cb in itertools.permutations(COLORS, 2)]
    raise ValueError(f"unknown task tag {tag!r}; expected one of {TASKS}")


def _prompt_hash(prompt: str) -> str:
    # sha256, not hash(): the split must not depend on PYTHONHASHSEED
    return hashlib.sha256(prompt.encode()).hexdigest()


@lru_cache(maxsize=None)
def _split_spaces() -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """Per task: (eval metas, train metas), eval = the lowest prompt hashes, at least one."""
    eval_by_task, train_by_task = {}, {}
    for tag in TASKS:
        space = sorted(_task_space(tag), key=lambda m: _prompt_hash(m["prompt"]))
        n_eval = max(1, int(len(space) * EVAL_FRACTION + 0.5))
        eval_by_task[tag], train_by_task[tag] = space[:n_eval], space[n_eval:]
    return eval_by_task, train_by_task


@lru_cache(maxsize=None)
def _eval_list() -> tuple[str, ...]:
    """The full eval list as JSON lines, round-robin over tasks so every prefix is balanced."""
    eval_by_task, _ = _split_spaces()
    rounds = itertools.zip_longest(*(eval_by_task[tag] for tag in TASKS))
    ordered = [m for row in rounds for m in row if m is not None]
    return tuple(json.dumps({"prompt_id": f"eval-{i:05d}", **m}) for i, m in enumerate(ordered))


def iter_train_prompts(seed: int = 0) -> Iterator[dict]:
    """Unlimited deterministic stream of train metadata: a uniform task, then a uniform prompt."""
    seed = _check_int(seed, "seed")
    _, train_by_task = _split_spaces()
    rng = random.Random(f"train|{seed}")
    for i in itertools.count():
        meta = rng.choice(train_by_task[rng.choice(TASKS)])
        yield {"prompt_id": f"train-{seed}-{i:07d}", **json.loads(json.dumps(meta))}


def prompt_set(split: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """GenEval-format metadata dicts for split "eval" (fixed; seed unused) or "train" (a stream).

    "eval" returns the first n of the fixed held-out list (all of it for n=None); "train" needs n.
    The two splits never share a prompt text.
    """
    if n is not None:
        n = _check_int(n, "n")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
    if split == "eval":
        lines = _eval_list()
        if n is not None and n > len(lines):
            raise ValueError(f"n={n} exceeds the {len(lines)} prompts of the eval split")
        return [json.loads(line) for line in lines[:n]]
    if split == "train":
        if n is None:
            raise ValueError("split 'train' is an unlimited stream: pass n (or use iter_train_prompts)")
        return list(itertools.islice(iter_train_prompts(seed), n))
    raise ValueError(f"unknown split {split!r}; expected 'eval' or 'train'")


# ---------------------------------------------------------------------------------------------
# Class-conditional variant (SiT family)


def class_index(label: int | str) -> int:
    """Index into CLASSES of an int label or a name like "red circle"."""
    if isinstance(label, str):
        if label not in CLASSES:
            raise ValueError(f"unknown class name {label!r}; expected one of {CLASSES}")
        return CLASSES.index(label)
    index = _check_int(label, "class label")
    if not 0 <= index < len(CLASSES):
        raise ValueError(f"class label {index} out of range 0..{len(CLASSES) - 1}")
    return index


def class_meta(label: int | str) -> dict:
    """The colors-task metadata of one class, with its index under "class_label"."""
    index = class_index(label)
    color, shape = CLASSES[index].split(" ")
    meta = _meta("colors", f"a photo of a {color} {shape}",
                 [{"class": shape, "count": 1, "color": color}])
    return {"prompt_id": f"class-{index:02d}", **meta, "class_label": index}


def render_class(label: int | str, seed: int, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, list[Obj]]:
    return render(class_meta(label), seed, size)


# ---------------------------------------------------------------------------------------------
# Validation


def _check_int(value, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _check_size(size) -> int:
    size = _check_int(size, "size")
    if size < MIN_SIZE:
        raise ValueError(f"size {size} is too small; the toy world needs size >= {MIN_SIZE}")
    return size


def _check_clause(where: str, clause, max_count: int | None) -> tuple[str, int]:
    if not isinstance(clause, Mapping):
        raise ValueError(f"{where} must be a dict, got {clause!r}")
    shape = clause.get("class")
    if shape not in SHAPES:
        raise ValueError(f"{where}: unknown class {shape!r}; expected one of {SHAPES}")
    count = _check_int(clause.get("count"), f"{where} count")
    if count < 1 or (max_count is not None and count > max_count):
        limit = f"1..{max_count}" if max_count else ">= 1"
        raise ValueError(f"{where}: count {count} outside {limit}")
    return shape, count


def _check_position(where: str, position, n_before: int) -> tuple[str, int]:
    if not isinstance(position, Sequence) or isinstance(position, str) or len(position) != 2:
        raise ValueError(f"{where}: position must be [relation, target index], got {position!r}")
    relation, target = position
    if relation not in RELATIONS:
        raise ValueError(f"{where}: unknown relation {relation!r}; expected one of {RELATIONS}")
    target = _check_int(target, f"{where} position target")
    if not 0 <= target < n_before:
        # GenEval resolves a target only after matching it, so it must be an earlier clause
        raise ValueError(f"{where}: position target {target} must index an earlier include clause")
    return relation, target


def parse_meta(meta) -> tuple[list[tuple[str, str | None]], list[tuple[int, int, str]]]:
    """Objects to draw [(shape, colour or None)] and pairwise constraints [(obj, ref obj, relation)]."""
    if not isinstance(meta, Mapping):
        raise ValueError(f"metadata must be a dict, got {type(meta).__name__}")
    if meta.get("tag") not in TASKS:
        raise ValueError(f"unknown task tag {meta.get('tag')!r}; expected one of {TASKS}")
    include = meta.get("include")
    if not isinstance(include, Sequence) or isinstance(include, str) or not include:
        raise ValueError(f"metadata 'include' must be a non-empty list, got {include!r}")
    specs, constraints, clause_objects = [], [], []
    for k, clause in enumerate(include):
        where = f"include[{k}]"
        shape, count = _check_clause(where, clause, MAX_COUNT)
        color = clause.get("color")
        if color is not None and color not in COLORS:
            raise ValueError(f"{where}: unknown color {color!r}; expected one of {COLORS}")
        indices = list(range(len(specs), len(specs) + count))
        specs += [(shape, color)] * count
        clause_objects.append(indices)
        if "position" in clause:
            relation, target = _check_position(where, clause["position"], k)
            constraints += [(i, j, relation) for i in indices for j in clause_objects[target]]
    if len(specs) > MAX_OBJECTS:
        raise ValueError(f"metadata asks for {len(specs)} objects; the toy world draws at most {MAX_OBJECTS}")
    _check_excludes(meta.get("exclude", []), specs)
    return specs, constraints


def _check_excludes(exclude, specs) -> None:
    if not isinstance(exclude, Sequence) or isinstance(exclude, str):
        raise ValueError(f"metadata 'exclude' must be a list, got {exclude!r}")
    for k, clause in enumerate(exclude):
        shape, count = _check_clause(f"exclude[{k}]", clause, None)
        drawn = sum(1 for s, _ in specs if s == shape)
        if drawn >= count:
            raise ValueError(f"exclude[{k}] forbids {count} {shape}s but include asks for {drawn}")


# ---------------------------------------------------------------------------------------------
# Geometry: GenEval's position rule, object sizes, layouts


def relation_cosines(box_a: Box, box_b: Box, threshold: float = POSITION_THRESHOLD):
    """GenEval's shrunk offset of A from B over the offset's length, (dx, dy); None if too close."""
    center_a = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    center_b = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    offset = (center_a[0] - center_b[0], center_a[1] - center_b[1])
    dims = (box_a[2] - box_a[0] + box_b[2] - box_b[0], box_a[3] - box_a[1] + box_b[3] - box_b[1])
    shrunk = [np.sign(o) * max(abs(o) - threshold * d, 0.0) for o, d in zip(offset, dims)]
    if all(abs(r) < 1e-3 for r in shrunk):
        return None
    norm = float(np.hypot(*offset))
    return shrunk[0] / norm, shrunk[1] / norm


def spatial_relations(box_a: Box, box_b: Box, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of A relative to B under GenEval's rule (image y grows downward)."""
    cosines = relation_cosines(box_a, box_b, threshold)
    if cosines is None:
        return set()
    dx, dy = cosines
    found = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {rel for rel, holds in found.items() if holds}


def _clearly_related(box_a: Box, box_b: Box, relation: str) -> bool:
    """Only `relation` holds, and with POSITION_MARGIN to spare (robust to 1 px of generator error)."""
    if spatial_relations(box_a, box_b) != {relation}:
        return False
    dx, dy = relation_cosines(box_a, box_b)
    along = {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation]
    return along >= 0.5 + POSITION_MARGIN


def object_size_range(size: int, n_objects: int = 1) -> tuple[int, int]:
    """Inclusive range of object sides in px: about 7..12 at 32 px, smaller when crowded."""
    low = max(MIN_OBJECT_PX, round(0.22 * size))
    high_share = 0.375 if n_objects <= 2 else 0.31
    return low, max(low, round(high_share * size))


def _apart(a: Box, b: Box) -> bool:
    """At least one empty pixel between the boxes along some axis (boxes are exclusive)."""
    return a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def _random_boxes(n: int, size: int, rng: random.Random) -> list[Box] | None:
    low, high = object_size_range(size, n)
    boxes: list[Box] = []
    for _ in range(n):
        side = rng.randint(low, high)
        for _ in range(PLACEMENT_TRIES):
            x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
            box = (x0, y0, x0 + side, y0 + side)
            if all(_apart(box, other) for other in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _satisfies(boxes: list[Box], constraints) -> bool:
    return all(_clearly_related(boxes[i], boxes[j], rel) for i, j, rel in constraints)


def grid_layout(n: int, constraints, size: int) -> list[Box]:
    """Deterministic fallback: smallest objects centred in the cells of a 2x2 grid."""
    half = size // 2
    side = object_size_range(size, n)[0]
    cells = [(col * half + (half - side) // 2, row * half + (half - side) // 2)
             for row in range(2) for col in range(2)]
    for chosen in itertools.permutations(cells, n):
        boxes = [(x, y, x + side, y + side) for x, y in chosen]
        if _satisfies(boxes, constraints):
            return boxes
    raise ValueError(f"the position constraints {constraints} cannot be laid out")


def _layout(n: int, constraints, size: int, rng: random.Random) -> list[Box]:
    for _ in range(LAYOUT_ATTEMPTS):
        boxes = _random_boxes(n, size, rng)
        if boxes is not None and _satisfies(boxes, constraints):
            return boxes
    return grid_layout(n, constraints, size)


# ---------------------------------------------------------------------------------------------
# Rasterisation and rendering


@lru_cache(maxsize=4096)
def shape_mask(shape: str, height: int, width: int) -> np.ndarray:
    """Hard-edged shape filling a height x width box, tested at pixel centres (read-only).

    Each shape touches all four sides of its box, so a rendered object's tight box is its box.
    The detector fits these same templates to components of any box size.
    """
    if height < 1 or width < 1:
        raise ValueError(f"shape box must be at least 1x1, got {height}x{width}")
    ys = (np.arange(height) + 0.5)[:, None]
    xs = (np.arange(width) + 0.5)[None, :]
    if shape == "square":
        mask = np.ones((height, width), bool)
    elif shape == "circle":
        mask = ((xs - width / 2) / (width / 2)) ** 2 + ((ys - height / 2) / (height / 2)) ** 2 <= 1
    elif shape == "triangle":
        # upward: the half width grows linearly from the apex to width/2 at the base; the
        # 0.5 floor keeps a one- or two-pixel apex in the top row for any box width
        half_width = np.maximum(ys / height * width / 2, 0.5)
        mask = np.abs(xs - width / 2) <= half_width
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    mask = np.broadcast_to(mask, (height, width)).copy()
    mask.flags.writeable = False
    return mask


def _layout_rng(meta: Mapping, seed: int) -> random.Random:
    # keyed on the clauses, not the prompt id, so equal metadata gives equal scenes;
    # str seeds go through sha512 in random.Random, independent of PYTHONHASHSEED
    clauses = json.dumps([meta["include"], meta.get("exclude", [])], sort_keys=True, default=str)
    return random.Random(f"{_check_int(seed, 'seed')}|{clauses}")


def _draw_scene(canvas: np.ndarray, meta: Mapping, seed: int) -> list[tuple[str, str, Box]]:
    """Paint the scene of (meta, seed) onto a HxWx3 uint8 canvas; returns (shape, colour, box)s."""
    specs, constraints = parse_meta(meta)
    rng = _layout_rng(meta, seed)
    colors = [color or rng.choice(COLORS) for _, color in specs]
    boxes = _layout(len(specs), constraints, canvas.shape[0], rng)
    canvas[:] = BACKGROUND
    for (shape, _), color, (x0, y0, x1, y1) in zip(specs, colors, boxes):
        canvas[y0:y1, x0:x1][shape_mask(shape, y1 - y0, x1 - x0)] = PALETTE[color]
    return [(shape, color, box) for (shape, _), color, box in zip(specs, colors, boxes)]


def render(meta: Mapping, seed: int, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, list[Obj]]:
    """A deterministic scene satisfying the metadata: (uint8 HxWx3 image, objects in include order)."""
    size = _check_size(size)
    image = np.empty((size, size, 3), np.uint8)
    objects = []
    for shape, color, (x0, y0, x1, y1) in _draw_scene(image, meta, seed):
        mask = np.zeros((size, size), bool)
        mask[y0:y1, x0:x1] = shape_mask(shape, y1 - y0, x1 - x0)
        objects.append(Obj(shape, color, (x0, y0, x1, y1), mask))
    return image, objects


def render_batch(metas: Sequence[Mapping], seeds: Sequence[int], size: int = DEFAULT_SIZE):
    """Float32 torch tensor (B, 3, H, W) in [0, 1] of render(metas[i], seeds[i], size)."""
    import torch  # lazy: the detector and metadata code must not pay torch's import

    size = _check_size(size)
    if len(metas) != len(seeds):
        raise ValueError(f"render_batch got {len(metas)} metas but {len(seeds)} seeds")
    images = np.empty((len(metas), size, size, 3), np.uint8)
    for canvas, meta, seed in zip(images, metas, seeds):
        _draw_scene(canvas, meta, seed)
    # convert in numpy: torch's threaded copy kernels stall when the 2 CPU cores are busy
    channels_first = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
    channels_first /= 255.0
    return torch.from_numpy(channels_first)
