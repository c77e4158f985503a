"""Paper presets as config files (workflows/config/paper/): each validates and builds its DAG on
the real world: linked teachers, benchmark prompt sets, real metrics with their reference rule,
released students sampled with their method's preset."""
import subprocess
import sys

import pytest
import yaml

from fewstep import config

PAPER = sorted((config.REPO / "workflows" / "config" / "paper").glob("*.yaml"))


def dry_run(tmp_path, configfile):
    out = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(config.REPO / "Snakefile"),
                          "-d", str(tmp_path), "-n", "-p", "all", "--configfile", str(configfile)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_config_builds_its_dag(path, tmp_path):
    cfg = config.load(path)
    assert cfg["world"] == "real"
    plan = dry_run(tmp_path, path)
    family = cfg["families"][0]
    prompt_set = cfg["eval"]["prompt_sets"][family]["name"]
    assert f"prompts --set {prompt_set}" in plan
    assert f"teacher link --family {family} --weights {cfg['teachers']['link'][family]}" in plan
    assert "--feature-net" not in plan and "toy_" not in plan
    if "fid" in cfg["metrics"]:
        assert "fid-ref --metric fid --metric-options" in plan
    released = cfg["distill"].get("released", {})
    for method, cells in released.items():
        assert f"release --method {method} --preset {cells[family]['preset']}" in plan
    trained = [m for m in cfg["distill"]["methods"] if family not in released.get(m, {})]
    for method in trained:  # trained on the family's configured prompts, never the toy world's
        assert f" train --method {method} " in plan
    runs = sum(len(cfg["distill"]["stages"].get(m, [None])) for m in trained)  # one per stage
    runs *= len(cfg["distill"].get("seeds", [0]))  # and per training seed
    assert plan.count(f"--train-prompts results/train_prompts/{family}.jsonl") == runs
    if not trained:
        assert " train --method" not in plan and "train_prompts" not in plan


def test_dmd2s_one_step_sdxl_trains_its_regression_warm_start_first(tmp_path):
    """DMD2 sec. 5.3: stage 1 regresses onto teacher pairs sampled with the DM teacher's guidance,
    stage 2 (DMD2) starts from stage 1's exported model."""
    plan = dry_run(tmp_path, config.REPO / "workflows/config/paper/dmd2-sdxl1-train.yaml")
    assert "pairs --teacher results/teachers/sdxl --count 10000 --steps 50 --guidance 8.0 " in plan
    assert "--preset dmd2-sdxl1-paper-warmstart" in plan
    warm = plan.index("--preset dmd2-sdxl1-paper-warmstart")
    assert "init_from" in plan[plan.index("--preset dmd2-sdxl1-paper ", warm):]


def test_training_on_a_real_backbone_reads_its_data_and_reward(tmp_path):
    """The SiT training preset: prompts and real images from the config, pairs sampled with the
    guidance of DMD's own preset (not the evaluation guidance), reward names checked."""
    path = config.REPO / "workflows/config/paper/sit-imagenet256-train.yaml"
    plan = dry_run(tmp_path, path)
    assert "prompts --set imagenet-classes --out results/train_prompts/sit.jsonl" in plan
    assert "--real-data imagenet-train-256" in plan
    assert "pairs --teacher results/teachers/sit --count 10000 --steps 32 --guidance 1.0 " in plan
    assert "--nproc_per_node 8 -m fewstep train --method dmd2" in plan
    cfg = config.load(path)
    cfg["distill"]["methods"] = ["dmd2", "amd"]
    cfg["distill"]["stages"]["amd"] = ["amd-sit-int"]  # the distill preset is DMD2's
    del cfg["distill"]["train_data"]["sit"]["real_images"]
    cfg["distill"]["rewards"] = {"amd": "hpsv3"}
    with pytest.raises(config.ConfigError) as err:
        config.validate(cfg)
    text = str(err.value)
    assert "dmd2 on sit (trained, not released) needs distill/train_data/sit/real_images" in text
    assert "distill/rewards/amd: unknown reward 'hpsv3'. Did you mean 'hpsv2'" in text
    cfg["distill"]["rewards"] = {}
    with pytest.raises(config.ConfigError, match="amd trains on a reward: set distill/rewards/amd"):
        config.validate(cfg)


def test_real_world_configs_say_what_is_missing(tmp_path):
    cfg = config.load(PAPER[0])
    cfg["metrics"] = ["toy_fid", "fid"]
    cfg["eval"]["prompt_sets"] = {}
    cfg["distill"]["released"] = {}
    with pytest.raises(config.ConfigError) as err:
        config.validate(cfg)
    text = str(err.value)
    assert "eval/prompt_sets has no entry for ['sdxl']" in text
    assert "toy metrics ['toy_fid'] score only the toy world" in text
    assert "dmd2 on sdxl (trained, not released) needs distill/train_data/sdxl/prompts" in text
    toy = config.load()
    toy["teachers"]["source"] = "link"
    with pytest.raises(config.ConfigError, match="link is for world: real"):
        config.validate(toy)
    del toy["fid"]
    toy["teachers"]["source"] = "shipped"
    with pytest.raises(config.ConfigError, match=r"the toy world needs \['fid'\]"):
        config.validate(toy)


def test_weights_check_of_a_paper_config_lists_checkpoints_metrics_and_prompt_sets(tmp_path,
                                                                                   monkeypatch,
                                                                                   capsys):
    from fewstep.cli import main

    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(tmp_path))
    code = main(["weights", "check", "--config", str(config.REPO / "workflows/config/paper/"
                                                          "rtdmd-sd3-drawbench.yaml")])
    out = capsys.readouterr().out
    assert code == 1
    for group in ("metric clip_score:", "metric hpsv2.1:", "metric imagereward:", "family sd3:",
                  "prompt set drawbench:"):
        assert group in out
    assert "stable-diffusion-3-medium-diffusers" in out and "prompts/drawbench/drawbench.csv" in out
    assert "released rtdmd on sd3:" in out and str(tmp_path / "rtdmd/sd3-medium-rtdmd") in out
