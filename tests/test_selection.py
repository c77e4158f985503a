"""Checkpoint selection never uses the evaluation prompts: a validation prompt set whose content
hash equals an evaluation set's (or that shares prompts with one) is refused, naming both sets.
The harness evaluates the final (EMA) checkpoint, recorded as student.json "checkpoint": "final"
(tests/test_fidelity_ledger.py checks the record)."""
import json

import pytest

from fewstep import config as cfg
from fewstep import selection
from fewstep.commands.prompts import eval_prompts
from fewstep.config import ConfigError


def write_prompts(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_validation_set_that_is_an_evaluation_set_is_refused_naming_both(tmp_path):
    config = cfg.load()  # the default toy config: eval/prompts held-out prompts per family
    n = config["eval"]["prompts"]
    same = write_prompts(tmp_path / "val.jsonl", eval_prompts("sdxl", n))
    with pytest.raises(ConfigError) as err:
        cfg.check_selection_set(config, same)
    text = str(err.value)
    assert "val.jsonl" in text and "eval/prompts (sdxl" in text and "sha256" in text
    assert "final (EMA) checkpoint" in text


def test_a_validation_set_that_shares_prompts_with_an_evaluation_set_is_refused(tmp_path):
    config = cfg.load()
    rows = eval_prompts("sdxl", 4)
    rows = [{**r, "prompt_id": f"v{i}"} for i, r in enumerate(rows)]  # other ids, same prompts
    path = write_prompts(tmp_path / "val.jsonl", rows)
    with pytest.raises(ConfigError, match=r"shares 4 prompts with the evaluation set"):
        cfg.check_selection_set(config, path)


def test_a_disjoint_validation_set_passes(tmp_path):
    config = cfg.load()
    rows = [{"prompt_id": f"v{i}", "prompt": f"a validation prompt number {i}"} for i in range(5)]
    ref = cfg.check_selection_set(config, write_prompts(tmp_path / "val.jsonl", rows))
    assert ref["name"] == "file:val.jsonl" and len(ref["sha256"]) == 64


def test_the_pure_check_compares_hashes():
    evals = {"sdxl": {"name": "coco2014-val-captions (n 10000, seed 123)", "sha256": "a" * 64,
                      "prompts": set()}}
    with pytest.raises(selection.SelectionError) as err:
        selection.check_validation_set({"name": "mine", "sha256": "a" * 64, "prompts": set()},
                                       evals)
    assert "mine" in str(err.value) and "coco2014-val-captions (n 10000, seed 123)" in str(err.value)
    selection.check_validation_set({"name": "mine", "sha256": "b" * 64, "prompts": {"x"}}, evals)


@pytest.mark.parametrize("family", ["sdxl", "sit"])
def test_the_toy_evaluation_rows_are_the_ones_fewstep_prompts_writes(family):
    assert selection.toy_eval_rows(family, 61) == eval_prompts(family, 61)


def test_fewstep_config_checks_a_validation_prompt_file(tmp_path, capsys):
    from fewstep.cli import main
    same = write_prompts(tmp_path / "val.jsonl", eval_prompts("sit", cfg.load()["eval"]["prompts"]))
    assert main(["config", "--quiet", "--validation-prompts", str(same)]) == 2
    err = capsys.readouterr().err
    assert "val.jsonl refused" in err and "the toy sit held-out prompts" in err
    other = write_prompts(tmp_path / "other.jsonl", [{"prompt_id": "v0", "prompt": "a red cube"}])
    assert main(["config", "--quiet", "--validation-prompts", str(other)]) == 0
    assert "disjoint from every evaluation set" in capsys.readouterr().out
