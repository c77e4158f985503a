"""The toy world's differentiable reward: a stand-in for HPSv2 / ImageReward in reward-guided
methods.

r(x, c) = mean_j log sigmoid(presence logit of object j of the prompt)   (what the prompt asks for)
        + log p(count = the prompt's object count)                          (how many)
        + log p(degradation = clean)                                        (image quality)
from a toy feature network trained with a different seed than the one behind the toy FID, so the
reward and the FID features share no weights (fewstep/notes/pitfalls.md F.24: a training reward that
is also the metric leaks; GenEval is scored by the exact detector, never by this network). Position
relations are not rewarded. Values are <= 0; higher is better. Gradients flow to the images.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

REWARD_SEED = 1  # the FID feature net uses seed 0


class ToyReward:
    def __init__(self, net):
        self.net = net.eval().requires_grad_(False)
        self.labels = list(net.config.labels)
        self.max_objects = net.config.max_objects
        self.sha256 = net.sha256

    def targets(self, meta: dict) -> tuple[list[int], int]:
        labels, count = [], 0
        for obj in meta.get("include", []):
            name = f"{obj['color']} {obj['class']}" if obj.get("color") else obj["class"]
            labels.append(self.labels.index(name))
            count += int(obj.get("count", 1))
        return labels, min(count, self.max_objects)

    def __call__(self, images01: torch.Tensor, metas: list[dict]) -> torch.Tensor:
        self.net.to(images01.device)
        _, presence, count, quality = self.net(images01.float())
        rewards = []
        for i, meta in enumerate(metas):
            labels, n = self.targets(meta)
            r = F.logsigmoid(presence[i, labels]).mean() if labels else presence.new_zeros(())
            r = r + F.log_softmax(count[i], -1)[n] + F.log_softmax(quality[i], -1)[0]
            rewards.append(r)
        return torch.stack(rewards)


def load_toy_reward(path: str | Path) -> ToyReward:
    from fewstep.toy.features import load_feature_net

    return ToyReward(load_feature_net(path))


def build_toy_reward(path: str | None, device="cpu") -> ToyReward:
    """REWARDS registry entry: the toy reward from its net file (`fewstep features --seed 1`)."""
    if not path:
        raise ValueError("the toy reward needs its network file: --reward toy:<file.safetensors> "
                         "(the DAG's reward_net rule writes results/metrics/toy_reward_net.safetensors)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"toy reward network {path} not found; train it with `fewstep "
                                f"features --seed {REWARD_SEED} --out {path}`")
    reward = load_toy_reward(path)
    reward.net.to(device)
    return reward

