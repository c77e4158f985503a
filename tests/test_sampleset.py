"""Sample sets: atomic writing and refusal of incomplete or corrupt sets, naming the culprit."""
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


def _records(n=4, seeds_per_prompt=2):
    return [{"prompt_id": f"p{i // seeds_per_prompt}", "prompt": "a red circle",
             "seed": i % seeds_per_prompt, "family": "toy", "method": "teacher", "nfe": 4,
             "meta": {"tag": "single_object", "include": [{"class": "circle", "count": 1}]}}
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


def test_blank_image_is_named(sample_set):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(sample_set / "000001.png")
    with pytest.raises(SampleSetError, match="000001.png is blank"):
        load_sample_set(sample_set)
    assert len(load_sample_set(sample_set, allow_blank=True)) == 4


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
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(sample_set / "000001.png")
    rows = [json.loads(line) for line in (sample_set / MANIFEST).read_text().splitlines()]
    rows[3]["seed"] = rows[2]["seed"]
    (sample_set / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SampleSetError) as err:
        load_sample_set(sample_set)
    assert len(err.value.problems) == 3


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
