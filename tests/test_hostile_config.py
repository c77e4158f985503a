"""Config strings never run as code: a payload put in every string field of the schema is either
refused by validation or reaches each planned job's command quoted. Each planned command is run by
bash with the fewstep program replaced by `true`: a live substitution would create a canary."""
import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fewstep import config

REPO = config.REPO
PAPER = REPO / "workflows" / "config" / "paper"
CANARY = "PWNED"
PAYLOAD = f"ok$(touch {CANARY}1)`touch {CANARY}2`;touch {CANARY}3;'\"x"
# string options of the methods: they reach `fewstep train --set KEY=VALUE`
OPTION_CASES = [("distill/overrides/dmd/pairs", "dmd"), ("distill/overrides/amd/reward_model", "amd"),
                ("distill/overrides/rtdmd/init_from", "rtdmd")]


def string_fields(schema: dict, path: str = "") -> list[str]:
    """Every string-valued place of the schema: '*' a map's key level, '[]' an array's items."""
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    found = [path] if "string" in kinds or "enum" in schema else []
    for key, sub in schema.get("properties", {}).items():
        found += string_fields(sub, f"{path}/{key}".lstrip("/"))
    if isinstance(schema.get("additionalProperties"), dict):
        found += string_fields(schema["additionalProperties"], f"{path}/*".lstrip("/"))
    if isinstance(schema.get("items"), dict):
        found += string_fields(schema["items"], f"{path}/[]")
    return found


def bases() -> dict[str, dict]:
    """Configs that between them fill every map and list of the schema (as Snakemake merges a
    config file over the default)."""
    toy = config.load()
    merged = {}
    for name in ("sit-imagenet256-train", "dmd2-sdxl-coco10k"):
        cfg = copy.deepcopy(toy)
        _merge(cfg, yaml.safe_load((PAPER / f"{name}.yaml").read_text()))
        merged[name] = cfg
    train = merged["sit-imagenet256-train"]
    train["distill"]["methods"].append("amd")
    train["distill"]["stages"]["amd"] = ["amd-sit-int"]
    train["distill"]["rewards"] = {"amd": "hpsv2"}
    train["distill"]["overrides"] = {"dmd": {"steps": 10}}
    train["distill"]["released"] = {"dmd2": {"sit": {"weights": "dmd2/sit.safetensors",
                                                     "preset": "dmd2-sit-ext"}}}
    train["teachers"]["dtype"] = "bf16"
    train["mlflow"]["tracking_uri"] = "http://localhost:5000"
    # without DMD nothing resolves the preset while the DAG is built (DMD's pairs rule does)
    no_pairs = copy.deepcopy(toy)
    no_pairs["distill"]["methods"].remove("dmd")
    return {"toy": toy, "toy-without-dmd": no_pairs, **merged}


def _merge(base: dict, over: dict) -> None:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def inject(cfg: dict, path: str) -> int:
    """Put PAYLOAD at every concrete place of `path` in `cfg` (a value, a list item, a map key);
    returns how many places there were."""
    head, _, rest = path.partition("/")
    if head == "[]":
        if not isinstance(cfg, list) or not cfg:
            return 0
        if not rest:
            cfg[0] = PAYLOAD
            return 1
        return sum(inject(item, rest) for item in cfg)
    if not isinstance(cfg, dict):
        return 0
    keys = list(cfg) if head == "*" else [head] if head in cfg else []
    if not rest:
        if head == "*":  # the map's keys themselves: one more entry under a hostile key
            if not keys:
                return 0
            cfg[PAYLOAD] = copy.deepcopy(cfg[keys[0]])
            return 1
        cfg[head] = PAYLOAD
        return 1
    return sum(inject(cfg[k], rest) for k in keys)


def accepted(cfg: dict) -> bool:
    try:
        config.validate(cfg)
        return True
    except config.ConfigError:
        return False


def planned_commands(tmp_path: Path, cfg: dict) -> list[str]:
    (tmp_path / "hostile.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d",
                          str(tmp_path / "work"), "-n", "-p", "all", "--configfile",
                          str(tmp_path / "hostile.yaml")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return [line[len("Shell command: "):] for line in out.stdout.splitlines()
            if line.startswith("Shell command: ")]


def run_neutralised(command: str, cwd: Path) -> None:
    """Run a planned command with every program replaced by `true` (arguments still expanded)."""
    command = command.replace(sys.executable, "true")
    for log in re.findall(r"> (\S+) 2>&1", command):
        (cwd / log).parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, timeout=60)


def test_every_string_field_of_the_schema_is_covered_by_a_base_config():
    schema = yaml.safe_load(config.SCHEMA.read_text())
    fields = string_fields(schema)
    assert "distill/preset" in fields and "distill/stages/*/[]" in fields
    uncovered = [f for f in fields if not any(inject(copy.deepcopy(c), f) for c in bases().values())]
    assert not uncovered


def apply(cfg: dict, path: str) -> bool:
    """The payload at `path` (a schema field, or a method's string option); False if absent."""
    if path.startswith("distill/overrides/"):
        _, _, method, option = path.split("/")
        cfg["distill"]["overrides"].setdefault(method, {})[option] = PAYLOAD
        return True
    return inject(cfg, path) > 0


@pytest.mark.parametrize("name", ["toy", "toy-without-dmd", "sit-imagenet256-train", "dmd2-sdxl-coco10k"])
def test_hostile_strings_are_refused_or_quoted(name, tmp_path):
    base = bases()[name]
    config.validate(base)
    schema = yaml.safe_load(config.SCHEMA.read_text())
    cases = string_fields(schema) + [path for path, method in OPTION_CASES
                                     if method in base["distill"]["methods"]]
    hostile, live = copy.deepcopy(base), []
    for path in cases:
        trial = copy.deepcopy(base)
        if apply(trial, path) and accepted(trial):  # any string passes: it must reach the shell quoted
            live.append(path)
            apply(hostile, path)
    assert live, "no field let the payload through: the test would check nothing"
    config.validate(hostile)
    commands = planned_commands(tmp_path, hostile)
    assert any("ok$(touch" in c for c in commands), "the payload reached no command"
    for command in commands:
        run_neutralised(command, tmp_path)
    assert not list(tmp_path.glob(f"{CANARY}*")), f"a config string ran as code; live fields: {live}"
    # resolved against their registries at validation: never a free string
    assert "eval/prompt_sets/*/name" not in live and (name[:3] != "toy" or "distill/preset" not in live)


def test_hostile_preset_and_overrides_are_refused_at_validation():
    cfg = config.load()
    cfg["distill"]["preset"] = f"$(touch {CANARY})toy"
    with pytest.raises(config.ConfigError, match="unknown dmd preset"):
        config.validate(cfg)
    cfg = config.load()
    cfg["distill"]["stages"] = {"rtdmd": ["toy-stage1", "toy; touch x"]}
    with pytest.raises(config.ConfigError, match="distill/stages/rtdmd"):
        config.validate(cfg)
