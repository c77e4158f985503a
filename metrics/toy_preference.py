"""Toy stand-ins for the HPSv2 and ImageReward slots: two toy reward models that measure
different things, as the real ones do.

The toy world has no human preference data. Each slot is filled by a cheap reward model built on
its own shipped toy feature net (fewstep/toy/features.py, hashes pinned), and each rewards
something else:

- `toy_hps` (HPSv2 slot): a preference for image quality and composition, independent of the
  prompt. score = 0.25 log p(clean) + log(0.05 + 0.95 composition), where p(clean) is the seed-2
  net's degradation head (no noise, blur, tint or ghosting) and composition in [0, 1] comes from
  the toy world's exact detector (fewstep/toy/detector.py): the mean shape-fit score of the objects
  (clean, whole shapes: an object cut by the canvas edge or a smudge fits its template badly), times
  the share of non-background ink that belongs to an object (no stray marks), times the share of
  object pairs with a gap between them (objects well separated); an image without an object has
  composition 0. Two images with the same pixels score the same whatever their prompts.
- `toy_imagereward` (ImageReward slot): prompt alignment, as soft scores of a learned model (not
  GenEval's detector rules). score = mean_j 1/2 (log sigmoid(feature presence logit) + log
  sigmoid(local presence logit)) of object j of the prompt ("colour shape" when coloured) + log
  p(count = the prompt's count) + mean_k log sigmoid(10 d_k) over the prompt's position relations,
  d_k the offset (in canvas units) along the relation's direction between the soft-argmax centres
  of the two objects' local presence maps; seed-3 net. Exclusions ("no fourth triangle") enter
  through the count term. Image quality enters only as far as it hides objects.

The training reward of AMD/RTDMD (metrics/toy_reward.py, seed-1 net) is a third objective: presence
+ count + 0.25 log p(clean) on its own net. It overlaps each slot partly (alignment terms with
toy_imagereward, a quality term with toy_hps) and shares no weights with either, as a real method
trains on one reward model and is scored by others (fewstep/notes/pitfalls.md F.24: reward
leakage). The recorded correlation matrix (metrics.toy_reward.CORRELATIONS, in each identity)
shows no two of them above 0.9. The report names them `toy_hps` and `toy_imagereward`; they are
stand-ins, not the real metrics.

Value: mean over images of the score (<= 0, higher is better), with a cluster-bootstrap CI over
prompts; per-image scores allow paired comparisons and win rates.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations

import numpy as np
import torch
import torch.nn.functional as F

from metrics.base import PerImageMetric
from metrics.toy_reward import CORRELATIONS, prompt_targets

SLOTS = {"toy_hps": ("hps", "HPSv2"), "toy_imagereward": ("imagereward", "ImageReward")}
QUALITY_WEIGHT = 0.25      # toy_hps: weight of log p(clean) (its range is about -20..0)
COMPOSITION_FLOOR = 0.05   # toy_hps: log(0.05 + 0.95 c) is -3.0 for c = 0, 0 for c = 1
MIN_OBJECT_SCORE = 0.3     # toy_hps: detections below this shape score are smudges, not objects
POSITION_SHARPNESS = 10.0  # toy_imagereward: log sigmoid(10 d), d in canvas units
CENTRE_TEMPERATURE = 0.5   # toy_imagereward: softmax temperature of the soft-argmax centres
DIRECTIONS = {"left of": (-1.0, 0.0), "right of": (1.0, 0.0), "above": (0.0, -1.0),
              "below": (0.0, 1.0)}


def _apart(a, b) -> bool:
    """At least one empty pixel between two boxes (x0, y0, x1, y1; exclusive) along some axis."""
    return a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]


def composition(image: np.ndarray) -> float:
    """toy_hps's composition of one uint8 HxWx3 image in [0, 1] (module docstring)."""
    from fewstep.toy.detector import ASSIGN_RADIUS, detect
    from fewstep.toy.world import BACKGROUND

    objects = [d for d in detect(image) if d.score > MIN_OBJECT_SCORE]
    if not objects:
        return 0.0
    ink = np.linalg.norm(image.astype(np.float32) - np.float32(BACKGROUND), axis=2) > ASSIGN_RADIUS
    covered = np.logical_or.reduce([d.mask for d in objects])
    owned = float((ink & covered).sum() / max(1, ink.sum()))
    pairs = list(combinations(objects, 2))
    apart = float(np.mean([_apart(a.box, b.box) for a, b in pairs])) if pairs else 1.0
    return float(np.mean([d.score for d in objects])) * owned * apart


class QualityReward:
    """toy_hps's score: image quality and composition, prompt-independent (not differentiable)."""
    rewards = (f"toy_hps: image quality and composition, prompt-independent: {QUALITY_WEIGHT} "
               f"log p(clean) (seed-2 net's degradation head) + log({COMPOSITION_FLOOR} + "
               f"{1 - COMPOSITION_FLOOR:.2f} composition) (exact detector: shape fit x owned ink "
               "x separated pairs)")

    def __init__(self, net):
        self.net = net.eval().requires_grad_(False)
        self.sha256 = net.sha256

    def __call__(self, images01: torch.Tensor, metas: list[dict]) -> torch.Tensor:
        self.net.to(images01.device)
        with torch.no_grad():
            clean = F.log_softmax(self.net(images01.float())[3], -1)[:, 0]
        u8 = (images01.detach() * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu()
        comp = torch.tensor([composition(im) for im in u8.numpy()], dtype=clean.dtype,
                            device=clean.device)
        return QUALITY_WEIGHT * clean + torch.log(COMPOSITION_FLOOR
                                                  + (1 - COMPOSITION_FLOOR) * comp)

    def identity(self) -> dict:
        return {"rewards": self.rewards, "net_sha256": self.sha256, "correlations": CORRELATIONS}


def soft_centres(maps: torch.Tensor) -> torch.Tensor:
    """(..., h, w) logit maps -> (..., 2) soft-argmax centres (x, y) in canvas units [0, 1]."""
    h, w = maps.shape[-2:]
    p = F.softmax(maps.flatten(-2) / CENTRE_TEMPERATURE, -1).unflatten(-1, (h, w))
    xs = (torch.arange(w, dtype=p.dtype, device=p.device) + 0.5) / w
    ys = (torch.arange(h, dtype=p.dtype, device=p.device) + 0.5) / h
    return torch.stack([(p.sum(-2) * xs).sum(-1), (p.sum(-1) * ys).sum(-1)], -1)


class AlignmentReward:
    """toy_imagereward's score: soft prompt alignment of a learned model (module docstring)."""
    rewards = ("toy_imagereward: prompt alignment: mean log sigmoid(feature + local presence of "
               "the prompt's objects)/2 + log p(count) + mean log sigmoid("
               f"{POSITION_SHARPNESS:g} x soft position offset), seed-3 net")

    def __init__(self, net):
        self.net = net.eval().requires_grad_(False)
        self.labels = list(net.config.labels)
        self.max_objects = net.config.max_objects
        self.sha256 = net.sha256

    def _position(self, maps: torch.Tensor, meta: dict, labels: list[int]) -> torch.Tensor:
        terms = []
        for j, obj in enumerate(meta.get("include", [])):
            if "position" in obj:
                relation, target = obj["position"]
                offset = soft_centres(maps[labels[j]]) - soft_centres(maps[labels[int(target)]])
                d = (offset * offset.new_tensor(DIRECTIONS[relation])).sum()
                terms.append(F.logsigmoid(POSITION_SHARPNESS * d))
        return torch.stack(terms).mean() if terms else maps.new_zeros(())

    def __call__(self, images01: torch.Tensor, metas: list[dict]) -> torch.Tensor:
        self.net.to(images01.device)
        maps, presence, count, _ = self.net.heads(images01.float())
        local = maps.amax(dim=(2, 3))
        scores = []
        for i, meta in enumerate(metas):
            labels, n = prompt_targets(self.labels, self.max_objects, meta)
            s = F.log_softmax(count[i], -1)[n] + self._position(maps[i], meta, labels)
            if labels:
                s = s + 0.5 * (F.logsigmoid(presence[i, labels])
                               + F.logsigmoid(local[i, labels])).mean()
            scores.append(s)
        return torch.stack(scores)

    def identity(self) -> dict:
        return {"rewards": self.rewards, "net_sha256": self.sha256, "correlations": CORRELATIONS}


SCORERS = {"toy_hps": QualityReward, "toy_imagereward": AlignmentReward}


@lru_cache(maxsize=None)
def _shipped_slot_files(size: int) -> dict[str, str]:
    """slot -> sha256 of the bytes of its shipped net file at this size (files present only)."""
    from fewstep.io import file_sha256
    from fewstep.toy.features import SHIPPED_DIR, SHIPPED_FILES

    paths = {slot: SHIPPED_DIR / SHIPPED_FILES[role].format(size=size)
             for slot, (role, _) in SLOTS.items()}
    return {slot: file_sha256(path) for slot, path in paths.items() if path.is_file()}


def slots_sharing_net(reward_file_sha256: str | None, size: int = 16) -> set[str]:
    """The toy metric slots whose shipped net is the file a training reward was built from
    (a student's inputs.reward_sha256, the sha256 of the file's bytes): scoring that student with
    them is leakage ("L"). The default training reward (the seed-1 net) shares none; a run pointed
    at a slot's own net file (`--reward toy:fewstep/toy/feature_nets/toy_pref_hps_16.safetensors`)
    shares that slot's model."""
    if not reward_file_sha256:
        return set()
    return {slot for slot, sha in _shipped_slot_files(size).items() if sha == reward_file_sha256}


@dataclass
class ToyPreference(PerImageMetric):
    slot: str = "toy_hps"
    net_path: str | None = None           # default: the shipped net of the slot at the set's size
    batch_size: int = 256
    _rewards: dict = field(default_factory=dict, init=False, repr=False)  # image size -> reward
    version = "2"
    higher_is_better = True

    def __post_init__(self):
        if self.slot not in SLOTS:
            raise ValueError(f"unknown toy preference slot {self.slot!r}; one of {sorted(SLOTS)}")
        self.name = self.slot

    def reward(self, size: int):
        from fewstep.toy.features import load_feature_net, shipped_feature_net

        path = self.net_path or shipped_feature_net(size, SLOTS[self.slot][0])
        return SCORERS[self.slot](load_feature_net(path))

    def reward_for(self, ss):
        """The slot's reward for the set's image size, loaded once; its net must see that size."""
        size = ss.resolution[0]
        if size not in self._rewards:
            self._rewards[size] = self.reward(size)
        reward = self._rewards[size]
        if reward.net.config.size != size:
            raise ValueError(f"{self.slot}: the reward net sees {reward.net.config.size} px images "
                             f"but {ss.folder} holds {size} px")
        return reward

    def rewards(self, ss, reward) -> np.ndarray:
        metas = [r["meta"] for r in ss.records]
        out = []
        with torch.inference_mode():
            for start in range(0, len(ss), self.batch_size):
                idx = range(start, min(start + self.batch_size, len(ss)))
                images = torch.from_numpy(np.stack([ss.load_image(i) for i in idx]))
                images01 = images.permute(0, 3, 1, 2).float() / 255.0
                out.append(reward(images01, [metas[i] for i in idx]).double().numpy())
        return np.concatenate(out)

    def image_scores(self, ss) -> dict:
        return {"score": self.rewards(ss, self.reward_for(ss))}

    def identity(self, ss) -> dict:
        return {"metric": self.slot, "version": self.version,
                "stands_in_for": SLOTS[self.slot][1],
                "reward_net_sha256": self.reward_for(ss).sha256,
                "reward": self.reward_for(ss).rewards, "correlations": CORRELATIONS,
                "resolution": list(ss.resolution), "prompt_set_sha256": ss.prompt_set_sha256(),
                "images_per_prompt": len(ss) // len(set(ss.prompt_ids()))}


@dataclass
class ToyHPS(ToyPreference):
    name = "toy_hps"
    slot: str = "toy_hps"


@dataclass
class ToyImageReward(ToyPreference):
    name = "toy_imagereward"
    slot: str = "toy_imagereward"
