"""Benchmark prompt sets from the data folder: formats, canonical hash, subsets, errors, CLI."""
import csv
import json

import pytest

from fewstep.backbones.weights import MissingWeightsError
from fewstep.errors import FewstepError
from fewstep.prompt_sets import (HPDV2_STYLES, PROMPT_SETS, canonical_sha256, check_hash,
                                 load_prompt_set, prompt_file_sha256, provenance_path,
                                 write_prompt_file)
from fewstep.prompts import read_prompts
from fewstep.registry import UnknownNameError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "weights"
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(root))
    return root / "prompts"


def put(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def fake_hpdv2(cache, n=3, indent=None):
    for style in HPDV2_STYLES:
        put(cache / "hpdv2" / f"{style}.json",
            json.dumps([f"{style} prompt {i} café" for i in range(n)], indent=indent))


def fake_coco(cache, n_images=20, indent=None):
    images = [{"id": 1000 + 7 * k, "file_name": f"COCO_val2014_{1000 + 7 * k:012d}.jpg"}
              for k in range(n_images)]
    annotations = []
    for k, image in enumerate(images):
        for j in range(3):  # ids interleaved so that the lowest is not the first listed
            annotations.append({"image_id": image["id"], "id": 50_000 + 10 * k + (2 - j),
                                "caption": f"  caption {j} of image {image['id']}\n"})
    data = {"info": {}, "images": images[::-1], "annotations": annotations}
    return put(cache / "coco2014" / "annotations" / "captions_val2014.json",
               json.dumps(data, indent=indent))


def fake_geneval(cache):
    """Three lines in GenEval's grammar (not the official prompts, nor its task sizes)."""
    metas = [{"tag": "single_object", "include": [{"class": "cup", "count": 1}],
              "prompt": "a photo of a cup"},
             {"tag": "counting", "include": [{"class": "cat", "count": 2}],
              "exclude": [{"class": "cat", "count": 3}], "prompt": "a photo of two cats"},
             {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}],
              "prompt": "a photo of a red car"}]
    return put(cache / "geneval" / "evaluation_metadata.jsonl",
               "".join(json.dumps(m) + "\n" for m in metas))


def fake_drawbench(cache, n=4):
    path = cache / "drawbench" / "drawbench.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8-sig") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Prompts", "Category"])
        for i in range(n):
            writer.writerow([f'A "quoted", prompt {i}', "Colors" if i % 2 else "Text"])
        writer.writerow(["", ""])  # spreadsheet exports end with empty rows
    return path


def test_every_set_loads_from_fake_files(cache):
    fake_hpdv2(cache)
    fake_geneval(cache)
    fake_coco(cache)
    put(cache / "imagenet" / "classes.txt", "tench\ncrane\ncrane\n\n")
    fake_drawbench(cache)
    options = {"coco2014-val-captions": {"n": 5, "seed": 0}}
    sets = {name: load_prompt_set(name, require_official=False, **options.get(name, {}))
            for name in PROMPT_SETS}
    hpd = sets["hpdv2"]
    assert [r["prompt_id"] for r in hpd.rows[:4]] == ["anime-000", "anime-001", "anime-002",
                                                     "concept-art-000"]
    assert hpd.rows[3]["style"] == "concept-art" and len(hpd.files) == 4 and len(hpd.rows) == 12
    gen = sets["geneval"]
    assert [r["prompt_id"] for r in gen.rows] == ["00000", "00001", "00002"]
    assert gen.rows[1]["tag"] == "counting" and gen.rows[1]["exclude"][0]["count"] == 3
    assert list(gen.files) == ["prompts/geneval/evaluation_metadata.jsonl"]
    coco = sets["coco2014-val-captions"]
    assert coco.name == "coco2014-val-captions-5-s0" and len(coco.rows) == 5
    imagenet = sets["imagenet-classes"]
    assert [(r["class_id"], r["class_label"], r["prompt"]) for r in imagenet.rows] == [
        (0, 0, "tench"), (1, 1, "crane"), (2, 2, "crane")]  # repeated names are allowed
    draw = sets["drawbench"]
    assert draw.rows[1] == {"prompt_id": "drawbench-001", "prompt": 'A "quoted", prompt 1',
                            "category": "Colors"} and len(draw.rows) == 4
    for ps in sets.values():
        assert len(ps.sha256) == 64 and ps.sha256 == canonical_sha256(ps.rows) and ps.source


def test_canonical_hash_ignores_file_layout(cache):
    fake_hpdv2(cache)
    compact = load_prompt_set("hpdv2", require_official=False)
    fake_hpdv2(cache, indent=4)
    indented = load_prompt_set("hpdv2", require_official=False)
    assert indented.sha256 == compact.sha256 and indented.rows == compact.rows
    assert indented.files != compact.files
    put(cache / "hpdv2" / "photo.json", json.dumps(["photo prompt 0 café", "other", "x"]))
    assert load_prompt_set("hpdv2", require_official=False).sha256 != compact.sha256


def test_coco_subset_is_seeded_and_takes_one_caption_per_image(cache):
    fake_coco(cache)
    a = load_prompt_set("coco2014-val-captions", n=8, seed=0, require_official=False)
    assert a.name == "coco2014-val-captions-8-s0" and a.params == {"n": 8, "seed": 0}
    assert a == load_prompt_set("coco2014-val-captions", n=8, seed=0, require_official=False)
    b = load_prompt_set("coco2014-val-captions", n=8, seed=1, require_official=False)
    assert a.sha256 != b.sha256
    image_ids = [r["image_id"] for r in a.rows]
    assert len(set(image_ids)) == 8
    for r in a.rows:  # the lowest annotation id of each image, caption stripped
        assert r["prompt"] == f"caption 2 of image {r['image_id']}"
        assert r["prompt_id"] == f"coco-{r['image_id']:012d}"
    longer = load_prompt_set("coco2014-val-captions", n=12, seed=0, require_official=False)
    assert longer.rows[:8] == a.rows  # permutation order: smaller subsets are prefixes
    fake_coco(cache, indent=2)
    assert load_prompt_set("coco2014-val-captions", n=8, seed=0,
                           require_official=False).sha256 == a.sha256
    with pytest.raises(FewstepError, match="n=21 captions asked for, but the file has 20 images"):
        load_prompt_set("coco2014-val-captions", n=21, require_official=False)
    with pytest.raises(FewstepError, match="20 captioned images, expected 40504"):
        load_prompt_set("coco2014-val-captions", n=8)


def test_missing_file_names_path_source_and_env_var(cache):
    with pytest.raises(MissingWeightsError) as err:
        load_prompt_set("drawbench")
    text = str(err.value)
    assert str(cache / "drawbench" / "drawbench.csv") in text
    assert "Prompts,Category" in text and "FEWSTEP_WEIGHTS" in text
    fake_hpdv2(cache)
    (cache / "hpdv2" / "paintings.json").unlink()
    with pytest.raises(MissingWeightsError, match="paintings.json.*zhwang/HPDv2.*FEWSTEP_WEIGHTS"):
        load_prompt_set("hpdv2")
    with pytest.raises(MissingWeightsError, match="evaluation_metadata.jsonl.*djghosh13/geneval"):
        load_prompt_set("geneval")


def test_wrong_counts_and_malformed_files_are_refused(cache):
    fake_hpdv2(cache)
    with pytest.raises(FewstepError, match=r"anime\.json: 3 prompts, expected 800"):
        load_prompt_set("hpdv2")
    put(cache / "hpdv2" / "anime.json", json.dumps(["ok", 3]))
    with pytest.raises(FewstepError, match=r"anime\.json: expected a JSON list of prompt strings; "
                                           "item 1 is 3"):
        load_prompt_set("hpdv2", require_official=False)
    put(cache / "hpdv2" / "anime.json", json.dumps({"prompts": ["a"]}))
    with pytest.raises(FewstepError, match="got dict"):
        load_prompt_set("hpdv2", require_official=False)
    put(cache / "imagenet" / "classes.txt", "a\n\nb\n")
    with pytest.raises(FewstepError, match=r"classes\.txt: blank line\(s\) \[2\]"):
        load_prompt_set("imagenet-classes", require_official=False)
    put(cache / "imagenet" / "classes.txt", "a\nb\n")
    with pytest.raises(FewstepError, match="2 class names .lines., expected 1000"):
        load_prompt_set("imagenet-classes")
    fake_drawbench(cache)
    with pytest.raises(FewstepError, match=r"drawbench\.csv: 4 prompts, expected 200"):
        load_prompt_set("drawbench")
    put(cache / "drawbench" / "drawbench.csv", "Prompt,Category\nx,y\n")
    with pytest.raises(FewstepError, match=r"lacks column\(s\) \['Prompts'\]"):
        load_prompt_set("drawbench", require_official=False)
    fake_geneval(cache)
    with pytest.raises(FewstepError, match="evaluation_metadata.jsonl.*task sizes"):
        load_prompt_set("geneval")


def test_malformed_coco_is_refused(cache):
    path = fake_coco(cache)
    data = json.loads(path.read_text())
    data["images"].append({"id": 5})
    path.write_text(json.dumps(data))
    with pytest.raises(FewstepError, match=r"1 images have no caption \(e\.g\. \[5\]\)"):
        load_prompt_set("coco2014-val-captions", n=2, require_official=False)
    data["images"].append({"id": 5})
    path.write_text(json.dumps(data))
    with pytest.raises(FewstepError, match="duplicate image id 5"):
        load_prompt_set("coco2014-val-captions", n=2, require_official=False)
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(FewstepError, match="expected COCO captions JSON"):
        load_prompt_set("coco2014-val-captions", n=2, require_official=False)
    path.write_text("{not json")
    with pytest.raises(FewstepError, match="captions_val2014.json: not JSON"):
        load_prompt_set("coco2014-val-captions", n=2, require_official=False)


def test_check_hash_messages(cache):
    fake_hpdv2(cache)
    ps = load_prompt_set("hpdv2", require_official=False)
    assert check_hash(ps, None, "claim AMD-T3") is None
    assert check_hash(ps, ps.sha256.upper(), "claim AMD-T3") is None
    msg = check_hash(ps, "ab" * 32, "claim AMD-T3")
    assert msg.startswith(f"claim AMD-T3 needs prompt set hpdv2 with sha256 {'ab' * 32}; "
                          f"the data folder holds {ps.sha256}")
    assert "prompts/hpdv2/anime.json" in msg
    assert "holds None" in check_hash(object(), "ab", "claim X")  # never raises


def test_unknown_names_and_options(cache):
    with pytest.raises(UnknownNameError, match="Did you mean 'drawbench'"):
        load_prompt_set("drawbenh")
    with pytest.raises(UnknownNameError, match="Did you mean 'coco2014-val-captions'"):
        load_prompt_set("coco2014-val-captions-10k-s0")
    with pytest.raises(FewstepError, match=r"prompt set 'hpdv2' takes no option\(s\) \['seed'\]"):
        load_prompt_set("hpdv2", seed=0)


def test_written_prompt_file_reads_back_with_its_hash(cache, tmp_path):
    fake_coco(cache)
    ps = load_prompt_set("coco2014-val-captions", n=6, seed=3, require_official=False)
    out = tmp_path / "out" / "coco.jsonl"
    write_prompt_file(ps, out)
    rows = read_prompts(out)
    assert rows == ps.rows and prompt_file_sha256(out) == ps.sha256
    prov = json.loads(provenance_path(out).read_text())
    assert prov["sha256"] == ps.sha256 and prov["prompt_set"] == "coco2014-val-captions-6-s3"
    assert prov["files"] == ps.files and prov["params"] == {"n": 6, "seed": 3}
    assert sorted(p.name for p in out.parent.iterdir()) == ["coco.jsonl",
                                                             "coco.jsonl.provenance.json"]


def test_cli_writes_a_set_and_keeps_family_mode(cache, tmp_path, capsys):
    from fewstep.cli import main

    fake_hpdv2(cache)
    out = tmp_path / "hpd.jsonl"
    assert main(["prompts", "--set", "hpdv2", "--allow-unofficial", "--out", str(out)]) == 0
    ps = load_prompt_set("hpdv2", require_official=False)
    assert f"sha256 {ps.sha256}" in capsys.readouterr().out
    assert read_prompts(out) == ps.rows
    assert json.loads(provenance_path(out).read_text())["sha256"] == ps.sha256
    fake_coco(cache)
    coco = tmp_path / "coco.jsonl"
    assert main(["prompts", "--set", "coco2014-val-captions", "--n", "4", "--seed", "2",
                 "--allow-unofficial", "--out", str(coco)]) == 0
    assert "coco2014-val-captions-4-s2" in capsys.readouterr().out and len(read_prompts(coco)) == 4
    assert main(["prompts", "--set", "hpdv2", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "expected 800" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()
    assert main(["prompts", "--family", "sdxl", "--seed", "1", "--n", "2",
                 "--out", str(tmp_path / "y.jsonl")]) == 2
    assert "apply to --set" in capsys.readouterr().err
    assert main(["prompts", "--family", "sdxl", "--n", "2", "--out", str(tmp_path / "z.jsonl")]) == 0
    assert len(read_prompts(tmp_path / "z.jsonl")) == 2


def test_scores_name_the_prompt_set_they_were_scored_on(cache, tmp_path):
    """fewstep score records the set's name and canonical hash from the prompt file's sidecar;
    a prompt file edited after it was written is refused (its hash no longer matches)."""
    from fewstep.scoring import prompt_set_of

    fake_drawbench(cache)
    out = tmp_path / "drawbench.jsonl"
    write_prompt_file(load_prompt_set("drawbench", require_official=False), out)
    named = prompt_set_of(out)
    assert named["name"] == "drawbench" and named["sha256"] == prompt_file_sha256(out)
    out.write_text(out.read_text().replace("prompt 1", "prompt one"))
    with pytest.raises(ValueError, match="does not match its provenance"):
        prompt_set_of(out)
    toy = tmp_path / "sdxl.jsonl"
    toy.write_text('{"prompt_id": "a", "prompt": "a red circle"}\n')
    assert prompt_set_of(toy)["name"] == "toy-heldout-sdxl"
