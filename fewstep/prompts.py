"""Reading prompt files: one JSON object per line with at least prompt_id and prompt."""
from __future__ import annotations

import json
from pathlib import Path

from fewstep.errors import FewstepError


def read_prompts(path) -> list[dict]:
    path = Path(path)
    try:
        lines = path.read_text().split("\n")  # JSON strings may hold U+2028 and the like
    except OSError as err:
        raise FewstepError(f"cannot read prompt file {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise FewstepError(f"prompt file {path} is not UTF-8 text") from None
    rows, seen = [], set()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise FewstepError(f"prompt file {path}, line {i}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or "prompt_id" not in row or "prompt" not in row:
            raise FewstepError(f"prompt file {path}, line {i}: needs an object with "
                               "'prompt_id' and 'prompt'")
        if row["prompt_id"] in seen:
            raise FewstepError(f"prompt file {path}, line {i}: duplicate prompt_id {row['prompt_id']!r}")
        seen.add(row["prompt_id"])
        rows.append(row)
    if not rows:
        raise FewstepError(f"prompt file {path} holds no prompts")
    return rows


def condition_of(row: dict):
    """What a backbone encodes for a row: the class id for class-conditional rows, else the text."""
    return row["class_label"] if "class_label" in row else row["prompt"]
