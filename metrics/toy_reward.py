"""The toy world's differentiable training reward of the reward-guided methods (AMD, RTDMD).

A real reward-guided method trains on one reward model (HPSv2, ImageReward, PickScore, ...) and is
scored by others that overlap with it only partly. The toy world has the same structure: its
training reward is a third objective on its own net, next to the metric slots of
metrics/toy_preference.py (toy_hps: image quality and composition; toy_imagereward: prompt
alignment):

    r(x, c) = mean_j log sigmoid(presence logit of object j of the prompt)  (objects asked for)
            + log p(object count = the prompt's count)              (how many)
            + 0.25 log p(degradation = clean)                       (a little image quality)

on the feature heads of the toy feature net trained with seed 1 (fewstep/toy/features.py; the DAG's
reward_net rule trains it, bit-identical to the shipped "reward" file). So it shares alignment terms
with toy_imagereward (which adds soft position terms and the local presence head, on the seed-3 net)
and the quality term with toy_hps (at a quarter of the weight, and without toy_hps's composition
term), and no weights with any metric (fewstep/notes/pitfalls.md F.24: a training reward that is
also the metric leaks). Positions are not rewarded. Values are <= 0; higher is better; gradients
flow to the images. CORRELATIONS records how it and the toy metrics correlate on the fixed set of
`fewstep metric-corr` (tests/test_toy_metric_independence.py recomputes it).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

REWARD_SEED = 1  # the FID feature net uses seed 0, toy_hps 2, toy_imagereward 3
QUALITY_WEIGHT = 0.25
OBJECTIVE = ("toy training reward: mean log sigmoid(presence of the prompt's objects) + "
             f"log p(count) + {QUALITY_WEIGHT} log p(clean), seed-{REWARD_SEED} net's feature "
             "heads")

# Pearson r of per-image scores on the fixed set of `fewstep metric-corr` (16 px eval-prompt
# renders, degraded and prompt-shuffled renders, shipped teachers at 1/2/4 steps; 1206 images),
# rounded; each metric's identity records it. Before the slots were made distinct, all three were
# this reward's formula on seeds 1-3: r(toy_hps, toy_imagereward) 0.93, r(toy_imagereward,
# toy_reward) 0.96, r(toy_hps, toy_reward) 0.92.
CORRELATIONS = {
    "fixed_set": "fewstep metric-corr --res 16 --seeds 0 1 --teacher-steps 1 2 4",
    "n_images": 1206,
    "pearson": {
        "toy_hps": {"toy_hps": 1.0, "toy_imagereward": 0.09, "toy_reward": 0.41,
                    "toy_geneval": 0.51},
        "toy_imagereward": {"toy_hps": 0.09, "toy_imagereward": 1.0, "toy_reward": 0.84,
                            "toy_geneval": 0.39},
        "toy_reward": {"toy_hps": 0.41, "toy_imagereward": 0.84, "toy_reward": 1.0,
                       "toy_geneval": 0.51},
        "toy_geneval": {"toy_hps": 0.51, "toy_imagereward": 0.39, "toy_reward": 0.51,
                        "toy_geneval": 1.0},
    },
}


def prompt_targets(labels, max_objects: int, meta: dict) -> tuple[list[int], int]:
    """Label indices of the prompt's objects ("colour shape" when coloured) and the total count."""
    indices, count = [], 0
    for obj in meta.get("include", []):
        name = f"{obj['color']} {obj['class']}" if obj.get("color") else obj["class"]
        indices.append(labels.index(name))
        count += int(obj.get("count", 1))
    return indices, min(count, max_objects)


class ToyReward:
    rewards = OBJECTIVE

    def __init__(self, net):
        self.net = net.eval().requires_grad_(False)
        self.labels = list(net.config.labels)
        self.max_objects = net.config.max_objects
        self.sha256 = net.sha256

    def targets(self, meta: dict) -> tuple[list[int], int]:
        return prompt_targets(self.labels, self.max_objects, meta)

    def __call__(self, images01: torch.Tensor, metas: list[dict]) -> torch.Tensor:
        self.net.to(images01.device)
        _, presence, count, quality = self.net(images01.float())
        clean = F.log_softmax(quality, -1)[:, 0]
        rewards = []
        for i, meta in enumerate(metas):
            labels, n = self.targets(meta)
            r = F.logsigmoid(presence[i, labels]).mean() if labels else presence.new_zeros(())
            rewards.append(r + F.log_softmax(count[i], -1)[n] + QUALITY_WEIGHT * clean[i])
        return torch.stack(rewards)

    def identity(self) -> dict:
        return {"rewards": self.rewards, "net_sha256": self.sha256, "correlations": CORRELATIONS}


def load_toy_reward(path: str | Path) -> ToyReward:
    from fewstep.toy.features import load_feature_net

    return ToyReward(load_feature_net(path))


def build_toy_reward(path: str | None, device="cpu") -> ToyReward:
    """REWARDS registry entry: the toy reward from its net file (`fewstep features --seed 1`)."""
    if not path:
        raise ValueError("the toy reward needs its network file: --reward toy:<file.safetensors> "
                         "(the DAG's reward_net rule writes "
                         "results/metrics/toy_reward_net.safetensors)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"toy reward network {path} not found; train it with `fewstep "
                                f"features --seed {REWARD_SEED} --out {path}`")
    reward = load_toy_reward(path)
    reward.net.to(device)
    return reward
