"""Where real weights live, and a clear error when they are not there.

Weights are never downloaded by the harness: a user puts diffusers folders (or the SiT checkpoint)
under one cache directory, named by the environment variable FEWSTEP_WEIGHTS (default
~/.cache/fewstep/weights). Every loader calls `require_files` before any heavy import, so a missing
file is reported in a second, with the full list of what is missing, instead of deep inside
diffusers after a minute of imports.
"""
from __future__ import annotations

import os
from pathlib import Path

from fewstep.errors import FewstepError

WEIGHTS_ENV = "FEWSTEP_WEIGHTS"
DEFAULT_WEIGHTS_ROOT = "~/.cache/fewstep/weights"
ALTERNATIVES_SEP = "|"  # "a|b" in an expected-file list: either file will do


class MissingWeightsError(FileNotFoundError, FewstepError):
    """A weights folder or some of its files are missing; the message says what and where."""

    def __str__(self):  # FileNotFoundError would print only errno-style fields
        return self.args[0]


def weights_root() -> Path:
    """The weights cache: $FEWSTEP_WEIGHTS, or ~/.cache/fewstep/weights when unset or empty."""
    value = os.environ.get(WEIGHTS_ENV, "").strip()
    return Path(value or DEFAULT_WEIGHTS_ROOT).expanduser()


def _is_bare_name(text: str) -> bool:
    """A bare name has no folder part: 'sdxl-base' is one, './sdxl-base' and 'a/b' are paths."""
    return (os.sep not in text and "/" not in text and not text.startswith("~")
            and text not in (".", ".."))


def resolve(path_or_name: str | os.PathLike) -> Path:
    """A path (absolute, relative, or ~) is used as is; a bare name is looked up in the cache."""
    text = os.fspath(path_or_name)
    if not text:
        raise ValueError(
            "empty weights path: give a folder path (e.g. ./my-teacher) or a name inside "
            f"the weights cache {weights_root()} (set {WEIGHTS_ENV} to move the cache)")
    if _is_bare_name(text):
        return weights_root() / text
    return Path(text).expanduser()


def _present(folder: Path, entry: str) -> bool:
    return any((folder / option).is_file() for option in entry.split(ALTERNATIVES_SEP))


def _describe(entry: str) -> str:
    first, *others = entry.split(ALTERNATIVES_SEP)
    return first + (f" (or {', '.join(others)})" if others else "")


def _where_hint(folder: Path) -> str:
    root = weights_root()
    set_or_not = (f"{WEIGHTS_ENV}={os.environ[WEIGHTS_ENV]}" if os.environ.get(WEIGHTS_ENV)
                  else f"{WEIGHTS_ENV} is unset, so the default {DEFAULT_WEIGHTS_ROOT} is used")
    return (f"The environment variable {WEIGHTS_ENV} points at the weights cache ({set_or_not}; "
            f"resolved to {root}). Put the files in {folder}, or put the model folder under "
            f"{root} and pass its bare name, or pass a path to the folder (./name for one in the "
            "current directory). The harness never downloads weights.")


def require_files(folder: str | os.PathLike, expected: list[str], what: str) -> Path:
    """Check that every expected file (relative to `folder`) exists; return the folder.

    An entry "a|b" is satisfied by either file (e.g. a single or a sharded safetensors file).
    Raises MissingWeightsError listing every missing file, the folder looked in, and where the
    weights cache is.
    """
    folder = Path(folder).expanduser()
    if not expected:
        raise ValueError(f"require_files for {what}: the list of expected files is empty")
    missing = [entry for entry in expected if not _present(folder, entry)]
    if not missing:
        return folder
    state = "does not exist" if not folder.is_dir() else "exists but is incomplete"
    listing = "\n".join(f"  - {_describe(entry)}" for entry in missing)
    raise MissingWeightsError(
        f"{what}: the weights folder {folder} {state}; missing {len(missing)} of "
        f"{len(expected)} expected files:\n{listing}\n{_where_hint(folder)}")
