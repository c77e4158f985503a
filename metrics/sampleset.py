"""Sample sets on disk: a flat folder of PNGs plus `manifest.jsonl`.

Metrics read sample sets from disk, never tensors in memory, and refuse an incomplete or corrupt set
instead of shrinking their denominator (pitfalls.md C.12): every problem found is named in one error.

Manifest: one JSON object per line and per image, with the keys in `REQUIRED_KEYS` plus optional task
metadata under "meta" (the GenEval dict for text-to-image prompts).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from fewstep.io import atomic_path

MANIFEST = "manifest.jsonl"
REQUIRED_KEYS = ("prompt_id", "prompt", "seed", "family", "method", "nfe", "path")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_LISTED_PROBLEMS = 20
SIDECARS = ("provenance.json",)  # records the sampling job writes beside the images (not images)


class SampleSetError(ValueError):
    """A sample set that must not be scored; `problems` lists every problem found."""

    def __init__(self, folder, problems: Sequence[str]):
        self.folder, self.problems = Path(folder), list(problems)
        shown = self.problems[:MAX_LISTED_PROBLEMS]
        more = len(self.problems) - len(shown)
        lines = [f"sample set {self.folder} refused ({len(self.problems)} problem(s)):"]
        lines += [f"  - {p}" for p in shown]
        if more:
            lines.append(f"  ... and {more} more problem(s)")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class SampleSet:
    """A validated sample set: records in manifest order and the common image size (H, W)."""
    folder: Path
    records: list[dict]
    resolution: tuple[int, int]

    def __len__(self):
        return len(self.records)

    def image_paths(self) -> list[Path]:
        return [self.folder / r["path"] for r in self.records]

    def keys(self) -> list[tuple[str, int]]:
        return [(r["prompt_id"], r["seed"]) for r in self.records]

    def prompt_ids(self) -> list[str]:
        return [r["prompt_id"] for r in self.records]

    def prompt_set_sha256(self) -> str:
        """Hash of the distinct (prompt_id, prompt, meta) triples: names the prompt set scored."""
        triples = sorted({json.dumps([r["prompt_id"], r["prompt"], r.get("meta")], sort_keys=True)
                          for r in self.records})
        return hashlib.sha256("\n".join(triples).encode()).hexdigest()

    def load_image(self, index: int) -> np.ndarray:
        """The image as uint8 (H, W, 3)."""
        return read_png_rgb(self.folder / self.records[index]["path"])


# ----------------------------------------------------------------------------------------- writing

def to_uint8_images(images) -> np.ndarray:
    """Images as uint8 (B, H, W, 3); accepts uint8 or float in [0, 1], channels first or last."""
    arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"images must be a batch (B, 3, H, W) or (B, H, W, 3); got shape {arr.shape}")
    if arr.shape[-1] != 3 and arr.shape[1] == 3:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.shape[-1] != 3:
        raise ValueError(f"images must have 3 colour channels; got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [0, 1]; got dtype {arr.dtype}")
    bad = [i for i in range(len(arr)) if not np.isfinite(arr[i]).all()]
    if bad:
        raise ValueError(f"images {bad[:10]} contain NaN or inf; fix the sampler (e.g. decode in fp32)")
    # Round rather than truncate so that uint8 -> float -> uint8 is the identity.
    return np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def default_image_name(index: int) -> str:
    return f"{index:06d}.png"


def write_sample_set(folder, images, records: Sequence[dict], *, overwrite: bool = False) -> Path:
    """Write images and manifest atomically: into a temporary sibling folder, then one rename.

    `records` hold the manifest keys except "path", which is assigned (`000000.png`, ...) unless given.
    A reader never sees a half-written set: the final folder appears only once everything is on disk.
    """
    folder = Path(folder)
    arr = to_uint8_images(images)
    if len(arr) != len(records):
        raise ValueError(f"{len(arr)} images but {len(records)} records; pass one record per image")
    rows = [_completed_record(i, r) for i, r in enumerate(records)]
    problems = _record_problems(rows)
    if problems:
        raise SampleSetError(folder, problems)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists; pass overwrite=True to replace it")
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for img, row in zip(arr, rows):
            Image.fromarray(img, mode="RGB").save(tmp / row["path"], format="PNG")
        (tmp / MANIFEST).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return folder


def _completed_record(index: int, record: dict) -> dict:
    row = dict(record)
    row.setdefault("path", default_image_name(index))
    return row


# ----------------------------------------------------------------------------------------- reading

def read_png_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_manifest(folder) -> tuple[list[dict], list[str]]:
    """Manifest rows and the problems found while parsing them."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return [], [f"missing {MANIFEST} in {folder}; write sample sets with write_sample_set"]
    rows, problems = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{MANIFEST} line {lineno}: not valid JSON ({err.msg})")
            continue
        if not isinstance(row, dict):
            problems.append(f"{MANIFEST} line {lineno}: expected a JSON object")
            continue
        rows.append(row)
    if not rows and not problems:
        problems.append(f"{MANIFEST} is empty: a sample set needs at least one image")
    return rows, problems


def _record_problems(rows: Sequence[dict]) -> list[str]:
    """Missing keys, bad types, unsafe paths, duplicate (prompt_id, seed) and duplicate paths."""
    problems, seen_keys, seen_paths = [], {}, {}
    for i, row in enumerate(rows):
        where = f"record {i} ({row.get('path', '?')})"
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            problems.append(f"{where}: missing key(s) {missing}")
            continue
        for key in ("seed", "nfe"):
            if not isinstance(row[key], int) or isinstance(row[key], bool):
                problems.append(f"{where}: {key} must be an integer, got {row[key]!r}")
        if "meta" in row and row["meta"] is not None and not isinstance(row["meta"], dict):
            problems.append(f"{where}: meta must be a JSON object or null")
        problems += _path_problems(where, row["path"])
        key = (row["prompt_id"], row["seed"])
        if key in seen_keys:
            problems.append(f"{where}: duplicate (prompt_id, seed) {key}, "
                            f"also record {seen_keys[key]}")
        seen_keys.setdefault(key, i)
        if row["path"] in seen_paths:
            problems.append(f"{where}: path also used by record {seen_paths[row['path']]}")
        seen_paths.setdefault(row["path"], i)
    return problems


def _path_problems(where: str, rel) -> list[str]:
    if not isinstance(rel, str) or not rel:
        return [f"{where}: path must be a non-empty string"]
    p = Path(rel)
    # Flat folders only: clean-fid globs recursively and would pick up anything in subfolders.
    if p.is_absolute() or len(p.parts) != 1:
        return [f"{where}: path {rel!r} must be a bare file name inside the sample-set folder"]
    if p.suffix.lower() != ".png":
        return [f"{where}: {rel} is not a .png file; store samples as lossless PNG"]
    return []


def _folder_problems(folder: Path, rows: Sequence[dict]) -> list[str]:
    """Listed files that are absent, and files on disk that the manifest does not list."""
    listed = {r.get("path") for r in rows}
    # hidden files (Snakemake's .snakemake_timestamp in directory outputs) are not samples
    on_disk = {p.name for p in folder.iterdir()
               if p.name not in (MANIFEST, *SIDECARS) and not p.name.startswith(".")}
    problems = [f"missing image {name} (listed in {MANIFEST})"
                for name in sorted(n for n in listed - on_disk if isinstance(n, str))]
    for name in sorted(on_disk - listed):
        kind = "folder" if (folder / name).is_dir() else (
            "image" if name.lower().endswith(".png") else "non-PNG file")
        problems.append(f"extra {kind} {name} not listed in {MANIFEST}; remove it "
                        "(sample-set folders hold exactly the listed PNGs)")
    return problems


def _image_problems(path: Path, allow_blank: bool) -> tuple[tuple[int, int] | None, list[str]]:
    """The image's (H, W) and its problems: not a PNG, not RGB, unreadable, or blank."""
    with open(path, "rb") as fh:
        if fh.read(len(PNG_MAGIC)) != PNG_MAGIC:
            return None, [f"{path.name} is not a PNG file (wrong magic bytes; e.g. a renamed JPEG)"]
    try:
        with Image.open(path) as im:
            im.load()
            mode, arr = im.mode, np.asarray(im)
    except Exception as err:  # noqa: BLE001 - any decoder failure means a corrupt file
        return None, [f"{path.name} cannot be decoded ({err})"]
    if mode != "RGB":
        return arr.shape[:2], [f"{path.name} has mode {mode}; samples must be 8-bit RGB PNG"]
    if not allow_blank and _is_constant(arr):
        return arr.shape[:2], [f"{path.name} is blank (every pixel has the same colour); "
                               "check the sampler/decoder (e.g. NaN in fp16 VAE decoding)"]
    return arr.shape[:2], []


def _is_constant(arr: np.ndarray) -> bool:
    flat = arr.reshape(-1, arr.shape[-1])
    return bool((flat == flat[0]).all())


def _resolution_problems(sizes: dict[str, tuple[int, int]], resolution) -> list[str]:
    if resolution is not None:
        want = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        return [f"{name} is {h}x{w} (HxW), expected {want[0]}x{want[1]}"
                for name, (h, w) in sizes.items() if (h, w) != want]
    common = max(set(sizes.values()), key=list(sizes.values()).count)
    return [f"{name} is {h}x{w} (HxW) while most images are {common[0]}x{common[1]}"
            for name, (h, w) in sizes.items() if (h, w) != common]


def _expected_problems(rows: Sequence[dict], expected: Iterable) -> list[str]:
    want = {(str(p), int(s)) for p, s in expected}
    have = {(str(r.get("prompt_id")), r.get("seed")) for r in rows}
    problems = [f"missing sample for (prompt_id, seed) = {k}" for k in sorted(want - have)]
    problems += [f"unexpected sample (prompt_id, seed) = {k} not in the expected grid"
                 for k in sorted(have - want, key=str)]
    return problems


def load_sample_set(folder, expected=None, resolution=None, *,
                    allow_blank: bool = False) -> SampleSet:
    """Validate and load a sample set; raise SampleSetError naming every problem.

    expected: the (prompt_id, seed) grid the set must cover exactly; resolution: int or (H, W).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SampleSetError(folder, [f"{folder} is not a folder"])
    rows, problems = read_manifest(folder)
    if not rows and problems:  # no usable manifest: listing every image as "extra" would be noise
        raise SampleSetError(folder, problems)
    problems += _record_problems(rows)
    problems += _folder_problems(folder, rows)
    sizes = {}
    for row in rows:
        rel = row.get("path")
        if isinstance(rel, str) and rel.lower().endswith(".png") and (folder / rel).is_file():
            size, found = _image_problems(folder / rel, allow_blank)
            problems += found
            if size is not None:
                sizes[rel] = tuple(int(v) for v in size)
    if sizes:
        problems += _resolution_problems(sizes, resolution)
    if expected is not None:
        problems += _expected_problems(rows, expected)
    if problems:
        raise SampleSetError(folder, problems)
    return SampleSet(folder=folder, records=rows, resolution=next(iter(sizes.values())))
