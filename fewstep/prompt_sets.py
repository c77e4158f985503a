"""Benchmark prompt sets read from the data folder, each with a content hash.

The papers' claims use fixed prompt sets (fewstep/notes/claims.md): the HPD v2 benchmark prompts
(HPSv2), GenEval's 553 prompts, COCO-2014 val captions (10K / 30K subsets), DrawBench, and the 1000
ImageNet classes (SiT). Mixing up subsets silently changes numbers (fewstep/notes/pitfalls.md item
13), so every set is read from its original upstream file under the weights/data cache
`$FEWSTEP_WEIGHTS/prompts/<set>/` (sec. 6; the harness never downloads) and named by a hash that
every score can carry (metrics/notes/metrics.md, top).

Cache layout (relative to $FEWSTEP_WEIGHTS):
* `prompts/hpdv2/{anime,concept-art,paintings,photo}.json`: JSON lists of 800 strings
  (sec. 1.5).
* `prompts/geneval/evaluation_metadata.jsonl`: read by fewstep.geneval_prompts.read_metadata.
* `prompts/coco2014/annotations/captions_val2014.json`: the COCO file keeps its own folder name
  (`annotations/`, as the official zip unpacks) under a set folder `coco2014/`.
* `prompts/imagenet/classes.txt`: 1000 lines, line k+1 is the name of class id k.
* `prompts/drawbench/drawbench.csv`: columns `Prompts,Category` (200 prompts).

Canonical hash (`PromptSet.sha256`): sha256 over the concatenation, in row order, of one line per
prompt, `json.dumps([prompt_id, prompt], ensure_ascii=True, separators=(",", ":")) + "\\n"`, as
UTF-8 bytes. The same ids and texts in the same order give the same hash whatever the source file's
layout (indentation, CSV quoting, our jsonl); each source file's own sha256 is kept in `files`.

Choices (uncertain; recorded here so they can be revisited):
* GenEval rows are read_metadata's rows unchanged: the GenEval metadata dict itself (`tag`,
  `include`, `exclude` at top level) plus prompt_id. A prompt row becomes the sample record's `meta`
  (commands/sample.py) and the GenEval scorer reads `meta["tag"]` / `meta["include"]`, so nesting
  the dict under a `meta` key would break scoring; the row *is* the meta.
* ImageNet rows carry `class_id` and the same value as `class_label`, the key the samplers and the
  scorer read for class-conditional families (commands/sample.py, fewstep/scoring.py). Class names
  may repeat in ImageNet (two "crane" classes), so only ids must be unique. The hash depends on the
  naming list; a suggested one is timm's `ImageNetInfo().index_to_description(i)` for i < 1000.
* Text is kept verbatim for HPD v2, GenEval and DrawBench (upstream text is the protocol); COCO
  captions and ImageNet lines are stripped of surrounding whitespace (trailing spaces and CR are
  layout there). Empty rows at the end of a CSV or text file are ignored; a blank line inside
  classes.txt is refused because it would shift every later class id.
* COCO subset rule: one caption per image (the annotation with the lowest id), images sorted by id,
  `numpy.random.default_rng(seed).permutation(n_images)`, first n, kept in permutation order (so the
  first 10K of the 30K-s0 set is the 10K-s0 set). This is our rule, not DMD2's exact 10K list
  (fewstep/notes/claims.md: "seed 123"); a claim that needs DMD2's list is reported as a hash
  mismatch by check_hash. numpy may change Generator streams across major versions; the hash would
  show it.
* `require_official=True` checks the official counts (HPD v2: 800 per style; GenEval: task sizes;
  COCO: 40,504 val images; ImageNet: 1000 classes; DrawBench: 200 prompts); False accepts any
  non-empty file (tests, deliberate subsets).
* The prompt file written by write_prompt_file holds only prompt rows (fewstep.prompts.read_prompts
  accepts nothing else); its provenance (set name, hash, source files' hashes) goes to a sidecar
  `<file>.provenance.json`, written first, so a prompt file never exists without it.
Sections (sec. N) are those of metrics/notes/metrics.md.
"""
from __future__ import annotations

import csv
import hashlib
import inspect
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from fewstep.backbones.weights import WeightFile, require_entry
from fewstep.errors import FewstepError, did_you_mean
from fewstep.geneval_prompts import METADATA_FILE, METADATA_SOURCE, read_metadata
from fewstep.io import write_json, write_text
from fewstep.registry import UnknownNameError

HASH_RULE = ('sha256 of the UTF-8 lines json.dumps([prompt_id, prompt], ensure_ascii=True, '
             'separators=(",", ":")) + "\\n", in row order')

HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")  # sec. 1.5, in this order
HPDV2_PROMPTS_PER_STYLE = 800
HPDV2_FILES = tuple(WeightFile(f"prompts/hpdv2/{style}.json",
                               f"Hugging Face dataset zhwang/HPDv2, file benchmark/{style}.json")
                    for style in HPDV2_STYLES)
COCO_FILE = WeightFile("prompts/coco2014/annotations/captions_val2014.json",
                       "COCO 2014 Train/Val annotations (cocodataset.org, annotations_trainval2014"
                       ".zip), file annotations/captions_val2014.json")
COCO_VAL2014_IMAGES = 40_504  # sec. 3.8
IMAGENET_FILE = WeightFile("prompts/imagenet/classes.txt",
                           "the 1000 ILSVRC-2012 class names in class-id order, one per line (e.g. "
                           "written from timm: ImageNetInfo().index_to_description(i), i < 1000)")
IMAGENET_CLASSES = 1000
DRAWBENCH_FILE = WeightFile("prompts/drawbench/drawbench.csv",
                            "DrawBench (Imagen, Saharia et al. 2022): the Google Sheet of prompts, "
                            "exported as CSV with columns Prompts,Category")
DRAWBENCH_PROMPTS = 200
DRAWBENCH_COLUMNS = ("Prompts", "Category")
GENEVAL_FILE = WeightFile(METADATA_FILE, METADATA_SOURCE)


@dataclass(frozen=True)
class PromptSet:
    name: str                  # e.g. "hpdv2", "coco2014-val-captions-10k-s0"
    rows: list[dict]           # prompt_id, prompt, and set-specific fields
    sha256: str                # canonical content hash (module docstring)
    files: dict[str, str]      # cache-relative source file -> sha256 of its bytes
    source: str                # where a user gets the files
    params: dict = field(default_factory=dict)  # loader options that shaped the rows (n, seed)


# -- shared helpers --------------------------------------------------------------------------------

def canonical_sha256(rows) -> str:
    """The content hash of (prompt_id, prompt) pairs in order; independent of file layout."""
    digest = hashlib.sha256()
    for row in rows:
        line = json.dumps([row["prompt_id"], row["prompt"]], ensure_ascii=True,
                          separators=(",", ":"))
        digest.update(line.encode("utf-8") + b"\n")
    return digest.hexdigest()


def _finish(name: str, rows: list[dict], files: dict, source: str, where, params=None) -> PromptSet:
    """Check what every set must satisfy (string prompts, unique ids), then hash."""
    seen = set()
    for row in rows:
        if not isinstance(row["prompt"], str):
            raise FewstepError(f"{where}: prompt {row['prompt_id']!r} is {row['prompt']!r}, "
                               "expected a string")
        if row["prompt_id"] in seen:
            raise FewstepError(f"{where}: duplicate prompt_id {row['prompt_id']!r}")
        seen.add(row["prompt_id"])
    return PromptSet(name, rows, canonical_sha256(rows), dict(files), source, dict(params or {}))


def _read(wf: WeightFile, what: str) -> tuple[Path, bytes, str]:
    """(path, bytes, sha256 of exactly the bytes parsed) of a cache file; MissingWeightsError if
    it is absent."""
    path = require_entry(wf.path, wf.source, what)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise FewstepError(f"cannot read {path}: {err.strerror}") from None
    return path, raw, hashlib.sha256(raw).hexdigest()


def _decode(path: Path, raw: bytes, encoding: str = "utf-8") -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError:
        raise FewstepError(f"{path} is not UTF-8 text") from None


def _parse_json(path: Path, raw: bytes):
    try:
        return json.loads(_decode(path, raw))
    except json.JSONDecodeError as err:
        raise FewstepError(f"{path}: not JSON ({err.msg}, line {err.lineno})") from None


def _check_count(path, got: int, expected: int, require_official: bool, what: str) -> None:
    if require_official and got != expected:
        raise FewstepError(f"{path}: {got} {what}, expected {expected} (the official set); pass "
                           "require_official=False (CLI: --allow-unofficial) for a deliberate "
                           "subset")
    if got == 0:
        raise FewstepError(f"{path}: holds no {what}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- the sets --------------------------------------------------------------------------------------

def load_hpdv2(require_official: bool = True) -> PromptSet:
    """HPD v2 benchmark: 4 styles x 800 prompts, ids '<style>-<index>' (sec. 1.5)."""
    what = "HPD v2 benchmark prompts ({})"
    for style, wf in zip(HPDV2_STYLES, HPDV2_FILES):  # any missing file before any content error
        require_entry(wf.path, wf.source, what.format(style))
    rows, files = [], {}
    for style, wf in zip(HPDV2_STYLES, HPDV2_FILES):
        path, raw, sha = _read(wf, what.format(style))
        prompts = _parse_json(path, raw)
        if not isinstance(prompts, list):
            raise FewstepError(f"{path}: expected a JSON list of prompt strings, got "
                               f"{type(prompts).__name__}")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise FewstepError(f"{path}: expected a JSON list of prompt strings; item {bad[0]} is "
                               f"{prompts[bad[0]]!r}")
        _check_count(path, len(prompts), HPDV2_PROMPTS_PER_STYLE, require_official, "prompts")
        files[wf.path] = sha
        rows += [{"prompt_id": f"{style}-{i:03d}", "prompt": p, "style": style}
                 for i, p in enumerate(prompts)]
    return _finish("hpdv2", rows, files, "Hugging Face dataset zhwang/HPDv2, folder benchmark/",
                   "prompts/hpdv2/")


def load_geneval(require_official: bool = True) -> PromptSet:
    """GenEval's 553 prompts via read_metadata (sec. 4.1); rows are the metadata dicts."""
    try:
        rows, sha = read_metadata(require_official=require_official)
    except ValueError as err:  # read_metadata's message names the file and every problem
        raise FewstepError(f"GenEval prompt metadata is malformed: {err}") from None
    return _finish("geneval", rows, {GENEVAL_FILE.path: sha}, GENEVAL_FILE.source,
                   GENEVAL_FILE.path)


def _coco_image_ids(path, data) -> set[int]:
    if not (isinstance(data, dict) and isinstance(data.get("images"), list)
            and isinstance(data.get("annotations"), list)):
        raise FewstepError(f"{path}: expected COCO captions JSON, an object with 'images' and "
                           "'annotations' lists")
    ids = set()
    for k, image in enumerate(data["images"]):
        if not (isinstance(image, dict) and _is_int(image.get("id"))):
            raise FewstepError(f"{path}: images[{k}] must be an object with an integer 'id'")
        if image["id"] in ids:
            raise FewstepError(f"{path}: duplicate image id {image['id']}")
        ids.add(image["id"])
    return ids


def coco_first_captions(path, data) -> list[tuple[int, int, str]]:
    """(image_id, annotation id, stripped caption) per image, the lowest annotation id per image,
    sorted by image id."""
    image_ids, best = _coco_image_ids(path, data), {}
    for k, ann in enumerate(data["annotations"]):
        if not (isinstance(ann, dict) and _is_int(ann.get("id")) and _is_int(ann.get("image_id"))
                and isinstance(ann.get("caption"), str)):
            raise FewstepError(f"{path}: annotations[{k}] must have integer 'id' and 'image_id' "
                               "and a string 'caption'")
        if ann["image_id"] not in image_ids:
            raise FewstepError(f"{path}: annotations[{k}] names image {ann['image_id']}, which is "
                               "not in 'images'")
        if ann["image_id"] not in best or ann["id"] < best[ann["image_id"]][0]:
            best[ann["image_id"]] = (ann["id"], ann["caption"].strip())
    uncaptioned = sorted(image_ids - best.keys())
    if uncaptioned:
        raise FewstepError(f"{path}: {len(uncaptioned)} images have no caption (e.g. "
                           f"{uncaptioned[:3]}); expected at least one per image")
    return [(image_id, *best[image_id]) for image_id in sorted(image_ids)]


def _count_label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def load_coco2014_val_captions(n: int = 10_000, seed: int = 0,
                               require_official: bool = True) -> PromptSet:
    """n COCO-2014 val captions, one per image, drawn by the seeded rule of the module docstring."""
    import numpy as np

    if not (_is_int(n) and n > 0) or not (_is_int(seed) and seed >= 0):
        raise FewstepError(f"COCO captions: n must be a positive integer and seed a non-negative "
                           f"integer, got n={n!r}, seed={seed!r}")
    path, raw, sha = _read(COCO_FILE, "COCO 2014 val captions")
    captions = coco_first_captions(path, _parse_json(path, raw))
    _check_count(path, len(captions), COCO_VAL2014_IMAGES, require_official, "captioned images")
    if n > len(captions):
        raise FewstepError(f"{path}: n={n} captions asked for, but the file has {len(captions)} "
                           "images (one caption per image)")
    order = np.random.default_rng(seed).permutation(len(captions))[:n]
    rows = [{"prompt_id": f"coco-{image_id:012d}", "prompt": caption, "image_id": image_id,
             "caption_id": ann_id}
            for image_id, ann_id, caption in (captions[i] for i in order)]
    return _finish(f"coco2014-val-captions-{_count_label(n)}-s{seed}", rows, {COCO_FILE.path: sha},
                   COCO_FILE.source, path, {"n": n, "seed": seed})


def load_imagenet_classes(require_official: bool = True) -> PromptSet:
    """The 1000 ImageNet classes for class-conditional SiT: prompt = class name."""
    path, raw, sha = _read(IMAGENET_FILE, "ImageNet class names")
    lines = _decode(path, raw).splitlines()
    while lines and not lines[-1].strip():  # trailing empty lines are layout, not classes
        lines.pop()
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise FewstepError(f"{path}: blank line(s) {blank[:5]}; expected one class name per line "
                           "(line k+1 = class id k), a blank line would shift the later ids")
    _check_count(path, len(lines), IMAGENET_CLASSES, require_official, "class names (lines)")
    rows = [{"prompt_id": f"class-{i:03d}", "prompt": name.strip(), "class_id": i,
             "class_label": i} for i, name in enumerate(lines)]
    return _finish("imagenet-classes", rows, {IMAGENET_FILE.path: sha}, IMAGENET_FILE.source, path)


def _drawbench_columns(path, header) -> tuple[int, int]:
    names = [h.strip() for h in header or []]
    missing = [c for c in DRAWBENCH_COLUMNS if c not in names]
    if missing:
        raise FewstepError(f"{path}: header {header!r} lacks column(s) {missing}; expected a CSV "
                           f"with columns {','.join(DRAWBENCH_COLUMNS)}")
    return names.index("Prompts"), names.index("Category")


def load_drawbench(require_official: bool = True) -> PromptSet:
    """DrawBench's 200 prompts with their category; rows carry `category`."""
    path, raw, sha = _read(DRAWBENCH_FILE, "DrawBench prompts")
    # utf-8-sig: spreadsheet exports often start with a byte-order mark
    reader = csv.reader(io.StringIO(_decode(path, raw, "utf-8-sig"), newline=""))
    try:
        i_prompt, i_category = _drawbench_columns(path, next(reader, None))
        records = [(reader.line_num, rec) for rec in reader if any(c.strip() for c in rec)]
    except csv.Error as err:
        raise FewstepError(f"{path}: not valid CSV ({err})") from None
    rows = []
    for line, rec in records:
        if len(rec) <= max(i_prompt, i_category) or not rec[i_prompt].strip():
            raise FewstepError(f"{path}, line {line}: expected a prompt and a category, "
                               f"got {rec!r}")
        rows.append({"prompt_id": f"drawbench-{len(rows):03d}", "prompt": rec[i_prompt],
                     "category": rec[i_category].strip()})
    _check_count(path, len(rows), DRAWBENCH_PROMPTS, require_official, "prompts")
    return _finish("drawbench", rows, {DRAWBENCH_FILE.path: sha}, DRAWBENCH_FILE.source, path)


PROMPT_SETS = {
    "hpdv2": load_hpdv2,
    "geneval": load_geneval,
    "coco2014-val-captions": load_coco2014_val_captions,
    "imagenet-classes": load_imagenet_classes,
    "drawbench": load_drawbench,
}
SET_FILES = {  # what each set reads from the cache, for `fewstep weights check`-style listings
    "hpdv2": HPDV2_FILES, "geneval": (GENEVAL_FILE,), "coco2014-val-captions": (COCO_FILE,),
    "imagenet-classes": (IMAGENET_FILE,), "drawbench": (DRAWBENCH_FILE,),
}


def check_prompt_set(name: str, options=()) -> None:
    """A registered set name and option names its loader takes; else an error listing the valid
    ones (config validation calls this before any file is read)."""
    if name not in PROMPT_SETS:
        raise UnknownNameError(f"unknown prompt set {name!r}.{did_you_mean(name, PROMPT_SETS)} "
                               f"Known prompt sets: {', '.join(sorted(PROMPT_SETS))}.")
    takes = list(inspect.signature(PROMPT_SETS[name]).parameters)
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise FewstepError(f"prompt set {name!r} takes no option(s) {unknown}; its options: "
                           f"{takes}")


def load_prompt_set(name: str, **kw) -> PromptSet:
    """Load a registered set; unknown names and options get an error that lists the valid ones."""
    check_prompt_set(name, kw)
    return PROMPT_SETS[name](**kw)


# -- hash check and the harness's prompt file ------------------------------------------------------

def check_hash(prompt_set: PromptSet, expected_sha256: str | None, needed_by: str) -> str | None:
    """None when the set is the expected one (or nothing is expected); else a message for the
    caller to report (the claims audit marks a protocol mismatch). Never raises."""
    if expected_sha256 is None:
        return None
    expected = str(expected_sha256).strip().lower()
    actual = getattr(prompt_set, "sha256", None)
    if expected == actual:
        return None
    name = getattr(prompt_set, "name", "?")
    files = ", ".join(getattr(prompt_set, "files", None) or {}) or "no files"
    return (f"{needed_by} needs prompt set {name} with sha256 {expected}; the data folder holds "
            f"{actual} (from {files}): a different prompt set, so the numbers are not comparable")


def provenance_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".provenance.json")


def load_prompt_file(path) -> PromptSet:
    """A user's own prompt file (e.g. training captions) as a set named after the file."""
    from fewstep.prompts import read_prompts

    from fewstep.train_data import resolve_data

    path = resolve_data(path)
    rows = read_prompts(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return _finish(f"file:{path.name}", rows, {str(path.resolve()): sha}, str(path.resolve()), path)


def write_prompt_file(prompt_set: PromptSet, path) -> dict:
    """Write the set as our prompt jsonl (fewstep.prompts) plus `<path>.provenance.json`."""
    prov = {"prompt_set": prompt_set.name, "sha256": prompt_set.sha256, "sha256_rule": HASH_RULE,
            "n_prompts": len(prompt_set.rows), "params": prompt_set.params,
            "source": prompt_set.source, "files": prompt_set.files}
    # sidecar first: once the prompt file exists (a DAG rule's output), its provenance does too
    write_json(provenance_path(path), prov)
    # ensure_ascii (json default): read_prompts decodes with the locale encoding
    write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in prompt_set.rows))
    return prov


def prompt_file_sha256(path) -> str:
    """The canonical hash of a written prompt file, to compare with its sidecar's `sha256`."""
    from fewstep.prompts import read_prompts

    return canonical_sha256(read_prompts(path))
