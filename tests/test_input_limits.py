"""Small inputs that used to hang or break: JSON Lines split only at newlines, counts with upper
bounds, and a config file merged over the default as Snakemake merges it."""
import json
import subprocess
import sys

import pytest

from fewstep import config
from fewstep.io import json_lines
from fewstep.prompts import read_prompts

ODD = "a red cube\u2028beside\u0085a ball\u2029and\x1ca line"  # separators str.splitlines splits on


def test_json_lines_split_only_at_newlines():
    text = json.dumps({"p": ODD}, ensure_ascii=False) + "\r\n" + json.dumps({"p": 2}) + "\n\n"
    assert [json.loads(line) for line in json_lines(text)] == [{"p": ODD}, {"p": 2}]


def test_prompt_file_keeps_unicode_separators_inside_a_prompt(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt_id": "a", "prompt": ODD}, {"prompt_id": "b", "prompt": "plain"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert read_prompts(path) == rows


def test_real_image_metadata_keeps_unicode_separators(tmp_path):
    from PIL import Image

    from fewstep.train_data import ImageFolder

    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "0.png")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "0.png", "prompt": ODD}, ensure_ascii=False) + "\n")
    assert ImageFolder(tmp_path, 8).rows[0]["prompt"] == ODD


def test_a_huge_prompt_count_is_refused_at_once(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fewstep", "prompts", "--family", "sit", "--n",
                          str(10**12), "--out", str(tmp_path / "p.jsonl")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "--n 1000000000000 is too large" in out.stderr
    assert not (tmp_path / "p.jsonl").exists()


@pytest.mark.parametrize("path, value", [("eval/prompts", 10**9), ("bootstrap/resamples", 10**9),
                                         ("fid/reference_images", 10**12),
                                         ("distill/pairs/count", 10**12), ("eval/seeds", list(range(5000)))])
def test_counts_have_upper_bounds(path, value):
    cfg = config.load()
    *parents, key = path.split("/")
    where = cfg
    for p in parents:
        where = where[p]
    where[key] = value
    with pytest.raises(config.ConfigError, match=path):
        config.validate(cfg)


def test_a_config_file_is_merged_over_the_default_as_snakemake_does(tmp_path):
    skeleton = config.REPO / "workflows" / "config" / "skeleton.yaml"
    cfg = config.load(skeleton)
    assert cfg["distill"]["methods"] == [] and cfg["families"] == config.load()["families"]
    out = subprocess.run([sys.executable, "-m", "fewstep", "config", str(skeleton), "--quiet"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "valid" in out.stdout
