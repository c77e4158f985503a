"""Improved precision and recall (Kynkaanniemi et al. 2019) and density/coverage (Naeem et al.
2020) against the toy FID's reference renders (metrics/precision_recall.py)."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from fewstep.registry import METRICS, UnknownNameError
from fewstep.toy import world
from metrics.sampleset import write_sample_set

SEEDS = (0, 1, 2, 3)
N_PROMPTS = 12


def _write(folder, metas, collapsed=False, seed_shift=0, method="render"):
    images, records = [], []
    for m in metas:
        for s in SEEDS:
            images.append(world.render(m, 0 if collapsed else s + seed_shift, 16)[0])
            records.append({"prompt_id": m["prompt_id"], "prompt": m["prompt"], "seed": s,
                            "family": "toy", "method": method, "nfe": 0, "meta": m})
    return write_sample_set(folder, np.stack(images), records)


@pytest.fixture(scope="module")
def world_sets(tmp_path_factory):
    metas = world.prompt_set("eval")[:N_PROMPTS]
    root = tmp_path_factory.mktemp("pr")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(m) + "\n" for m in metas))
    return {"prompts": prompts, "cache": root / "cache",
            "varied": _write(root / "varied", metas, seed_shift=100),
            "collapsed": _write(root / "collapsed", metas, collapsed=True)}


def _metric(world_sets, statistic, **kw):
    from metrics.precision_recall import ToyPrecisionRecall

    return ToyPrecisionRecall(statistic=statistic, reference_prompts=str(world_sets["prompts"]),
                              renders_per_prompt=8, cache_dir=world_sets["cache"],
                              n_resamples=kw.pop("n_resamples", 100), **kw)


# ------------------------------------------------------------------------------ the formulas

def test_knn_radii_exclude_the_point_itself():
    from metrics.precision_recall import knn_radii

    points = np.array([[0.0], [1.0], [3.0], [7.0]])
    assert knn_radii(points, k=1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(points, k=3).tolist() == [7.0, 6.0, 4.0, 7.0]
    with pytest.raises(ValueError, match="k = 3 needs at least 4"):
        knn_radii(points[:3], k=3)


def test_precision_recall_density_coverage_by_hand():
    from metrics.precision_recall import manifold_scores

    real = np.array([[0.0], [1.0], [2.0], [3.0]])      # k = 1 radii: 1, 1, 1, 1
    fake = np.array([[0.5], [10.0], [11.5], [12.0]])    # k = 1 radii: 9.5, 1.5, 0.5, 0.5
    s = manifold_scores(real, fake, k=1)
    assert s["precision"] == 0.25                      # only 0.5 lies in a real ball
    # real points in a fake ball: 0 (|0 - 0.5| <= 9.5), 1, 2, 3 all within 9.5 of 0.5
    assert s["recall"] == 1.0
    # coverage: real balls (radius 1) holding a fake: 0 and 1 (0.5 is within 1 of both)
    assert s["coverage"] == 0.5
    # density: (1 / (k M)) sum over fakes of the number of real balls holding it = 2 / 4
    assert s["density"] == 0.5


def test_identical_sets_score_one_and_far_sets_zero():
    from metrics.precision_recall import manifold_scores

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3))
    same = manifold_scores(x, x.copy(), k=3)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = manifold_scores(x, x + 100.0, k=3)
    assert far["precision"] == far["recall"] == far["coverage"] == far["density"] == 0.0


def test_a_resample_builds_the_manifold_from_distinct_images():
    """Duplicates drawn by the bootstrap add no point to the generated manifold (a point's copies
    would otherwise be its nearest neighbours at distance 0 and shrink its ball to nothing)."""
    from metrics.precision_recall import ManifoldResampler

    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(30, 2)), rng.normal(size=(20, 2))
    resampler = ManifoldResampler(real, fake, k=3)
    idx = np.array([0, 0, 1, 2, 3, 3, 3, 4, 5])
    distinct = ManifoldResampler(real, fake[[0, 1, 2, 3, 4, 5]], k=3)
    assert resampler.recall(idx) == distinct.recall(np.arange(6))
    assert resampler.recall(np.arange(20)) == resampler.scores()["recall"]
    # precision counts every drawn image (duplicates included): a mean over draws
    inside = resampler.in_reference(np.arange(20))
    assert resampler.precision(idx) == pytest.approx(inside[idx].mean())


def test_the_torch_path_a_gpu_takes_gives_the_numpy_paths_numbers():
    from metrics.precision_recall import STATISTICS, ManifoldResampler

    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(40, 4)), rng.normal(size=(30, 4)) * 1.2
    on_numpy = ManifoldResampler(real, fake, k=3, use_torch=False)
    on_torch = ManifoldResampler(real, fake, k=3, use_torch=True)
    assert isinstance(on_torch.d_gg, torch.Tensor) and isinstance(on_numpy.d_gg, np.ndarray)
    for idx in (np.arange(30), rng.integers(0, 30, size=30), np.array([3, 3, 7])):
        for name in STATISTICS:
            assert getattr(on_torch, name)(idx) == pytest.approx(getattr(on_numpy, name)(idx))


# --------------------------------------------------------------------------- the toy metric

def test_collapsed_generator_has_lower_recall_than_varied_renders(world_sets):
    recall = _metric(world_sets, "recall")
    varied, collapsed = recall.score(world_sets["varied"]), recall.score(world_sets["collapsed"])
    assert collapsed.value < varied.value and collapsed.ci_high < varied.ci_low
    assert varied.higher_is_better and varied.n == N_PROMPTS * len(SEEDS)
    for key in ("precision", "recall", "density", "coverage"):
        assert 0.0 <= varied.details[key] and key in collapsed.details
    assert varied.details["recall"] == varied.value
    # a set-level statistic at this N against a fixed reference, labelled as FID's is
    from fewstep.audit import fixed_reference, size_note
    assert fixed_reference(varied.to_dict()) and varied.details["comparable"] is False
    assert size_note(varied.to_dict()) == f" at {varied.n} images, reference fixed"
    diff = recall.paired_difference(collapsed, varied, world_sets["collapsed"],
                                    world_sets["varied"])
    assert diff["verdict"] == "worse" and diff["difference"] < 0


def test_precision_of_renders_is_high_and_identity_names_the_reference(world_sets):
    precision = _metric(world_sets, "precision")
    result = precision.score(world_sets["varied"])
    assert result.value == result.details["precision"] and result.value > 0.5
    ident = result.identity
    assert ident["metric"] == "toy_precision" and ident["k"] == 3
    assert ident["reference"]["kind"] == "toy-render" and len(ident["extractor_sha256"]) == 64
    assert ident["reference_n"] == "match" and ident["n_reference_used"] == result.n


def test_replicate_statistic_recomputes_the_value_on_the_given_rows(world_sets):
    recall = _metric(world_sets, "recall")
    result = recall.score(world_sets["varied"])
    keys = [(r["prompt_id"], r["seed"]) for r in result.per_sample][::-1]   # another order
    stat = recall.replicate_statistic(result, world_sets["varied"], keys)
    assert stat(np.arange(len(keys))) == pytest.approx(result.value)
    first = [i for i, k in enumerate(keys) if k[0] == keys[0][0]]
    assert 0.0 <= stat(np.array(first * 3)) <= 1.0


def test_options_are_checked_and_names_registered():
    from metrics.precision_recall import InceptionPrecisionRecall, ToyPrecisionRecall

    with pytest.raises(ValueError, match="statistic 'recal'.*recall"):
        ToyPrecisionRecall(statistic="recal")
    with pytest.raises(ValueError, match="reference_n"):
        ToyPrecisionRecall(reference_n="some")
    assert issubclass(METRICS.get("toy_recall"), ToyPrecisionRecall)
    assert issubclass(METRICS.get("toy_precision"), ToyPrecisionRecall)
    assert issubclass(METRICS.get("recall"), InceptionPrecisionRecall)
    assert METRICS.get("toy_recall").statistic == "recall"
    with pytest.raises(UnknownNameError, match="toy_recall"):
        METRICS.check("toy_recal")


# ---------------------------------------------------------------- real route: the FID's wiring

class _FakeFID:
    """Stands in for metrics.fid.FID: a set's features are the red channel of its images' top-left
    4x4 pixels (cheap, deterministic); the reference features are given."""

    def __init__(self, reference_feats):
        from metrics.fid import ReferenceStats

        self.ref = ReferenceStats(reference_feats, reference_feats.mean(0), np.eye(2),
                                  np.eye(2), [], {"reference": {"kind": "image-folder"}})
        self.extractor_obj = type("Ex", (), {"name": "stand-in", "sha256": "0" * 64})()

    def resolution_for(self, ss):
        return ss.resolution[0]

    def features(self, ss, size):
        return np.stack([ss.load_image(i)[:4, :4, 0].reshape(-1) / 255.0 for i in range(len(ss))])

    def reference_stats(self, size):
        return self.ref

    def extractor(self):
        return self.extractor_obj

    def _device(self):
        return "cpu"


def test_inception_route_reads_the_fids_features_and_reference(world_sets):
    from metrics.precision_recall import InceptionRecall
    from metrics.sampleset import load_sample_set

    varied_set = load_sample_set(world_sets["varied"])
    feats = _FakeFID(np.zeros((1, 1))).features(varied_set, 16)
    metric = InceptionRecall(n_resamples=50)
    metric._fid_metric = _FakeFID(feats)          # the varied set is its own reference: recall 1
    varied, collapsed = metric.score(world_sets["varied"]), metric.score(world_sets["collapsed"])
    assert varied.value == 1.0 and collapsed.value < varied.value
    ident = varied.identity
    assert ident["features"].startswith("clean-fid Inception") and ident["crop"] == "center"
    assert ident["reference"] == {"kind": "image-folder"} and ident["metric"] == "recall"


def test_inception_route_missing_weights_name_the_file(world_sets, tmp_path, monkeypatch):
    from fewstep.backbones.weights import MissingWeightsError
    from metrics.precision_recall import InceptionPrecision

    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(tmp_path / "empty"))
    metric = InceptionPrecision(reference=str(tmp_path), n_resamples=10)
    assert [wf.path for wf in metric.weight_files()][0].startswith("cleanfid/")
    with pytest.raises(MissingWeightsError, match="fewstep weights check"):
        metric.score(world_sets["varied"])


# ------------------------------------------------------------ through `fewstep score --against`

def test_score_command_pairs_diversity_and_recall_against_the_teacher(world_sets, tmp_path):
    from fewstep.cli import main
    from fewstep.io import write_json

    metas = world.prompt_set("eval")[:N_PROMPTS]
    folders = {"teacher": _write(tmp_path / "teacher", metas, seed_shift=100, method="teacher"),
               "student": _write(tmp_path / "student", metas, collapsed=True, method="dmd")}
    for folder in folders.values():
        write_json(folder / "provenance.json", {"timing": {"latency_s": 0.01}})
    from fewstep.toy.features import shipped_feature_net

    metrics = ["toy_diversity", "toy_recall", "toy_precision", "toy_fid"]

    def score(name, against=()):
        out = tmp_path / f"{name}.json"
        args = ["score", "--samples", str(folders[name]), "--prompts",
                str(world_sets["prompts"]), "--seeds", *map(str, SEEDS), "--resolution", "16",
                "--metrics", *metrics, "--reference-images", "96", "--feature-net",
                str(shipped_feature_net(16)), "--cache",
                str(tmp_path / "cache"), "--resamples", "100", "--out", str(out)]
        assert main(args + (["--against", *map(str, against)] if against else [])) == 0
        return out

    teacher = score("teacher")
    row = json.loads(score("student", [teacher]).read_text())
    assert row["results"]["toy_diversity"]["value"] == 0.0
    paired = row["against_teacher"]["metrics"]
    assert paired["toy_diversity"]["verdict"] == "worse"
    assert paired["toy_recall"]["verdict"] == "worse"
    assert row["results"]["toy_recall"]["identity"]["reference"]["renders_per_prompt"] == 8
    assert paired["toy_recall"]["ci_low"] >= -1.0     # a difference of shares stays in [-1, 1]
    # toy_fid and toy_recall/toy_precision share one reference file (the DAG builds it once)
    assert len(list((tmp_path / "cache" / "toy_fid").glob("reference-*.npz"))) == 1
    fid_ref = row["results"]["toy_fid"]["identity"]["reference_stats_sha256"]
    assert row["results"]["toy_recall"]["identity"]["reference_stats_sha256"] == fid_ref


# ------------------------------------------------------------------- cells of training seeds

def test_cells_of_training_seeds_recentre_recall_and_pair_diversity(world_sets, tmp_path):
    """Two replicates per cell: recall's bootstrap seed level is recentred like FID's (a
    resample's manifold has fewer distinct images), diversity's is the plain per-image one; the
    default t level is clipped to the statistic's range too."""
    from metrics.diversity import ToyDiversity

    metas = world.prompt_set("eval")[:N_PROMPTS]
    varied = [world_sets["varied"], _write(tmp_path / "v2", metas, seed_shift=200)]
    collapsed = [world_sets["collapsed"], _write(tmp_path / "c2", metas, collapsed=True)]
    recall = dataclasses.replace(_metric(world_sets, "recall"), seed_level="bootstrap")
    assert type(recall).recentred
    cells = {name: [(recall.score(f), f) for f in folders]
             for name, folders in (("varied", varied), ("collapsed", collapsed))}
    cell = recall.cell_result(cells["varied"], seeds=[0, 1])
    assert cell.value == pytest.approx(np.mean([r.value for r, _ in cells["varied"]]))
    assert cell.ci_low <= cell.value <= cell.ci_high and "recentred" in cell.details["ci_method"]
    paired = recall.paired_difference_cells(cells["collapsed"], cells["varied"])
    assert paired["verdict"] == "worse" and paired["n_training_seeds"] == {"a": 2, "b": 2}
    assert -1.0 <= paired["ci_low"] <= paired["difference"] <= paired["ci_high"] <= 1.0
    assert 0.0 <= recall.cell_result(cells["collapsed"], seeds=[0, 1]).ci_low
    t_level = dataclasses.replace(recall, seed_level="t")
    assert 0.0 <= t_level.cell_result(cells["collapsed"], seeds=[0, 1]).ci_low
    paired = t_level.paired_difference_cells(cells["collapsed"], cells["varied"])
    assert paired["method"].startswith("t, Welch")
    assert -1.0 <= paired["ci_low"] <= paired["difference"] <= paired["ci_high"] <= 1.0
    diversity = ToyDiversity(n_resamples=100)
    div = {name: [(diversity.score(f), f) for f in folders]
           for name, folders in (("varied", varied), ("collapsed", collapsed))}
    paired = diversity.paired_difference_cells(div["collapsed"], div["varied"])
    assert paired["verdict"] == "worse" and paired["win_rate"]["losses"] > 0
