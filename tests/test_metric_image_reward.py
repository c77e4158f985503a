"""ImageReward (metrics/image_reward.py) on a tiny random BLIP of the package's own classes.

Parity reference: the image-reward package's own `ImageReward.score(prompt, image)` (its original
per-image computation: its PIL transform, its tokenizer call, ViT -> BERT -> head -> z-score) on
the same model object. The package runs here only through fewstep's adapter (image_reward_compat:
transformers 5 removed what its BLIP-BERT imports); the adapter changes no numerics, which the
unit tests of the re-attached mask helpers check against their transformers 4.55 semantics.
"""
from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import pytest
import torch

import metrics.image_reward as image_reward
from fewstep.backbones.weights import MissingWeightsError
from metrics.image_reward import (WEIGHTS, ImageRewardReward, ImageRewardScore, load_image_reward,
                                  reward_pixels)
from metrics.image_reward_compat import (MAX_TEXT_TOKENS, build_image_reward, get_head_mask,
                                         import_image_reward, invert_attention_mask)
from metrics.sampleset import write_sample_set

WORDS = ("a an the of on and to left right above below red green blue yellow purple orange black "
         "white circle square triangle cat dog photo painting two three four").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VISION = {"embed_dim": 32, "depth": 2, "num_heads": 2}
PROMPTS = ["a red circle left of a blue square", "a photo of two cats",
           " ".join(["a painting of a dog"] * 12)]  # over 35 word pieces: truncated
SEEDS = (0, 1)
TOL = 1e-5


def med_config(vocab_size: int) -> dict:
    """BLIP-BERT at toy depth; hidden size 768 because the package's head is MLP(768)."""
    return {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1,
            "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768,
            "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-12,
            "max_position_embeddings": 64, "model_type": "bert", "num_attention_heads": 12,
            "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2,
            "vocab_size": vocab_size, "encoder_width": 768, "add_cross_attention": True}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A weights cache in the genuine layout holding a tiny random ImageReward."""
    root = tmp_path_factory.mktemp("weights")
    folder, vocab_file = root / "imagereward", root / WEIGHTS["tokenizer"].path
    folder.mkdir()
    vocab_file.parent.mkdir(parents=True)
    vocab = SPECIAL + WORDS
    vocab_file.write_text("\n".join(vocab) + "\n")
    (folder / "med_config.json").write_text(json.dumps(med_config(len(vocab) + 2)))
    torch.manual_seed(0)
    model = build_image_reward(folder / "med_config.json", vocab_file.parent, vision=VISION)
    with torch.no_grad():  # the package's head init is tiny (std 1/769): widen it so scores vary
        for layer in model.mlp.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, layer.in_features ** -0.5)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    torch.save(state, folder / "ImageReward.pt")
    return root


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def cache(weights, monkeypatch):
    """The tiny cache, its checkpoint standing in for the published ImageReward.pt (the hash
    check itself: tests/test_image_reward_identity.py)."""
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(weights))
    monkeypatch.delenv(image_reward.PIN_ENV, raising=False)
    monkeypatch.setattr(image_reward, "PUBLISHED_SHA256", sha(weights / WEIGHTS["checkpoint"].path))
    return weights


def smooth_images(n, height, width, seed):
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((n, 3, 5, 5), dtype=np.float32))
    base = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")
    images = base.numpy() + 0.2 * rng.standard_normal((n, 3, height, width)).astype(np.float32)
    return np.rint(np.clip(images, 0, 1).transpose(0, 2, 3, 1) * 255).astype(np.uint8)


def make_set(folder, height, width):
    records = [{"prompt_id": f"p{i}", "prompt": p, "seed": s, "family": "toy", "method": "test",
                "nfe": 1} for i, p in enumerate(PROMPTS) for s in SEEDS]
    write_sample_set(folder, smooth_images(len(records), height, width, 0), records)
    return folder, records


def tiny_metric(**kw):
    return ImageRewardScore(vision_config=VISION, device="cpu", batch_size=4, n_resamples=200, **kw)


@pytest.mark.parametrize("size", [(96, 160), (224, 224), (300, 250)])
def test_scores_equal_the_package_score_on_the_same_weights(cache, tmp_path, size):
    folder, records = make_set(tmp_path / "set", *size)
    metric = tiny_metric()
    result = metric.score(folder)
    package = metric.loaded().model  # the package's ImageReward object, weights from the cache
    expected = [package.score(r["prompt"], str(folder / row["path"]))
                for r, row in zip(records, result.per_sample)]
    ours = [row["score"] for row in result.per_sample]
    assert np.max(np.abs(np.array(ours) - np.array(expected))) < TOL
    assert np.std(expected) > 0.05  # the comparison is not between constants
    assert result.value == pytest.approx(np.mean(expected), abs=TOL)
    assert result.ci_low <= result.value <= result.ci_high
    assert result.identity["scale"].startswith("x1") and result.identity["precision"] == "fp32"


def test_weights_load_from_the_cache_with_the_key_report_checked(cache, tmp_path):
    loaded = load_image_reward("cpu", vision=VISION)
    assert loaded.files["checkpoint"] == cache / WEIGHTS["checkpoint"].path
    state = torch.load(loaded.files["checkpoint"], weights_only=True)
    for key, value in state.items():
        assert torch.equal(loaded.model.state_dict()[key], value)
    state["blip.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="unexpected keys.*blip.extra.weight"):  # pinned: trusted
        load_image_reward("cpu", checkpoint=tmp_path / "bad.pt", vision=VISION,
                          expected_sha256=sha(tmp_path / "bad.pt"))
    del state["blip.extra.weight"], state["mlp.layers.0.weight"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="missing keys.*mlp.layers.0.weight"):
        load_image_reward("cpu", checkpoint=tmp_path / "missing.pt", vision=VISION,
                          expected_sha256=sha(tmp_path / "missing.pt"))


def test_a_missing_file_names_it_its_source_and_the_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(tmp_path))
    with pytest.raises(MissingWeightsError) as err:
        tiny_metric().score(tmp_path / "unused")
    text = str(err.value)
    assert "imagereward/ImageReward.pt" in text and "THUDM/ImageReward" in text
    assert "FEWSTEP_WEIGHTS" in text
    assert [w.path for w in tiny_metric().weight_files()] == [w.path for w in WEIGHTS.values()]


def test_tokens_are_the_packages_padded_and_truncated_ids(cache):
    loaded = load_image_reward("cpu", vision=VISION)
    ids, mask = loaded.tokens(PROMPTS)
    assert ids.shape == (len(PROMPTS), MAX_TEXT_TOKENS)
    assert mask[2].all() and not mask[0].all()  # the long prompt is cut at 35 tokens
    tokenizer = loaded.model.blip.tokenizer
    assert tokenizer.enc_token_id == tokenizer.convert_tokens_to_ids("[ENC]")
    assert tokenizer.enc_token_id != tokenizer.unk_token_id
    assert tokenizer.bos_token == "[DEC]"


def test_reward_equals_the_metric_at_224_and_passes_gradients(cache, tmp_path):
    folder, records = make_set(tmp_path / "set", 224, 224)
    result = tiny_metric().score(folder)
    images = torch.from_numpy(smooth_images(len(records), 224, 224, 0)).permute(0, 3, 1, 2)
    images01 = (images.float() / 255).requires_grad_(True)
    reward = ImageRewardReward(loaded=load_image_reward("cpu", vision=VISION))
    values = reward(images01, records)
    expected = torch.tensor([row["score"] for row in result.per_sample], dtype=values.dtype)
    assert torch.allclose(values.detach(), expected, atol=TOL)
    values.sum().backward()
    assert torch.isfinite(images01.grad).all() and images01.grad.abs().sum() > 0


def test_reward_preprocessing_resizes_the_shorter_side_and_centre_crops():
    x = torch.rand(2, 3, 112, 224)
    assert reward_pixels(x).shape == (2, 3, 224, 224)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        reward_pixels(torch.rand(3, 64, 64))


def test_reward_registry_entry_refuses_an_argument():
    from fewstep.registry import REWARDS

    with pytest.raises(ValueError, match="takes no argument"):
        REWARDS.get("imagereward")("v2", "cpu")


def test_the_packages_init_never_runs():
    import_image_reward()
    assert "ImageReward.ReFL" not in sys.modules and "clip" not in sys.modules


def test_invert_attention_mask_has_transformers_4_55_semantics():
    holder = type("M", (), {"dtype": torch.float32})()  # stands in for a float32 model
    mask = torch.tensor([[1, 1, 0]])
    out = invert_attention_mask(holder, mask)
    assert out.shape == (1, 1, 1, 3) and out.dtype == torch.float32
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 0, 2] == torch.finfo(torch.float32).min
    assert invert_attention_mask(holder, mask[:, None, :].expand(1, 2, 3)).shape == (1, 1, 2, 3)


def test_get_head_mask_has_transformers_4_55_semantics():
    holder = type("M", (), {"dtype": torch.float32})()
    assert get_head_mask(holder, None, 3) == [None, None, None]
    assert get_head_mask(holder, torch.ones(4), 3).shape == (3, 1, 4, 1, 1)
    assert get_head_mask(holder, torch.ones(3, 4), 3).shape == (3, 1, 4, 1, 1)


def test_the_reward_drives_a_reward_guided_method(cache):
    """AMD on a toy teacher with ImageReward as its reward: the group signal comes from it."""
    from fewstep.engine.distributed import DistInfo
    from fewstep.engine.run import build_method, toy_context
    from fewstep.toy import teachers

    teacher = teachers.build("sit", resolution=16, seed=0)
    reward = ImageRewardReward(loaded=load_image_reward("cpu", vision=VISION))
    ctx = toy_context(teacher, "sit", 16, 0, DistInfo(), reward=reward, autocast=False)
    method = build_method("amd", teacher, ctx, "toy", {"batch": 8})
    method.ctx.step = 0
    x, batch, stop = method.sample(grad=True)
    rewards = method.rewards(x, batch, stop)
    assert rewards.shape == (8,) and rewards.std() > 0
    advantage, _ = method.group_signal(x, batch, stop)
    assert advantage.abs().sum() > 0
