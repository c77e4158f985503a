"""Reference statistics (features, mean, covariance and its square root), cached in a file per
identity, and the real route's reference image folders and their identity.

Reference features are built once per key and cached (never in the package folder); the real
route's key is (reference folder listing, resolution, crop policy, mode, Inception sha256).
Sections (sec. N) are those of metrics/notes/metrics.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metrics.fid_frechet import gaussian_stats, psd_sqrt
from metrics.fid_protocol import protocol_policy

REFERENCES_DIR = "refs"                        # folder of reference image folders in the cache
REFERENCE_SOURCES = {"coco2014-val": "COCO 2014 val images (cocodataset.org val2014.zip, 40,504 "
                                     "JPEGs), unpacked into one flat folder"}
REFERENCE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REAL_REFERENCE_VERSION = "1"


@dataclass
class ReferenceStats:
    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    sqrt_sigma: np.ndarray
    prompt_ids: list[str]
    identity: dict

    @property
    def stats_sha256(self) -> str:
        return hashlib.sha256(self.mu.tobytes() + self.sigma.tobytes()).hexdigest()


def cached_features(path: Path, ident: dict, compute) -> np.ndarray:
    """Features stored at `path` with their identity; computed by `compute()` and written
    atomically (temporary file, then rename) when the file is absent or holds another identity."""
    if path.is_file():
        with np.load(path) as data:
            if json.loads(str(data["identity"])) == ident:
                return data["features"]
    feats = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}.npz")
    np.savez(tmp_path, features=feats, identity=json.dumps(ident, sort_keys=True))
    os.replace(tmp_path, path)
    return feats


def _stats(feats: np.ndarray, prompt_ids: list[str], ident: dict) -> ReferenceStats:
    mu, sigma = gaussian_stats(feats)
    return ReferenceStats(np.asarray(feats, np.float64), mu, sigma, psd_sqrt(sigma), prompt_ids, ident)


def reference_folder(reference: str) -> Path:
    """A bare name is a folder under $FEWSTEP_WEIGHTS/refs/; anything else is a path."""
    from fewstep.backbones.weights import is_bare_name, weights_root

    text = os.fspath(reference)
    if is_bare_name(text):
        return weights_root() / REFERENCES_DIR / text
    return Path(text).expanduser()


def list_reference_images(folder: Path) -> list[Path]:
    """The folder's images, sorted; a subfolder or another file stops it (fewstep/notes/pitfalls.md A.7)."""
    if not folder.is_dir():
        from fewstep.backbones.weights import MissingWeightsError
        raise MissingWeightsError(
            f"FID reference folder {folder} does not exist. Put the reference images there (one "
            f"flat folder; a bare name is looked up under $FEWSTEP_WEIGHTS/{REFERENCES_DIR}/) or "
            "pass the folder's path.")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    strays = [p.name for p in entries if p.is_dir() or p.suffix.lower() not in REFERENCE_EXTENSIONS]
    if strays:
        raise ValueError(f"FID reference folder {folder} holds {len(strays)} entries that are not "
                         f"images ({', '.join(REFERENCE_EXTENSIONS)}), e.g. {strays[:3]}; keep "
                         "one flat folder of reference images")
    if len(entries) < 2:
        raise ValueError(f"FID reference folder {folder} holds {len(entries)} image(s); need >= 2")
    return entries


def reference_identity(name: str, files: list[Path]) -> dict:
    """Names the reference set by the hash of its sorted (file name, byte size) list."""
    listing = "\n".join(f"{p.name}\t{p.stat().st_size}" for p in files)
    return {"kind": "image-folder", "version": REAL_REFERENCE_VERSION, "name": name,
            "n_images": len(files), "list_sha256": hashlib.sha256(listing.encode()).hexdigest()}


def real_reference_key(reference: dict, extractor_sha256: str, mode: str, resolution: int,
                       crop: str) -> tuple[str, dict]:
    """Cache key of reference features: (reference set, resolution, crop policy, extractor)."""
    ident = {"reference": reference, "extractor_sha256": extractor_sha256, "mode": mode,
             "resolution": int(resolution), "crop": crop,
             "policy": protocol_policy(resolution, crop, mode)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest(), ident
