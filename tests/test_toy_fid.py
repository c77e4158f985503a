"""Toy FID through clean-fid with the toy feature net: sanity orderings, CI, caching, contract."""
from dataclasses import asdict

import numpy as np
import pytest
import scipy
import torch

from fewstep.toy import world
from fewstep.toy.features import (QUICK_RECIPE, load_feature_net, save_feature_net,
                                  toy_feature_extractor, train_feature_net)
from metrics import fid as fid_module
from metrics import fid_toy
from metrics.fid import (ReferenceSpec, ToyFID, build_reference, extract_features,
                         frechet_distance, gaussian_stats, kid_from_features)
from metrics.sampleset import write_sample_set

SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def net():
    return train_feature_net(recipe=QUICK_RECIPE, seed=0)


@pytest.fixture(scope="module")
def metric(net, tmp_path_factory):
    return ToyFID(feature_net=net, cache_dir=tmp_path_factory.mktemp("cache"), renders_per_prompt=8,
                  n_resamples=200)


@pytest.fixture(scope="module")
def clean_images():
    metas = world.prompt_set("eval")
    return np.stack([world.render(m, s, 32)[0] for m in metas for s in SEEDS]).astype(np.float64)


def _write(folder, images_uint8, seed_shift=0):
    metas = world.prompt_set("eval")
    records = [{"prompt_id": m["prompt_id"], "prompt": m["prompt"], "seed": s + seed_shift,
                "family": "toy", "method": "render", "nfe": 0, "meta": m} for m in metas for s in SEEDS]
    return write_sample_set(folder, images_uint8, records)


def _uint8(x):
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _independent_renders(shift):
    metas = world.prompt_set("eval")
    return np.stack([world.render(m, s + shift, 32)[0] for m in metas for s in SEEDS])


def _recoloured(images):
    """Every object red: same shapes and layouts, wrong colours."""
    out = images.copy()
    out[(images != world.BACKGROUND).any(-1)] = world.PALETTE["red"]
    return out


def _blurred(images):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return _uint8(torch.nn.functional.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
                  .permute(0, 2, 3, 1).numpy())


def _noisy(images, t, seed=0):
    noise = np.random.default_rng(seed).normal(128, 64, images.shape)
    return _uint8((1 - t) * images + t * noise)


def test_fid_orders_clean_and_shifted_sets(metric, clean_images, tmp_path):
    same = metric.score(_write(tmp_path / "same", _independent_renders(100), 100))
    scores = {name: metric.score(_write(tmp_path / name, imgs)).value for name, imgs in {
        "colours": _recoloured(_uint8(clean_images)), "blur": _blurred(clean_images),
        "noise": _noisy(clean_images, 0.3)}.items()}
    for name, value in scores.items():
        assert value > 5 * same.value, (name, value, same.value)
    assert same.ci_low <= same.value <= same.ci_high and same.ci_low >= 0
    assert same.details["kid"] < 0.1 * metric.score(tmp_path / "noise").details["kid"]


def test_fid_decreases_from_noise_to_clean(metric, clean_images, tmp_path):
    values = [metric.score(_write(tmp_path / f"t{t}", _noisy(clean_images, t))).value
              for t in (1.0, 0.6, 0.3, 0.1, 0.0)]
    assert all(a > b for a, b in zip(values, values[1:])), values


def test_result_records_protocol(metric, clean_images, tmp_path):
    res = metric.score(_write(tmp_path / "gt", _uint8(clean_images)), resolution=32)
    assert res.name == "toy_fid" and not res.higher_is_better and res.n == len(clean_images)
    assert res.ci_low <= res.value <= res.ci_high
    ident = res.identity
    assert ident["mode"] == "clean" and "bicubic" in ident["resize"] and "32x32" in ident["resize"]
    assert ident["extractor_sha256"] == metric.extractor.sha256
    assert ident["reference"]["renders_per_prompt"] == 8 and ident["reference"]["split"] == "eval"
    assert res.details["comparable"] is False  # 244 samples < min_n
    assert {"prompt_id", "seed", "path"} <= set(res.per_sample[0])


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")
def test_matches_clean_fid_compute_fid(metric, clean_images, tmp_path):
    if tuple(int(v) for v in scipy.__version__.split(".")[:2]) >= (1, 18):
        pytest.skip("clean-fid's own frechet_distance needs scipy < 1.18")
    from cleanfid import fid as cfid
    a = _write(tmp_path / "a", _uint8(clean_images))
    b = _write(tmp_path / "b", _blurred(clean_images))
    with fid_module.single_blas_thread():  # scipy's sqrtm crawls when BLAS fights torch threads
        theirs = cfid.compute_fid(str(a), str(b), mode="clean", custom_feat_extractor=metric.extractor,
                                  custom_fn_resize=fid_module.clean_resizer(32),
                                  device=torch.device("cpu"), num_workers=0, verbose=False)
    fa = extract_features(sorted(a.glob("*.png")), metric.extractor)
    fb = extract_features(sorted(b.glob("*.png")), metric.extractor)
    ours = frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb))
    assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-6)


def test_paired_comparison(metric, clean_images, tmp_path):
    clean = _write(tmp_path / "clean", _uint8(clean_images))
    noisy = _write(tmp_path / "noisy", _noisy(clean_images, 0.3))
    diff = metric.compare(clean, noisy)
    assert diff.high < 0 and diff.contains(diff.estimate)   # clean is better (lower FID)
    same = metric.compare(clean, clean)
    assert same.estimate == same.low == same.high == 0.0
    shifted = _write(tmp_path / "shifted", _independent_renders(100), 100)
    with pytest.raises(ValueError, match="same .prompt_id, seed. grid"):
        metric.compare(clean, shifted)
    # the Metric-level paired difference of FID is this resampling, with its verdict
    summary = metric.paired_difference(None, None, clean, noisy)
    assert (summary["difference"], summary["ci_high"]) == (diff.estimate, diff.high)
    assert summary["verdict"] == "better"


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=3), rng.normal(size=3)
    d1, d2 = np.diag([1.0, 2.0, 3.0]), np.diag([4.0, 1.0, 0.5])
    expected = ((mu1 - mu2) ** 2).sum() + sum((np.sqrt(a) - np.sqrt(b)) ** 2
                                               for a, b in zip(np.diag(d1), np.diag(d2)))
    assert frechet_distance(mu1, d1, mu2, d2) == pytest.approx(expected)
    a = rng.normal(size=(5, 5))
    sigma = a @ a.T                                      # a full, non-diagonal covariance
    assert frechet_distance(mu1[:1].repeat(5), sigma, mu1[:1].repeat(5), sigma) == pytest.approx(
        0.0, abs=1e-8)
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(mu1, d1, mu2[:2], d2[:2, :2])


def test_kid_is_seeded_and_leaves_global_rng_alone():
    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 0.5
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    assert kid_from_features(f1, f2, seed=3) == kid_from_features(f1, f2, seed=3)
    assert np.array_equal(np.random.get_state()[1], before)


def test_reference_is_cached(net, tmp_path, monkeypatch):
    extractor = toy_feature_extractor(net)
    spec = ReferenceSpec(renders_per_prompt=2)
    first = build_reference(spec, extractor, tmp_path)
    assert len(list((tmp_path / "toy_fid").glob("reference-*.npz"))) == 1

    def no_render(*args, **kwargs):
        raise AssertionError("reference re-rendered despite the cache")
    monkeypatch.setattr(fid_toy, "_render_reference_folder", no_render)  # build_reference's lookup
    again = build_reference(spec, extractor, tmp_path)
    assert np.array_equal(first.features, again.features) and again.stats_sha256 == first.stats_sha256


def test_refuses_prompts_outside_the_reference(metric, tmp_path):
    metas = [world.class_meta(k) for k in range(4)]
    images = np.stack([world.render(m, 0, 32)[0] for m in metas])
    records = [{"prompt_id": m["prompt_id"], "prompt": m["prompt"], "seed": 0, "family": "toy",
                "method": "render", "nfe": 0, "meta": m} for m in metas]
    with pytest.raises(ValueError, match="not in the reference prompt set"):
        metric.score(write_sample_set(tmp_path / "classes", images, records))


def test_feature_net_save_load_and_hash(net, tmp_path):
    path = save_feature_net(net, tmp_path / "net.safetensors")
    again = load_feature_net(path)
    assert again.sha256 == net.sha256 and again.recipe == net.recipe
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(again.features(x), net.features(x))
    raw = bytearray(path.read_bytes())
    raw[-4] ^= 0xFF                                      # flip bits inside the last tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="hash"):
        load_feature_net(path)


def test_extractor_contract(net):
    extractor = toy_feature_extractor(net)
    out = extractor(torch.rand(3, 3, 32, 32) * 255)
    assert out.shape == (3, net.config.feature_dim) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="custom_fn_resize"):
        extractor(torch.rand(2, 3, 299, 299) * 255)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        extractor(torch.rand(2, 3, 32, 32))


def test_shipped_feature_net_is_the_pinned_default_recipe(net, tmp_path, monkeypatch):
    from fewstep.toy import features
    shipped = load_feature_net(features.shipped_feature_net(16))
    assert shipped.config.size == 16 and shipped.recipe == asdict(features.TrainRecipe())
    assert shipped.train_summary["count_accuracy"] > 0.9          # a net that sees the toy world
    with pytest.raises(ValueError, match="fid.feature_net: train"):
        features.shipped_feature_net(24)
    # a self-consistent file that is not the pinned one (someone replaced it) is refused
    monkeypatch.setattr(features, "SHIPPED_DIR", tmp_path)
    save_feature_net(net, tmp_path / "toy_feature_net_16.safetensors")
    with pytest.raises(ValueError, match="pinned"):
        features.shipped_feature_net(16)
    (tmp_path / "toy_feature_net_16.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="toy_feature_net_16.safetensors"):
        features.shipped_feature_net(16)
