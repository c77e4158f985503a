"""fewstep weights check: the weight files a config's metrics and backbone families need, where
each is expected in the weights cache ($FEWSTEP_WEIGHTS), where to get it, and which are missing.

Nothing is downloaded. Metrics declare their files with `weight_files()` (toy metrics need none);
families with `required_weights()`, the same lists their loaders check. In the toy world the
families run the shipped toy teachers, so only `--world real` lists their checkpoints.
Exit status: 0 when every file is present, 1 when some are missing.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ACTIONS = ("check",)
WORLDS = ("toy", "real")


def add_arguments(p):
    p.add_argument("action", choices=ACTIONS,
                   help="check: list the files the config needs and which are missing")
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


def run(args) -> int:
    from fewstep.backbones.weights import cache_state, find_entry, weights_root
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
