"""GenEval's official prompt file and folder layout: validation, hash, completeness gates."""
import json

import numpy as np
import pytest

from fewstep.backbones.weights import MissingWeightsError
from fewstep.geneval_prompts import TASK_SIZES, read_metadata
from metrics.geneval_official import read_official_results, write_official_layout
from metrics.sampleset import write_sample_set


def synthetic_metadata() -> list[dict]:
    """553 lines in GenEval's grammar with the official task sizes (not the official prompts)."""
    lines = []
    for tag, n in TASK_SIZES.items():
        for i in range(n):
            include = [{"class": f"thing{i}", "count": 1}]
            if tag == "two_object":
                include.append({"class": "dog", "count": 1})
            if tag == "counting":
                include = [{"class": "cup", "count": 2 + i % 3}]
            if tag in ("colors", "color_attr"):
                include[0]["color"] = "red"
            if tag == "position":
                include = [{"class": "cat", "count": 1},
                           {"class": "dog", "count": 1, "position": ["left of", 0]}]
            meta = {"tag": tag, "include": include, "prompt": f"a photo of {tag} {i}"}
            if tag == "counting":
                meta["exclude"] = [{"class": "cup", "count": 3 + i % 3}]
            lines.append(meta)
    return lines


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reads_the_official_shape_and_records_its_hash(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "meta.jsonl", synthetic_metadata())
    rows, sha = read_metadata(path)
    assert len(rows) == 553 and rows[0]["prompt_id"] == "00000" and rows[552]["prompt_id"] == "00552"
    assert rows[0]["include"] == [{"class": "thing0", "count": 1}] and len(sha) == 64
    edited = synthetic_metadata()
    edited[3]["prompt"] = "a photo of something else"
    assert read_metadata(write_jsonl(tmp_path / "edited.jsonl", edited))[1] != sha
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(tmp_path / "cache"))
    with pytest.raises(MissingWeightsError, match="prompts/geneval/evaluation_metadata.jsonl"):
        read_metadata()


def test_refuses_a_subset_or_malformed_lines(tmp_path):
    subset = synthetic_metadata()[:-1]
    with pytest.raises(ValueError, match="task sizes"):
        read_metadata(write_jsonl(tmp_path / "subset.jsonl", subset))
    assert len(read_metadata(tmp_path / "subset.jsonl", require_official=False)[0]) == 552
    bad = synthetic_metadata()
    bad[0]["include"][0]["color"] = "teal"
    bad[400]["include"][1]["position"] = ["near", 0]
    with pytest.raises(ValueError, match="teal.*position must be"):
        read_metadata(write_jsonl(tmp_path / "bad.jsonl", bad))


def _geneval_set(folder, rows, images_per_prompt=4):
    records, images = [], []
    for r in rows:
        for s in range(images_per_prompt):
            records.append({"prompt_id": r["prompt_id"], "prompt": r["prompt"], "seed": s,
                            "family": "sd3", "method": "teacher", "nfe": 4, "meta": r})
            image = np.full((8, 8, 3), (s * 40 + 10, 20, 30), np.uint8)
            image[0, 0] = 255  # not blank: blank images are refused before any scoring
            images.append(image)
    return write_sample_set(folder, np.stack(images), records)


def test_official_layout_is_complete_or_not_written(tmp_path):
    rows, _ = read_metadata(write_jsonl(tmp_path / "meta.jsonl", synthetic_metadata()))
    tree = write_official_layout(_geneval_set(tmp_path / "set", rows), tmp_path / "tree")
    folders = sorted(p.name for p in tree.iterdir())
    assert folders[0] == "00000" and len(folders) == 553
    meta = json.loads((tree / "00004" / "metadata.jsonl").read_text())
    assert meta == {k: v for k, v in rows[4].items() if k != "prompt_id"}
    assert sorted(p.name for p in (tree / "00004" / "samples").iterdir()) == [
        "0000.png", "0001.png", "0002.png", "0003.png"]
    short = _geneval_set(tmp_path / "short", rows[:-1])
    with pytest.raises(ValueError, match="552 prompts .need 553"):
        write_official_layout(short, tmp_path / "tree2")
    assert not (tmp_path / "tree2").exists()


def test_official_results_must_cover_every_image(tmp_path):
    lines = [{"filename": f"out/{i // 4:05d}/samples/{i % 4:04d}.png", "tag": "colors",
              "correct": i % 2 == 0, "reason": ""} for i in range(2212)]
    rows = read_official_results(write_jsonl(tmp_path / "results.jsonl", lines))
    assert len(rows) == 2212 and rows[5]["prompt_id"] == "00001" and rows[4]["score"] == 1.0
    with pytest.raises(ValueError, match="2206 result lines, expected 2212"):
        read_official_results(write_jsonl(tmp_path / "short.jsonl", lines[:2206]))
