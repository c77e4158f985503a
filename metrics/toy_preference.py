"""Toy stand-ins for the HPSv2 and ImageReward slots: per-image rewards from toy-world nets.

On real backbones the leaderboard's preference columns are HPSv2 and ImageReward. The toy world
has no human preference data, so each slot is filled by a small reward model trained on the toy
world (the toy reward of metrics/toy_reward.py: the prompt's objects present, the right count, a
clean image), each from its own shipped net: seed 2 for the HPSv2 slot, seed 3 for the ImageReward
slot (fewstep/toy/features.py, hashes pinned). The training reward of AMD/RTDMD is seed 1, so a
reward-guided method is never scored by the network it optimised (pitfalls.md: reward leakage).
The report names them `toy_hps` and `toy_imagereward`; they are stand-ins, not the real metrics.

Value: mean over images of r(x, c) <= 0 (higher is better), with a cluster-bootstrap CI over
prompts; per-image scores allow paired comparisons and win rates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from metrics.base import Metric, MetricResult
from metrics.sampleset import load_sample_set
from metrics.stats import DEFAULT_LEVEL, DEFAULT_RESAMPLES

SLOTS = {"toy_hps": ("hps", "HPSv2"), "toy_imagereward": ("imagereward", "ImageReward")}


@dataclass
class ToyPreference(Metric):
    slot: str = "toy_hps"
    net_path: str | None = None           # default: the shipped net of the slot at the set's size
    batch_size: int = 256
    n_resamples: int = DEFAULT_RESAMPLES
    level: float = DEFAULT_LEVEL
    seed: int = 0
    version = "1"
    higher_is_better = True

    def __post_init__(self):
        if self.slot not in SLOTS:
            raise ValueError(f"unknown toy preference slot {self.slot!r}; one of {sorted(SLOTS)}")
        self.name = self.slot

    def reward(self, size: int):
        from fewstep.toy.features import shipped_feature_net
        from metrics.toy_reward import load_toy_reward

        return load_toy_reward(self.net_path or shipped_feature_net(size, SLOTS[self.slot][0]))

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

    def score(self, sample_set_folder, expected=None, resolution=None, allow_blank=False,
              **ctx) -> MetricResult:
        ss = load_sample_set(sample_set_folder, expected=expected, resolution=resolution,
                             allow_blank=allow_blank)
        reward = self.reward(ss.resolution[0])
        if reward.net.config.size != ss.resolution[0]:
            raise ValueError(f"{self.slot}: the reward net sees {reward.net.config.size} px images "
                             f"but {ss.folder} holds {ss.resolution[0]} px")
        identity = {"metric": self.slot, "version": self.version,
                    "stands_in_for": SLOTS[self.slot][1], "reward_net_sha256": reward.sha256,
                    "reward": "toy reward (presence + count + clean), metrics/toy_reward.py",
                    "resolution": list(ss.resolution), "prompt_set_sha256": ss.prompt_set_sha256(),
                    "images_per_prompt": len(ss) // len(set(ss.prompt_ids()))}
        return self.per_image_result(ss, self.rewards(ss, reward), identity,
                                     details={"blank_images_allowed": bool(allow_blank)})


@dataclass
class ToyHPS(ToyPreference):
    slot: str = "toy_hps"


@dataclass
class ToyImageReward(ToyPreference):
    slot: str = "toy_imagereward"
