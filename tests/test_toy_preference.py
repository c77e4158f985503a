"""Toy stand-ins for the HPSv2 and ImageReward slots: own shipped nets, sensible direction."""
import numpy as np
import pytest

from fewstep.toy import world
from fewstep.toy.features import SHIPPED_SEEDS, load_feature_net, shipped_feature_net
from metrics.sampleset import write_sample_set
from metrics.toy_preference import ToyHPS, ToyImageReward
from metrics.toy_reward import REWARD_SEED

SEEDS = (0, 1)


def _write(folder, metas, noise=0.0):
    rng = np.random.default_rng(0)
    images, records = [], []
    for m in metas:
        for s in SEEDS:
            image = world.render(m, s, 16)[0].astype(np.float64)
            image = np.clip(image + rng.normal(0, noise * 255, image.shape), 0, 255)
            images.append(image.astype(np.uint8))
            records.append({"prompt_id": m["prompt_id"], "prompt": m["prompt"], "seed": s,
                            "family": "toy", "method": "render", "nfe": 0, "meta": m})
    return write_sample_set(folder, np.stack(images), records)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    metas = world.prompt_set("eval")[:24]
    root = tmp_path_factory.mktemp("pref")
    return _write(root / "clean", metas), _write(root / "noisy", metas, noise=0.25)


@pytest.mark.parametrize("metric_cls", [ToyHPS, ToyImageReward])
def test_clean_renders_beat_degraded_ones(sets, metric_cls):
    metric = metric_cls(n_resamples=200)
    clean, noisy = (metric.score(folder) for folder in sets)
    assert clean.ci_low > noisy.ci_high and clean.higher_is_better
    assert clean.n == len(clean.per_sample) == 48 and clean.value <= 0.0
    diff = metric.paired_difference(noisy, clean)
    assert diff["verdict"] == "worse" and diff["win_rate"]["losses"] > diff["win_rate"]["wins"]


def test_slots_have_their_own_nets_never_the_training_reward(sets):
    hps, ir = ToyHPS(n_resamples=10).score(sets[0]), ToyImageReward(n_resamples=10).score(sets[0])
    assert hps.identity["stands_in_for"] == "HPSv2" and ir.identity["stands_in_for"] == "ImageReward"
    assert hps.identity["reward_net_sha256"] != ir.identity["reward_net_sha256"]
    assert hps.value != ir.value
    for role in ("hps", "imagereward"):
        seed = load_feature_net(shipped_feature_net(16, role)).recipe["seed"]
        assert seed == SHIPPED_SEEDS[role] and seed not in (REWARD_SEED, SHIPPED_SEEDS["fid"])


def test_unknown_slot_and_size_mismatch_are_clear_errors(sets, tmp_path):
    from metrics.toy_preference import ToyPreference
    with pytest.raises(ValueError, match="toy_hps"):
        ToyPreference(slot="toy_hsp")
    metas = world.prompt_set("eval")[:2]
    images = np.stack([world.render(m, 0, 32)[0] for m in metas])
    records = [{"prompt_id": m["prompt_id"], "prompt": m["prompt"], "seed": 0, "family": "toy",
                "method": "render", "nfe": 0, "meta": m} for m in metas]
    folder = write_sample_set(tmp_path / "big", images, records)
    with pytest.raises(ValueError, match="no shipped toy hps net for 32 px"):
        ToyHPS(n_resamples=10).score(folder)
