"""Atomic writes: a half-written output never counts as done."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


class UnsafeTargetError(ValueError):
    """An output path that would replace the working directory, an ancestor of it, or a folder
    the caller protects (e.g. `reports/` itself: `reports/.` names it)."""


def check_target(path: Path, protect=()) -> None:
    """Refuse a target that is the working directory, the home folder, an ancestor of either, or
    a protected folder or an ancestor of one: replacing it would delete what lies inside."""
    target = Path(os.path.abspath(path))
    keep = [Path.cwd(), Path.home(), *(Path(os.path.abspath(p)) for p in protect)]
    for folder in keep:
        if target == folder or target in folder.parents:
            raise UnsafeTargetError(f"refusing to replace {target}: it is {folder} or holds it; "
                                    "give an output path inside its own folder")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, protect=()):
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    Works for files and folders. The temporary name starts with '.tmp-' beside the target, so
    the rename stays on one filesystem and is atomic. `protect`: folders the target must not be
    or hold (the working directory and the home folder always are).
    """
    check_target(Path(path), protect)
    path = Path(os.path.abspath(path))  # "reports/." is reports itself, named so the checks see it
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            # a folder cannot be renamed onto another: move the old one aside into the scratch
            # folder (deleted below), so the target is missing only between two renames
            os.rename(path, tmp.parent / f".old-{path.name}")
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in blocks (weights, checkpoints, input files)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def json_lines(text: str) -> list[str]:
    """The non-blank lines of a JSON Lines text, split at newlines only: str.splitlines also
    splits at U+2028, U+0085 and other separators that may sit inside a JSON string."""
    return [line for line in text.split("\n") if line.strip()]


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path):
    return json.loads(Path(path).read_text())
