"""The toy metric slots measure different things, as the real ones do: toy_hps image quality and
composition (prompt-independent), toy_imagereward prompt alignment, and the training reward of
AMD/RTDMD a third objective; no two correlate above 0.9 on the fixed set of `fewstep metric-corr`,
whose matrix each identity records; the leakage mark stays correct for the training reward."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fewstep.commands import metric_corr
from fewstep.toy import world
from fewstep.toy.features import degrade_batch

ROOT = Path(__file__).resolve().parents[1]
RES = 16


@pytest.fixture(scope="module")
def fixed_set():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, metas, _ = metric_corr.fixed_set(RES, (0, 1), (1, 2, 4))
        return images, metas, metric_corr.metric_scores(images, metas)
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def matrix(fixed_set):
    return metric_corr.correlation_matrix(fixed_set[2])


@pytest.fixture(scope="module")
def n_images(fixed_set):
    return len(fixed_set[1])


@pytest.mark.parametrize("method", ["pearson", "spearman"])
def test_no_two_toy_metrics_correlate_above_0_9(fixed_set, method):
    matrix = metric_corr.correlation_matrix(fixed_set[2], method)
    assert set(matrix) == set(metric_corr.METRICS)
    high = {(a, b): round(r, 3) for a, row in matrix.items() for b, r in row.items()
            if a < b and abs(r) > 0.9}
    assert not high, f"toy metrics that measure one thing (|{method} r| > 0.9): {high}"


def test_recorded_matrix_is_the_measured_one(matrix, n_images):
    from metrics.toy_reward import CORRELATIONS

    recorded = CORRELATIONS["pearson"]
    assert set(recorded) == set(matrix) and CORRELATIONS["n_images"] == n_images
    for a, row in matrix.items():
        for b, r in row.items():
            assert abs(recorded[a][b] - r) <= 0.011, (
                f"recorded r({a}, {b}) = {recorded[a][b]}, measured {r:.3f}: rerun "
                "`fewstep metric-corr` and update metrics.toy_reward.CORRELATIONS")


@pytest.fixture(scope="module")
def renders():
    rows = world.prompt_set("eval")
    images = np.stack([world.render(m, s, RES)[0] for m in rows for s in (0, 1)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return x, [m for m in rows for _ in (0, 1)]


def _scorers():
    from metrics.toy_preference import ToyHPS, ToyImageReward
    from metrics.toy_reward import load_toy_reward
    from fewstep.toy.features import shipped_feature_net

    return {"toy_hps": ToyHPS().reward(RES), "toy_imagereward": ToyImageReward().reward(RES),
            "toy_reward": load_toy_reward(shipped_feature_net(RES, "reward"))}


def _score(scorer, x, metas):
    with torch.no_grad():
        return scorer(x, metas).double().numpy()


def test_each_identity_records_what_it_rewards_and_the_matrix(renders):
    from metrics.toy_reward import CORRELATIONS

    scorers = _scorers()
    objectives = {name: s.identity()["rewards"] for name, s in scorers.items()}
    assert len(set(objectives.values())) == 3, objectives
    for name, scorer in scorers.items():
        ident = scorer.identity()
        assert ident["correlations"] == CORRELATIONS, name
        assert ident["net_sha256"] == scorer.sha256


def test_hps_rewards_quality_not_the_prompt(renders):
    x, metas = renders
    hps = _scorers()["toy_hps"]
    shuffled = [metas[i] for i in np.random.default_rng(0).permutation(len(metas))]
    assert np.array_equal(_score(hps, x, metas), _score(hps, x, shuffled))
    degraded, kinds = degrade_batch(x, np.random.default_rng(0), 1.0, metric_corr.DEGRADATIONS)
    drop = _score(hps, x, metas) - _score(hps, degraded, metas)
    for k in range(1, len(metric_corr.DEGRADATIONS)):
        assert drop[kinds.numpy() == k].mean() > 0, metric_corr.DEGRADATIONS[k]


def test_hps_prefers_separated_objects_inside_the_canvas(renders):
    x, metas = renders
    hps = _scorers()["toy_hps"]
    clean = _score(hps, x, metas)
    cut = x.clone()
    cut[:, :, :, : RES // 2] = x[:, :, :, RES // 2:]   # right half pasted left: objects cut/merged
    assert (clean > _score(hps, cut, metas)).mean() > 0.6


def test_imagereward_rewards_alignment_more_than_cleanliness(renders):
    x, metas = renders
    ir = _scorers()["toy_imagereward"]
    own = _score(ir, x, metas)
    wrong = [metas[i] for i in np.random.default_rng(1).permutation(len(metas))]
    assert (own > _score(ir, x, wrong)).mean() > 0.8
    # the same prompt with its position relation flipped scores lower
    flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    idx = [i for i, m in enumerate(metas) if m["tag"] == "position"]
    flipped = []
    for i in idx:
        meta = {**metas[i], "include": [dict(c) for c in metas[i]["include"]]}
        rel, target = meta["include"][1]["position"]
        meta["include"][1]["position"] = [flip[rel], target]
        flipped.append(meta)
    assert (own[idx] > _score(ir, x[idx], flipped)).mean() > 0.7


def test_training_reward_is_differentiable_and_no_metric_shares_its_net(renders):
    from fewstep.toy.features import SHIPPED_SEEDS, load_feature_net, shipped_feature_net
    from metrics.toy_reward import REWARD_SEED

    x, metas = renders
    scorers = _scorers()
    reward = scorers["toy_reward"]
    images = x[:8].clone().requires_grad_(True)
    reward(images, metas[:8]).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert SHIPPED_SEEDS["reward"] == REWARD_SEED
    metric_nets = {load_feature_net(shipped_feature_net(RES, r)).sha256
                   for r in ("fid", "hps", "imagereward")}
    assert reward.sha256 not in metric_nets
    assert {scorers["toy_hps"].sha256, scorers["toy_imagereward"].sha256} <= metric_nets


def test_leakage_mark_for_the_toy_reward_and_a_metric_reward():
    """The toy training reward shares no net and no formula with a scoring metric: no L; a reward
    that is a metric's model (real world) keeps its L."""
    from fewstep.reporting.tables import trained_on

    def row(spec):
        return {"sampling_provenance": {"student": {"reward": spec}}}

    assert trained_on(row("toy:results/metrics/toy_reward_net.safetensors")) == set()
    assert trained_on(row("hpsv2")) == {"hpsv2.1"}


def test_a_reward_built_on_a_slot_net_shares_that_slot():
    """What the leakage mark needs for a toy reward: which slot's model a reward file is."""
    from fewstep.io import file_sha256
    from fewstep.toy.features import shipped_feature_net
    from metrics.toy_preference import slots_sharing_net

    assert slots_sharing_net(file_sha256(shipped_feature_net(RES, "reward"))) == set()
    assert slots_sharing_net(file_sha256(shipped_feature_net(RES, "hps"))) == {"toy_hps"}
    assert slots_sharing_net(file_sha256(shipped_feature_net(RES, "imagereward"))) == {
        "toy_imagereward"}
    assert slots_sharing_net(None) == set()


def test_dag_trains_the_shipped_reward_net_recipe():
    """The reward_net rule's command still trains the recipe and seed of the shipped reward net,
    so the correlation matrix measured with the shipped file is the DAG's."""
    from fewstep.toy.features import load_feature_net, shipped_feature_net
    from metrics.toy_reward import REWARD_SEED

    rule = (ROOT / "workflows/rules/train.smk").read_text()
    shell = rule[rule.index("rule reward_net"):rule.index("rule pairs")]
    trains = re.search(rf"features --size \{{params.res\}} --steps \{{params.steps\}} --seed "
                       rf"{REWARD_SEED} ", shell)
    # the config's fid.feature_net picks the shipped seed-1 file or the recipe with that seed
    copies = ("features --source {params.source} --role reward " in shell
              and f"--steps {{params.steps}} --seed {REWARD_SEED} " in shell)
    assert trains or copies, shell
    recipe = load_feature_net(shipped_feature_net(RES, "reward")).recipe
    config = yaml.safe_load((ROOT / "workflows/config/default.yaml").read_text())
    assert recipe["seed"] == REWARD_SEED and config["resolution"] == RES
    assert recipe["steps"] == config["fid"]["feature_net_steps"]


def test_metric_corr_command_prints_the_matrix(capsys):
    import argparse
    import json

    parser = argparse.ArgumentParser()
    metric_corr.add_arguments(parser)
    metric_corr.run(parser.parse_args(["--teacher-steps", "--json", "--method", "spearman"]))
    out = capsys.readouterr().out
    assert "spearman correlation of per-image scores on" in out and "largest |r|" in out
    recorded = json.loads(out.strip().splitlines()[-1])
    assert set(recorded["spearman"]) == set(metric_corr.METRICS)
    assert recorded["n_images"] == 3 * 2 * len(world.prompt_set("eval"))  # renders only
