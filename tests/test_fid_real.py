"""Real FID route: the Frechet formula against clean-fid's, Inception files read from the weights
cache in their genuine formats (random-weight stand-ins), the protocol and the reference cache.

The stand-in for NVIDIA's `inception-2015-12-05.pt` is a TorchScript archive with the same
interface (a `layers` module taking normalised 299 px images to 2048 pooled features, and
`forward(img, return_features)` that resizes inside) around a randomly initialised full-size
torchvision Inception-v3 body: clean-fid's own wrapper loads it exactly as it loads the real file.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fewstep.backbones.weights import MissingWeightsError
from metrics import fid as fid_module
from metrics.fid import (FID, ReferenceStats, fid_resampler, frechet_distance, gaussian_stats,
                         inception_weight_file, kid_from_features, list_reference_images,
                         load_inception, protocol_transform, psd_sqrt, real_reference_key,
                         reference_folder)
from metrics.sampleset import write_sample_set

INCEPTION_BODY = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                  "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                  "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b",
                  "Mixed_7c", "avgpool")


class StandInInception(torch.nn.Module):
    """Random full-size Inception-v3 with the TorchScript interface of the StyleGAN2-ADA file."""

    def __init__(self):
        super().__init__()
        import torchvision

        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
        self.layers = torch.nn.Sequential(*[getattr(net, name) for name in INCEPTION_BODY])
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = F.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False)
        features = self.layers((x - 128.0) / 128.0).flatten(1)
        return features if return_features else self.output(features)


def _clean_fid_frechet(mu1, s1, mu2, s2):
    from cleanfid.fid import frechet_distance as cleanfid_frechet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SciPy 1.17 deprecates the `disp` argument clean-fid passes
        return float(cleanfid_frechet(mu1, s1, mu2, s2))


def _stats_of(feats) -> ReferenceStats:
    mu, sigma = gaussian_stats(feats)
    return ReferenceStats(np.asarray(feats, np.float64), mu, sigma, psd_sqrt(sigma), [], {})


# ------------------------------------------------------------------------------- the formula

@pytest.mark.parametrize("n1, n2, dim, seed", [(300, 400, 32, 0), (30, 50, 20, 2),
                                               (10, 40, 16, 0), (5, 100, 32, 3)])
def test_frechet_distance_equals_clean_fid(n1, n2, dim, seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n1, dim))
    b = rng.normal(size=(n2, dim)) * 1.3 + 0.2
    (mu1, s1), (mu2, s2) = gaussian_stats(a), gaussian_stats(b)
    expected = _clean_fid_frechet(mu1, s1, mu2, s2)
    assert abs(frechet_distance(mu1, s1, mu2, s2) - expected) < 1e-6
    # the bootstrap's torch statistic (both of its eigenvalue branches) gives the same number
    resample = fid_resampler(a, _stats_of(b))
    assert abs(resample(np.arange(n1)) - expected) < 1e-6


def test_rank_deficient_case_where_sqrtm_turns_complex():
    """Fewer samples than dimensions: Sigma1 Sigma2 is singular, where SciPy's sqrtm may return
    complex values with tiny imaginary parts (it depends on the CPU and BLAS: on some machines
    it does, on others not), which clean-fid drops; our eigh route needs no such step and agrees
    with clean-fid's value either way."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(10, 16)), rng.normal(size=(40, 16)) * 1.3 + 0.2
    (mu1, s1), (mu2, s2) = gaussian_stats(a), gaussian_stats(b)
    assert np.linalg.matrix_rank(s1) < s1.shape[0]  # the singular case
    assert abs(frechet_distance(mu1, s1, mu2, s2) - _clean_fid_frechet(mu1, s1, mu2, s2)) < 1e-6


# ------------------------------------------------------------------- the Inception from the cache

@pytest.fixture(scope="module")
def weights_root(tmp_path_factory):
    """A weights cache holding the stand-in TorchScript Inception under its genuine name."""
    root = tmp_path_factory.mktemp("weights")
    path = root / inception_weight_file("clean").path
    path.parent.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated, but it is the format
        torch.manual_seed(0)
        torch.jit.script(StandInInception().eval()).save(str(path))
    return root


@pytest.fixture
def cache(weights_root, monkeypatch):
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(weights_root))
    return weights_root


def _images(rng, n, height, width):
    return rng.integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A sample set (3 prompts x 2 seeds, 64 px) and a reference folder of mixed-size JPEG/PNG."""
    rng = np.random.default_rng(1)
    base = tmp_path_factory.mktemp("sets")
    records = [{"prompt_id": f"p{i}", "prompt": f"prompt {i}", "seed": s, "family": "toy",
                "method": "test", "nfe": 1} for i in range(3) for s in (0, 1)]
    samples = write_sample_set(base / "samples", _images(rng, 6, 64, 64), records)
    refs = base / "refs"
    refs.mkdir()
    for i, (h, w) in enumerate([(80, 64), (64, 96), (64, 64), (72, 72), (100, 70), (64, 80)]):
        suffix = ".jpg" if i % 2 else ".png"
        Image.fromarray(_images(rng, 1, h, w)[0]).save(refs / f"ref{i:02d}{suffix}")
    return samples, refs


@pytest.fixture(scope="module")
def scored(weights_root, folders, tmp_path_factory):
    samples, refs = folders
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEWSTEP_WEIGHTS", str(weights_root))
        metric = FID(reference=str(refs), cache_dir=tmp_path_factory.mktemp("cache"),
                     device="cpu", batch_size=4, n_resamples=3, min_n=10)
        return metric, metric.score(samples)


def test_inception_route_matches_clean_fid_features(cache, folders, scored):
    """The metric's number is the Frechet distance of features that clean-fid's own InceptionV3W,
    built on the cached file, extracts after the protocol transform."""
    from cleanfid.fid import get_files_features
    from cleanfid.inception_torchscript import InceptionV3W

    samples, refs = folders
    _, result = scored
    net = InceptionV3W(str(cache / "cleanfid"), download=False).eval()
    transform = protocol_transform(64, "center")

    def feats(paths):
        return get_files_features([str(p) for p in paths], model=net, num_workers=0, batch_size=4,
                                  device=torch.device("cpu"), mode="clean",
                                  custom_image_tranform=transform, verbose=False).astype(np.float64)

    sample_feats = feats(sorted(samples.glob("*.png")))
    ref_feats = feats(list_reference_images(refs))
    assert sample_feats.shape == (6, 2048) and np.isfinite(sample_feats).all()
    assert sample_feats.std(axis=0).max() > 0 and result.value > 0  # not a degenerate stand-in
    expected = frechet_distance(*gaussian_stats(sample_feats), *gaussian_stats(ref_feats))
    assert abs(result.value - expected) <= 1e-6 * max(1.0, expected)
    assert abs(result.details["kid"] - kid_from_features(sample_feats, ref_feats, 0)) < 1e-9


def test_result_identity_names_mode_extractor_protocol_and_reference(cache, folders, scored):
    samples, refs = folders
    _, result = scored
    ident = result.identity
    assert result.name == "fid" and not result.higher_is_better and result.n == 6
    assert ident["mode"] == "clean" and ident["resolution"] == 64 and ident["crop"] == "center"
    file = cache / "cleanfid" / "inception-2015-12-05.pt"
    assert ident["extractor_sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert ident["reference"]["name"] == "refs" and ident["reference"]["n_images"] == 6
    assert "clean-fid 0.1.35" in ident["implementation"]
    assert result.details["comparable"] is False  # 6 samples < min_n
    assert [r["prompt_id"] for r in result.per_sample] == ["p0", "p0", "p1", "p1", "p2", "p2"]


def test_reference_statistics_are_cached_per_resolution_and_crop(cache, folders, scored,
                                                                  monkeypatch):
    metric, _ = scored
    stored = list((metric.cache_dir / "fid").glob("reference-*.npz"))
    assert len(stored) == 1

    def no_extraction(*args, **kwargs):
        raise AssertionError("reference features were recomputed")

    monkeypatch.setattr(fid_module, "files_features", no_extraction)
    assert metric.reference_stats(64).features.shape == (6, 2048)  # from the cache
    with pytest.raises(AssertionError, match="recomputed"):
        metric.reference_stats(48)  # another resolution is another key


def test_cache_key_changes_with_resolution_crop_and_mode():
    ref = {"kind": "image-folder", "name": "coco", "n_images": 10, "list_sha256": "ab" * 32}
    base, _ = real_reference_key(ref, "cd" * 32, "clean", 256, "center")
    assert base == real_reference_key(ref, "cd" * 32, "clean", 256, "center")[0]
    others = [real_reference_key(ref, "cd" * 32, "clean", 512, "center")[0],
              real_reference_key(ref, "cd" * 32, "clean", 256, "none")[0],
              real_reference_key(ref, "cd" * 32, "clean", 256, "patch")[0],
              real_reference_key(ref, "cd" * 32, "legacy_tensorflow", 256, "center")[0],
              real_reference_key({**ref, "list_sha256": "ef" * 32}, "cd" * 32, "clean", 256,
                                 "center")[0]]
    assert len({base, *others}) == 6


def test_legacy_tensorflow_mode_resizes_inside_the_network(cache):
    extractor = load_inception("legacy_tensorflow")
    assert extractor.net.resize_inside
    with torch.no_grad():
        out = extractor(torch.rand(1, 3, 64, 48) * 255)
    assert out.shape == (1, 2048)


def test_legacy_pytorch_mode_reads_the_local_state_dict(tmp_path, monkeypatch):
    """clean-fid's pytorch-fid Inception would fetch its state dict by URL; ours is served the
    cached file. The stand-in state dict is the network's own random initialisation."""
    import cleanfid.inception_pytorch as module

    def capture_fresh_weights(url, **kwargs):
        # called inside clean-fid's fid_inception_v3 while its freshly built network is a local
        return inspect.currentframe().f_back.f_locals["inception"].state_dict()

    monkeypatch.setattr(module, "load_state_dict_from_url", capture_fresh_weights)
    state = module.fid_inception_v3().state_dict()
    monkeypatch.undo()
    path = tmp_path / inception_weight_file("legacy_pytorch").path
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(tmp_path))
    extractor = load_inception("legacy_pytorch")
    with torch.no_grad():
        assert extractor(torch.rand(1, 3, 299, 299) * 255).shape == (1, 2048)
    assert module.load_state_dict_from_url is not capture_fresh_weights  # restored


@pytest.mark.parametrize("mode, file", [("clean", "cleanfid/inception-2015-12-05.pt"),
                                        ("legacy_pytorch",
                                         "cleanfid/pt_inception-2015-12-05-6726825d.pth")])
def test_missing_inception_weights_name_the_file_and_env(tmp_path, monkeypatch, folders, mode,
                                                         file):
    samples, refs = folders
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(tmp_path / "empty"))
    metric = FID(reference=str(refs), mode=mode, cache_dir=tmp_path, device="cpu")
    assert metric.weight_files()[0].path == file
    with pytest.raises(MissingWeightsError) as err:
        metric.score(samples)
    text = str(err.value)
    assert file in text and "FEWSTEP_WEIGHTS" in text and str(tmp_path / "empty") in text
    assert "http" in text  # the source URL clean-fid would have used


# ------------------------------------------------------------------ protocol and reference folders

def test_protocol_transform_crops_and_resizes():
    image = np.arange(60 * 80 * 3, dtype=np.uint8).reshape(60, 80, 3)
    assert protocol_transform(32, "center")(image).shape == (32, 32, 3)
    assert protocol_transform(32, "none")(image).shape == (32, 32, 3)
    patch = protocol_transform(40, "patch")(image)
    np.testing.assert_array_equal(patch, image[10:50, 20:60])
    square = image[:, 10:70]
    np.testing.assert_array_equal(protocol_transform(60, "center")(square), square)  # no-op
    with pytest.raises(ValueError, match="at least 299"):
        protocol_transform(299, "patch")(image)
    with pytest.raises(ValueError, match="unknown crop policy"):
        protocol_transform(32, "middle")


def test_reference_folders_are_flat_and_bare_names_live_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(tmp_path / "w"))
    assert reference_folder("coco2014-val") == tmp_path / "w" / "refs" / "coco2014-val"
    assert reference_folder(str(tmp_path / "mine")) == tmp_path / "mine"
    with pytest.raises(MissingWeightsError, match="does not exist"):
        list_reference_images(tmp_path / "nowhere")
    folder = tmp_path / "refs"
    (folder / "nested").mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
    with pytest.raises(ValueError, match="nested"):
        list_reference_images(folder)
    assert [w.path for w in FID().weight_files()] == ["cleanfid/inception-2015-12-05.pt",
                                                      "refs/coco2014-val/"]
    assert len(FID(reference=str(folder)).weight_files()) == 1


def test_fid_ref_command_builds_the_statistics_the_score_step_reads(cache, folders, tmp_path,
                                                                    monkeypatch):
    """`fewstep fid-ref --metric fid` (the DAG's reference rule) fills the cache once; the
    metric then scores without extracting reference features again."""
    from fewstep.cli import main

    samples, refs = folders
    options = {"reference": str(refs), "crop": "center", "device": "cpu"}
    stamp = tmp_path / "ref.json"
    main(["fid-ref", "--metric", "fid", "--metric-options", json.dumps(options),
          "--resolution", "64", "--cache", str(tmp_path / "cache"), "--out", str(stamp)])
    built = json.loads(stamp.read_text())
    assert built["n_reference"] == 6 and built["identity"]["crop"] == "center"
    calls = []
    original = fid_module.files_features
    monkeypatch.setattr(fid_module, "files_features",
                        lambda paths, *a, **k: calls.append(len(paths)) or original(paths, *a, **k))
    metric = FID(cache_dir=tmp_path / "cache", **options)
    assert metric.reference_stats(64).stats_sha256 == built["stats_sha256"]
    assert calls == []  # read from the cache the command filled
