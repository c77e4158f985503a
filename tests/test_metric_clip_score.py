"""CLIP score on a tiny random open_clip CLIP (same classes as the real models), from the cache."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fewstep.backbones.weights import MissingWeightsError, WeightFile
from metrics.clip_score import (VARIANTS, CLIPReward, CLIPScore, CLIPVariant, apply_scale,
                                check_quickgelu, precision_context)
from metrics.fid import protocol_transform
from metrics.sampleset import read_manifest, write_sample_set

TINY = "fewstep-test-tiny-clip-quickgelu"
TINY_CONFIG = {"embed_dim": 16, "quick_gelu": True,
               "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                              "patch_size": 8},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                            "layers": 1}}
WEIGHTS = "clip/tiny/open_clip_model.safetensors"
PROMPTS = ["a red cube on a table", "two blue spheres", "a photo of a cat " * 30]  # last: > 77 tokens
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(weights root, variant, model): a random tiny CLIP saved in open_clip's HF file layout."""
    config = tmp_path_factory.mktemp("config") / f"{TINY}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(TINY).eval()
    root = tmp_path_factory.mktemp("weights")
    (root / WEIGHTS).parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / WEIGHTS))
    variant = CLIPVariant("tiny-test", TINY, "random-init", WeightFile(WEIGHTS, "built by the test"))
    return root, variant, model


@pytest.fixture
def cache(tiny, monkeypatch):
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(tiny[0]))
    return tiny


def _sample_set(folder, height, width, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(len(PROMPTS) * len(SEEDS), height, width, 3), dtype=np.uint8)
    records = [{"prompt_id": f"p{i}", "prompt": p, "seed": s, "family": "toy", "method": "test",
                "nfe": 1} for i, p in enumerate(PROMPTS) for s in SEEDS]
    write_sample_set(folder, images, records)
    return folder, images, read_manifest(folder)[0]  # the records with their image paths


def _direct_cosines(model, folder, records, prefix="", square=None):
    """The reference computation: open_clip's transform and encoders, normalise, dot."""
    transform = open_clip.image_transform(32, is_train=False)
    tokenizer = open_clip.get_tokenizer(TINY)
    out = []
    with torch.no_grad():
        for r in records:
            image = Image.open(folder / r["path"]).convert("RGB")
            if square:
                image = Image.fromarray(protocol_transform(square, "center")(np.asarray(image)))
            e_img = model.encode_image(transform(image)[None])
            e_txt = model.encode_text(tokenizer([prefix + r["prompt"]]))
            out.append(float((e_img / e_img.norm()) @ (e_txt / e_txt.norm()).T))
    return np.array(out)


@pytest.mark.parametrize("size, prefix, square", [((32, 32), "", None),
                                                  ((40, 56), "A photo depicts ", 24)])
def test_metric_equals_a_direct_open_clip_computation(cache, tmp_path, size, prefix, square):
    root, variant, model = cache
    variant = CLIPVariant(variant.key, variant.model_name, variant.pretrained, variant.weights,
                          caption_prefix=prefix, square_resize=square)
    folder, _, records = _sample_set(tmp_path / "set", *size)
    result = CLIPScore(variant=variant, device="cpu", n_resamples=50).score(folder)
    direct = _direct_cosines(model, folder, records, prefix, square)
    got = np.array([row["cosine"] for row in result.per_sample])
    np.testing.assert_allclose(got, direct, atol=1e-6, rtol=0)
    assert abs(result.value - direct.mean()) < 1e-6
    assert result.ci_low <= result.value <= result.ci_high and result.n == len(records)


def test_identity_names_everything_that_moves_the_number(cache, tmp_path):
    root, variant, _ = cache
    folder, _, _ = _sample_set(tmp_path / "set", 32, 32)
    result = CLIPScore(variant=variant, device="cpu", n_resamples=20).score(folder)
    ident = result.identity
    assert result.name == "clip_score" and result.higher_is_better
    assert (ident["model"], ident["pretrained"]) == (TINY, "random-init")
    assert ident["checkpoint_sha256"] == hashlib.sha256((root / WEIGHTS).read_bytes()).hexdigest()
    assert ident["precision"] == "fp32" and ident["scale"].startswith("cosine")
    assert ident["images_per_prompt"] == len(SEEDS) and ident["n_prompts"] == len(PROMPTS)
    assert ident["preprocessing"]["resize_mode"] == "shortest"
    assert importlib.metadata.version("open_clip_torch") in ident["implementation"]
    assert len(ident["prompt_set_sha256"]) == 64
    json.dumps(result.to_dict())  # the result is plain JSON


def test_scales():
    cos = np.array([-0.2, 0.0, 0.31])
    np.testing.assert_allclose(apply_scale(cos, "cosine"), cos)
    np.testing.assert_allclose(apply_scale(cos, "torchmetrics"), [0.0, 0.0, 31.0])
    np.testing.assert_allclose(apply_scale(cos, "hessel"), [0.0, 0.0, 0.775])
    with pytest.raises(ValueError, match="unknown CLIP-score scale"):
        apply_scale(cos, "x100")


def test_reward_agrees_with_the_metric_and_passes_gradients(cache, tmp_path):
    _, variant, _ = cache
    folder, images, records = _sample_set(tmp_path / "set", 32, 32)
    result = CLIPScore(variant=variant, device="cpu", n_resamples=20).score(folder)
    reward = CLIPReward(variant)
    images01 = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).requires_grad_()
    values = reward(images01, records)
    assert values.shape == (len(records),)
    np.testing.assert_allclose(values.detach().numpy(), [r["cosine"] for r in result.per_sample],
                               atol=1e-6, rtol=0)
    values.sum().backward()
    assert torch.isfinite(images01.grad).all() and images01.grad.abs().sum() > 0


def test_reward_resizes_other_sizes_differentiably(cache):
    _, variant, _ = cache
    square = CLIPVariant(variant.key, variant.model_name, variant.pretrained, variant.weights,
                         square_resize=24)
    images01 = torch.rand(2, 3, 48, 40, requires_grad=True)
    values = CLIPReward(square)(images01, [{"prompt": p} for p in PROMPTS[:2]])
    values.sum().backward()
    assert values.shape == (2,) and images01.grad.abs().sum() > 0


def test_missing_weights_name_the_file_source_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(tmp_path / "empty"))
    folder, _, _ = _sample_set(tmp_path / "set", 32, 32)
    metric = CLIPScore(device="cpu")  # building it reads nothing
    assert metric.weight_files() == [VARIANTS["clip-l14-openai"].weights]
    with pytest.raises(MissingWeightsError) as err:
        metric.score(folder)
    text = str(err.value)
    for part in ("clip/vit-l-14-openai/open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                 "timm/vit_large_patch14_clip_224.openai", "FEWSTEP_WEIGHTS", str(tmp_path / "empty")):
        assert part in text


def test_variants_avoid_the_quickgelu_trap():
    assert (VARIANTS["clip-l14-openai"].model_name, VARIANTS["clip-l14-openai"].pretrained) == (
        "ViT-L-14-quickgelu", "openai")
    assert (VARIANTS["clip-g14-dmd2"].model_name, VARIANTS["clip-g14-dmd2"].pretrained) == (
        "ViT-g-14", "laion2b_s12b_b42k")
    for variant in VARIANTS.values():
        check_quickgelu(variant)
    plain = CLIPVariant("bad", "ViT-L-14", "openai", VARIANTS["clip-l14-openai"].weights)
    with pytest.raises(ValueError, match="ViT-L-14-quickgelu"):
        check_quickgelu(plain)


def test_fp16_needs_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        precision_context("fp16-autocast", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown precision"):
        CLIPScore(precision="bf16")


def test_reward_refuses_a_resize_mode_it_cannot_differentiate(cache):
    _, variant, _ = cache
    reward = CLIPReward(variant)
    reward.clip.preprocess_cfg = {**reward.clip.preprocess_cfg, "resize_mode": "longest"}
    with pytest.raises(ValueError, match="'shortest' resize mode only.*'longest'"):
        reward(torch.rand(1, 3, 32, 32), [{"prompt": PROMPTS[0]}])
