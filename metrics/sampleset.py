"""Sample sets on disk: a flat folder of PNGs plus `manifest.jsonl`.

Metrics read sample sets from disk, never tensors in memory, and refuse an incomplete or corrupt set
instead of shrinking their denominator (fewstep/notes/pitfalls.md C.12): every problem found is
named in one error.

Sets are verified by content, not only structure: a relabelled record, a row with another NFE, two
images swapped across prompts or an image replaced by another valid PNG are all refused.

Manifest (format 2), one JSON object per line:
* line 1, the header: {"fewstep_sample_set": 2, the set-level fields (family, method, nfe; steps and
  guidance when given), "images": the row count, "prompt_set_sha256": hash of the distinct
  (prompt_id, prompt, meta) triples};
* then one row per image: prompt_id, prompt, "prompt_sha256" (sha256 of the prompt text), seed,
  path, "image_sha256" (sha256 of the PNG file's bytes) and task metadata under "meta" (the
  prompt file's row, which holds the GenEval dict for text-to-image prompts).
A record (what metrics read) is a row with the header's set-level fields and without the hashes,
i.e. the dict the writer was given plus its path.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from fewstep.io import atomic_path

MANIFEST = "manifest.jsonl"
REQUIRED_KEYS = ("prompt_id", "prompt", "seed", "family", "method", "nfe", "path")
SET_KEYS = ("family", "method", "nfe", "steps", "guidance")  # one value per set: in the header
REQUIRED_SET_KEYS = ("family", "method", "nfe")
HASH_KEYS = ("prompt_sha256", "image_sha256")  # in manifest rows, not in records
FORMAT_KEY, FORMAT_VERSION = "fewstep_sample_set", 2
RESAMPLE = "resample the set (fewstep sample; in the DAG, rerun its sample rule)"
RESAMPLE_HINT = ("resample it: `fewstep sample --teacher ... --prompts ... --out <folder>` (in the "
                 "DAG: delete the folder and rerun its sample rule, sample_teacher or sample_student)")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_LISTED_PROBLEMS = 20
SHARD_FILE = "shard.json"  # in a shard folder (fewstep sample --shard): which shard of which set
SIDECARS = ("provenance.json", SHARD_FILE)  # what sampling writes beside the images (not images)


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
    """A validated sample set: records in manifest order, the common image size (H, W), the
    manifest's header and the sha256 of the manifest's bytes (what a score file names)."""
    folder: Path
    records: list[dict]
    resolution: tuple[int, int]
    header: dict
    manifest_sha256: str

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
        return prompt_set_sha256(self.records)

    def load_image(self, index: int) -> np.ndarray:
        """The image as uint8 (H, W, 3)."""
        return read_png_rgb(self.folder / self.records[index]["path"])


def prompt_set_sha256(records: Sequence[dict]) -> str:
    triples = sorted({json.dumps([r["prompt_id"], r["prompt"], r.get("meta")], sort_keys=True)
                      for r in records})
    return hashlib.sha256("\n".join(triples).encode()).hexdigest()


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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

    `records` hold the manifest keys except "path", which is assigned (`000000.png`, ...) unless
    given; the set-level fields (SET_KEYS) must be equal across records and go once into the header.
    A reader never sees a half-written set: the final folder appears only once everything is on disk.
    """
    folder = Path(folder)
    arr = to_uint8_images(images)
    if len(arr) != len(records):
        raise ValueError(f"{len(arr)} images but {len(records)} records; pass one record per image")
    records = [_completed_record(i, r) for i, r in enumerate(records)]
    problems = _record_problems(records) + _set_field_problems(records)
    if problems:
        raise SampleSetError(folder, problems)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists; pass overwrite=True to replace it")
    hashes = []
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for img, record in zip(arr, records):
            data = png_bytes(img)  # hashed as written: the reader hashes the same file bytes
            (tmp / record["path"]).write_bytes(data)
            hashes.append(hashlib.sha256(data).hexdigest())
        (tmp / MANIFEST).write_text(manifest_text(records, hashes))
    return folder


def manifest_text(records: Sequence[dict], image_sha256s: Sequence[str]) -> str:
    """The manifest's bytes (as text) for these records and their PNGs' hashes: the one writer of
    a manifest, so a gathered set's manifest is the unsharded set's byte for byte."""
    lines = [header_of(records)] + [manifest_row(r, h) for r, h in zip(records, image_sha256s)]
    return "".join(json.dumps(x, sort_keys=True) + "\n" for x in lines)


def _completed_record(index: int, record: dict) -> dict:
    row = dict(record)
    row.setdefault("path", default_image_name(index))
    return row


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def _set_field_problems(records: Sequence[dict]) -> list[str]:
    """A set is one sampler setting: each set-level field has one value, or is absent, in all."""
    problems = []
    for key in SET_KEYS:
        values = {json.dumps(r.get(key, "<absent>"), sort_keys=True) for r in records}
        if len(values) > 1:
            problems.append(f"records disagree on {key} ({', '.join(sorted(values))}): a sample "
                            "set is one sampler setting; write one set per setting")
    return problems


def header_of(records: Sequence[dict]) -> dict:
    """The manifest's first line: format, set-level fields, image count, prompt-set hash."""
    fields = {k: records[0][k] for k in SET_KEYS if k in records[0]}
    return {FORMAT_KEY: FORMAT_VERSION, **fields, "images": len(records),
            "prompt_set_sha256": prompt_set_sha256(records)}


def manifest_row(record: dict, image_sha256: str) -> dict:
    row = {k: v for k, v in record.items() if k not in SET_KEYS}
    return {**row, "prompt_sha256": text_sha256(record["prompt"]), "image_sha256": image_sha256}


def record_of(header: dict, row: dict) -> dict:
    """What metrics read: the row with the header's set-level fields, without the hashes."""
    record = {k: v for k, v in row.items() if k not in HASH_KEYS}
    record.update({k: header[k] for k in SET_KEYS if k in header})
    return dict(sorted(record.items()))  # key order as the writer's sort_keys manifest had it


# ----------------------------------------------------------------------------------------- reading

def read_png_rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@dataclass(frozen=True)
class Manifest:
    """A parsed manifest: its header (None when unusable), raw rows, problems, bytes' sha256."""
    header: dict | None
    rows: list[dict]
    problems: list[str]
    sha256: str | None = None


def read_manifest(folder) -> tuple[list[dict], list[str]]:
    """The records (header fields merged in, hashes left out) and the problems found parsing."""
    m = parse_manifest(folder)
    return ([record_of(m.header, r) for r in m.rows] if m.header else []), m.problems


def parse_manifest(folder) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return Manifest(None, [], [f"missing {MANIFEST} in {folder}; write sample sets with "
                                   "write_sample_set"])
    data = path.read_bytes()  # hashed and parsed from the same bytes: the score names what it read
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return Manifest(None, [], [f"{MANIFEST} is not UTF-8 text; {RESAMPLE_HINT}"])
    lines, problems = _json_lines(text)
    if not lines and not problems:
        problems.append(f"{MANIFEST} is empty: a sample set needs at least one image")
    if not lines:
        return Manifest(None, [], problems)
    if FORMAT_KEY not in lines[0]:
        # the format before hashes: nothing to verify the images against
        return Manifest(None, [], problems + [
            f"{MANIFEST} has no header (an old-format set written before image hashes were "
            f"recorded, or not written by write_sample_set), so its content cannot be verified; "
            f"{RESAMPLE_HINT}"])
    header, rows = lines[0], lines[1:]
    if header[FORMAT_KEY] != FORMAT_VERSION:
        problems.append(f"{MANIFEST} has format {header[FORMAT_KEY]!r}, this fewstep reads "
                        f"{FORMAT_VERSION}; {RESAMPLE_HINT}")
    problems += [f"{MANIFEST} row {i}: a second header; one header, on the first line"
                 for i, row in enumerate(rows) if FORMAT_KEY in row]
    return Manifest(header, rows, problems, hashlib.sha256(data).hexdigest())


def _json_lines(text: str) -> tuple[list[dict], list[str]]:
    """The JSON objects of a .jsonl text and the lines that are not JSON objects."""
    rows, problems = [], []
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 etc.
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
        if not isinstance(row["prompt"], str):
            problems.append(f"{where}: prompt must be a string, got {row['prompt']!r}")
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


def _image_problems(path: Path, data: bytes,
                    allow_blank: bool) -> tuple[tuple[int, int] | None, list[str]]:
    """The image's (H, W) and its problems: not a PNG, not RGB, unreadable, or blank."""
    if data[:len(PNG_MAGIC)] != PNG_MAGIC:
        return None, [f"{path.name} is not a PNG file (wrong magic bytes; e.g. a renamed JPEG)"]
    try:
        with Image.open(io.BytesIO(data)) as im:
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


def _header_problems(header: dict, rows: Sequence[dict]) -> list[str]:
    """The header's own fields, then every row against it: one sampler setting, the row count."""
    problems = [f"header: missing {k}; {RESAMPLE}" for k in REQUIRED_SET_KEYS if k not in header]
    if header.get("images") != len(rows):
        problems.append(f"header: {header.get('images')!r} images but {MANIFEST} lists {len(rows)} "
                        f"rows: a row was added or removed after sampling; {RESAMPLE}")
    for i, row in enumerate(rows):
        problems += [f"record {i} ({row.get('path', '?')}): {k}={row[k]!r} disagrees with the "
                     f"header's {k}={header.get(k)!r}; a sample set is one sampler setting, stated "
                     f"once in its header; {RESAMPLE}"
                     for k in SET_KEYS if k in row and row[k] != header.get(k)]
    return problems


def _prompt_hash_problems(header: dict, rows: Sequence[dict], records: Sequence[dict]) -> list[str]:
    """Each row's prompt text against its prompt_sha256, and all prompts and metadata against the
    header's prompt-set hash (which catches a record relabelled together with its hash)."""
    problems = [f"record {i} ({row.get('path', '?')}): prompt_sha256 does not match its prompt "
                f"{row['prompt']!r}: the prompt was edited after sampling; {RESAMPLE}"
                for i, row in enumerate(rows)
                if isinstance(row.get("prompt"), str)
                and row.get("prompt_sha256") != text_sha256(row["prompt"])]
    if all("prompt_id" in r and "prompt" in r for r in records) and \
            header.get("prompt_set_sha256") != prompt_set_sha256(records):
        problems.append("the records' prompts and metadata are not the header's prompt set "
                        "(prompt_set_sha256 differs): a record was relabelled or its meta edited "
                        f"after sampling; {RESAMPLE}")
    return problems


def _image_file_problems(folder: Path, rows: Sequence[dict],
                         allow_blank: bool) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Each listed PNG: its bytes against the row's image_sha256, then a decodable, non-blank
    8-bit RGB image. Returns the images' (H, W) by path, and the problems."""
    sizes, problems = {}, []
    for row in rows:
        rel = row.get("path")
        if not (isinstance(rel, str) and rel.lower().endswith(".png") and (folder / rel).is_file()):
            continue  # a bad or missing path is named by _record_problems / _folder_problems
        data = (folder / rel).read_bytes()
        actual, want = hashlib.sha256(data).hexdigest(), row.get("image_sha256")
        if want is None:
            problems.append(f"{rel}: its manifest row has no image_sha256; {RESAMPLE}")
        elif actual != want:
            problems.append(f"{rel}: sha256 {actual[:12]} is not the manifest's {str(want)[:12]}: "
                            f"the file was replaced or swapped after sampling; {RESAMPLE}")
        size, found = _image_problems(folder / rel, data, allow_blank)
        problems += found
        if size is not None:
            sizes[rel] = tuple(int(v) for v in size)
    return sizes, problems


def _prompt_file_problems(records: Sequence[dict], prompts: Sequence[dict]) -> list[str]:
    """Each record's prompt text and meta against the prompt file's row of its prompt_id: the
    (prompt_id, seed) grid alone accepts a set sampled from other prompts under the same ids."""
    by_id = {str(p["prompt_id"]): p for p in prompts}
    problems = []
    for i, r in enumerate(records):
        where, pid = f"record {i} ({r.get('path', '?')})", r.get("prompt_id")
        want = by_id.get(str(pid))
        if want is None:
            problems.append(f"{where}: prompt_id {pid!r} is not in the prompt file; score the set "
                            "with the prompt file it was sampled from")
            continue
        diffs = _prompt_differences(r, want)
        if diffs:
            problems.append(f"{where}: {'; '.join(diffs)} (prompt_id {pid!r}, against the prompt "
                            "file's row): the set was sampled from other prompts; score it with "
                            "its own prompt file or resample it with this one "
                            "(fewstep sample --prompts)")
    return problems


def _prompt_differences(record: dict, want: dict) -> list[str]:
    diffs = []
    if record.get("prompt") != want.get("prompt"):
        diffs.append(f"prompt {record.get('prompt')!r} is not the prompt file's "
                     f"{want.get('prompt')!r}")
    meta = record.get("meta")
    if meta != want:  # `fewstep sample` stores the prompt file's whole row as meta
        keys = (sorted(k for k in set(meta) | set(want) if meta.get(k) != want.get(k))
                if isinstance(meta, dict) else None)
        diffs.append(f"meta differs in {keys}" if keys else "meta is not the prompt file's row")
    return diffs


def load_sample_set(folder, expected=None, resolution=None, *, allow_blank: bool = False,
                    prompts: Sequence[dict] | None = None) -> SampleSet:
    """Validate and load a sample set; raise SampleSetError naming every problem.

    Checks structure (keys, files, PNGs, sizes) and content: every row against the header, every
    image against its sha256, the prompts against their hashes. expected: the (prompt_id, seed)
    grid the set must cover exactly; resolution: int or (H, W); prompts: the prompt file's rows
    (fewstep.prompts.read_prompts), which each record's prompt text and meta must equal.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SampleSetError(folder, [f"{folder} is not a folder"])
    m = parse_manifest(folder)
    if m.header is None or not m.rows:  # no usable manifest: listing every image would be noise
        raise SampleSetError(folder, m.problems or [
            f"{MANIFEST} has a header but no image rows: a sample set needs at least one image"])
    records = [record_of(m.header, row) for row in m.rows]
    problems = m.problems + _record_problems(records) + _header_problems(m.header, m.rows)
    problems += _prompt_hash_problems(m.header, m.rows, records)
    problems += _folder_problems(folder, records)
    sizes, found = _image_file_problems(folder, m.rows, allow_blank)
    problems += found
    if sizes:
        problems += _resolution_problems(sizes, resolution)
    if expected is not None:
        problems += _expected_problems(records, expected)
    if prompts is not None:
        problems += _prompt_file_problems(records, prompts)
    if problems:
        raise SampleSetError(folder, problems)
    return SampleSet(folder=folder, records=records, resolution=next(iter(sizes.values())),
                     header=m.header, manifest_sha256=m.sha256)
