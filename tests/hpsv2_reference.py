"""The installed hpsv2 package (1.2.0) as a parity and speed reference, adapted at import time.

Used by tests/test_metric_hpsv2.py (parity) and tests/benchmarks/bench_metrics.py (speed). The
package cannot be imported as shipped (metrics/notes/metrics.md sec. 1.4); nothing of it is copied
here, it is only made importable and kept offline:
* placeholder modules for `hpsv2`, `hpsv2.src` and `hpsv2.src.open_clip` (their __init__ files
  would import the benchmark downloader and every fork module), with their search paths pointing
  at the installed folders; `hpsv2.src.open_clip` then gets the two names img_score imports;
* a placeholder `clint` (a progress-bar package that `hpsv2.utils` imports and scoring never uses);
  a placeholder `turtle` only where tkinter is missing (the stray `from turtle import forward`);
* the wheel lacks the BPE vocabulary file that the fork's tokenizer opens at import; while it is
  imported, that one missing path is served open_clip 3.3's bundled file of the same name (both
  are OpenAI CLIP's merges list; the parity test compares token ids);
* `redirected_scoring`: the model factory call inside `img_score.score` is redirected from
  ViT-H-14 + LAION weights (a 3.94 GB download) to a named config of the fork without pretrained
  weights (the fork's own ViT-H-14, or a tiny config registered through `adapted_hpsv2`), and the
  module's device and root folder are set. Everything else is the package's own code; `score`
  still loads the HPS checkpoint given as `cp` on every call, as it does for its users.

    with adapted_hpsv2() as package, redirected_scoring(package, "ViT-H-14") as img_score:
        cosines = scores_per_prompt(img_score, paths, prompts, checkpoint)
"""
from __future__ import annotations

import contextlib
import gzip
import importlib
import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path
from typing import NamedTuple

import numpy as np

PACKAGE_FACTORY_CALL = ("ViT-H-14", "laion2B-s32B-b79K")  # what img_score.initialize_model asks


class HPSv2PackageMissing(ImportError):
    pass


class PackageModules(NamedTuple):
    """The adapted package's modules a caller needs (unpacks like the old 3-tuple)."""
    img_score: types.ModuleType
    factory: types.ModuleType
    transform: types.ModuleType


def package_root() -> Path:
    """The installed hpsv2 folder (found, not imported)."""
    spec = importlib.util.find_spec("hpsv2")
    if spec is None or not spec.submodule_search_locations:
        raise HPSv2PackageMissing(
            "the hpsv2 package is missing: `.venv/bin/python -m pip install --no-deps "
            "-r requirements-nodeps.lock` (or run .ci/setup)")
    return Path(list(spec.submodule_search_locations)[0])


def _placeholder(name: str, folder: Path) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(folder)]
    sys.modules[name] = module
    return module


@contextlib.contextmanager
def _missing_vocab_served_from(package_root: Path):
    """While the fork's tokenizer is imported, serve its missing BPE file from open_clip's."""
    import open_clip

    missing = str(package_root / "src" / "open_clip" / "bpe_simple_vocab_16e6.txt.gz")
    bundled = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    original = gzip.open

    def redirected(path, *args, **kwargs):
        return original(bundled if str(path) == missing else path, *args, **kwargs)

    gzip.open = redirected
    try:
        yield
    finally:
        gzip.open = original


def _stub_missing_modules() -> list[str]:
    """clint (always unused by scoring) and turtle (only where tkinter is missing)."""
    added = []
    if importlib.util.find_spec("clint") is None:
        clint, textui = types.ModuleType("clint"), types.ModuleType("clint.textui")
        textui.progress, clint.textui = None, textui
        sys.modules.update({"clint": clint, "clint.textui": textui})
        added += ["clint", "clint.textui"]
    try:
        import turtle  # noqa: F401
    except ImportError:
        sys.modules["turtle"] = types.SimpleNamespace(forward=None)
        added.append("turtle")
    return added


def _package_modules() -> dict:
    return {k: v for k, v in sys.modules.items() if k == "hpsv2" or k.startswith("hpsv2.")}


def _import_adapted(root: Path) -> PackageModules:
    _placeholder("hpsv2", root)
    _placeholder("hpsv2.src", root / "src")
    fork = _placeholder("hpsv2.src.open_clip", root / "src" / "open_clip")
    with _missing_vocab_served_from(root):
        factory = importlib.import_module("hpsv2.src.open_clip.factory")
    fork.create_model_and_transforms = factory.create_model_and_transforms
    fork.get_tokenizer = factory.get_tokenizer
    return PackageModules(importlib.import_module("hpsv2.img_score"), factory,
                          importlib.import_module("hpsv2.src.open_clip.transform"))


def _register_configs(factory, model_configs: dict, config_dir: Path) -> None:
    """Extra model configs (name -> open_clip config dict) made known to the fork's factory."""
    for name, config in model_configs.items():
        path = Path(config_dir) / f"{name}.json"
        path.write_text(json.dumps(config))
        factory.add_model_config(path)


@contextlib.contextmanager
def adapted_hpsv2(model_configs: dict | None = None, config_dir: Path | None = None):
    """The installed package, adapted as the module docstring says: yields PackageModules.

    model_configs: extra fork configs by name (written as JSON into config_dir, or a temporary
    folder). On exit the package's modules and the placeholders added are removed again and any
    hpsv2 modules imported before are put back."""
    root = package_root()
    saved = _package_modules()
    added = _stub_missing_modules()
    with contextlib.ExitStack() as stack:
        try:
            package = _import_adapted(root)
            if model_configs:
                folder = config_dir or stack.enter_context(tempfile.TemporaryDirectory())
                _register_configs(package.factory, model_configs, Path(folder))
            yield package
        finally:
            for name in _package_modules():
                del sys.modules[name]
            sys.modules.update(saved)
            for name in added:
                sys.modules.pop(name, None)


@contextlib.contextmanager
def redirected_scoring(package: PackageModules, model_name: str, device: str = "cpu",
                       root: Path | None = None):
    """`img_score` whose model factory builds `model_name` of the fork with no pretrained weights
    (instead of downloading ViT-H-14 + LAION), on `device`, with its root folder at `root`; its
    model cache is emptied before and after. Yields the img_score module."""
    img_score, factory = package.img_score, package.factory

    def factory_without_download(name, pretrained, **kwargs):
        if (name, pretrained) != PACKAGE_FACTORY_CALL:
            raise AssertionError(f"img_score asked the factory for {(name, pretrained)}, not "
                                 f"{PACKAGE_FACTORY_CALL}: the package changed")
        return factory.create_model_and_transforms(model_name, None, **kwargs)

    names = ("create_model_and_transforms", "device", "root_path")
    saved = {name: getattr(img_score, name) for name in names}
    img_score.create_model_and_transforms = factory_without_download
    img_score.device = device
    if root is not None:
        img_score.root_path = str(root)
    img_score.model_dict.clear()
    try:
        yield img_score
    finally:
        img_score.model_dict.clear()
        for name, value in saved.items():
            setattr(img_score, name, value)


def scores_per_prompt(img_score, paths, prompts, checkpoint, hps_version: str = "v2.1"
                      ) -> np.ndarray:
    """Per-image values of `img_score.score`, one call per distinct prompt (in first-seen order)
    with that prompt's images, as the package is used; returned in the order of `paths`."""
    paths, prompts = [str(p) for p in paths], list(prompts)
    out = {}
    for prompt in dict.fromkeys(prompts):
        mine = [p for p, q in zip(paths, prompts) if q == prompt]
        values = img_score.score(mine, prompt, cp=str(checkpoint), hps_version=hps_version)
        out.update({p: float(v) for p, v in zip(mine, values)})
    return np.array([out[p] for p in paths])
