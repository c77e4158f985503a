"""ImageReward's checkpoint is recognised by sha256, never by its file name alone
(metrics/image_reward.py, metrics/notes/metrics.md sec. 2.5).

A tiny random ImageReward (tests/test_metric_image_reward.py's weights cache) stands in for the
1.79 GB file: the published hash is replaced by the tiny file's hash, so "the published
ImageReward.pt" is a tiny file here and the real one is never needed."""
from __future__ import annotations

import hashlib

import pytest
import torch

import metrics.image_reward as image_reward
from fewstep.errors import FewstepError
# tests/test_metric_image_reward.py: its tiny weights cache, ViT config and sample sets
from test_metric_image_reward import VISION, make_set, weights  # noqa: F401 (weights: fixture)

ENV = "FEWSTEP_IMAGEREWARD_SHA256"


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def unknown(weights, tmp_path_factory):
    """A modified checkpoint: the published (tiny) state dict with one head weight changed."""
    state = torch.load(weights / "imagereward" / "ImageReward.pt", weights_only=True)
    state["mlp.layers.0.weight"][0, 0] += 1.0
    path = tmp_path_factory.mktemp("unknown") / "ImageReward.pt"
    torch.save(state, path)
    return path


@pytest.fixture
def published(weights, monkeypatch):
    """The tiny cache's checkpoint as the published file; no pin in the environment."""
    digest = sha(weights / "imagereward" / "ImageReward.pt")
    monkeypatch.setattr(image_reward, "PUBLISHED_SHA256", digest, raising=False)
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(weights))
    monkeypatch.delenv(ENV, raising=False)
    return digest


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder, _ = make_set(tmp_path_factory.mktemp("samples") / "set", 64, 64)
    return folder


def metric(**kw):
    return image_reward.ImageRewardScore(vision_config=VISION, device="cpu", batch_size=4,
                                         n_resamples=50, **kw)


def test_the_published_hash_is_the_hugging_face_lfs_pointer():
    """The cited value (Hugging Face THUDM/ImageReward, ImageReward.pt, 1,786,880,927 bytes)."""
    assert image_reward.PUBLISHED_SHA256 == (
        "d71dc8d4912bc633c06ab8ef1ef6a81e8199d4369f14b47b29baf1d19de561f6")
    assert image_reward.PIN_OPTION == "expected_sha256" and image_reward.PIN_ENV == ENV


def test_a_modified_file_is_refused_before_it_is_read(published, unknown, monkeypatch):
    def never(*_, **__):
        raise AssertionError("the checkpoint was read before its hash was checked")

    monkeypatch.setattr(image_reward, "build_image_reward", never)
    monkeypatch.setattr(image_reward.torch, "load", never)
    with pytest.raises(FewstepError) as err:
        image_reward.load_image_reward("cpu", checkpoint=unknown, vision=VISION)
    text = str(err.value)
    for needle in (str(unknown), sha(unknown), published, "expected sha256"):
        assert needle in text


def test_an_unknown_file_in_the_cache_is_refused_saying_how_to_pin(published, unknown, weights,
                                                                   monkeypatch, samples, tmp_path):
    cache = tmp_path / "cache"
    (cache / "imagereward").mkdir(parents=True)
    config = "imagereward/med_config.json"
    (cache / config).write_bytes((weights / config).read_bytes())
    (cache / "imagereward" / "ImageReward.pt").write_bytes(unknown.read_bytes())
    vocab = image_reward.WEIGHTS["tokenizer"].path
    (cache / vocab).parent.mkdir(parents=True)
    (cache / vocab).write_bytes((weights / vocab).read_bytes())
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(cache))
    with pytest.raises(FewstepError) as err:
        metric().score(samples)
    text = str(err.value)
    for needle in ("ImageReward.pt", sha(unknown), published, "expected_sha256", ENV,
                   "metric_options", "imagereward"):
        assert needle in text
    # the training reward's route (REWARDS 'imagereward'): refused before the ViT-L is built
    from fewstep.registry import REWARDS

    with pytest.raises(FewstepError, match=sha(unknown)):
        REWARDS.get("imagereward")(None, "cpu")


def test_the_published_file_passes_and_the_identity_says_verified(published, samples):
    ident = metric().score(samples).identity
    assert ident["checkpoint_sha256"] == published
    assert ident["checkpoint_verified"] is True and ident["checkpoint_published"] is True
    assert "published sha256" in ident["checkpoint_verified_by"]
    assert "THUDM/ImageReward" in ident["checkpoint_verified_by"]


def test_a_pinned_file_passes_and_the_identity_says_pinned(published, unknown, samples,
                                                           monkeypatch):
    found = sha(unknown)
    ident = metric(checkpoint=unknown, expected_sha256=found.upper()).score(samples).identity
    assert ident["checkpoint_sha256"] == found
    assert ident["checkpoint_verified"] is True and ident["checkpoint_published"] is False
    assert "expected_sha256" in ident["checkpoint_verified_by"]
    monkeypatch.setenv(ENV, found)                   # the reward's route: the variable
    reward = image_reward.ImageRewardReward(device="cpu", checkpoint=unknown, vision=VISION)
    assert ENV in reward.ir.verification["checkpoint_verified_by"]
    assert reward.ir.verification["checkpoint_published"] is False


def test_the_training_reward_refuses_a_modified_file_without_a_pin(published, unknown):
    with pytest.raises(FewstepError, match=ENV):
        image_reward.ImageRewardReward(device="cpu", checkpoint=unknown, vision=VISION)


def test_a_pin_the_file_does_not_match_is_refused(published, unknown):
    pin = "ab" * 32
    with pytest.raises(FewstepError) as err:
        image_reward.load_image_reward("cpu", checkpoint=unknown, vision=VISION,
                                       expected_sha256=pin)
    assert pin in str(err.value) and sha(unknown) in str(err.value)
    assert "expected_sha256" in str(err.value)


@pytest.mark.parametrize("pin", ["abc", "g" * 64, 12])
def test_a_malformed_pin_names_the_option_and_value(pin):
    with pytest.raises(FewstepError) as err:
        image_reward.ImageRewardScore(expected_sha256=pin)
    assert "expected_sha256" in str(err.value) and repr(pin) in str(err.value)
    assert "64 hexadecimal" in str(err.value)


def test_a_malformed_variable_names_the_variable(published, monkeypatch):
    monkeypatch.setenv(ENV, "not-a-hash")
    with pytest.raises(FewstepError, match=ENV):
        image_reward.load_image_reward("cpu", vision=VISION)


def test_the_option_is_accepted_by_the_config_check():
    from fewstep.config import check_metric_options

    check_metric_options("imagereward", {"expected_sha256": "ab" * 32})


def test_the_file_is_hashed_once_per_process(published, weights, samples, monkeypatch,
                                             tmp_path):
    """Verification and the identity share one hash (the per-process cache of file_sha256)."""
    import fewstep.io

    fresh = tmp_path / "ImageReward.pt"          # a new path: no earlier test hashed it
    fresh.write_bytes((weights / "imagereward" / "ImageReward.pt").read_bytes())
    calls = []
    real = fewstep.io.file_sha256
    monkeypatch.setattr(fewstep.io, "file_sha256", lambda p: calls.append(p) or real(p))
    m = metric(checkpoint=fresh)
    m.score(samples)
    m.score(samples)
    assert [p for p in calls if str(p) == str(fresh)] == [fresh]
