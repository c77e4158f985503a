"""The two-level bootstrap (training seeds, then prompts with all their images) and the metric API
on cells of training-seed replicates: checked against a direct, slow computation written with
explicit loops, and against the one-seed bootstrap it must reduce to bit for bit."""
from dataclasses import dataclass, field

import numpy as np
import pytest

from fewstep.toy import world
from metrics.base import MetricResult, PerImageMetric
from metrics.fid import FID, ToyFID, _stats, fid_resampler, frechet_distance, gaussian_stats
from metrics.geneval import ToyGenEval
from metrics.sampleset import load_sample_set, write_sample_set
from metrics.seed_level import seed_level_interval
from metrics.stats import bootstrap, bootstrap_p_value, group_indices, two_level_bootstrap

R = 99
N_PROMPTS, IMAGE_SEEDS = 5, 2


def _grid():
    keys = [(f"p{i}", s) for i in range(N_PROMPTS) for s in range(IMAGE_SEEDS)]
    return keys, group_indices([k[0] for k in keys])[1]


def _stat(x, power):
    """A non-linear set statistic of per-sample values x on a resample idx."""
    return lambda idx: float(np.mean(x[idx]) ** power + np.std(x[idx]))


def _direct(stats_a, stats_b, groups, strata, seed, level=0.95):
    """Explicit loops: prompts drawn per stratum (rng(seed), all resamples of a stratum at once,
    as `bootstrap` draws them), then A's and B's training seeds from rng([seed, 1])."""
    rng = np.random.default_rng(seed)
    labels = strata if strata is not None else [0] * len(groups)
    order = list(dict.fromkeys(labels))
    counts = [[0] * len(groups) for _ in range(R)]
    for lab in order:
        members = [i for i, s in enumerate(labels) if s == lab]
        draws = rng.integers(0, len(members), size=(R, len(members)))
        for r in range(R):
            for d in draws[r]:
                counts[r][members[d]] += 1
    srng = np.random.default_rng([seed, 1])
    seeds_a = srng.integers(0, len(stats_a), size=(R, len(stats_a)))
    seeds_b = srng.integers(0, len(stats_b), size=(R, len(stats_b))) if stats_b else None
    values = []
    for r in range(R):
        idx = np.array([i for g, c in zip(groups, counts[r]) for _ in range(c) for i in g])
        v = np.mean([stats_a[j](idx) for j in seeds_a[r]])
        if stats_b:
            v -= np.mean([stats_b[j](idx) for j in seeds_b[r]])
        values.append(v)
    tail = (1 - level) / 2 * 100
    return np.percentile(values, [tail, 100 - tail]), np.array(values)


def _values(n_seeds, shift, rng):
    base = rng.normal(0, 1, N_PROMPTS * IMAGE_SEEDS)
    return [base + shift + rng.normal(0, 0.3, len(base)) for _ in range(n_seeds)]


@pytest.mark.parametrize("strata", [None, ["x", "y", "x", "y", "y"]])
def test_two_level_equals_a_direct_computation(strata):
    rng = np.random.default_rng(0)
    keys, groups = _grid()
    stats_a = [_stat(x, 2) for x in _values(2, 0.5, rng)]
    stats_b = [_stat(x, 2) for x in _values(3, 0.0, rng)]
    ci = two_level_bootstrap(stats_a, stats_b, groups, strata=strata, n_resamples=R, level=0.95,
                             seed=3)
    (low, high), values = _direct(stats_a, stats_b, groups, strata, 3)
    everything = np.concatenate(groups)
    estimate = np.mean([f(everything) for f in stats_a]) - np.mean([f(everything) for f in stats_b])
    assert ci.estimate == pytest.approx(estimate, rel=1e-12)
    assert (ci.low, ci.high) == pytest.approx((low, high), rel=1e-12)
    assert ci.p_value == bootstrap_p_value(values)
    assert "two-level" in ci.method and "training seeds" in ci.method
    one = two_level_bootstrap(stats_a, None, groups, strata=strata, n_resamples=R, level=0.95,
                              seed=3)
    (low, high), _ = _direct(stats_a, None, groups, strata, 3)
    assert (one.low, one.high) == pytest.approx((low, high), rel=1e-12) and one.p_value is None


@pytest.mark.parametrize("strata,recentre", [(None, False), (["x", "y", "x", "y", "y"], True)])
def test_one_seed_per_side_is_the_plain_bootstrap(strata, recentre):
    rng = np.random.default_rng(1)
    _, groups = _grid()
    fa, fb = _stat(_values(1, 0.5, rng)[0], 2), _stat(_values(1, 0.0, rng)[0], 2)
    kw = dict(strata=strata, n_resamples=R, level=0.9, seed=4, recentre=recentre)
    two = two_level_bootstrap([fa], [fb], groups, **kw)
    one = bootstrap(lambda idx: fa(idx) - fb(idx), groups, **kw)
    assert (two.estimate, two.low, two.high, two.p_value) == \
        (one.estimate, one.low, one.high, one.p_value)
    cell = two_level_bootstrap([fa], None, groups, **kw)
    own = bootstrap(fa, groups, **kw)
    assert (cell.estimate, cell.low, cell.high) == (own.estimate, own.low, own.high)


def test_settings_are_checked():
    _, groups = _grid()
    with pytest.raises(ValueError, match="stats_a"):
        two_level_bootstrap([], None, groups, n_resamples=R, level=0.95, seed=0)
    with pytest.raises(ValueError, match="level"):
        two_level_bootstrap([lambda i: 0.0], None, groups, n_resamples=R, level=95, seed=0)


# ------------------------------------------------------------------ the metric API on cells

@dataclass
class Plain(PerImageMetric):
    name = "plain"
    version = "1"


def _result(scores, keys, name="plain", identity=None, details=None):
    rows = [{"prompt_id": p, "seed": s, "score": float(v)} for (p, s), v in zip(keys, scores)]
    return MetricResult(name, "1", True, float(np.mean(scores)), float(np.min(scores)),
                        float(np.max(scores)), len(rows), rows, identity or {"metric": name},
                        details or {"ci_method": "cluster percentile (prompts)"})


def _cell(n_seeds, shift, seed, keys):
    rng = np.random.default_rng(seed)
    values = _values(n_seeds, shift, rng)
    return [(_result(x, keys), f"set{seed}-{i}") for i, x in enumerate(values)]


def test_cell_result_with_one_replicate_is_the_replicate():
    keys, _ = _grid()
    cell = _cell(1, 0.0, 0, keys)
    out = Plain(n_resamples=R).cell_result(cell, seeds=[4])
    own = cell[0][0]
    assert (out.value, out.ci_low, out.ci_high) == (own.value, own.ci_low, own.ci_high)
    assert out.n == own.n
    assert out.per_sample == own.per_sample and out.identity == own.identity
    assert out.details["per_seed"] == {"4": own.value} and out.details["seed_sd"] is None
    assert out.details["n_training_seeds"] == 1
    assert out.details["ci_method"] == own.details["ci_method"]
    assert out.details["ci_covers"] == "prompts (1 training seed)"
    assert own.details == {"ci_method": "cluster percentile (prompts)"}  # not modified in place


def test_cell_result_with_seeds_is_the_two_level_interval():
    keys, groups = _grid()
    keys_shuffled = keys[::-1]           # replicates may list the grid in another order
    cell = _cell(2, 0.0, 0, keys)
    cell[1] = (_result([r["score"] for r in cell[1][0].per_sample][::-1], keys_shuffled), "s1")
    metric = Plain(n_resamples=R, seed=2, level=0.9, interval="bca", seed_level="bootstrap")
    out = metric.cell_result(cell, seeds=[0, 1])
    x = [np.array([r["score"] for r in res.per_sample]) for res, _ in cell]
    direct, _ = _direct([lambda i: x[0][i].mean(), lambda i: x[0 + 1][::-1][i].mean()], None,
                        groups, None, 2, level=0.9)
    assert (out.ci_low, out.ci_high) == pytest.approx(tuple(direct), rel=1e-12)
    assert out.value == pytest.approx(np.mean([res.value for res, _ in cell]))
    assert out.n == 2 * len(keys) and out.per_sample == []
    d = out.details
    assert d["per_seed"] == {"0": cell[0][0].value, "1": cell[1][0].value}
    assert d["seed_sd"] == pytest.approx(np.std([cell[0][0].value, cell[1][0].value], ddof=1))
    assert d["n_training_seeds"] == 2 and d["ci_covers"] == "training seeds and prompts"
    assert "two-level percentile" in d["ci_method"] and "bca" in d["ci_method"]


def test_cell_result_default_seed_level_is_t():
    keys, groups = _grid()
    cell = _cell(3, 0.0, 0, keys)
    out = Plain(n_resamples=R, seed=2).cell_result(cell, seeds=[0, 1, 2])
    x = [np.array([r["score"] for r in res.per_sample]) for res, _ in cell]
    ci = seed_level_interval([lambda i, v=v: v[i].mean() for v in x], None, groups,
                             n_resamples=R, seed=2)
    assert (out.ci_low, out.ci_high) == (ci.low, ci.high)
    assert out.details["ci_method"].startswith("t, Welch-Satterthwaite")


def test_cell_result_refuses_replicates_of_another_protocol():
    keys, _ = _grid()
    cell = _cell(2, 0.0, 0, keys)
    cell[1] = (_result([0.0] * len(keys), keys, identity={"metric": "plain", "resolution": 32}),
               "s1")
    with pytest.raises(ValueError, match="resolution"):
        Plain(n_resamples=R).cell_result(cell, seeds=[0, 1])


def test_paired_cells_one_seed_each_is_paired_difference():
    keys, _ = _grid()
    a, b = _cell(1, 0.5, 0, keys), _cell(1, 0.0, 1, keys)
    metric = Plain(n_resamples=R, seed=3)
    out = metric.paired_difference_cells(a, b)
    plain = metric.paired_difference(a[0][0], b[0][0], a[0][1], b[0][1])
    assert out == {**plain, "n_training_seeds": {"a": 1, "b": 1}}


def test_paired_cells_with_seeds_is_the_two_level_difference():
    keys, groups = _grid()
    a, b = _cell(3, 2.0, 0, keys), _cell(1, 0.0, 1, keys)
    metric = Plain(n_resamples=R, seed=3, seed_level="bootstrap")
    out = metric.paired_difference_cells(a, b)
    xa = [np.array([r["score"] for r in res.per_sample]) for res, _ in a]
    xb = [np.array([r["score"] for r in res.per_sample]) for res, _ in b]
    (low, high), values = _direct([lambda i, x=x: x[i].mean() for x in xa],
                                  [lambda i, x=x: x[i].mean() for x in xb], groups, None, 3)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((low, high), rel=1e-12)
    assert out["p_value"] == bootstrap_p_value(values) == pytest.approx(2 / (R + 1))
    assert out["n_training_seeds"] == {"a": 3, "b": 1} and out["verdict"] == "better"
    assert out["win_rate"]["win_rate"] == 1.0  # per-prompt means, averaged over seeds
    t_level = Plain(n_resamples=R, seed=3).paired_difference_cells(a, b)
    ci = seed_level_interval([lambda i, x=x: x[i].mean() for x in xa],
                             [lambda i, x=x: x[i].mean() for x in xb], groups,
                             n_resamples=R, seed=3)
    assert (t_level["ci_low"], t_level["ci_high"], t_level["p_value"]) == (ci.low, ci.high,
                                                                           ci.p_value)


def test_geneval_cells_keep_their_strata():
    tags = ["colors", "counting", "colors", "position", "counting"]
    keys, groups = _grid()
    metric = ToyGenEval(n_resamples=R, seed=1, seed_level="bootstrap")
    rng = np.random.default_rng(5)

    def replicate(i):
        rows = [{"prompt_id": p, "seed": s, "tag": tags[int(p[1:])],
                 "score": float(rng.random() < 0.6)} for p, s in keys]
        res = MetricResult("geneval", "1", True, metric.set_statistic(rows), 0.0, 1.0, len(rows),
                           rows, {"metric": "geneval"})
        return res, f"g{i}"

    a, b = [replicate(0), replicate(1)], [replicate(2), replicate(3)]
    out = metric.paired_difference_cells(a, b)
    stat = [lambda idx, rows=res.per_sample: metric.set_statistic([rows[i] for i in idx])
            for res, _ in a + b]
    (low, high), _ = _direct(stat[:2], stat[2:], groups, tags, 1)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx((low, high), rel=1e-12)
    assert "stratified" in out["method"]
    t_level = ToyGenEval(n_resamples=R, seed=1).paired_difference_cells(a, b)
    ci = seed_level_interval(stat[:2], stat[2:], groups, strata=tags, n_resamples=R, seed=1)
    assert (t_level["ci_low"], t_level["ci_high"]) == (ci.low, ci.high)
    assert "stratified" in t_level["method"]


# ------------------------------------------------------------------ FID on tiny features

@pytest.fixture(scope="module")
def fid_sets(tmp_path_factory):
    """Three tiny sample sets on one grid (the third written in reverse order) and features."""
    metas = world.prompt_set("eval")[:4]
    folder = tmp_path_factory.mktemp("fidcells")
    rng = np.random.default_rng(0)
    sets, feats = [], {}
    for j in range(3):
        records = [{"prompt_id": m["prompt_id"], "prompt": m["prompt"], "seed": s, "family": "toy",
                    "method": "render", "nfe": 0, "meta": m} for m in metas for s in range(3)]
        images = np.stack([world.render(r["meta"], r["seed"], 16)[0] for r in records])
        if j == 2:
            records, images = records[::-1], images[::-1]
        sets.append(write_sample_set(folder / f"set{j}", images, records))
        feats[f"set{j}"] = rng.normal(0.3 * j, 1.0, (len(records), 3))
    ref = _stats(rng.normal(0, 1, (40, 3)), [m["prompt_id"] for m in metas], {"reference": "stub"})
    return sets, feats, ref


@dataclass
class StubToyFID(ToyFID):
    stub: tuple = field(default=None, repr=False)

    def __post_init__(self):
        self.extractor = None

    def reference(self, resolution):
        return self.stub[1]

    def features(self, ss):
        return self.stub[0][ss.folder.name]

    def identity(self, ref, ss):
        return {"metric": self.name, "reference": "stub"}


@dataclass
class StubFID(FID):
    stub: tuple = field(default=None, repr=False)
    device: str = "cpu"

    def reference_stats(self, resolution):
        return self.stub[1]

    def features(self, ss, resolution):
        return self.stub[0][ss.folder.name]

    def identity(self, ref, ss, resolution):
        return {"metric": self.name, "reference": "stub"}


def _fid_result(metric, folder):
    return metric.score_set(load_sample_set(folder), False)


def test_toy_fid_replicate_statistic_and_cells(fid_sets):
    sets, feats, ref = fid_sets
    metric = StubToyFID(stub=(feats, ref), n_resamples=R, seed=2, seed_level="bootstrap")
    results = [(_fid_result(metric, s), s) for s in sets]
    keys = [(r["prompt_id"], r["seed"]) for r in results[0][0].per_sample]
    stat = metric.replicate_statistic(results[2][0], sets[2], keys)
    aligned = feats["set2"][::-1]                  # set2 was written in reverse order
    idx = np.array([0, 0, 3, 5, 7, 8])
    assert stat(idx) == pytest.approx(frechet_distance(*gaussian_stats(aligned[idx]), ref.mu,
                                                       ref.sigma, ref.sqrt_sigma), rel=1e-12)
    one = metric.paired_difference_cells([results[0]], [results[1]])
    assert one == {**metric.paired_difference(results[0][0], results[1][0], sets[0], sets[1]),
                   "n_training_seeds": {"a": 1, "b": 1}}
    out = metric.paired_difference_cells(results[:2], [results[2]])
    stats = [metric.replicate_statistic(res, f, keys) for res, f in results]
    ci = two_level_bootstrap(stats[:2], stats[2:], group_indices([k[0] for k in keys])[1],
                             n_resamples=R, level=0.95, seed=2, recentre=True)
    assert (out["ci_low"], out["ci_high"], out["p_value"]) == (ci.low, ci.high, ci.p_value)
    assert "recentred" in out["method"] and "win_rate" not in out
    cell = metric.cell_result(results[:2], seeds=[0, 1])
    assert cell.value == pytest.approx((results[0][0].value + results[1][0].value) / 2)
    assert cell.ci_low >= 0.0 and "recentred" in cell.details["ci_method"]


def test_real_fid_replicate_statistic(fid_sets):
    sets, feats, ref = fid_sets
    metric = StubFID(stub=(feats, ref), n_resamples=R, seed=2)
    results = [(_fid_result(metric, s), s) for s in sets]
    keys = [(r["prompt_id"], r["seed"]) for r in results[0][0].per_sample]
    stat = metric.replicate_statistic(results[2][0], sets[2], keys)
    idx = np.array([1, 1, 2, 6, 9, 11])
    direct = fid_resampler(feats["set2"][::-1].copy(), ref)
    assert stat(idx) == pytest.approx(direct(idx), rel=1e-12)
    out = metric.paired_difference_cells(results[:2], results[2:])
    assert out["n_training_seeds"] == {"a": 2, "b": 1} and out["p_value"] is not None
