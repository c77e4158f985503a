"""fewstep weights check: the weight files a config's metrics, backbone families and trained
methods need, where each is expected in the weights cache ($FEWSTEP_WEIGHTS), where to get it, and
which are missing.

Nothing is downloaded. Metrics declare their files with `weight_files()` (toy metrics need none);
families with `required_weights()`, the same lists their loaders check; methods with the
classmethod `weight_files(options)` for each preset the config trains (DMD's LPIPS trunk). In the toy world the
families run the shipped toy teachers, so only `--world real` lists their checkpoints.
Exit status: 0 when every file is present, 1 when some are missing.

fewstep weights convert --trust-pickle FILE.pt --out FILE.safetensors: the one way to read a
pickled checkpoint that torch's tensor-only loader refuses. fewstep's loaders never unpickle
fully (a crafted pickle runs any code); a person who trusts a file converts it once here. Even
then nothing is unpickled blindly: the globals the pickle names are listed (without running it)
and printed, those that can run commands or touch files are refused, and only the listed ones
are allowed to the tensor-only loader.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ACTIONS = ("check", "convert")
WORLDS = ("toy", "real")
# globals from these modules run commands, touch files or load code: never allowed, trusted or not
DANGEROUS_MODULES = {"os", "posix", "nt", "subprocess", "sys", "builtins", "shutil", "importlib",
                     "runpy", "socket", "ctypes", "pty", "code", "codeop", "pickle", "_pickle",
                     "marshal", "io", "_io", "pathlib", "tempfile", "webbrowser", "multiprocessing",
                     "operator", "functools", "types", "inspect", "pydoc", "timeit", "platform"}


def add_arguments(p):
    p.add_argument("action", choices=ACTIONS,
                   help="check: list the files the config needs and which are missing; convert: "
                        "re-save a pickled checkpoint you trust as .safetensors")
    p.add_argument("--trust-pickle", metavar="FILE",
                   help="convert: the pickled checkpoint (.pt/.pth/.bin) to convert; naming it "
                        "here says you trust it (its unpickling may build the objects it names)")
    p.add_argument("--out", help="convert: the .safetensors file to write")
    p.add_argument("--key", help="convert: the entry that holds the state dict (default: "
                                 "'state_dict' when there is one, else the whole file)")
    p.add_argument("--config", help="workflow config (default: workflows/config/default.yaml)")
    p.add_argument("--metrics", nargs="+", help="metric names to check instead of the config's")
    p.add_argument("--families", nargs="+", help="backbone families instead of the config's")
    p.add_argument("--prompt-sets", nargs="+", default=[],
                   help="benchmark prompt sets whose data files to check too (hpdv2, geneval, "
                        "coco2014-val-captions, imagenet-classes, drawbench)")
    p.add_argument("--world", choices=WORLDS,
                   help="toy: families use the shipped toy teachers (no weights); real: their real "
                        "checkpoints (default: the config's world)")


@dataclass(frozen=True)
class Need:
    """One file (or folder, trailing '/') under the weights cache that a metric or family needs."""
    who: str            # "metric clip_score" or "family sdxl"
    entry: str          # relative to the cache root; "a|b": either will do
    source: str
    note: str = ""


def metric_needs(name: str) -> list[Need]:
    """The registered metric's weight files; metrics that do not override weight_files need none
    (and are not built: building a toy metric may train its feature net)."""
    from fewstep.registry import METRICS
    from metrics.base import Metric

    cls = METRICS.get(name)
    if getattr(cls, "weight_files", Metric.weight_files) is Metric.weight_files:
        return []
    try:
        metric = cls()
    except Exception as err:  # noqa: BLE001 - any failure here is the metric's, named below
        raise ValueError(f"metric {name!r} ({cls.__name__}) cannot be built without arguments to "
                         f"list its weight files: {err}. A metric with weights must build without "
                         "loading them (load on first score)") from err
    return [Need(f"metric {name}", wf.path, wf.source, wf.note) for wf in metric.weight_files()]


def family_needs(name: str, world: str) -> list[Need]:
    """A family's real checkpoint files (none in the toy world: the toy teachers are shipped)."""
    from fewstep.registry import BACKBONES

    if world == "toy":
        return []
    cls = BACKBONES.get(name)
    required = getattr(cls, "required_weights", None)
    if required is None:
        raise ValueError(f"backbone family {name!r} ({cls.__name__}) does not declare its weight "
                         "files; give it a required_weights() classmethod")
    return [Need(f"family {name}", entry, source) for entry, source in required()]


def describe(entry: str, root: Path) -> str:
    from fewstep.backbones.weights import entry_options

    # a folder entry keeps its trailing "/", so the listing says it is a folder
    first, *others = [str(root / option) + "/" * option.endswith("/")
                      for option in entry_options(entry)]
    return first + "".join(f"\n             or {other}" for other in others)


def report_lines(groups: dict[str, list[Need]], found: dict[str, Path | None],
                 root: Path) -> list[str]:
    """One block per metric/family: each entry, present or MISSING, with its source if missing."""
    lines = []
    for who, needs in groups.items():
        if not needs:
            lines.append(f"{who}: no weight files")
            continue
        lines.append(f"{who}:")
        for need in needs:
            hit = found[need.entry]
            if hit is not None:
                lines.append(f"  ok       {hit}")
                continue
            lines.append(f"  MISSING  {describe(need.entry, root)}")
            note = f" ({need.note})" if need.note else ""
            lines.append(f"           source: {need.source}{note}")
    return lines


def summary(found: dict[str, Path | None], root: Path, world: str) -> str:
    from fewstep.backbones.weights import WEIGHTS_ENV

    missing = sum(hit is None for hit in found.values())
    if not found:
        return (f"weights check: nothing to check; the configured metrics and families ({world} "
                "world) need no weight files")
    if not missing:
        return f"weights check: all {len(found)} files present under {root}"
    return (f"weights check: {missing} of {len(found)} files missing under {root}; get each from "
            f"its source and put it at the path shown (or point {WEIGHTS_ENV} at the cache that "
            "holds them)")


def prompt_set_needs(name: str) -> list[Need]:
    from fewstep.prompt_sets import PROMPT_SETS, SET_FILES

    if name not in SET_FILES:
        raise ValueError(f"unknown prompt set {name!r}; known: {sorted(PROMPT_SETS)}")
    return [Need(f"prompt set {name}", wf.path, wf.source, wf.note) for wf in SET_FILES[name]]


def train_data_needs(data: dict) -> list[Need]:
    """A family's training prompts (a prompt set's data files, or the user's file) and its
    real-image folder."""
    from fewstep.prompt_sets import PROMPT_SETS
    from fewstep.train_data import METADATA

    needs = []
    if data["prompts"] in PROMPT_SETS:
        needs += prompt_set_needs(data["prompts"])
    else:
        needs.append(Need("training prompts", data["prompts"],
                          "your training prompt file (JSONL rows with prompt_id and prompt)"))
    if "real_images" in data:
        needs.append(Need("real images", f"{data['real_images'].rstrip('/')}/{METADATA}",
                          "captioned real images, imagefolder layout (metadata.jsonl rows "
                          "{file_name, prompt | class_label} beside the images)"))
    return needs


def method_needs(config: dict) -> dict[str, list[Need]]:
    """Files each trained preset's options need (e.g. DMD's LPIPS trunk), from the method class's
    `weight_files(options)` when it has one; the groups are keyed "method <name> (<preset>)"."""
    from fewstep.planning import trained_presets
    from fewstep.options import resolve
    from fewstep.registry import METHODS

    groups = {}
    overrides = config["distill"].get("overrides", {})
    for method, presets in trained_presets(config).items():
        cls = METHODS.get(method)
        for preset in presets:
            options = resolve(cls.Options, cls.PRESETS, preset, overrides.get(method), method)
            listing = getattr(cls.for_options(options), "weight_files", None)
            if listing is None:
                continue
            groups[f"method {method} ({preset})"] = [
                Need(f"method {method}", wf.path, wf.source, wf.note) for wf in listing(options)]
    return groups


def collect(metrics: list[str], families: list[str], world: str) -> dict[str, list[Need]]:
    from fewstep.registry import BACKBONES, METRICS

    groups = {}
    for name in metrics:
        groups[f"metric {METRICS.check(name)}"] = metric_needs(name)
    for name in families:
        label = f"family {BACKBONES.check(name)}"
        if world == "toy":
            label += " (toy world: shipped toy teacher)"
        groups[label] = family_needs(name, world)
    return groups


def resolve_global(name: str):
    """The object a pickle global "module.qualname" names; refused for dangerous modules."""
    import importlib

    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
        break
    else:
        raise ValueError(f"the pickle names {name}, which is not importable here")
    where = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
    # the name must be where the object lives (not reached through another module's imports)
    if parts[0] in DANGEROUS_MODULES or where.split(".")[0] in DANGEROUS_MODULES or where != name:
        raise ValueError(f"the pickle calls {name}, which can run commands or touch files: no "
                         "checkpoint needs it, so this file is not one to trust; nothing was "
                         "unpickled and nothing written")
    return obj


def trusted_load(path: Path):
    """Load a pickled checkpoint with the tensor-only loader, allowing exactly the globals it
    names (listed from its opcodes, without running it) once none of them is dangerous."""
    import torch
    from torch.serialization import get_unsafe_globals_in_checkpoint

    try:
        names = get_unsafe_globals_in_checkpoint(str(path))
    except ValueError as err:
        raise ValueError(f"{path} is not in torch's zip checkpoint format, whose globals can be "
                         f"listed without running it ({err}); re-save it with torch.save under a "
                         "current torch where you trust it, then convert that") from err
    allowed = [resolve_global(name) for name in names]
    print(f"trusting the globals {path} names: {', '.join(names) or 'none beyond tensors'}")
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def pick_state_dict(obj, key: str | None, path: Path) -> dict:
    """The state dict inside a loaded checkpoint: obj[key], obj["state_dict"], or obj itself."""
    import torch

    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{path} has no entry {key!r}; it has {keys}")
        obj = obj[key]
    elif isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: the state dict is a {type(obj).__name__}, not a dict")
    others = sorted(str(k) for k, v in obj.items() if not torch.is_tensor(v))
    if others and key is None and any(isinstance(v, dict) for v in obj.values()):
        raise ValueError(f"{path} holds several entries: give --key, one of "
                         f"{sorted(k for k, v in obj.items() if isinstance(v, dict))}")
    if others:
        raise ValueError(f"{path}: entries that are not tensors: {others[:10]}; give --key the "
                         "entry that holds only the weights")
    return obj


def convert(args) -> int:
    from safetensors.torch import save_file

    from fewstep.backbones.weights import file_sha256
    from fewstep.io import atomic_path

    if not args.trust_pickle or not args.out:
        raise ValueError("convert needs --trust-pickle FILE (the checkpoint you trust) and --out "
                         "FILE.safetensors: fewstep weights convert --trust-pickle FILE.pt --out "
                         "FILE.safetensors")
    src, out = Path(args.trust_pickle), Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: the converted file must end in .safetensors")
    if not src.is_file():
        raise FileNotFoundError(f"--trust-pickle {src}: no such file")
    state = pick_state_dict(trusted_load(src), args.key, src)
    # clone: tensors sharing storage (tied weights) cannot be saved as they are
    tensors = {str(k): v.detach().contiguous().clone() for k, v in state.items()}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={"converted_from": src.name,
                                               "source_sha256": file_sha256(src)})
    print(f"converted {len(tensors)} tensors from {src} -> {out}")
    return 0


def run(args) -> int:
    from fewstep.backbones.weights import cache_state, find_entry, weights_root

    if args.action == "convert":
        return convert(args)
    from fewstep.config import load

    config = load(args.config)
    world = args.world or config["world"]
    groups = collect(args.metrics or config["metrics"], args.families or config["families"],
                     world)
    for method, cells in config["distill"].get("released", {}).items():
        for family, spec in cells.items():
            groups[f"released {method} on {family}"] = [Need(
                f"released {method}", spec["weights"] + ("" if Path(spec["weights"]).suffix else "/"),
                "the method's published checkpoint (a local copy)")]
    groups.update(method_needs(config))
    for family, data in config["distill"].get("train_data", {}).items():
        groups[f"training data of {family}"] = train_data_needs(data)
    configured = [spec["name"] for spec in config["eval"].get("prompt_sets", {}).values()]
    for name in dict.fromkeys([*configured, *args.prompt_sets]):
        groups[f"prompt set {name}"] = prompt_set_needs(name)
    root = weights_root()
    found = {need.entry: find_entry(need.entry, root) for needs in groups.values()
             for need in needs}
    print(f"weights cache: {root} ({cache_state()})")
    print("\n".join(report_lines(groups, found, root)))
    print(summary(found, root, world))
    return 1 if any(hit is None for hit in found.values()) else 0
