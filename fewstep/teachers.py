"""Teacher folders of both worlds behind one `verify` / `load`.

* Toy world: a folder with `recipe.json` (fewstep.toy.teachers: trained by the recipe or the
  shipped copy, every file hash-checked).
* Real world: a *link* folder with `teacher.json`, written by `fewstep teacher link`: which family,
  which local weights (a diffusers folder, or SiT's official checkpoint) under the weights cache,
  the dtype and resolution to run at, and the sha256 of the checkpoint's small files (configs,
  scheduler, tokenizer), so a changed checkpoint is noticed without hashing gigabytes. The
  multi-gigabyte weights are never copied into results/.

Commands take `--teacher <folder>` either way, so the DAG's rules are the same in both worlds.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from fewstep.io import atomic_path, write_json
from fewstep.registry import BACKBONES

LINK_FILE = "teacher.json"
SMALL_FILE_BYTES = 1 << 20  # files hashed at link time: configs, tokenizers, scheduler
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def small_files(root: Path) -> dict[str, str]:
    """sha256 of every file under 1 MiB in a weights folder (relative path -> hash)."""
    if root.is_file():
        return {}
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.stat().st_size < SMALL_FILE_BYTES:
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def link(family: str, weights: str, out, dtype: str = "bf16", resolution: int | None = None) -> dict:
    """Write a real teacher's link folder after checking the weights are all there."""
    from fewstep.backbones.weights import resolve

    cls = BACKBONES.get(family)
    if dtype not in DTYPES:
        raise ValueError(f"teacher dtype {dtype!r}: use one of {sorted(DTYPES)}")
    where = Path(resolve(weights))
    if not where.exists():
        raise FileNotFoundError(
            f"{family} teacher weights {where} not found ({cls.__name__}: "
            f"{getattr(cls, 'WEIGHTS_SOURCE', 'see fewstep weights check')}). Put the checkpoint "
            "there or point FEWSTEP_WEIGHTS at the cache that holds it; `fewstep weights check "
            "--world real` lists every file")
    info = {"recipe": {"family": family, "resolution": resolution, "world": "real"},
            "weights": str(where.resolve()), "dtype": dtype, "small_files": small_files(where)}
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        write_json(tmp / LINK_FILE, info)
    return info


def verify(folder) -> dict:
    """The teacher's info (`recipe.family`, `recipe.resolution`, ...), after its checks."""
    folder = Path(folder)
    if not (folder / LINK_FILE).is_file():
        from fewstep.toy import teachers as toy
        return toy.verify(folder)
    info = json.loads((folder / LINK_FILE).read_text())
    weights = Path(info["weights"])
    if not weights.exists():
        raise FileNotFoundError(f"teacher link {folder}: its weights {weights} are gone; relink "
                                "with `fewstep teacher link`")
    changed = sorted(set(small_files(weights).items()) ^ set(info["small_files"].items()))
    if changed:
        raise ValueError(f"teacher link {folder}: files of {weights} changed since it was linked: "
                         f"{sorted({name for name, _ in changed})[:5]}; relink deliberately "
                         "(results from the old checkpoint would be mixed with the new)")
    return info


def load(folder, verified: dict | None = None, device=None):
    """The teacher backbone (toy: from its folder; real: from the linked weights and dtype)."""
    folder = Path(folder)
    info = verified or verify(folder)
    if info["recipe"].get("world") != "real":
        from fewstep.toy import teachers as toy
        backbone = toy.load(folder, verified=info)
    else:
        cls = BACKBONES.get(info["recipe"]["family"])
        kwargs = {} if info["recipe"]["family"] == "sit" else {
            "dtype": DTYPES[info["dtype"]], "resolution": info["recipe"]["resolution"]}
        backbone = cls.from_pretrained(info["weights"], **kwargs)
    return backbone.to(device) if device is not None else backbone
