"""Lazy name registries with did-you-mean errors.

Built-in plugins are named by "module:attr" strings and imported only when asked for; third-party
packages add entries through the entry-point groups `fewstep.methods`, `fewstep.metrics`,
`fewstep.backbones` (lm-evaluation-harness style).
"""
from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points


class UnknownNameError(KeyError):
    def __str__(self):  # KeyError quotes its message; we want it readable
        return self.args[0]


class Registry:
    def __init__(self, kind: str, group: str, builtins: dict[str, str], plural: str | None = None):
        self.kind, self.group, self.plural = kind, group, plural or kind + "s"
        self._targets: dict[str, str] = dict(builtins)
        self._loaded: dict[str, object] = {}
        self._scanned = False

    def _scan_entry_points(self):
        if not self._scanned:
            for ep in entry_points(group=self.group):
                self._targets.setdefault(ep.name, ep.value)
            self._scanned = True

    def names(self) -> list[str]:
        self._scan_entry_points()
        return sorted(self._targets)

    def register(self, name: str, target) -> None:
        """Register an object, or a 'module:attr' string imported on first use."""
        if isinstance(target, str):
            self._targets[name] = target
        else:
            self._targets[name] = f"<object {target!r}>"
            self._loaded[name] = target

    def check(self, name: str) -> str:
        """Raise a did-you-mean error for an unknown name; return the name otherwise."""
        self._scan_entry_points()
        if name not in self._targets:
            close = difflib.get_close_matches(name, self._targets, n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Known {self.plural}: {', '.join(self.names())}.")
        return name

    def get(self, name: str):
        self.check(name)
        if name not in self._loaded:
            module, _, attr = self._targets[name].partition(":")
            obj = importlib.import_module(module)
            for part in attr.split(".") if attr else []:
                obj = getattr(obj, part)
            self._loaded[name] = obj
        return self._loaded[name]


BACKBONES = Registry("backbone family", "fewstep.backbones", {
    "sdxl": "fewstep.backbones.sdxl:SDXLBackbone",
    "sd3": "fewstep.backbones.sd3:SD3Backbone",
    "sit": "fewstep.backbones.sit:SiTBackbone",
}, plural="backbone families")
METHODS = Registry("method", "fewstep.methods", {
    "dummy": "methods.dummy:Dummy",
    "dmd": "methods.dmd:DMD",
    "dmd2": "methods.dmd2:DMD2",
    "amd": "methods.amd:AMD",
    "rtdmd": "methods.rtdmd:RTDMD",
    "cdm": "methods.cdm:CDM",
})
METRICS = Registry("metric", "fewstep.metrics", {
    "toy_fid": "metrics.fid:ToyFID",
    "toy_geneval": "metrics.geneval:ToyGenEval",
    "geneval_hf_m2f": "metrics.geneval_m2f:GenEvalM2F",         # GenEval route B, approximate
    "toy_hps": "metrics.toy_preference:ToyHPS",                  # toy stand-in, HPSv2 slot
    "toy_imagereward": "metrics.toy_preference:ToyImageReward",  # toy stand-in, ImageReward slot
    "fid": "metrics.fid:FID",                                    # clean-fid Inception, cache weights
    "clip_score": "metrics.clip_score:CLIPScore",                # ViT-L-14-quickgelu, OpenAI
    "clip_score_dmd2": "metrics.clip_score:CLIPScoreDMD2",       # DMD2's ViT-g-14 protocol
    "hpsv2.1": "metrics.hpsv2:HPSv2",                            # HPSv2.1 (harness default), x100
    "hpsv2.0": "metrics.hpsv2:HPSv20",                           # HPSv2.0, separate identity
    "imagereward": "metrics.image_reward:ImageRewardScore",      # BLIP reward, x1 (z-score)
})

# Differentiable scorers for reward-guided training: each entry builds one from an optional
# argument (a file) and a device; a scorer maps (images01 (B, 3, H, W), metas) -> (B,) rewards.
REWARDS = Registry("reward", "fewstep.rewards", {
    "toy": "metrics.toy_reward:build_toy_reward",
    "clip": "metrics.clip_score:build_clip_reward",
    "hpsv2": "metrics.hpsv2:build_hps_reward",                   # hpsv2 (v2.1) or hpsv2:v2.0
    "imagereward": "metrics.image_reward:build_image_reward_reward",
})

