"""Toy stand-ins for the HPSv2 and ImageReward slots: per-image rewards from toy-world nets.

On real backbones the leaderboard's preference columns are HPSv2 and ImageReward. The toy world has
no human preference data, so each slot is filled by a small reward model trained on the toy world
(the toy reward of metrics/toy_reward.py: the prompt's objects present, the right count, a clean
image), each from its own shipped net: seed 2 for the HPSv2 slot, seed 3 for the ImageReward slot
(fewstep/toy/features.py, hashes pinned). The training reward of AMD/RTDMD is seed 1, so a
reward-guided method is never scored by the network it optimised (fewstep/notes/pitfalls.md F.24:
reward leakage). The report names them `toy_hps` and `toy_imagereward`; they are stand-ins, not the
real metrics.

Value: mean over images of r(x, c) <= 0 (higher is better), with a cluster-bootstrap CI over
prompts; per-image scores allow paired comparisons and win rates.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from metrics.base import PerImageMetric

SLOTS = {"toy_hps": ("hps", "HPSv2"), "toy_imagereward": ("imagereward", "ImageReward")}


@dataclass
class ToyPreference(PerImageMetric):
    slot: str = "toy_hps"
    net_path: str | None = None           # default: the shipped net of the slot at the set's size
    batch_size: int = 256
    _rewards: dict = field(default_factory=dict, init=False, repr=False)  # image size -> reward
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
                "reward": "toy reward (presence + count + clean), metrics/toy_reward.py",
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
