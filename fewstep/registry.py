"""Lazy name registries with did-you-mean errors.

Built-in plugins are named by "module:attr" strings and imported only when asked for; third-party
packages add entries through the entry-point groups `fewstep.methods`, `fewstep.metrics`,
`fewstep.backbones`, `fewstep.rewards` (lm-evaluation-harness style). An entry must be a subclass
of its registry's base class (checked when it is loaded, so importing this module stays light),
and an entry point may not take a name that is already taken: it is refused, never dropped.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from fewstep.errors import FewstepError, did_you_mean


class UnknownNameError(KeyError):
    def __str__(self):  # KeyError quotes its message; we want it readable
        return self.args[0]


class PluginError(FewstepError):
    """An installed plugin that cannot be registered: a name clash or a wrong base class."""


def _import(target: str):
    """The object a 'module:attr.attr' string names."""
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def _distribution(ep) -> str:
    dist = getattr(ep, "dist", None)
    return f"package {dist.name} {dist.version}" if dist is not None else "an unknown package"


class Registry:
    def __init__(self, kind: str, group: str, builtins: dict[str, str], plural: str | None = None,
                 base: str | None = None):
        """base: 'module:Class' every entry must subclass, imported only when an entry is loaded."""
        self.kind, self.group, self.plural, self.base = kind, group, plural or kind + "s", base
        self._targets: dict[str, str] = dict(builtins)
        self._origins: dict[str, str] = {name: "fewstep (built in)" for name in builtins}
        self._loaded: dict[str, object] = {}
        self._scanned = False

    def _scan_entry_points(self):
        if self._scanned:
            return
        for ep in entry_points(group=self.group):
            origin = f"entry point {ep.name!r} = {ep.value!r} of {_distribution(ep)}"
            if ep.name in self._targets:
                raise PluginError(
                    f"{origin} (group {self.group!r}) names the {self.kind} {ep.name!r}, which "
                    f"{self._origins[ep.name]} already registers; rename the entry point in that "
                    f"package's [project.entry-points.\"{self.group}\"] table and reinstall it")
            self._targets[ep.name], self._origins[ep.name] = ep.value, origin
        self._scanned = True

    def names(self) -> list[str]:
        self._scan_entry_points()
        return sorted(self._targets)

    def register(self, name: str, target) -> None:
        """Register an object, or a 'module:attr' string imported on first use."""
        self._origins.setdefault(name, "register()")
        if isinstance(target, str):
            self._targets[name] = target
        else:
            self._targets[name] = f"<object {target!r}>"
            self._loaded[name] = self._checked(name, target)

    def check(self, name: str) -> str:
        """Raise a did-you-mean error for an unknown name; return the name otherwise."""
        self._scan_entry_points()
        if name not in self._targets:
            hint = did_you_mean(name, self._targets)
            raise UnknownNameError(f"unknown {self.kind} {name!r}.{hint} Known {self.plural}: "
                                   f"{', '.join(self.names())}.")
        return name

    def get(self, name: str):
        self.check(name)
        if name not in self._loaded:
            self._loaded[name] = self._checked(name, _import(self._targets[name]))
        return self._loaded[name]

    def _checked(self, name: str, obj):
        """obj itself if it subclasses the registry's base; else a PluginError naming its origin."""
        if self.base is None:
            return obj
        base = _import(self.base)
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise PluginError(
                f"the {self.kind} {name!r} ({self._origins.get(name, 'unknown origin')}) is "
                f"{obj!r}, not a subclass of {base.__module__}.{base.__qualname__}; a {self.kind} "
                f"plugin's entry point names such a class")
        return obj


BACKBONES = Registry("backbone family", "fewstep.backbones", {
    "sdxl": "fewstep.backbones.sdxl:SDXLBackbone",
    "sd3": "fewstep.backbones.sd3:SD3Backbone",
    "sit": "fewstep.backbones.sit:SiTBackbone",
}, plural="backbone families", base="fewstep.backbones.base:Backbone")
METHODS = Registry("method", "fewstep.methods", {
    "dummy": "methods.dummy:Dummy",
    "dmd": "methods.dmd:DMD",
    "dmd2": "methods.dmd2:DMD2",
    "amd": "methods.amd:AMD",
    "rtdmd": "methods.rtdmd:RTDMD",
    "cdm": "methods.cdm:CDM",
}, base="fewstep.engine.method:Method")
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
    "toy_diversity": "metrics.diversity:ToyDiversity",           # per-prompt, seed-4 toy net
    "diversity_dinov2": "metrics.diversity:DINOv2Diversity",     # per-prompt, DINOv2 CLS
    "toy_precision": "metrics.precision_recall:ToyPrecision",    # k-NN manifolds, toy FID net
    "toy_recall": "metrics.precision_recall:ToyRecall",          # k-NN manifolds, toy FID net
    "precision": "metrics.precision_recall:InceptionPrecision",  # k-NN manifolds, FID Inception
    "recall": "metrics.precision_recall:InceptionRecall",        # k-NN manifolds, FID Inception
}, base="metrics.base:Metric")

# Differentiable scorers for reward-guided training: each entry builds one from an optional
# argument (a file) and a device; a scorer maps (images01 (B, 3, H, W), metas) -> (B,) rewards.
# Entries are factories (functions), so there is no base class to check.
REWARDS = Registry("reward", "fewstep.rewards", {
    "toy": "metrics.toy_reward:build_toy_reward",
    "clip": "metrics.clip_score:build_clip_reward",
    "hpsv2": "metrics.hpsv2:build_hps_reward",                   # hpsv2 (v2.1) or hpsv2:v2.0
    "imagereward": "metrics.image_reward:build_image_reward_reward",
})
