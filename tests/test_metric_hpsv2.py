"""HPSv2 (metrics/hpsv2.py) on a tiny random open_clip CLIP saved in the genuine checkpoint layout.

Parity reference: the hpsv2 package (1.2.0, installed with --no-deps, requirements-nodeps.lock) run
through its own scoring function `hpsv2.img_score.score`, which builds its bundled open_clip fork's
model and "val" transform (`create_model_and_transforms(..., light_augmentation=True)`, i.e. the
letterboxing ResizeMaxSize), loads the checkpoint strictly from `{"state_dict": ...}`, tokenises
with the fork's tokenizer and returns image_features @ text_features.T. The package cannot be
imported as shipped (metrics/notes/metrics.md sec. 1.4); tests/hpsv2_reference.py adapts it at
import time without copying any of it (placeholder package modules, stubbed clint/turtle, the
missing BPE file served from open_clip's, token ids compared separately below) and redirects the
model factory call inside `score` from ViT-H-14 + LAION weights (a 3.94 GB download) to the tiny
config with no pretrained weights; everything else is the package's own code, on the CPU
(`img_score.device`), where its CUDA autocast is inactive, i.e. fp32.
"""
from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from fewstep.backbones.weights import MissingWeightsError
# tests/hpsv2_reference.py (pytest's default import mode puts the tests folder on sys.path)
from hpsv2_reference import (HPSv2PackageMissing, adapted_hpsv2, package_root, redirected_scoring,
                             scores_per_prompt)
import metrics.hpsv2 as hpsv2
from metrics.hpsv2 import (CHECKPOINTS, HPSv2, HPSv20, HPSv2Reward, hps_pixels, image_to_tensor01,
                           letterbox, letterbox_geometry, load_hps)
from metrics.sampleset import read_manifest, write_sample_set

TINY_CONFIG = {"embed_dim": 16,
               "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16,
                              "patch_size": 14},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                            "layers": 2}}
TINY_NAME = "fewstep-test-tiny-hps"
PROMPTS = ["a red cube on a table", "an oil painting of two blue spheres, &amp; a cat",
           "a photo of a cat " * 30]                        # the last one is over 77 tokens
SEEDS = (0, 1)
HEIGHT, WIDTH = 101, 160                                    # non-square: letterboxing is exercised
TOL = 1e-5


def tiny_model(seed: int):
    """A random tiny CLIP of open_clip's classes; weights spread wider than the default
    initialisation so that scores clearly depend on the image and the prompt."""
    from open_clip.model import CLIP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(**json.loads(json.dumps(TINY_CONFIG)))
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A weights cache holding both HPS files (different random weights), genuine layout; while
    it is used, their hashes stand in for the published ones (tests/test_hps_identity.py)."""
    root = tmp_path_factory.mktemp("weights")
    for seed, version in enumerate(("v2.1", "v2.0")):
        path = root / CHECKPOINTS[version].path
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": tiny_model(seed).state_dict()}, path)
    table = {version: sha256_of(root / CHECKPOINTS[version].path) for version in CHECKPOINTS}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hpsv2, "PUBLISHED_SHA256", table)
        yield root


@pytest.fixture
def cache(weights, monkeypatch):
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(weights))
    return weights


def smooth_images(n: int, height: int, width: int, seed: int) -> np.ndarray:
    """uint8 images with structure at several scales (noise alone would make every image alike)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, 3, 6, 6), dtype=np.float32)
    base = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(height, width),
                                           mode="bilinear", align_corners=False)
    fine = 0.25 * rng.standard_normal((n, 3, height, width)).astype(np.float32)
    images = np.clip(base.numpy() + fine, 0, 1).transpose(0, 2, 3, 1)
    return np.rint(images * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("samples") / "set"
    images = smooth_images(len(PROMPTS) * len(SEEDS), HEIGHT, WIDTH, seed=0)
    records = [{"prompt_id": f"p{i}", "prompt": p, "seed": s, "family": "toy", "method": "test",
                "nfe": 1} for i, p in enumerate(PROMPTS) for s in SEEDS]
    write_sample_set(folder, images, records)
    return folder, images, read_manifest(folder)[0]


def tiny_metric(cls=HPSv2, **kw):
    """The metric on the tiny config; on the CPU (fp32) unless a test asks for CUDA."""
    return cls(model_config=TINY_CONFIG, n_resamples=200, **{"device": "cpu", **kw})


@pytest.fixture(scope="module")
def scored(weights, sample_set):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEWSTEP_WEIGHTS", str(weights))
        metric = tiny_metric()
        return metric, metric.score(sample_set[0])


# ------------------------------------------------------------ the hpsv2 package as reference

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(img_score, factory, transform module) of the installed hpsv2 package, adapted by
    tests/hpsv2_reference.py, with the tiny config registered in the fork's factory."""
    try:
        package_root()
    except HPSv2PackageMissing as err:
        pytest.fail(str(err))
    with adapted_hpsv2({TINY_NAME: TINY_CONFIG}, tmp_path_factory.mktemp("fork-config")) as package:
        yield package


def package_scores(reference, checkpoint: Path, folder: Path, records, monkeypatch, tmp_path,
                   device="cpu"):
    """Per-image cosines from hpsv2.img_score.score, one call per prompt as the package is used
    (on CUDA it runs under its fp16 autocast; on the CPU in fp32)."""
    with redirected_scoring(reference, TINY_NAME, device, tmp_path / "hps-root") as img_score:
        return scores_per_prompt(img_score, [folder / r["path"] for r in records],
                                 [r["prompt"] for r in records], checkpoint, "v2.1")


def test_scores_match_the_hpsv2_package(reference, scored, sample_set, weights, monkeypatch,
                                        tmp_path):
    folder, _, records = sample_set
    metric, result = scored
    theirs = package_scores(reference, weights / CHECKPOINTS["v2.1"].path, folder, records,
                            monkeypatch, tmp_path)
    ours = np.array([row["cosine"] for row in result.per_sample])
    assert np.ptp(ours) > 1e-3, "scores must depend on the image/prompt for parity to mean anything"
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)
    assert result.value == pytest.approx(100 * theirs.mean(), abs=100 * TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast is CUDA-only")
def test_fp16_autocast_on_cuda_follows_the_package(reference, cache, sample_set, weights,
                                                   monkeypatch, tmp_path):
    """The reference precision: cosines rounded to fp16 like the package's (the ties HPSv2 reports);
    batch sizes differ (the package scores one image at a time), hence the fp16-sized tolerance."""
    folder, _, records = sample_set
    fp16 = tiny_metric(device="cuda").score(folder)
    fp32 = tiny_metric(device="cuda", precision="fp32").score(folder)
    ours = np.array([row["cosine"] for row in fp16.per_sample])
    assert fp16.identity["precision"] == "fp16-autocast" and fp32.identity["precision"] == "fp32"
    assert (ours.astype(np.float16).astype(np.float64) == ours).all()
    theirs = package_scores(reference, weights / CHECKPOINTS["v2.1"].path, folder, records,
                            monkeypatch, tmp_path, device="cuda")
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=5e-3)
    np.testing.assert_allclose([row["cosine"] for row in fp32.per_sample], ours, rtol=0, atol=5e-3)


@pytest.mark.parametrize("antialias", [True, False])
def test_transform_matches_the_package_transform(reference, antialias, monkeypatch):
    """The package's val transform; antialias off is torchvision < 0.17's tensor resize, emulated
    by handing the package's resize antialias=False."""
    import torchvision.transforms.functional as tvF

    _, _, transform = reference
    if not antialias:
        patched = types.SimpleNamespace(**{n: getattr(tvF, n) for n in dir(tvF)
                                           if not n.startswith("__")})
        patched.resize = lambda img, size, interpolation: tvF.resize(img, size, interpolation,
                                                                    antialias=False)
        monkeypatch.setattr(transform, "F", patched)
    val = transform.image_transform(224, is_train=False, resize_longest_max=True)
    for height, width in [(HEIGHT, WIDTH), (300, 97), (1024, 1024), (64, 64)]:
        image = Image.fromarray(smooth_images(1, height, width, seed=height)[0])
        theirs = val(image)
        ours = hps_pixels(image_to_tensor01(image)[None], antialias=antialias)[0]
        assert theirs.shape == ours.shape == (3, 224, 224)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=TOL)


def test_tokens_match_the_package_tokenizer(reference):
    _, factory, _ = reference
    ours = open_clip.get_tokenizer("ViT-H-14")(PROMPTS)
    theirs = factory.get_tokenizer("ViT-H-14")(PROMPTS)
    assert ours.shape == (len(PROMPTS), 77)
    assert torch.equal(ours, theirs)


# ------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("height, width", [(101, 160), (300, 97)])
def test_letterbox_pads_black_with_floor_on_left_and_top_and_never_crops(height, width):
    (new_h, new_w), (left, right, top, bottom) = letterbox_geometry(height, width)
    assert max(new_h, new_w) == 224 and new_h + top + bottom == 224 and new_w + left + right == 224
    assert (left, top) == ((224 - new_w) // 2, (224 - new_h) // 2)
    image = torch.full((1, 3, height, width), 0.5)
    image[..., :, 0] = 1.0                      # marks at every edge: a centre crop would lose some
    image[..., :, -1] = 1.0
    image[..., 0, :] = 1.0
    image[..., -1, :] = 1.0
    boxed = letterbox(image)[0, 0]
    assert boxed.shape == (224, 224)
    content = boxed[top:top + new_h, left:left + new_w]
    assert (boxed[:top] == 0).all() and (boxed[top + new_h:] == 0).all()
    assert (boxed[:, :left] == 0).all() and (boxed[:, left + new_w:] == 0).all()
    assert (content > 0.25).all()               # padding is only outside the resized image
    for edge in (content[:, 0], content[:, -1], content[0], content[-1]):
        assert edge.mean() > 0.75               # every edge mark survives


def test_letterbox_examples():
    assert letterbox_geometry(101, 160) == ((141, 224), (0, 0, 41, 42))   # round(141.4)
    assert letterbox_geometry(1024, 1024) == ((224, 224), (0, 0, 0, 0))
    assert letterbox_geometry(224, 160) == ((224, 160), (32, 32, 0, 0))   # padded, not resized


def test_antialias_on_and_off_differ():
    image = torch.from_numpy(smooth_images(1, 1024, 1024, seed=3)).permute(0, 3, 1, 2) / 255.0
    on, off = hps_pixels(image, antialias=True), hps_pixels(image, antialias=False)
    assert (on - off).abs().max() > 0.1


def test_antialias_is_part_of_the_identity_and_moves_the_score(cache, scored, sample_set):
    metric_on, on = scored
    off = tiny_metric(antialias=False)
    off._hps = metric_on.hps()      # same model: only the preprocessing differs
    result = off.score(sample_set[0])
    assert on.identity["preprocessing"]["antialias"] is True
    assert result.identity["preprocessing"]["antialias"] is False
    assert abs(result.value - on.value) > 1e-4


def test_rgba_alpha_is_dropped():
    rgb = smooth_images(1, 40, 60, seed=5)[0]
    alpha = np.random.default_rng(6).integers(0, 256, size=(40, 60, 1), dtype=np.uint8)
    rgba = Image.fromarray(np.concatenate([rgb, alpha], axis=-1), mode="RGBA")
    tensor = image_to_tensor01(rgba)
    assert tensor.shape == (3, 40, 60)
    torch.testing.assert_close(tensor, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0)


# ----------------------------------------------------------------------- metric and reward

def test_result_scale_ci_and_identity(scored, sample_set):
    metric, result = scored
    cosines = np.array([row["cosine"] for row in result.per_sample])
    assert result.name == "hpsv2.1" and result.higher_is_better and result.n == len(sample_set[2])
    assert result.value == pytest.approx(100 * cosines.mean(), abs=1e-9)
    assert result.ci_low <= result.value <= result.ci_high and result.ci_low < result.ci_high
    assert [row["score"] for row in result.per_sample] == pytest.approx(100 * cosines)
    ident = result.identity
    assert ident["checkpoint_file"] == "HPS_v2.1_compressed.pt"
    assert len(ident["checkpoint_sha256"]) == 64
    assert ident["checkpoint_verified"] is True and ident["checkpoint_published"] is True
    assert ident["precision"].startswith("fp32") and "x100" in ident["scale"]
    assert ident["images_per_prompt"] == len(SEEDS) and ident["n_prompts"] == len(PROMPTS)
    assert ident["implementation"] == f"fewstep open_clip route, open_clip {open_clip.__version__}"
    assert len(ident["prompt_set_sha256"]) == 64


def test_reward_equals_metric_and_passes_gradients(cache, scored, sample_set):
    metric, result = scored
    _, images, records = sample_set
    reward = HPSv2Reward(hps=metric.hps())
    images01 = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0).requires_grad_()
    metas = [{"prompt": r["prompt"]} for r in records]
    values = reward(images01, metas)
    assert values.shape == (len(records),)
    expected = torch.tensor([row["cosine"] for row in result.per_sample], dtype=values.dtype)
    torch.testing.assert_close(values.detach(), expected, rtol=0, atol=TOL)
    again = reward(images01.detach().flip(0), metas[::-1])      # text embeddings now cached
    torch.testing.assert_close(again.flip(0), values.detach(), rtol=0, atol=TOL)
    values.sum().backward()
    assert images01.grad is not None and torch.isfinite(images01.grad).all()
    assert images01.grad.abs().sum() > 0


@pytest.mark.parametrize("cls, file", [(HPSv2, "HPS_v2.1_compressed.pt"),
                                       (HPSv20, "HPS_v2_compressed.pt")])
def test_missing_checkpoint_names_file_source_and_variable(cls, file, tmp_path, monkeypatch,
                                                           sample_set):
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(tmp_path / "empty-cache"))
    metric = tiny_metric(cls)
    assert [w.path for w in metric.weight_files()] == [f"hps/{file}"]
    with pytest.raises(MissingWeightsError) as err:
        metric.score(sample_set[0])
    for needle in (file, "xswu/HPSv2", "FEWSTEP_WEIGHTS"):
        assert needle in str(err.value)
    with pytest.raises(MissingWeightsError, match="xswu/HPSv2"):
        load_hps(metric.hps_version, checkpoint=tmp_path / "nowhere.pt", config=TINY_CONFIG)


def test_versions_have_different_identities(cache, scored, sample_set):
    _, v21 = scored
    v20 = tiny_metric(HPSv20).score(sample_set[0])
    assert (v20.name, v21.name) == ("hpsv2.0", "hpsv2.1")
    assert v20.identity["checkpoint_file"] == "HPS_v2_compressed.pt"
    assert v20.identity["checkpoint_sha256"] != v21.identity["checkpoint_sha256"]
    assert v20.identity != v21.identity and v20.value != v21.value


def test_checkpoint_layout_is_checked(tmp_path):
    state = tiny_model(0).state_dict()
    bare, partial = tmp_path / "bare.pt", tmp_path / "partial.pt"
    torch.save(state, bare)
    torch.save({"state_dict": {k: v for k, v in list(state.items())[1:]}}, partial)
    with pytest.raises(ValueError, match="state_dict"):   # pinned: the hash check passes
        load_hps("v2.1", "cpu", bare, TINY_CONFIG, sha256_of(bare))
    with pytest.raises(ValueError, match="does not match"):
        load_hps("v2.1", "cpu", partial, TINY_CONFIG, sha256_of(partial))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="v2.1"):
        HPSv2(hps_version="v2")
    with pytest.raises(ValueError, match="precision"):
        HPSv2(precision="bf16")
    with pytest.raises(ValueError, match="QuickGELU"):
        load_hps("v2.1", checkpoint=__file__, config={**TINY_CONFIG, "quick_gelu": True})


class _RunsCode:
    """Unpickling this runs os.mkdir(marker): what a crafted checkpoint can do with any call."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def test_a_pickle_that_would_run_code_is_refused_and_never_run(tmp_path):
    """A checkpoint the tensor-only loader refuses is never unpickled fully (it could run any
    command); the error says how to convert a trusted file once."""
    marker = tmp_path / "the-pickle-ran"
    crafted = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": tiny_model(0).state_dict(), "x": _RunsCode(marker)}, crafted)
    pin = sha256_of(crafted)    # pinned, so that the hash check lets it reach the loader
    with pytest.raises(ValueError, match=r"fewstep weights convert --trust-pickle .*HPS_v2\.1_"
                                         r"compressed\.pt --out .*HPS_v2\.1_compressed\.safetensors"):
        load_hps("v2.1", "cpu", crafted, TINY_CONFIG, pin)
    assert not marker.exists()
    metric = tiny_metric(checkpoint=crafted, expected_sha256=pin)  # what metric_options can give
    with pytest.raises(ValueError, match="trust-pickle"):
        metric.hps()
    assert not marker.exists()


def test_a_converted_safetensors_checkpoint_scores_the_same(weights, scored, sample_set, tmp_path,
                                                            monkeypatch):
    """`fewstep weights convert` output is read directly, and in the weights cache it is used in
    place of the .pt beside it."""
    from safetensors.torch import save_file

    from metrics.hpsv2 import resolve_checkpoint

    state = {k: v.contiguous() for k, v in tiny_model(0).state_dict().items()}
    cache = tmp_path / "cache"
    pt = cache / CHECKPOINTS["v2.1"].path
    pt.parent.mkdir(parents=True)
    pt.write_bytes((weights / CHECKPOINTS["v2.1"].path).read_bytes())
    save_file(state, str(pt.with_suffix(".safetensors")))
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(cache))
    assert resolve_checkpoint("v2.1") == pt.with_suffix(".safetensors")
    with pytest.raises(ValueError, match="expected_sha256"):   # not the published .pt's hash
        tiny_metric().score(sample_set[0])
    pin = sha256_of(pt.with_suffix(".safetensors"))
    result = tiny_metric(expected_sha256=pin).score(sample_set[0])  # the user's pin
    assert result.value == scored[1].value
    assert result.identity["checkpoint_file"] == "HPS_v2.1_compressed.safetensors"
    assert result.identity["checkpoint_published"] is False
