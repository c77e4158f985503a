"""The DAG's plan (fewstep.planning) as pure functions of the config: runs, each train job's inputs
from its method's `requires`, quoted arguments, released students, score and report lists."""
import copy
import shlex
import subprocess
import sys

import pytest

from fewstep import config as workflow_config
from fewstep import planning
from fewstep.engine.method import Method
from fewstep.registry import METHODS

DEFAULT = workflow_config.load(workflow_config.DEFAULT)
REAL = workflow_config.load(workflow_config.REPO / "workflows/config/paper" /
                            "sit-imagenet256-train.yaml")


class NeedsAll(Method):
    """A plugin-like method that requires every extra input (never trained here)."""
    name = "needs_all"
    requires = ("pairs", "reward", "real")


@pytest.fixture
def needs_all(monkeypatch):
    """`needs_all` registered for the test only, as an installed plugin would be."""
    monkeypatch.setitem(METHODS._targets, "needs_all", "<test>")
    monkeypatch.setitem(METHODS._loaded, "needs_all", NeedsAll)
    return "needs_all"


def with_methods(cfg: dict, *methods: str, **distill) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["distill"].update(methods=list(methods), **distill)
    return cfg


def test_a_staged_method_is_one_run_per_stage_each_from_the_previous():
    runs = planning.runs(DEFAULT)
    assert list(runs) == ["dmd", "dmd2", "amd", "rtdmd-stage1", "rtdmd", "cdm"]
    assert runs["rtdmd-stage1"] == planning.Run("rtdmd", "toy", None)
    assert runs["rtdmd"] == planning.Run("rtdmd", "toy-stage2", "rtdmd-stage1")
    assert runs["cdm"] == planning.Run("cdm", "toy", None)


def test_toy_train_inputs_follow_each_methods_requires():
    for run, (method, _, previous) in planning.runs(DEFAULT).items():
        inputs = planning.train_inputs(DEFAULT, "sit", run, 0)
        needs = METHODS.get(method).requires
        assert ("pairs" in inputs) == ("pairs" in needs), run
        assert ("reward" in inputs) == ("reward" in needs), run
        assert "prompts" not in inputs  # the toy world trains on its own prompts
        assert inputs.get("init") == (previous and f"results/models/sit/{previous}/seed0")
    assert planning.train_inputs(DEFAULT, "sit", "dmd", 0)["pairs"] == "results/pairs/sit.safetensors"
    assert planning.train_inputs(DEFAULT, "sd3", "amd", 0)["reward"] == planning.TOY_REWARD_NET


def test_toy_train_args_are_the_commands_the_dag_runs():
    assert planning.train_args(DEFAULT, "sit", "dmd", 0) == (
        "--method dmd --preset toy --set pairs=results/pairs/sit.safetensors seed=0")
    assert planning.train_args(DEFAULT, "sdxl", "rtdmd", 2) == (
        "--method rtdmd --preset toy-stage2 --reward results/metrics/toy_reward_net.safetensors "
        "--set init_from=results/models/sdxl/rtdmd-stage1/seed2 seed=2")
    assert planning.train_args(DEFAULT, "sit", "dmd2", 0) == "--method dmd2 --preset toy --set seed=0"


def test_every_training_seed_is_a_replicate_trained_sampled_and_scored_on_its_own():
    cfg = with_methods(DEFAULT, "dmd2", "rtdmd", seeds=[0, 1, 2])
    assert planning.replicates(cfg, "sit", "dmd2") == ["seed0", "seed1", "seed2"]
    assert planning.model_dir(cfg, "sit", "dmd2", "seed1") == "results/models/sit/dmd2/seed1"
    assert planning.train_inputs(cfg, "sit", "rtdmd", 1)["init"] == \
        "results/models/sit/rtdmd-stage1/seed1"
    assert planning.replicate_scores(cfg, "sd3", "rtdmd") == [
        f"results/scores/sd3/rtdmd/seed{s}.json" for s in (0, 1, 2)]
    assert planning.aggregate_seeds(cfg, "sd3", "rtdmd") == "0 1 2"
    assert len(planning.all_model_dirs(cfg)) == 3 * 3 * 3  # families x runs x seeds
    # the report's grids show the first replicate of each cell
    assert planning.sample_sets(cfg)[-1] == "results/samples/sit/rtdmd/seed0"


def test_a_seed_override_is_refused_because_distill_seeds_sets_every_seed():
    cfg = with_methods(DEFAULT, "dmd2", overrides={"dmd2": {"seed": 3}})
    with pytest.raises(workflow_config.ConfigError, match="distill/seeds"):
        workflow_config.validate(cfg)


def test_a_plugin_gets_the_inputs_it_requires_in_both_worlds(needs_all):
    cfg = with_methods(DEFAULT, needs_all)
    assert set(planning.train_inputs(cfg, "sit", needs_all, 0)) == {"teacher", "pairs", "reward"}
    toy_args = planning.train_args(cfg, "sit", needs_all, 0)
    assert "--reward results/metrics/toy_reward_net.safetensors" in toy_args
    real = with_methods(REAL, needs_all, rewards={needs_all: "hpsv2:v2.0"})
    inputs = planning.train_inputs(real, "sit", needs_all, 0)
    assert set(inputs) == {"teacher", "pairs", "prompts"}  # the real reward is a name, not a file
    args = planning.train_args(real, "sit", needs_all, 0)
    assert "--reward hpsv2:v2.0 --train-prompts results/train_prompts/sit.jsonl" in args
    assert "--real-data imagenet-train-256" in args


def test_every_config_string_in_the_train_arguments_is_quoted(needs_all):
    hostile = "x'; touch pwned #"
    cfg = with_methods(REAL, needs_all, rewards={needs_all: hostile}, preset=hostile,
                       overrides={needs_all: {"name": hostile}})
    cfg["distill"]["train_data"]["sit"]["real_images"] = hostile
    words = shlex.split(planning.train_args(cfg, "sit", needs_all, 0))
    assert words[words.index("--preset") + 1] == hostile
    assert words[words.index("--reward") + 1] == hostile
    assert words[words.index("--real-data") + 1] == hostile
    assert f"name={hostile}" in words


def test_pairs_are_sampled_with_the_guidance_of_the_method_that_reads_them():
    dmd = METHODS.get("dmd")
    assert planning.pairs_guidance(DEFAULT) == dmd.Options(**dmd.PRESETS["toy"]).teacher_guidance
    cfg = with_methods(DEFAULT, "dmd", overrides={"dmd": {"teacher_guidance": 3.5}})
    assert planning.pairs_guidance(cfg) == 3.5


def test_released_students_are_not_trained_and_are_sampled_from_their_release():
    cfg = with_methods(DEFAULT, "dmd2", "cdm", released={"dmd2": {"sit": {"weights": "w b"}}})
    assert planning.replicates(cfg, "sit", "dmd2") == ["released"]
    assert planning.model_dir(cfg, "sit", "dmd2", "released") == "results/released/sit/dmd2"
    assert planning.model_dir(cfg, "sd3", "dmd2", "seed0") == "results/models/sd3/dmd2/seed0"
    assert planning.aggregate_seeds(cfg, "sit", "dmd2") == "released"
    dirs = planning.all_model_dirs(cfg)
    assert "results/models/sit/dmd2/seed0" not in dirs and dirs[-1] == "results/released/sit/dmd2"
    assert len(dirs) == 5 * 3 + 1  # five trained cells x three training seeds, one release
    assert planning.release_params(cfg, "sit", "dmd2") == {"weights": "'w b'", "lora": "",
                                                           "preset": "toy"}


def test_score_and_report_lists_cover_every_teacher_set_and_student():
    scores = planning.score_files(DEFAULT)
    assert len(scores) == 3 * 5 + 3 * 5
    assert scores[:2] == ["results/scores/sdxl/teacher/steps1.json",
                          "results/scores/sdxl/teacher/steps2.json"]
    assert scores[-1] == "results/scores/sit/cdm/student.json"
    assert planning.sample_sets(DEFAULT)[-1] == "results/samples/sit/cdm/seed0"
    assert planning.score_extra_inputs(DEFAULT) == {
        "net": planning.TOY_FEATURE_NET, "reference": "results/metrics/fid_reference/{family}.json"}
    assert set(planning.score_extra_inputs(REAL)) == {"reference"}
    assert planning.score_params(REAL)["blank"] == ""


def test_real_precision_and_recall_need_the_fid_reference_they_read():
    cfg = copy.deepcopy(REAL)
    cfg["metrics"] = [m for m in cfg["metrics"] if m != "fid"] + ["recall"]
    cfg["metric_options"] = {"recall": cfg["metric_options"].pop("fid")}
    with pytest.raises(workflow_config.ConfigError, match="add fid"):
        workflow_config.validate(cfg)


def test_train_launch_runs_several_ranks_under_torchrun():
    assert planning.train_launch(DEFAULT, "py") == "py -m fewstep"
    cfg = with_methods(DEFAULT, "dmd", processes=4)
    assert planning.train_launch(cfg, "py") == (
        "py -m torch.distributed.run --standalone --signals-to-handle "
        "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout 240 --nproc_per_node 4 -m fewstep")


def test_importing_the_planning_module_is_light():
    code = ("import sys, fewstep.planning; "
            "print(sorted(m for m in ('torch', 'snakemake') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def with_eval(cfg: dict, **values) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["eval"].update(values)
    return cfg


def test_a_shard_count_over_the_batches_of_a_sample_set_is_refused_at_config_load():
    """Each shard samples whole batches of the DAG's `fewstep sample` batch (64): the toy sdxl set
    of 6 prompts x 2 seeds is one batch, so 2 shards would leave one shard job nothing to do
    (it fails); 61 prompts x 2 seeds are 2 batches (SiT's 54 class prompts too)."""
    assert planning.SAMPLE_BATCH == 64
    small = with_eval(DEFAULT, prompts=6, seeds=[0, 1], shards=2)
    with pytest.raises(workflow_config.ConfigError,
                       match=r"eval/shards = 2 .*12 \(prompt, seed\) jobs.*1 batch.*"
                             r"the largest allowed is 1"):
        workflow_config.validate(small)
    two = with_eval(small, prompts=61)
    workflow_config.validate(two)
    assert planning.max_shards(two) == (2, "sdxl")  # every family has 2 batches: the first
    with pytest.raises(workflow_config.ConfigError,
                       match=r"eval/shards = 3 .*largest allowed is 2"):
        workflow_config.validate(with_eval(two, shards=3))


def test_a_benchmark_sets_size_bounds_the_shards_in_the_real_world():
    """World real: a benchmark set's official size (or its n): 1000 ImageNet classes x 10 seeds
    are 10,000 jobs, 157 batches of 64."""
    assert planning.max_shards(REAL) == (157, "sit")
    workflow_config.validate(with_eval(REAL, shards=157))
    with pytest.raises(workflow_config.ConfigError, match=r"eval/shards = 158 .*sit.*"
                                                          r"largest allowed is 157"):
        workflow_config.validate(with_eval(REAL, shards=158))
    coco = copy.deepcopy(REAL)
    coco["eval"]["prompt_sets"]["sit"] = {"name": "coco2014-val-captions", "n": 100}
    assert planning.max_shards(coco) == (16, "sit")  # 100 x 10 = 1000 jobs
    coco["eval"]["prompt_sets"]["sit"] = {"name": "coco2014-val-captions"}  # its default n 10,000
    assert planning.max_shards(coco) == (1563, "sit")
