"""clean-fid's Inception for the real FID route (sec. 3), from the weights cache.

The Inception file is the one clean-fid would download (its name is read from the installed
package) and comes from the weights cache, `$FEWSTEP_WEIGHTS/cleanfid/`: clean-fid's wrapper is
built on that folder with download disabled (legacy_pytorch: its state-dict fetch is served the
local file), so nothing is fetched and the hard-coded /tmp cache is never used.
Sections (sec. N) are those of metrics/notes/metrics.md.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from fewstep.backbones.weights import WeightFile

INCEPTION_MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")
MODE_RESIZE = {
    "clean": "clean-fid clean: PIL bicubic on float32 channels to 299x299, no re-quantisation",
    "legacy_tensorflow": "clean-fid legacy_tensorflow: no outside resize, the network resizes",
    "legacy_pytorch": "clean-fid legacy_pytorch: torch bilinear (align_corners=False) to 299x299",
}
CLEANFID_DIR = "cleanfid"                      # folder of the Inception files in the weights cache


def inception_url(mode: str) -> str:
    """Where clean-fid downloads the mode's Inception weights, read from the installed package."""
    if mode == "legacy_pytorch":
        from cleanfid.inception_pytorch import FID_WEIGHTS_URL
        return FID_WEIGHTS_URL
    from cleanfid.downloads_helper import inception_url as torchscript_url
    return torchscript_url


def inception_weight_file(mode: str) -> WeightFile:
    url = inception_url(mode)
    kind = "pytorch-fid state dict" if mode == "legacy_pytorch" else "TorchScript, ~0.1 GB"
    name = url.rsplit("/", 1)[-1]
    return WeightFile(f"{CLEANFID_DIR}/{name}", url, f"Inception for FID ({kind})")


@contextlib.contextmanager
def _local_state_dict(path: Path):
    """clean-fid's pytorch-fid Inception fetches its state dict by URL; serve our local file."""
    import cleanfid.inception_pytorch as module

    def load_local(url, *args, **kwargs):
        if url.rsplit("/", 1)[-1] != path.name:
            raise RuntimeError(f"clean-fid asked for {url}, but the local file is {path.name}")
        return torch.load(path, map_location="cpu", weights_only=True)

    original = module.load_state_dict_from_url
    module.load_state_dict_from_url = load_local
    try:
        yield
    finally:
        module.load_state_dict_from_url = original


class InceptionExtractor:
    """clean-fid's feature network for a mode, built from the local file with download disabled.

    Called by clean-fid on float batches (B, 3, H, W) in [0, 255] (299 px except in
    legacy_tensorflow mode, whose network resizes inside); returns (B, 2048)."""

    def __init__(self, mode: str, path: Path, device="cpu"):
        from fewstep.backbones.weights import file_sha256

        self.mode, self.path = mode, Path(path)
        self.sha256 = file_sha256(self.path)
        self.name = f"clean-fid {mode} Inception ({self.path.name})"
        self.net = self._build(torch.device(device))

    def _build(self, device):
        if self.mode == "legacy_pytorch":
            from cleanfid.features import feature_extractor
            with _local_state_dict(self.path):
                return feature_extractor("pytorch_inception", device=device, use_dataparallel=False)
        from cleanfid.inception_torchscript import InceptionV3W
        # InceptionV3W loads <folder>/inception-2015-12-05.pt: our file, never downloaded
        net = InceptionV3W(str(self.path.parent), download=False,
                           resize_inside=self.mode == "legacy_tensorflow")
        return net.to(device).eval()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_inception(mode: str, device="cpu") -> InceptionExtractor:
    """The mode's Inception from $FEWSTEP_WEIGHTS/cleanfid/, or MissingWeightsError."""
    from fewstep.backbones.weights import require_entry

    wf = inception_weight_file(mode)
    return InceptionExtractor(mode, require_entry(wf.path, wf.source, f"FID ({mode} mode)"), device)
