"""Sample sets: atomic writing and refusal of incomplete or corrupt sets, naming the culprit."""
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from metrics.base import MetricResult
from metrics.sampleset import (MANIFEST, SampleSetError, load_sample_set, to_uint8_images,
                               write_sample_set)


def _images(n=4, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


PROMPTS = [("a red circle", {"tag": "single_object", "include": [{"class": "circle", "count": 1}]}),
           ("two blue squares", {"tag": "counting", "include": [{"class": "square", "count": 2}]})]


def _prompt_rows():
    """The prompt file's rows; a record's meta is its prompt's row, as `fewstep sample` writes."""
    return [{"prompt_id": f"p{i}", "prompt": text, **task}
            for i, (text, task) in enumerate(PROMPTS)]


def _records(n=4, seeds_per_prompt=2):
    rows = _prompt_rows()
    return [{"prompt_id": f"p{i // seeds_per_prompt}", "prompt": PROMPTS[i // seeds_per_prompt][0],
             "seed": i % seeds_per_prompt, "family": "toy", "method": "teacher", "nfe": 4,
             "steps": 2, "guidance": 1.5, "meta": rows[i // seeds_per_prompt]}
            for i in range(n)]


@pytest.fixture
def sample_set(tmp_path):
    return write_sample_set(tmp_path / "set", _images(), _records())


def test_roundtrip_uint8_and_float(tmp_path):
    imgs = _images()
    folder = write_sample_set(tmp_path / "a", imgs, _records())
    ss = load_sample_set(folder, expected=[("p0", 0), ("p0", 1), ("p1", 0), ("p1", 1)], resolution=16)
    assert len(ss) == 4 and ss.resolution == (16, 16)
    assert np.array_equal(ss.load_image(2), imgs[2])
    assert ss.records[0]["meta"]["tag"] == "single_object"
    as_float = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    folder_b = write_sample_set(tmp_path / "b", as_float, _records())
    assert np.array_equal(load_sample_set(folder_b).load_image(3), imgs[3])


def test_write_is_atomic_and_refuses_overwrite(tmp_path, sample_set):
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no temporary sibling left behind
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_sample_set(sample_set, _images(), _records())
    write_sample_set(sample_set, _images(seed=1), _records(), overwrite=True)
    assert np.array_equal(load_sample_set(sample_set).load_image(0), _images(seed=1)[0])
    assert [p.name for p in tmp_path.iterdir()] == ["set"]


def test_write_refuses_nan_and_duplicates(tmp_path):
    bad = torch.rand(4, 3, 8, 8)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"\[1\].*NaN"):
        write_sample_set(tmp_path / "nan", bad, _records())
    dup = _records()
    dup[1]["seed"] = 0
    with pytest.raises(SampleSetError, match="duplicate"):
        write_sample_set(tmp_path / "dup", _images(), dup)
    assert not (tmp_path / "nan").exists() and not (tmp_path / "dup").exists()


def test_missing_image_is_named(sample_set):
    (sample_set / "000002.png").unlink()
    with pytest.raises(SampleSetError, match="missing image 000002.png"):
        load_sample_set(sample_set)


def test_blank_image_is_named(tmp_path):
    images = _images()
    images[1] = 0  # a sampler's blank output, written as sampled (so its hash is the manifest's)
    folder = write_sample_set(tmp_path / "set", images, _records())
    with pytest.raises(SampleSetError, match="000001.png is blank"):
        load_sample_set(folder)
    assert len(load_sample_set(folder, allow_blank=True)) == 4


def test_jpeg_is_refused(sample_set):
    # A JPEG under a .png name, and an extra .jpg next to the PNGs.
    Image.fromarray(_images(1)[0]).save(sample_set / "000003.png", format="JPEG")
    Image.fromarray(_images(1)[0]).save(sample_set / "extra.jpg", format="JPEG")
    with pytest.raises(SampleSetError) as err:
        load_sample_set(sample_set)
    msg = str(err.value)
    assert "000003.png is not a PNG" in msg and "extra non-PNG file extra.jpg" in msg


def test_wrong_size_is_named(sample_set):
    Image.fromarray(_images(1, size=20)[0]).save(sample_set / "000000.png")
    with pytest.raises(SampleSetError, match="000000.png is 20x20"):
        load_sample_set(sample_set)
    with pytest.raises(SampleSetError, match=r"expected 32x32"):
        load_sample_set(sample_set, resolution=32)


def test_missing_manifest_and_expected_pairs(sample_set):
    with pytest.raises(SampleSetError, match=r"\('p2', 0\)"):
        load_sample_set(sample_set, expected=[("p0", 0), ("p0", 1), ("p1", 0), ("p1", 1), ("p2", 0)])
    (sample_set / MANIFEST).unlink()
    with pytest.raises(SampleSetError, match="missing manifest.jsonl"):
        load_sample_set(sample_set)


def test_every_problem_is_listed(sample_set):
    (sample_set / "000000.png").unlink()
    Image.fromarray(_images(1)[0]).save(sample_set / "stray.png")
    lines = _lines(sample_set)
    _row(lines, "p1", 0)["seed"] = 1
    _write_lines(sample_set, lines)
    with pytest.raises(SampleSetError) as err:
        load_sample_set(sample_set)
    assert len(err.value.problems) == 3
    assert "missing image 000000.png" in str(err.value) and "stray.png" in str(err.value)
    assert "duplicate (prompt_id, seed) ('p1', 1)" in str(err.value)


def test_to_uint8_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        to_uint8_images(np.zeros((4, 4, 3)))


def test_metric_result_json_roundtrip(tmp_path):
    res = MetricResult("toy_fid", "1", False, 3.5, 3.0, 4.0, 10,
                       per_sample=[{"prompt_id": "p0", "seed": 0}], identity={"mode": "clean"})
    again = MetricResult.load(res.save(tmp_path / "r.json"))
    assert again == res
    with pytest.raises(ValueError, match="finite"):
        MetricResult("x", "1", True, float("nan"), 0, 1, 1)


# ------------------------------------------------------- content: hashes, header, the prompt file

def _lines(folder):
    return [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines()]


def _write_lines(folder, lines):
    (folder / MANIFEST).write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in lines))


def _row(lines, prompt_id, seed):
    return next(x for x in lines if x.get("prompt_id") == prompt_id and x.get("seed") == seed)


def test_records_round_trip_and_the_header_holds_the_set_fields(sample_set):
    ss = load_sample_set(sample_set, prompts=_prompt_rows())
    assert ss.records == [{**r, "path": f"{i:06d}.png"} for i, r in enumerate(_records())]
    assert {k: ss.header[k] for k in ("method", "family", "nfe", "steps", "guidance")} == {
        "method": "teacher", "family": "toy", "nfe": 4, "steps": 2, "guidance": 1.5}
    assert ss.header["prompt_set_sha256"] == ss.prompt_set_sha256()
    rows = _lines(sample_set)[1:]
    assert all("nfe" not in row and "method" not in row for row in rows)  # stated once
    for row in rows:
        image = (sample_set / row["path"]).read_bytes()
        assert row["image_sha256"] == hashlib.sha256(image).hexdigest()
        assert row["prompt_sha256"] == hashlib.sha256(row["prompt"].encode()).hexdigest()
    assert ss.manifest_sha256 == hashlib.sha256((sample_set / MANIFEST).read_bytes()).hexdigest()


def test_a_row_relabelled_as_another_prompt_is_refused(sample_set):
    """Probe (a): the record of (p1, 0) carries p0's prompt text, meta and prompt hash."""
    lines = _lines(sample_set)
    source, target = _row(lines, "p0", 0), _row(lines, "p1", 0)
    for key in ("prompt", "meta", "prompt_sha256"):
        if key in source:
            target[key] = source[key]
    _write_lines(sample_set, lines)
    with pytest.raises(SampleSetError, match="prompt set"):
        load_sample_set(sample_set)
    with pytest.raises(SampleSetError, match=r"000002.png.*prompt file"):
        load_sample_set(sample_set, prompts=_prompt_rows())


def test_a_row_with_another_nfe_is_refused_and_never_written(sample_set, tmp_path):
    """Probe (b): one record claims NFE 8 in a set sampled at NFE 4."""
    lines = _lines(sample_set)
    _row(lines, "p1", 1)["nfe"] = 8
    _write_lines(sample_set, lines)
    with pytest.raises(SampleSetError, match=r"000003.png.*nfe=8.*header.*nfe=4"):
        load_sample_set(sample_set)
    mixed = _records()
    mixed[3]["nfe"] = 8
    with pytest.raises(SampleSetError, match=r"nfe.*one set per"):
        write_sample_set(tmp_path / "mixed", _images(), mixed)
    assert not (tmp_path / "mixed").exists()


def test_images_swapped_across_prompts_are_refused(sample_set):
    """Probe (c): the PNG files of (p0, 0) and (p1, 0) trade places."""
    a, b = sample_set / "000000.png", sample_set / "000002.png"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    with pytest.raises(SampleSetError) as err:
        load_sample_set(sample_set)
    assert len(err.value.problems) == 2
    assert all("sha256" in p for p in err.value.problems)
    assert "000000.png" in err.value.problems[0] and "000002.png" in err.value.problems[1]


def test_an_image_replaced_by_another_valid_png_is_refused(sample_set):
    """Probe (d): a well-formed PNG of the right size, just not the sampled one."""
    Image.fromarray(_images(1, seed=5)[0]).save(sample_set / "000003.png")
    with pytest.raises(SampleSetError, match=r"000003.png.*sha256"):
        load_sample_set(sample_set)


def test_a_manifest_without_a_header_is_refused_with_how_to_resample(sample_set):
    rows = [{**r, "path": f"{i:06d}.png"} for i, r in enumerate(_records())]
    _write_lines(sample_set, rows)  # the format before image hashes: one row per image only
    with pytest.raises(SampleSetError, match=r"no header.*fewstep sample"):
        load_sample_set(sample_set)
