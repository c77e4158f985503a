"""GenEval's official prompt set (djghosh13/geneval): its task tables and the metadata reader.

The 553-prompt metadata file (`prompts/evaluation_metadata.jsonl` of the GenEval repository) is read
from the weights cache (`$FEWSTEP_WEIGHTS/prompts/geneval/`), checked line by line and against the
official task sizes (metrics/notes/metrics.md sec. 4.1), and its sha256 is returned so that every
result names the exact prompt set; a file that is not the official set is reported, not used
silently.

Core, not metrics: the prompt sets (fewstep.prompt_sets) read it while the DAG is parsed, which
must not pay for numpy, PIL or any metric; the GenEval metrics import these tables from here.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from fewstep.backbones.weights import MissingWeightsError, weights_root

METADATA_FILE = "prompts/geneval/evaluation_metadata.jsonl"
METADATA_SOURCE = "github.com/djghosh13/geneval, file prompts/evaluation_metadata.jsonl"
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
TASK_SIZES = {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94,
              "position": 100, "color_attr": 100}
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")


def _clause_problems(where: str, clause, n_include: int, include: bool) -> list[str]:
    if not isinstance(clause, dict) or not isinstance(clause.get("class"), str):
        return [f"{where}: a clause must be an object with a 'class' string"]
    problems = []
    if not isinstance(clause.get("count", 1), int) or clause.get("count", 1) < 1:
        problems.append(f"{where}: count must be a positive integer")
    if include and "color" in clause and clause["color"] not in COLOURS:
        problems.append(f"{where}: colour {clause['color']!r} is not one of GenEval's {COLOURS}")
    if include and "position" in clause:
        pos = clause["position"]
        if not (isinstance(pos, list) and len(pos) == 2 and pos[0] in RELATIONS
                and isinstance(pos[1], int) and 0 <= pos[1] < n_include):
            problems.append(f"{where}: position must be [relation in {RELATIONS}, index of "
                            f"another include clause], got {pos!r}")
    return problems


def metadata_problems(index: int, meta) -> list[str]:
    where = f"line {index + 1}"
    if not isinstance(meta, dict):
        return [f"{where}: not a JSON object"]
    problems = [] if meta.get("tag") in TASKS else [f"{where}: tag {meta.get('tag')!r} not in {TASKS}"]
    if not isinstance(meta.get("prompt"), str) or not meta["prompt"].strip():
        problems.append(f"{where}: 'prompt' must be a non-empty string")
    include = meta.get("include")
    if not isinstance(include, list) or not include:
        return problems + [f"{where}: 'include' must be a non-empty list of clauses"]
    for k, clause in enumerate(include):
        problems += _clause_problems(f"{where} include[{k}]", clause, len(include), True)
    for k, clause in enumerate(meta.get("exclude", [])):
        problems += _clause_problems(f"{where} exclude[{k}]", clause, len(include), False)
    return problems


def read_metadata(path=None, require_official: bool = True) -> tuple[list[dict], str]:
    """(prompt rows with prompt_id = 5-digit index, sha256 of the file) of GenEval's metadata."""
    path = Path(path) if path else weights_root() / METADATA_FILE
    if not path.is_file():
        raise MissingWeightsError(
            f"GenEval prompt metadata not found: expected {path} (source: {METADATA_SOURCE}). Put "
            f"the file at $FEWSTEP_WEIGHTS/{METADATA_FILE} (FEWSTEP_WEIGHTS names the cache, now "
            f"{weights_root()}), or pass its path.")
    raw = path.read_bytes()
    lines = [line for line in raw.decode("utf-8").splitlines() if line.strip()]
    metas, problems = [], []
    for i, line in enumerate(lines):
        try:
            meta = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"line {i + 1}: not JSON ({err.msg})")
            continue
        problems += metadata_problems(i, meta)
        metas.append(meta)
    sizes = dict(Counter(m.get("tag") for m in metas if isinstance(m, dict)))
    if require_official and sizes != TASK_SIZES:
        problems.append(f"task sizes {sizes} differ from the official set's {TASK_SIZES} "
                        f"({sum(TASK_SIZES.values())} prompts); a GenEval number needs the whole "
                        "official file (pass require_official=False for a deliberate subset)")
    if problems:
        raise ValueError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems[:8]))
    rows = [{"prompt_id": f"{i:05d}", "prompt": m["prompt"], **m} for i, m in enumerate(metas)]
    return rows, hashlib.sha256(raw).hexdigest()
