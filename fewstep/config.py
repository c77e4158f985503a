"""The workflow config: load, validate against the JSON schema, check plugin names.

Used by the Snakefile (so a bad config stops the DAG before any job) and by every CLI verb.
Only light imports here: `snakemake -n` must answer fast.
"""
from __future__ import annotations

from pathlib import Path

import jsonschema
import yaml

from fewstep.errors import FewstepError
from fewstep.planning import trained_presets, training_seeds, world_size
from fewstep.registry import BACKBONES, METHODS, METRICS, UnknownNameError

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO / "workflows" / "schemas" / "config.schema.yaml"
DEFAULT = REPO / "workflows" / "config" / "default.yaml"


class ConfigError(ValueError):
    pass


def _where(error: jsonschema.ValidationError) -> str:
    return "/".join(str(p) for p in error.absolute_path) or "<top level>"


def validate(config: dict, source: str = "config") -> dict:
    """Raise ConfigError naming the offending key; return the config unchanged if it is valid."""
    schema = yaml.safe_load(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(config),
                    key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {_where(e)}: {e.message}" for e in errors[:10]]
        raise ConfigError(f"{source} does not match {SCHEMA.name}:\n" + "\n".join(lines))
    try:
        for fam in config["families"]:
            BACKBONES.check(fam)
        for metric in config["metrics"]:
            METRICS.check(metric)
        for method in config["distill"]["methods"]:
            METHODS.check(method)
        for method in list(config["distill"]["stages"]) + list(config["distill"]["overrides"]):
            METHODS.check(method)
    except (UnknownNameError, FewstepError) as err:  # FewstepError: a refused plugin
        raise ConfigError(f"{source}: {err}") from None
    _check_metric_options(config, source)
    _check_reference_metrics(config, source)
    _check_seeds(config, source)
    _check_training(config, source)
    _check_world(config, source)
    _check_shards(config, source)
    for method, families in config["distill"].get("released", {}).items():
        if method not in config["distill"]["methods"]:
            raise ConfigError(f"{source}: distill/released names {method!r}, which is not in "
                              f"distill/methods {config['distill']['methods']}")
        unknown = sorted(set(families) - set(config["families"]))
        if unknown:
            raise ConfigError(f"{source}: distill/released/{method} names families {unknown} "
                              f"that are not run (families: {config['families']})")
    # guidance may name more families than are run (a config file merged over the default keeps
    # the default's entries), but every run family needs one and every key must be a family
    guidance = config["teachers"]["guidance"]
    missing = sorted(set(config["families"]) - set(guidance))
    if missing:
        raise ConfigError(f"{source}: teachers/guidance has no entry for {missing}; add "
                          f"e.g. `{missing[0]}: 2.0`")
    try:
        for fam in guidance:
            BACKBONES.check(fam)
    except UnknownNameError as err:
        raise ConfigError(f"{source}: teachers/guidance: {err}") from None
    return config


def _check_reference_metrics(config: dict, source: str) -> None:
    """World real: precision and recall read the FID's reference features, which the DAG builds
    once for `fid` (its fid_reference rule, with metric_options.fid)."""
    readers = sorted({"precision", "recall"} & set(config["metrics"]))
    if config["world"] == "real" and readers and "fid" not in config["metrics"]:
        raise ConfigError(f"{source}: metrics {readers} read the FID's reference features; add fid "
                          "to metrics (and give them metric_options.fid's reference, crop, "
                          "eval_resolution and mode)")


def _check_seeds(config: dict, source: str) -> None:
    """A training seed comes from distill/seeds alone: a seed override would train every
    replicate of the cell with one seed and label them as different ones."""
    for method, overrides in config["distill"]["overrides"].items():
        if "seed" in (overrides or {}):
            raise ConfigError(f"{source}: distill/overrides/{method} sets seed; training seeds are "
                              f"set for every method by distill/seeds (now "
                              f"{training_seeds(config)}), e.g. `seeds: [0, 1, 2]`")


def _check_training(config: dict, source: str) -> None:
    """Every preset a training job will name and every override, resolved by the method's own
    options now (types and ranges included), so `snakemake -n` refuses them before any job.
    Released presets are resolved too: the release job names them."""
    from fewstep.options import resolve
    from fewstep.errors import FewstepError

    distill = config["distill"]
    uses = [(m, p, distill["overrides"].get(m), "distill/" + (f"stages/{m}" if m in distill["stages"]
                                                                 else "preset"))
            for m, presets in trained_presets(config).items() for p in presets]
    # a release job names its preset (the distill preset by default) and no overrides
    uses += [(m, cell.get("preset", distill["preset"]), None, f"distill/released/{m}/{fam}")
             for m, fams in distill.get("released", {}).items() for fam, cell in fams.items()]
    uses += [(m, None, o, "distill/overrides") for m, o in distill["overrides"].items()]
    ranks = world_size(config)
    world = (f" (world size {ranks} = distill/nodes {distill.get('nodes', 1)} x distill/processes "
             f"{distill.get('processes', 1)} per node)")
    for method, preset, overrides, where in uses:
        cls = METHODS.get(method)
        # a training job runs on nodes x processes ranks, which must divide a global_batch
        trains = where.startswith("distill/stages") or where == "distill/preset"
        try:
            resolve(cls.Options, cls.PRESETS, preset, overrides, method,
                    world_size=ranks if trains else 1)
        except FewstepError as err:
            both = f" with distill/overrides/{method}" if overrides else ""
            raise ConfigError(f"{source}: {where}{both}: {err}{world if trains else ''}") from None


def _check_shards(config: dict, source: str) -> None:
    """eval/shards at most the batches of the smallest sample set (each shard samples whole
    batches), now rather than as a failed shard job; only asked for K > 1 (the size of a toy set
    is computed, of a benchmark set its official size or n)."""
    from fewstep.planning import SAMPLE_BATCH, eval_shards, max_shards, set_prompts

    shards = eval_shards(config)
    limit = max_shards(config) if shards > 1 else None
    if limit is None or shards <= limit[0]:
        return
    batches, family = limit
    jobs = set_prompts(config, family) * len(config["eval"]["seeds"])
    raise ConfigError(f"{source}: eval/shards = {shards} is more than the {family} sample sets "
                      f"can take: {jobs} (prompt, seed) jobs make {batches} batch"
                      f"{'es' if batches > 1 else ''} of {SAMPLE_BATCH} and each shard samples "
                      f"whole batches; the largest allowed is {batches} (or add eval prompts or "
                      "seeds)")


def _check_world(config: dict, source: str) -> None:
    """What each world needs: the toy world its toy teachers; the real world linked checkpoints,
    benchmark prompt sets and real metrics, and for every student it trains (not released) the
    family's training data and, for reward-guided methods, a real reward."""
    families, teachers = config["families"], config["teachers"]
    if config["world"] == "toy":
        if teachers["source"] == "link":
            raise ConfigError(f"{source}: teachers/source link is for world: real (the toy world "
                              "uses shipped or trained toy teachers)")
        missing = [key for key, where in (("fid", config), ("prompts", config["eval"]),
                                          ("train", teachers)) if key not in where]
        if missing:
            raise ConfigError(f"{source}: the toy world needs {missing} (fid: the toy FID's "
                              "reference and feature net; eval/prompts: held-out prompts per "
                              "family; teachers/train: the teachers' recipe)")
        return
    problems = []
    if teachers["source"] != "link":
        problems.append("teachers/source must be link (the real checkpoints in the weights cache)")
    for key, where in (("link", teachers.get("link", {})),
                       ("prompt_sets", config["eval"].get("prompt_sets", {}))):
        missing = sorted(set(families) - set(where))
        if missing:
            problems.append(f"{'teachers/link' if key == 'link' else 'eval/prompt_sets'} has no "
                            f"entry for {missing}")
    problems += _prompt_set_problems(config["eval"].get("prompt_sets", {}))
    toy = [m for m in config["metrics"] if m.startswith("toy_")]
    if toy:
        problems.append(f"toy metrics {toy} score only the toy world; use their real slots "
                        "(fid, hpsv2.1, imagereward, geneval_hf_m2f, clip_score)")
    problems += _training_data_problems(config)
    if problems:
        raise ConfigError(f"{source} (world: real):\n  " + "\n  ".join(problems))


def _prompt_set_problems(prompt_sets: dict) -> list[str]:
    """Each family's benchmark set a registered one, with options its loader takes."""
    from fewstep.errors import FewstepError
    from fewstep.prompt_sets import check_prompt_set

    problems = []
    for family, spec in prompt_sets.items():
        try:
            check_prompt_set(spec["name"], set(spec) - {"name"})
        except (FewstepError, UnknownNameError) as err:
            problems.append(f"eval/prompt_sets/{family}: {err}")
    return problems


def _training_data_problems(config: dict) -> list[str]:
    """World real: what each trained (not released) method needs from distill/train_data and
    distill/rewards, by the method's `requires` (real images for the GAN, a reward)."""
    from fewstep.registry import METHODS, REWARDS

    distill, problems = config["distill"], []
    data, rewards = distill.get("train_data", {}), distill.get("rewards", {})
    released = distill.get("released", {})
    for method in distill["methods"]:
        needs = getattr(METHODS.get(method), "requires", ())
        for family in (f for f in config["families"] if f not in released.get(method, {})):
            where = f"{method} on {family} (trained, not released)"
            if "prompts" not in data.get(family, {}):
                problems.append(f"{where} needs distill/train_data/{family}/prompts (a training "
                                "prompt file or prompt set name)")
            if "real" in needs and "real_images" not in data.get(family, {}):
                problems.append(f"{where} needs distill/train_data/{family}/real_images (the "
                                "GAN's captioned real images)")
        trained = any(f not in released.get(method, {}) for f in config["families"])
        if trained and "reward" in needs:
            name = rewards.get(method, "").partition(":")[0]
            if not name or name == "toy":
                problems.append(f"{method} trains on a reward: set distill/rewards/{method} to "
                                f"one of {[n for n in REWARDS.names() if n != 'toy']}")
            else:
                try:
                    REWARDS.check(name)
                except UnknownNameError as err:
                    problems.append(f"distill/rewards/{method}: {err}")
    return problems


def _check_metric_options(config: dict, source: str) -> None:
    """metric_options: each key a configured metric, each option one of its fields."""
    for name, options in config.get("metric_options", {}).items():
        if name not in config["metrics"]:
            raise ConfigError(f"{source}: metric_options has an entry for {name!r}, which is not "
                              f"in metrics {config['metrics']}; add it there or drop the entry")
        try:
            check_metric_options(name, options)
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None


def check_metric_options(name: str, options) -> None:
    """ValueError naming an option the metric does not take. The metric class, found through the
    registry, checks its own options: the core imports no metric."""
    METRICS.get(name).check_options(options, name)  # the registry name, as the config spells it


def check_selection_set(config: dict, path, source: str = "config") -> dict:
    """The check a checkpoint selection must pass before it scores anything: its validation
    prompt file (JSONL, `fewstep prompts`) is none of the config's evaluation sets and shares no
    prompt with them (fewstep.selection). Returns the file's reference (name, sha256)."""
    from fewstep.prompt_sets import load_prompt_file
    from fewstep.selection import SelectionError, check_validation_set, evaluation_sets, reference

    loaded = load_prompt_file(path)
    validation = reference(loaded.name, loaded.rows)
    try:
        check_validation_set(validation, evaluation_sets(config))
    except SelectionError as err:
        raise ConfigError(f"{source}: {err}") from None
    return {"name": validation["name"], "sha256": validation["sha256"]}


def parse_overrides(items: list[str]) -> dict:
    """`--set KEY=VALUE` items (values in YAML) as a mapping of option overrides."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not KEY=VALUE")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key] = parsed
    return out


def _read(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(config).__name__}")
    return config


def merged(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base` the way Snakemake merges a --configfile over the
    Snakefile's default config: mappings key by key, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both else value
    return out


def load(path: str | Path | None = None) -> dict:
    """The config the DAG would run: a file merged over the default (as `snakemake --configfile
    FILE` does), or the default alone."""
    config = _read(DEFAULT)
    if path is not None and Path(path).resolve() != DEFAULT.resolve():
        config = merged(config, _read(Path(path)))
    return validate(config, source=str(path or DEFAULT))
