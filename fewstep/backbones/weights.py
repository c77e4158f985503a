"""Where real weights live, and a clear error when they are not there.

Weights are never downloaded by the harness: a user puts diffusers folders (or the SiT checkpoint)
under one cache directory, named by the environment variable FEWSTEP_WEIGHTS (default
~/.cache/fewstep/weights). Every loader calls `require_files` before any heavy import, so a missing
file is reported in a second, with the full list of what is missing, instead of deep inside
diffusers after a minute of imports.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fewstep.errors import FewstepError

WEIGHTS_ENV = "FEWSTEP_WEIGHTS"
DEFAULT_WEIGHTS_ROOT = "~/.cache/fewstep/weights"
ALTERNATIVES_SEP = "|"  # "a|b" in an expected-file list: either file will do


@dataclass(frozen=True)
class WeightFile:
    """One file a metric, backbone or prompt set needs from the weights cache ($FEWSTEP_WEIGHTS).

    path: relative to the cache root (e.g. "hps/HPS_v2.1_compressed.pt"); source: where a user
    gets it (a Hugging Face repo id and file, or a URL); the harness never downloads it.
    """
    path: str
    source: str
    note: str = ""


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


is_bare_name = _is_bare_name  # public name, for other caches under the root (FID references)


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


def cache_state() -> str:
    """How the cache root was chosen, e.g. 'FEWSTEP_WEIGHTS=/data/w; resolved to /data/w'."""
    set_or_not = (f"{WEIGHTS_ENV}={os.environ[WEIGHTS_ENV]}" if os.environ.get(WEIGHTS_ENV)
                  else f"{WEIGHTS_ENV} is unset, so the default {DEFAULT_WEIGHTS_ROOT} is used")
    return f"{set_or_not}; resolved to {weights_root()}"


def _where_hint(folder: Path) -> str:
    root = weights_root()
    return (f"The environment variable {WEIGHTS_ENV} points at the weights cache ({cache_state()}"
            f"). Put the files in {folder}, or put the model folder under "
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


# -- single cache entries (metrics, `fewstep weights check`) ---------------------------------------
# An entry is a path relative to the cache root; "a|b" means either file will do, and a trailing
# "/" names a folder that must hold at least one file (e.g. a folder of FID reference images).

def entry_options(entry: str) -> list[str]:
    return [option.strip() for option in entry.split(ALTERNATIVES_SEP) if option.strip()]


def under(folder: str, entry: str) -> str:
    """The entry with every alternative moved into `folder` (relative to the cache root)."""
    prefix = folder.rstrip("/")
    return ALTERNATIVES_SEP.join(f"{prefix}/{option}" for option in entry_options(entry))


def _option_present(path: Path, is_folder: bool) -> bool:
    if is_folder:
        return path.is_dir() and any(not p.name.startswith(".") for p in path.iterdir())
    return path.is_file()


def find_entry(entry: str, root: Path | None = None) -> Path | None:
    """The first alternative of the entry present under the cache (or `root`); None if none is."""
    root = weights_root() if root is None else Path(root)
    for option in entry_options(entry):
        path = root / option
        if _option_present(path, option.endswith("/")):
            return path
    return None


def require_entry(entry: str, source: str, what: str) -> Path:
    """The path of a cache entry, or MissingWeightsError naming the file, source and cache."""
    found = find_entry(entry)
    if found is not None:
        return found
    wanted = " or ".join(str(weights_root() / option) for option in entry_options(entry))
    raise MissingWeightsError(
        f"{what}: weights not found: expected {wanted} (source: {source}). Put it there: the "
        f"environment variable {WEIGHTS_ENV} names the weights cache ({cache_state()}). The "
        "harness never downloads weights; `fewstep weights check` lists every file a config needs.")


_SHA256_CACHE: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a (large) weights file, computed once per process for an unchanged file."""
    from fewstep.io import file_sha256 as digest

    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_CACHE:
        _SHA256_CACHE[key] = digest(path)
    return _SHA256_CACHE[key]


def load_state_dict_file(path: str | os.PathLike) -> dict:
    """A state dict from a .safetensors file, or a torch file read by the tensor-only loader
    (never a full unpickle; `fewstep weights convert` re-saves a pickle a person trusts)."""
    import torch

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise FewstepError(f"{path}: not a tensor-only torch file ({type(err).__name__}: {err}); "
                           "re-save it with `fewstep weights convert --trust-pickle FILE --out "
                           "FILE.safetensors` if you trust it") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise FewstepError(f"{path}: holds a {type(state).__name__}, not a state dict")
    return state
