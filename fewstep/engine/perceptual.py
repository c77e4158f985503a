"""Regression distances between latents, measured on their decoded images (DMD's L_reg, DMD paper
Eq. 9; DMD2's regression warm start uses the same distance).

    distance = regression_distance(kind, teacher, options=None)   # kind: "lpips" | "l2"
    loss = distance(x_latent, y_latent)                           # scalar, differentiable in both

"lpips" is the paper's loss: VGG-LPIPS (Zhang et al. 2018, the `lpips` package, v0.1 linear
heads) between the decoded images mapped to [-1, 1] and upsampled bilinearly to 224 x 224, averaged
over the batch (DMD paper sec. 3.3 and App. B; methods/notes/dmd.md sec. 3.3). "l2" is the paper's
ablation (App. I): the mean squared error of the decoded images in [0, 1].

Images come from `teacher.decode` (the family's codec: its full VAE, or the toy pixel codec), which
clamps them to [0, 1]. The VGG16 trunk (torchvision's ImageNet weights) is read from the weights
cache, never downloaded; the linear heads ship inside the `lpips` package.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.backbones.weights import WeightFile, load_state_dict_file, require_entry
from fewstep.errors import FewstepError
from fewstep.options import not_a_choice

KINDS = ("lpips", "l2")
LPIPS_RESOLUTION = 224  # DMD paper App. B: both images bilinearly resized to 224 for VGG LPIPS
LPIPS_TRUNK = WeightFile(
    path="lpips/vgg16-397923af.pth|lpips/vgg16-397923af.safetensors",
    source="https://download.pytorch.org/models/vgg16-397923af.pth (torchvision "
           "VGG16_Weights.IMAGENET1K_V1, the trunk `lpips` loads)",
    note="VGG-LPIPS trunk of DMD's regression loss; the linear heads ship with the lpips package")
OPTION_KEYS = ("resolution",)

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def regression_distance(kind: str, teacher, options=None) -> Distance:
    """The distance `kind` between latents of `teacher`'s family (see the module docstring).

    options: None, a mapping {"resolution": px} (lpips only; default the paper's 224), or a
    method's options object, read only for an `lpips_resolution` field. Building "lpips" loads the
    VGG16 trunk now, so a missing file fails before any training."""
    if kind not in KINDS:
        raise FewstepError(not_a_choice("regression", "kind", kind, KINDS))
    opts = distance_options(options)
    if kind == "l2":
        return lambda x, y: l2_distance(teacher, x, y)
    return LPIPSDistance(teacher, int(opts.get("resolution", LPIPS_RESOLUTION)))


def distance_options(options) -> dict:
    if options is None:
        return {}
    if not isinstance(options, Mapping):  # an options dataclass: only its own LPIPS field
        value = getattr(options, "lpips_resolution", None)
        return {} if value is None else {"resolution": value}
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise FewstepError(f"regression distance options {unknown}: unknown; known: "
                           f"{list(OPTION_KEYS)}")
    return dict(options)


def l2_distance(teacher, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the decoded images (DMD paper App. I's alternative to LPIPS)."""
    return torch.mean((teacher.decode(x) - teacher.decode(y)) ** 2)


class LPIPSDistance:
    """VGG-LPIPS between decoded latents at `resolution` px (the package's forward, frozen)."""

    def __init__(self, teacher, resolution: int = LPIPS_RESOLUTION):
        self.teacher, self.resolution = teacher, resolution
        self.net = lpips_vgg()

    def image(self, latents: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (the range lpips expects), bilinearly resized (DMD paper App. B)."""
        images = self.teacher.decode(latents) * 2.0 - 1.0
        size = (self.resolution, self.resolution)
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, b = self.image(x), self.image(y)
        if next(self.net.parameters()).device != a.device:
            self.net.to(a.device)
        return self.net(a, b).mean()


def lpips_vgg() -> nn.Module:
    """The package's LPIPS(net="vgg"), trunk from the weights cache, heads from the package.

    Built with a random trunk (torchvision's vgg16 without weights: nothing is downloaded), then
    the cached trunk is loaded into it; eval mode (the heads' dropout off), no gradients."""
    path = require_entry(LPIPS_TRUNK.path, LPIPS_TRUNK.source,
                         "DMD's LPIPS regression loss (regression = lpips)")
    import lpips

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
        warnings.filterwarnings("ignore", message=".*weight enum or `None` for 'weights'.*")
        warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated.*")
        model = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    load_heads(model, Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth")
    model.net.load_state_dict(trunk_for_slices(load_state_dict_file(path), model.net, path))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_heads(model: nn.Module, heads_file: Path) -> None:
    """The package's calibrated linear heads (lin0..lin4), read by the tensor-only loader."""
    heads = torch.load(heads_file, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(heads, strict=False)
    # the trunk (net.*) is loaded apart; `lins.*` alias the lin<k> modules the file names; the
    # input scaling is a constant buffer set by the package
    missing = [k for k in missing if not k.startswith(("net.", "lins.", "scaling_layer."))]
    if missing or unexpected:
        raise FewstepError(f"{heads_file}: the lpips package's VGG heads do not fit its model "
                           f"(missing {missing}, unexpected {unexpected}); reinstall lpips 0.1.4")


def trunk_for_slices(state: dict, net: nn.Module, path) -> dict:
    """torchvision vgg16 keys (features.<i>.<param>; classifier.* ignored) -> the lpips trunk's
    (slice<k>.<i>.<param>: its slices keep torchvision's feature indices as module names)."""
    features = {k.removeprefix("features."): v for k, v in state.items()
                if not k.startswith("classifier.")}
    wanted = {k: k.split(".", 1)[1] for k in net.state_dict()}
    missing = sorted(v for v in wanted.values() if v not in features)
    if missing:
        raise FewstepError(f"{path}: not a torchvision VGG16 state dict (no features.{missing[0]}"
                           f" and {len(missing) - 1} more); get {LPIPS_TRUNK.source}")
    return {k: features[v] for k, v in wanted.items()}
