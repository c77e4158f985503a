"""The bootstrap interval method is a config choice (`bootstrap.interval: percentile | bca |
studentized`, default percentile) that reaches every metric's CI through `fewstep score
--interval`; the default DAG's commands, score files and reports do not change, and score files
written before the option rebuild their metrics with the percentile interval (fewstep.pairing)."""
import argparse
import copy
import json

import pytest

from fewstep import config as workflow_config
from fewstep import planning
from fewstep.cli import main
from fewstep.commands.prompts import eval_prompts
from fewstep.io import write_text
from fewstep.scoring import scoring_context
from dry_run import dry_run  # tests/dry_run.py
from test_score_gate import SEEDS, _sample_set  # toy teacher sets as `fewstep sample` writes

DEFAULT = workflow_config.load(workflow_config.DEFAULT)


def with_interval(interval) -> dict:
    cfg = copy.deepcopy(DEFAULT)
    cfg["bootstrap"]["interval"] = interval
    return cfg


# -- config ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("interval", ["percentile", "bca", "studentized"])
def test_the_config_accepts_the_three_interval_methods(interval):
    workflow_config.validate(with_interval(interval))


def test_the_config_refuses_another_interval_and_lists_the_allowed_ones():
    with pytest.raises(workflow_config.ConfigError) as err:
        workflow_config.validate(with_interval("normal"))
    message = str(err.value)
    assert "bootstrap" in message and "normal" in message
    assert all(m in message for m in ("percentile", "bca", "studentized"))


# -- planning and the DAG --------------------------------------------------------------------------
def test_the_score_flag_is_planned_only_for_a_non_default_interval():
    assert planning.score_params(DEFAULT)["interval"] == ""
    assert planning.score_params(with_interval("percentile"))["interval"] == ""
    assert planning.score_params(with_interval("bca"))["interval"] == "--interval bca "


def test_the_seed_level_flag_is_planned_only_when_not_t():
    cfg = copy.deepcopy(DEFAULT)
    cfg["bootstrap"]["seed_level"] = "bootstrap"
    workflow_config.validate(cfg)
    assert planning.score_params(cfg)["interval"] == "--seed-level bootstrap "
    cfg["bootstrap"]["seed_level"] = "t"
    assert planning.score_params(cfg)["interval"] == ""
    cfg["bootstrap"]["seed_level"] = "jackknife"
    with pytest.raises(workflow_config.ConfigError, match="seed_level"):
        workflow_config.validate(cfg)


def _score_commands(tmp_path, cfg) -> list[str]:
    return [line for line in dry_run(tmp_path, cfg).splitlines() if " score --samples " in line]


def test_the_dry_run_passes_interval_only_when_the_config_asks(tmp_path):
    default = _score_commands(tmp_path / "a", DEFAULT)
    bca = _score_commands(tmp_path / "b", with_interval("bca"))
    assert default and len(default) == len(bca)
    assert not any("--interval" in c for c in default)
    assert all("--interval bca --metric-options" in c for c in bca)
    # nothing else in the command moves
    assert sorted(c.replace("--interval bca ", "") for c in bca) == sorted(default)


# -- fewstep score ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_set(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interval")
    rows = eval_prompts("sdxl", 12)  # two prompts in every GenEval task
    prompts = tmp / "p.jsonl"
    write_text(prompts, "".join(json.dumps(r) + "\n" for r in rows))
    return _sample_set(tmp / "set", rows), prompts


def _score(toy_set, out, *extra) -> dict:
    samples, prompts = toy_set
    rc = main(["score", "--samples", str(samples), "--prompts", str(prompts), "--seeds",
               *map(str, SEEDS), "--resolution", "16", "--metrics", "toy_hps", "toy_geneval",
               "--allow-blank", "--resamples", "50", *extra, "--out", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


def test_score_interval_keeps_the_value_and_names_the_interval(toy_set, tmp_path):
    plain = _score(toy_set, tmp_path / "p.json")
    bca = _score(toy_set, tmp_path / "b.json", "--interval", "bca")
    stud = _score(toy_set, tmp_path / "s.json", "--interval", "studentized")
    assert "interval" not in plain["scoring_args"]  # default score files as before the option
    assert bca["scoring_args"]["interval"] == "bca"
    for name in ("toy_hps", "toy_geneval"):
        p, b, s = (x["results"][name] for x in (plain, bca, stud))
        assert p["value"] == b["value"] == s["value"]
        assert p["identity"] == b["identity"] == s["identity"]  # identities are in the reports
        assert "percentile" in p["details"]["ci_method"]
        assert "BCa" in b["details"]["ci_method"]
    assert "studentized" in stud["results"]["toy_hps"]["details"]["ci_method"]
    # GenEval's overall score is a stratified set-level statistic: no per-resample standard
    # error, so a studentized request gets BCa there, and ci_method says so
    geneval = stud["results"]["toy_geneval"]["details"]["ci_method"]
    assert "BCa" in geneval and "studentized" in geneval


def test_score_refuses_an_unknown_interval(toy_set, tmp_path, capsys):
    from fewstep.commands import score
    from metrics import seed_level, stats

    assert score.INTERVAL_METHODS == stats.INTERVAL_METHODS
    assert score.SEED_LEVELS == seed_level.SEED_LEVELS
    samples, prompts = toy_set
    with pytest.raises(SystemExit):
        main(["score", "--samples", str(samples), "--prompts", str(prompts), "--seeds", "0",
              "--resolution", "16", "--metrics", "toy_hps", "--interval", "normal",
              "--out", str(tmp_path / "x.json")])
    assert "bca" in capsys.readouterr().err


# -- score files written before the option -------------------------------------------------------
def test_an_older_score_files_arguments_rebuild_a_percentile_metric(toy_set):
    from fewstep import pairing

    samples, prompts = toy_set
    old = dict(prompts=str(prompts), seeds=list(SEEDS), resolution=16, metrics=["toy_hps"],
               feature_net=None, reference_images=2000, cache="results/cache", allow_blank=True,
               resamples=50, confidence=0.95, bootstrap_seed=0, against=[], metric_options={})
    assert scoring_context(argparse.Namespace(**old), []).interval == "percentile"
    metric, _, _ = pairing.metric_for("toy_hps", old)
    assert metric.interval == "percentile"
    metric, _, _ = pairing.metric_for("toy_hps", {**old, "interval": "bca"})
    assert metric.interval == "bca"


def test_a_config_cannot_set_the_interval_as_a_metric_option():
    from metrics.base import RESERVED_OPTIONS

    assert "interval" in RESERVED_OPTIONS


def test_paired_differences_use_the_interval(toy_set, tmp_path):
    """A student-vs-teacher difference: a plain mean takes the interval asked; GenEval's
    stratified difference goes through stats.bootstrap, where studentized is read as BCa."""
    from metrics.base import MetricResult
    from metrics.geneval import ToyGenEval
    from metrics.toy_preference import ToyHPS

    score = _score(toy_set, tmp_path / "p.json")
    hps = MetricResult.from_dict(score["results"]["toy_hps"])
    geneval = MetricResult.from_dict(score["results"]["toy_geneval"])
    assert "percentile" in ToyHPS(n_resamples=50).paired_difference(hps, hps)["method"]
    assert "BCa" in ToyHPS(n_resamples=50, interval="bca").paired_difference(hps, hps)["method"]
    method = ToyHPS(n_resamples=50, interval="studentized").paired_difference(hps, hps)["method"]
    assert "studentized" in method
    method = ToyGenEval(n_resamples=50, interval="studentized").paired_difference(geneval, geneval)
    assert "BCa" in method["method"]
