"""Image files to features through clean-fid's own file loop (sec. 3), and the toy feature net
the toy route extracts with (trained once per recipe and cached).

The images are read and featurised by clean-fid itself, `cleanfid.fid.get_files_features` (see
metrics/fid_toy.py for why that layer and the toy route's resize policy); the file list is the
caller's (a manifest's, never a glob).
Sections (sec. N) are those of metrics/notes/metrics.md.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

MODE = "clean"


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEWSTEP_CACHE_DIR", "results/cache"))


def clean_resizer(size: int):
    """clean-fid's clean-mode resizer (PIL bicubic on float32 channels), to the extractor's size."""
    from cleanfid.resize import make_resizer
    return make_resizer("PIL", False, "bicubic", (size, size))


def resize_policy(size: int) -> str:
    return f"clean-fid make_resizer(PIL, bicubic, float32, no re-quantisation) -> {size}x{size}"


def extract_features(paths, extractor, *, device="cpu", batch_size: int = 64) -> np.ndarray:
    """(N, D) features of image files in the given order, via clean-fid's file-feature loop."""
    return files_features(paths, extractor, mode=MODE, fn_resize=clean_resizer(extractor.size),
                          device=device, batch_size=batch_size)


def files_features(paths, extractor, *, mode: str, fn_resize=None, image_transform=None,
                   device="cpu", batch_size: int = 64) -> np.ndarray:
    """(N, D) float64 features of image files in order, through clean-fid's get_files_features.

    fn_resize: None uses the mode's own resizer; image_transform: uint8 HxWx3 -> uint8, applied
    by clean-fid before the resizer (the protocol's crop and resize)."""
    from cleanfid.fid import get_files_features
    paths = [str(p) for p in paths]
    if not paths:
        raise ValueError("no image files to featurise")
    feats = get_files_features(paths, model=extractor, num_workers=0, batch_size=batch_size,
                               device=torch.device(device), mode=mode, custom_fn_resize=fn_resize,
                               custom_image_tranform=image_transform, verbose=False)
    if feats.shape[0] != len(paths) or not np.isfinite(feats).all():
        raise RuntimeError(f"feature extraction returned {feats.shape} for {len(paths)} files, "
                           "or non-finite values")
    return feats.astype(np.float64)


def _load_extractor(feature_net, cache_dir):
    from fewstep.toy.features import ToyFeatureNet, load_feature_net, toy_feature_extractor
    if isinstance(feature_net, ToyFeatureNet):
        return toy_feature_extractor(feature_net)
    if feature_net is not None:
        return toy_feature_extractor(load_feature_net(feature_net))
    return toy_feature_extractor(default_feature_net(cache_dir))


def default_feature_net(cache_dir=None):
    """The default-recipe feature net, trained once (about a minute) and cached by its recipe."""
    from fewstep.toy.features import (FEATURE_NET_VERSION, TrainRecipe, load_feature_net,
                                      save_feature_net, train_feature_net)
    recipe = json.dumps({"version": FEATURE_NET_VERSION, **asdict(TrainRecipe())}, sort_keys=True)
    name = f"feature-net-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}.safetensors"
    path = Path(cache_dir or default_cache_dir()) / "toy_fid" / name
    if path.is_file():
        return load_feature_net(path)
    print(f"toy_fid: training the default feature net once; cached at {path}")
    net = train_feature_net()
    save_feature_net(net, path)
    return net
