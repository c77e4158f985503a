"""GenEval scoring rules (djghosh13/geneval, metrics/notes/metrics.md sec. 4) applied to detections.

The rules are detector-independent: a `Detector` returns detections (class, box, score, mask) and a
`ColourClassifier` names each detected object's colour. The toy world plugs in its exact detector,
which also reads colours; the real routes (Mask2Former + CLIP, legacy or HF) plug in the same way.

Per image: correct iff every include clause holds and no exclude clause fires (section 4.6).
Per task: share of images correct. Overall: plain mean of the six task scores (not over images).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from fewstep.geneval_prompts import TASKS
from metrics.base import Metric, MetricResult
from metrics.sampleset import SampleSet, SampleSetError
from metrics.stats import bootstrap, cluster_mean_ci, group_indices

CONF_THRESHOLD = 0.3           # detection confidence for every task but counting
COUNTING_THRESHOLD = 0.9       # counting needs confident detections (exact count)
MAX_OBJECTS = 16               # per class, kept in descending confidence
POSITION_MARGIN = 0.1          # share of the two box sizes removed from the centre offset
NO_RELATION_EPS = 1e-3


class Detector(Protocol):
    """Anything with detect(image uint8 HxWx3) -> detections having .cls, .box, .score (.mask)."""

    def detect(self, image: np.ndarray) -> Sequence: ...


class ColourClassifier(Protocol):
    """Names the colour of one detected object (GenEval: CLIP zero-shot on a grey-pasted crop)."""

    def classify(self, image: np.ndarray, detection) -> str: ...


class DetectedColour:
    """Colour classifier for detectors that already report colour (the toy exact detector)."""
    name = "detector-colour"

    def classify(self, image, detection) -> str:
        return detection.color


class ToyExactDetector:
    """The toy world's exact detector for rendered shapes (fewstep.toy.detector.detect)."""
    name = "toy-exact"

    def detect(self, image):
        from fewstep.toy.detector import detect
        return detect(image)


# ------------------------------------------------------------------------------ rules (pure)

def confidence_threshold(tag: str) -> float:
    return COUNTING_THRESHOLD if tag == "counting" else CONF_THRESHOLD


def group_detections(detections: Sequence, threshold: float) -> dict[str, list]:
    """Detections above threshold per class, most confident first, at most MAX_OBJECTS each.

    No extra NMS: GenEval's overlap threshold is 1.0, which keeps every detection.
    """
    by_class: dict[str, list] = {}
    for det in sorted(detections, key=lambda d: -float(d.score)):
        if float(det.score) > threshold and len(by_class.get(det.cls, [])) < MAX_OBJECTS:
            by_class.setdefault(det.cls, []).append(det)
    return by_class


def relative_position(box_a, box_b) -> set[str]:
    """Relations of box A relative to box B (x0, y0, x1, y1; y grows downward), section 4.5."""
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    centre_a, centre_b = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
    size_a, size_b = np.abs(a[2:] - a[:2]), np.abs(b[2:] - b[:2])
    offset = centre_a - centre_b
    shrunk = np.sign(offset) * np.maximum(np.abs(offset) - POSITION_MARGIN * (size_a + size_b), 0)
    if np.all(np.abs(shrunk) < NO_RELATION_EPS):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _include_failure(clause: dict, found: list, colours: list, matched: list) -> str | None:
    """Why an include clause fails (None if it holds), given its top-n detections."""
    cls, n = clause["class"], int(clause["count"])
    if len(found) < n:
        return f"expected {cls} >= {n}, found {len(found)}"
    if "color" in clause and colours.count(clause["color"]) < n:
        return f"expected {clause['color']} {cls}, found {colours}"
    if "position" in clause:
        relation, target = clause["position"]
        if not 0 <= int(target) < len(matched):
            raise ValueError(f"position target {target} of {clause} must index an earlier "
                             "include clause")
        if matched[target] is None:
            return f"no target for {cls} to be {relation}"
        for obj in found:
            for ref in matched[target]:
                found_rel = relative_position(obj.box, ref.box)
                if relation not in found_rel:
                    return f"expected {cls} {relation} target, found {sorted(found_rel) or 'none'}"
    return None


def evaluate_image(meta: dict, detections: Sequence, image=None,
                   colour: ColourClassifier | None = None) -> tuple[bool, str]:
    """GenEval correctness of one image: (correct, reasons joined by '; ')."""
    colour = colour or DetectedColour()
    objects = group_detections(detections, confidence_threshold(meta["tag"]))
    reasons, matched = [], []
    for clause in meta.get("include", []):
        found = objects.get(clause["class"], [])[:int(clause["count"])]
        colours = [colour.classify(image, d) for d in found] if "color" in clause else []
        why = _include_failure(clause, found, colours, matched)
        matched.append(found if why is None else None)
        if why:
            reasons.append(why)
    for clause in meta.get("exclude", []):
        n_found = len(objects.get(clause["class"], []))
        if n_found >= int(clause["count"]):
            reasons.append(f"expected {clause['class']} < {clause['count']}, found {n_found}")
    return not reasons, "; ".join(reasons)


def task_scores(tags: Sequence[str], correct: Sequence[bool]) -> dict[str, float]:
    """Share of images judged correct, per task present."""
    correct = np.asarray(correct, dtype=np.float64)
    tags = np.asarray(tags)
    return {t: float(correct[tags == t].mean()) for t in TASKS if (tags == t).any()}


def overall_score(tags: Sequence[str], correct: Sequence[bool]) -> float:
    """Plain mean of the task scores: tasks are not weighted by their number of images."""
    return float(np.mean(list(task_scores(tags, correct).values())))


# --------------------------------------------------------------------------------- the metric

def _meta_problems(ss: SampleSet, require_all_tasks: bool) -> list[str]:
    problems = []
    for r in ss.records:
        meta = r.get("meta")
        if not isinstance(meta, dict) or meta.get("tag") not in TASKS or "include" not in meta:
            problems.append(f"{r['path']}: meta must be a GenEval dict with tag in {TASKS} "
                            "and include clauses")
    tags = {(r.get("meta") or {}).get("tag") for r in ss.records}
    missing = [t for t in TASKS if t not in tags]
    if require_all_tasks and missing and not problems:
        problems.append(f"tasks {missing} have no images; the overall score needs all six tasks "
                        "(pass require_all_tasks=False for a partial diagnostic run)")
    return problems


def _balance_problems(ss: SampleSet) -> list[str]:
    """Every prompt must have the same number of images, or prompts get unequal weight."""
    prompts, groups = group_indices(ss.prompt_ids())
    sizes = [len(g) for g in groups]
    usual = max(set(sizes), key=sizes.count)
    return [f"prompt {p} has {len(g)} images, most prompts have {usual}"
            for p, g in zip(prompts, groups) if len(g) != usual]


def check_geneval_set(ss: SampleSet, require_all_tasks: bool = True) -> None:
    problems = _meta_problems(ss, require_all_tasks) + _balance_problems(ss)
    if problems:
        raise SampleSetError(ss.folder, problems)


@dataclass
class ToyGenEval(Metric):
    """GenEval rules with the toy world's exact detector (or any Detector/ColourClassifier)."""
    name = "toy_geneval"
    version = "1"
    higher_is_better = True

    detector: Detector | None = None
    colour: ColourClassifier | None = None
    require_all_tasks: bool = True

    def __post_init__(self):
        self.detector = self.detector or ToyExactDetector()
        self.colour = self.colour or DetectedColour()

    @classmethod
    def context_defaults(cls, context) -> dict:
        """A class-conditional prompt set holds only GenEval's colors task: score it as a partial
        set instead of refusing it."""
        return {"require_all_tasks": not all("class_label" in r for r in context.prompt_rows)}

    def set_statistic(self, rows: list[dict]) -> float:
        """GenEval overall: the mean over tasks of each task's image accuracy."""
        return overall_score(np.array([r["tag"] for r in rows]), np.array([r["score"] for r in rows]))

    def strata(self, rows: list[dict]):
        _, groups = group_indices([r["prompt_id"] for r in rows])
        return [rows[g[0]]["tag"] for g in groups]

    def identity(self, ss: SampleSet) -> dict:
        return {"metric": self.name, "version": self.version, "rules": "geneval (djghosh13) 4.5-4.6",
                "detector": getattr(self.detector, "name", type(self.detector).__name__),
                "colour_classifier": getattr(self.colour, "name", type(self.colour).__name__),
                "thresholds": {"confidence": CONF_THRESHOLD, "counting": COUNTING_THRESHOLD,
                               "max_objects": MAX_OBJECTS, "position_margin": POSITION_MARGIN},
                "resolution": list(ss.resolution), "prompt_set_sha256": ss.prompt_set_sha256(),
                "n_prompts": len(set(ss.prompt_ids())),
                "images_per_prompt": len(ss) // len(set(ss.prompt_ids()))}

    def judge(self, ss: SampleSet) -> list[dict]:
        """One row per image: prompt_id, seed, tag, score (1/0), reason."""
        rows = []
        for i, rec in enumerate(ss.records):
            image = ss.load_image(i)
            ok, why = evaluate_image(rec["meta"], self.detector.detect(image), image, self.colour)
            rows.append({"prompt_id": rec["prompt_id"], "seed": rec["seed"], "path": rec["path"],
                         "tag": rec["meta"]["tag"], "score": float(ok), "reason": why})
        return rows

    def _task_cis(self, tags, correct, rows) -> dict:
        """Per-task accuracy CI, resampling that task's prompts."""
        prompt_ids = np.array([r["prompt_id"] for r in rows])
        out = {}
        for task in task_scores(tags, correct):
            mask = tags == task
            ci = cluster_mean_ci(correct[mask], list(prompt_ids[mask]), n_resamples=self.n_resamples,
                                 level=self.level, seed=self.seed, method=self.interval)
            out[task] = [ci.low, ci.high]
        return out

    def score_set(self, ss: SampleSet, allow_blank: bool) -> MetricResult:
        check_geneval_set(ss, self.require_all_tasks)   # before any image is judged
        return super().score_set(ss, allow_blank)

    def image_columns(self, ss: SampleSet) -> dict:
        """The judged rows: an image's correctness is its own (a shard's prompts may be split,
        so the balance and all-tasks checks wait for the whole set)."""
        problems = _meta_problems(ss, require_all_tasks=False)
        if problems:
            raise SampleSetError(ss.folder, problems)
        return {"rows": self.judge(ss)}

    def result_from_columns(self, ss: SampleSet, columns: dict, allow_blank: bool) -> MetricResult:
        check_geneval_set(ss, self.require_all_tasks)
        rows = columns["rows"]
        if len(rows) != len(ss):  # count check after scoring (fewstep/notes/pitfalls.md C.12)
            raise RuntimeError(f"scored {len(rows)} images of {len(ss)}")
        tags = np.array([r["tag"] for r in rows])
        correct = np.array([r["score"] for r in rows])
        _, groups = group_indices([r["prompt_id"] for r in rows])
        prompt_tags = [tags[g[0]] for g in groups]
        # the overall score is a stratified set-level statistic: studentized is read as BCa
        # (Metric.set_interval) and ci_method says so; the per-task CIs take any interval
        ci = bootstrap(lambda idx: overall_score(tags[idx], correct[idx]), groups,
                       strata=prompt_tags, n_resamples=self.n_resamples, level=self.level,
                       seed=self.seed, method=self.set_interval())
        fallback = self.interval != self.set_interval()
        ci_method = ci.method + (" (studentized asked: the stratified overall score has no "
                                 "per-resample standard error)" if fallback else "")
        details = {"tasks": task_scores(tags, correct),
                   "task_ci": self._task_cis(tags, correct, rows),
                   "correct_images": float(correct.mean()),
                   "correct_prompts": float(np.mean([correct[g].max() for g in groups])),
                   "ci_method": ci_method, "ci_level": self.level, "n_resamples": self.n_resamples,
                   "blank_images_allowed": bool(allow_blank)}
        return self.result(ci.estimate, (ci.low, ci.high), len(rows), rows, self.identity(ss), details)
