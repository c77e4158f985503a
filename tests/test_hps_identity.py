"""HPSv2 checkpoints are recognised by sha256, never by file name alone (metrics/hpsv2.py,
metrics/notes/metrics.md sec. 1.6).

Tiny fake checkpoints stand in for the 1.9 GB files: the table of published hashes is replaced by
the fakes' hashes, so "published v2.0" and "published v2.1" are two tiny files here."""
from __future__ import annotations

import hashlib

import pytest
import torch

import metrics.hpsv2 as hpsv2
from fewstep.errors import FewstepError
# tests/test_metric_hpsv2.py: its tiny open_clip config and seeded tiny models
from test_metric_hpsv2 import TINY_CONFIG, smooth_images, tiny_model
from metrics.sampleset import write_sample_set

V21, V20 = hpsv2.CHECKPOINTS["v2.1"].path, hpsv2.CHECKPOINTS["v2.0"].path


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    """Three tiny checkpoints: the fake published v2.1 and v2.0 files and an unknown one."""
    folder = tmp_path_factory.mktemp("fake-hps")
    files = {}
    for seed, name in enumerate(("v2.1", "v2.0", "unknown")):
        files[name] = folder / f"{name}.pt"
        torch.save({"state_dict": tiny_model(seed).state_dict()}, files[name])
    return files


@pytest.fixture
def published(fakes, monkeypatch):
    """The fakes' hashes as the published table; no pin in the environment."""
    table = {"v2.1": sha(fakes["v2.1"]), "v2.0": sha(fakes["v2.0"])}
    monkeypatch.setattr(hpsv2, "PUBLISHED_SHA256", table, raising=False)
    for variable in ("FEWSTEP_HPS_V2_1_SHA256", "FEWSTEP_HPS_V2_0_SHA256"):
        monkeypatch.delenv(variable, raising=False)
    return table


def cache_with(tmp_path, monkeypatch, **files):
    """A weights cache whose cache paths (v21=..., v20=...) hold the given files' bytes."""
    root = tmp_path / "cache"
    for key, source in files.items():
        target = root / {"v21": V21, "v20": V20}[key]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(root))
    return root


def metric(cls=hpsv2.HPSv2, **kw):
    return cls(model_config=TINY_CONFIG, n_resamples=50, device="cpu", **kw)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("samples") / "set"
    records = [{"prompt_id": f"p{i}", "prompt": p, "seed": 0, "family": "toy", "method": "test",
                "nfe": 1} for i, p in enumerate(["a red cube", "two blue spheres"])]
    write_sample_set(folder, smooth_images(2, 32, 48, seed=0), records)
    return folder


def test_published_hashes_are_the_hugging_face_lfs_pointers():
    """The cited values (Hugging Face xswu/HPSv2, commit 697403c), distinct, well formed."""
    table = hpsv2.PUBLISHED_SHA256
    assert table == {
        "v2.0": "07cb0d20626232204ca3a6ec53ff5984e7e53212a8a7b0e0ec2bac1bdaf125a1",
        "v2.1": "c57a38fb4a2f7e7c15bf00da2ea377cdf165448b4dd1052a484c215a998c9837"}


def test_a_v20_file_under_the_v21_name_is_refused_naming_both_hashes(fakes, published, tmp_path,
                                                                     monkeypatch, samples):
    cache_with(tmp_path, monkeypatch, v21=fakes["v2.0"])
    with pytest.raises(FewstepError) as err:
        metric().score(samples)
    text = str(err.value)
    for needle in ("HPS_v2.1_compressed.pt", "v2.1", published["v2.1"], published["v2.0"],
                   "this is the v2.0 checkpoint"):
        assert needle in text
    # the other way round, through the reward (training) route too
    with pytest.raises(FewstepError, match="this is the v2.1 checkpoint"):
        hpsv2.HPSv2Reward("v2.0", device="cpu", checkpoint=fakes["v2.1"], model_config=TINY_CONFIG)


def test_a_swapped_file_is_refused_before_the_model_is_read(fakes, published, monkeypatch):
    def never(*_):
        raise AssertionError("the checkpoint was read before its hash was checked")

    monkeypatch.setattr(hpsv2, "read_state_dict", never)
    with pytest.raises(FewstepError, match="expected sha256"):
        hpsv2.load_hps("v2.1", "cpu", fakes["v2.0"], TINY_CONFIG)


def test_the_published_file_passes_and_the_identity_says_verified(fakes, published, tmp_path,
                                                                  monkeypatch, samples):
    cache_with(tmp_path, monkeypatch, v21=fakes["v2.1"], v20=fakes["v2.0"])
    for cls, version in ((hpsv2.HPSv2, "v2.1"), (hpsv2.HPSv20, "v2.0")):
        ident = metric(cls).score(samples).identity
        assert ident["checkpoint_sha256"] == published[version]
        assert ident["checkpoint_verified"] is True and ident["checkpoint_published"] is True
        assert "published sha256" in ident["checkpoint_verified_by"]


def test_an_unknown_file_without_a_pin_is_refused_saying_how_to_pin(fakes, published, tmp_path,
                                                                    monkeypatch, samples):
    found = sha(fakes["unknown"])
    cache_with(tmp_path, monkeypatch, v21=fakes["unknown"])
    with pytest.raises(FewstepError) as err:
        metric().score(samples)
    text = str(err.value)
    for needle in ("HPS_v2.1_compressed.pt", found, published["v2.1"], "expected_sha256",
                   "FEWSTEP_HPS_V2_1_SHA256", "metric_options"):
        assert needle in text


def test_a_modified_file_is_refused(fakes, published, tmp_path):
    modified = tmp_path / "HPS_v2.1_compressed.pt"
    data = bytearray(fakes["v2.1"].read_bytes())
    data[-1] ^= 1                                     # one bit of the published file flipped
    modified.write_bytes(bytes(data))
    with pytest.raises(FewstepError, match=published["v2.1"]):
        hpsv2.load_hps("v2.1", "cpu", modified, TINY_CONFIG)


def test_a_pinned_file_passes_and_the_identity_says_pinned(fakes, published, tmp_path,
                                                           monkeypatch, samples):
    found = sha(fakes["unknown"])
    cache_with(tmp_path, monkeypatch, v21=fakes["unknown"])
    ident = metric(expected_sha256=found.upper()).score(samples).identity  # any case
    assert ident["checkpoint_sha256"] == found
    assert ident["checkpoint_verified"] is True and ident["checkpoint_published"] is False
    assert "expected_sha256" in ident["checkpoint_verified_by"]
    monkeypatch.setenv("FEWSTEP_HPS_V2_1_SHA256", found)      # the reward's route: the variable
    loaded = hpsv2.load_hps("v2.1", "cpu", None, TINY_CONFIG)
    assert "FEWSTEP_HPS_V2_1_SHA256" in loaded.verification["checkpoint_verified_by"]


def test_a_pin_the_file_does_not_match_is_refused(fakes, published, tmp_path, monkeypatch):
    pin = "ab" * 32
    with pytest.raises(FewstepError) as err:
        hpsv2.load_hps("v2.1", "cpu", fakes["unknown"], TINY_CONFIG, expected_sha256=pin)
    assert pin in str(err.value) and sha(fakes["unknown"]) in str(err.value)


def test_a_pin_cannot_relabel_the_other_versions_published_file(fakes, published):
    with pytest.raises(FewstepError, match="is the v2.0 checkpoint, and a pin cannot make it"):
        hpsv2.load_hps("v2.1", "cpu", fakes["v2.0"], TINY_CONFIG,
                       expected_sha256=published["v2.0"])


@pytest.mark.parametrize("pin", ["abc", "g" * 64, 12])
def test_a_malformed_pin_names_the_option_and_value(pin):
    with pytest.raises(FewstepError) as err:
        hpsv2.HPSv2(expected_sha256=pin)
    assert "expected_sha256" in str(err.value) and repr(pin) in str(err.value)
    assert "64 hexadecimal" in str(err.value)


def test_the_file_is_hashed_once_per_process(fakes, published, tmp_path, monkeypatch, samples):
    """Verification and the identity share one hash (the per-process cache of file_sha256)."""
    import fewstep.io

    cache_with(tmp_path, monkeypatch, v21=fakes["v2.1"])
    calls = []
    real = fewstep.io.file_sha256
    monkeypatch.setattr(fewstep.io, "file_sha256", lambda p: calls.append(p) or real(p))
    m = metric()
    m.score(samples)
    m.score(samples)
    assert len(calls) == 1
