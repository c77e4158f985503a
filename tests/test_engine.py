"""The training engine: plans, checkpoints and exact resume, signals, NaN stop, LoRA, data parallel."""
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from fewstep.engine import checkpoint
from fewstep.engine.distributed import DistInfo
from fewstep.engine.loop import NonFiniteLossError, StopRequested, Trainer
from fewstep.engine.run import build_method, export, load_student, toy_context
from fewstep.errors import FewstepError
from fewstep.registry import METHODS, UnknownNameError
from fewstep.toy import teachers
from trainer_checks import assert_same, weights

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sit_teacher():
    torch.manual_seed(0)
    return teachers.build("sit", resolution=16, seed=0)


def make(teacher, name="dmd2", preset="toy", **overrides):
    ctx = toy_context(teacher, teacher.family, 16, 0, DistInfo())
    opts = dict(batch=2, warmup=1, checkpoint_every=1000, log_every=1)
    if name == "dmd2":
        opts.update(generator_grid=[1.0, 0.5], ttur_ratio=2)
    opts.update(overrides)
    return build_method(name, teacher, ctx, preset, opts)


def test_resume_continues_exactly(sit_teacher, tmp_path):
    straight = Trainer(make(sit_teacher, steps=6), tmp_path / "a")
    straight.run(progress=False)
    first = Trainer(make(sit_teacher, steps=3), tmp_path / "b")
    first.run(progress=False)
    resumed = Trainer(make(sit_teacher, steps=6), tmp_path / "b")
    state = resumed.run(progress=False)
    assert state.resumed_from == 3 and state.step == 6
    assert_same(weights(straight), weights(resumed))
    for name in ("generator", "critic"):
        sa = straight.optimizers[name].state_dict()["state"]
        sb = resumed.optimizers[name].state_dict()["state"]
        assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    steps = [int(line.split('"step": ')[1].split(",")[0])
             for line in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(6))  # logged once per iteration, even across the resume


def test_resume_refuses_a_checkpoint_of_another_config(sit_teacher, tmp_path):
    """Only the run length (steps, checkpoint/log cadence) may change across a resume."""
    Trainer(make(sit_teacher, steps=2), tmp_path / "run").run(progress=False)
    with pytest.raises(FewstepError, match=r"lr: 0\.0001 -> 0\.0002.*--run-dir"):
        Trainer(make(sit_teacher, steps=4, lr=2e-4), tmp_path / "run").run(progress=False)
    with pytest.raises(FewstepError, match="method: dmd2 -> dmd"):
        Trainer(make(sit_teacher, "dmd", steps=4, lambda_reg=0.0), tmp_path / "run").run(progress=False)
    state = Trainer(make(sit_teacher, steps=3, log_every=2), tmp_path / "run").run(progress=False)
    assert state.resumed_from == 2 and state.step == 3


class _Signalling:
    """Wraps a method's loss to deliver a signal to this process at one iteration."""

    def __init__(self, method, at: int, signum):
        self.method, self.at, self.signum = method, at, signum
        original = method.loss

        def loss(net, scratch):
            if method.ctx.step == self.at and net == method.plan(self.at)[0]:
                os.kill(os.getpid(), self.signum)
            return original(net, scratch)

        method.loss = loss


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_saves_checkpoint_and_resume_matches(sit_teacher, tmp_path, signum):
    straight = Trainer(make(sit_teacher, "dummy", steps=5), tmp_path / "a")
    straight.run(progress=False)
    method = make(sit_teacher, "dummy", steps=5)
    _Signalling(method, at=2, signum=signum)
    with pytest.raises(StopRequested) as stop:
        Trainer(method, tmp_path / "b").run(progress=False)
    assert stop.value.step == 3  # the iteration in flight finishes, then it saves
    assert checkpoint.latest(tmp_path / "b").name == "step_00000003"
    resumed = Trainer(make(sit_teacher, "dummy", steps=5), tmp_path / "b")
    assert resumed.run(progress=False).resumed_from == 3
    assert_same(weights(straight), weights(resumed))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_nonfinite_loss_stops_with_iteration_and_network(sit_teacher, tmp_path):
    method = make(sit_teacher, "dummy", steps=5)
    original = method.loss
    method.loss = lambda net, scratch: (original(net, scratch)[0] * (float("nan") if method.ctx.step == 2
                                                                  else 1.0), {})
    with pytest.raises(NonFiniteLossError, match=r"iteration 2: the generator loss of dummy is nan"):
        Trainer(method, tmp_path / "run").run(progress=False)


def test_ttur_generator_steps_every_rth_iteration(sit_teacher, tmp_path):
    method = make(sit_teacher, steps=10, ttur_ratio=5, gan_w_G=0.0, gan_w_D=0.0)
    trainer = Trainer(method, tmp_path)
    snapshots = []
    original = trainer.iteration

    def iteration():
        row = original()
        snapshots.append({k: v.clone() for k, v in trainer.nets["generator"].state_dict().items()})
        return row

    trainer.iteration = iteration
    trainer.run(progress=False)
    gen_steps = trainer.optimizers["generator"].state_dict()["state"][0]["step"]
    critic_steps = trainer.optimizers["critic"].state_dict()["state"][0]["step"]
    assert int(gen_steps) == 2 and int(critic_steps) == 10
    for i in range(1, 10):
        changed = any(not torch.equal(snapshots[i][k], snapshots[i - 1][k]) for k in snapshots[i])
        assert changed == (i == 5), i
    # both learning-rate schedulers step every iteration, whatever the plan
    assert all(s.last_epoch == 10 for s in trainer.schedulers.values())


def test_teacher_is_never_modified(sit_teacher, tmp_path):
    before = {k: v.clone() for k, v in sit_teacher.state_dict().items()}
    Trainer(make(sit_teacher, steps=4), tmp_path).run(progress=False)
    assert_same(before, sit_teacher.state_dict())
    assert not any(p.requires_grad for p in sit_teacher.parameters())


def test_lora_trains_only_adapters_and_export_merges(sit_teacher, tmp_path):
    method = make(sit_teacher, "dummy", steps=3, lora_rank=4, lora_alpha=4, lr=1e-2)
    trainer = Trainer(method, tmp_path / "run")
    trained = [n for n, p in trainer.nets["generator"].named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    base_before = {k: v.clone() for k, v in trainer.nets["generator"].state_dict().items() if "lora_" not in k}
    trainer.run(progress=False)
    base_after = {k: v for k, v in trainer.nets["generator"].state_dict().items() if "lora_" not in k}
    assert_same(base_before, base_after)
    export(method, trainer, tmp_path / "model", {})
    student, info = load_student(tmp_path / "model", sit_teacher)  # loads into the plain architecture
    z = torch.randn(2, *sit_teacher.latent_shape)
    cond = sit_teacher.encode([0, 1])
    t = torch.ones(2)
    with torch.no_grad():
        expected = method.generator.x0(z, t, cond)
        got = student.x0(z, t, cond)
    assert torch.allclose(expected, got, atol=1e-5)
    assert info["method"] == "dummy" and info["student"]["nfe"] == 1


def test_registry_and_options_say_what_was_wrong(sit_teacher):
    with pytest.raises(UnknownNameError, match="Did you mean .*'dmd2'"):
        METHODS.check("dmd3")
    with pytest.raises(FewstepError, match="Did you mean 'toy'"):
        make(sit_teacher, "dmd2", preset="tyo")
    with pytest.raises(FewstepError, match="Did you mean 'ttur_ratio'"):
        make(sit_teacher, "dmd2", ttur_raito=3)
    method = make(sit_teacher, "dmd2", **{"dmd2.gan.w_G": 0.0})  # spec's dotted names work too
    assert method.opt.gan_w_G == 0.0


def _ddp_worker(rank, world, port, run_dir, queue):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fewstep.engine import distributed

    info = distributed.init("cpu")
    teacher = teachers.build("sit", resolution=16, seed=0)
    ctx = toy_context(teacher, "sit", 16, 0, info)
    method = build_method("dmd2", teacher, ctx, "toy", dict(
        steps=3, batch=2, warmup=1, generator_grid=[1.0, 0.5], ttur_ratio=2, checkpoint_every=1000))
    trainer = Trainer(method, Path(run_dir), info)
    trainer.run(progress=False)
    flat = torch.cat([p.detach().reshape(-1) for m in trainer.nets.values() for p in m.parameters()])
    queue.put((rank, flat.double().sum().item(), flat[:1000].tolist()))
    distributed.shutdown(info)


def test_gloo_data_parallel_keeps_ranks_identical(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (s, v)) for r, s, v in (queue.get(timeout=300) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0][1] == results[1][1]  # every rank holds the same weights after averaging
    assert checkpoint.latest(tmp_path).name == "step_00000003"  # rank 0 saved


def test_ema_ticks_per_iteration_or_per_generator_update(sit_teacher, tmp_path):
    """ema_on = generator_update: the EMA moves right after each generator step and only then
    (CDM); ema_on = iteration: every iteration (RTDMD stage 1). Warm-up counts EMA updates."""
    for ema_on, expected in (("generator_update", 2), ("iteration", 6)):
        method = make(sit_teacher, steps=6, ttur_ratio=3, ema_decay=0.9, ema_on=ema_on,
                      gan_w_G=0.0, gan_w_D=0.0)
        trainer = Trainer(method, tmp_path / ema_on)
        trainer.run(progress=False)
        assert trainer.state.ema_updates == expected
    # a decay-0 EMA after a generator update equals the generator itself
    method = make(sit_teacher, steps=4, ttur_ratio=2, ema_decay=1e-12, ema_on="generator_update",
                  gan_w_G=0.0, gan_w_D=0.0)
    trainer = Trainer(method, tmp_path / "zero")
    trainer.run(progress=False)  # last generator update at iteration 2, EMA right after it
    gen, ema = trainer.nets["generator"].state_dict(), trainer.emas["generator"].state_dict()
    assert all(torch.allclose(gen[k], ema[k]) for k in gen)


def test_cli_overrides_parse_numbers_lists_and_strings():
    from fewstep.config import parse_overrides

    got = parse_overrides(["lr=1e-4", "steps=20", "generator_grid=[1.0, 0.5]", "regression=l2"])
    assert got == {"lr": 1e-4, "steps": 20, "generator_grid": [1.0, 0.5], "regression": "l2"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["lr"])


def test_reward_spec_names_a_registered_scorer_or_a_toy_net(tmp_path):
    """`fewstep train --reward`: a toy reward-net file, `toy:<file>`, or a registered scorer name
    (the `fewstep.rewards` registry; real scorers come from the metrics package)."""
    from fewstep.engine.run import build_reward, parse_reward_spec
    from fewstep.toy.features import save_feature_net, train_feature_net

    path = tmp_path / "reward.safetensors"
    save_feature_net(train_feature_net(steps=2, seed=1, size=16), path)
    assert parse_reward_spec(str(path)) == ("toy", str(path))
    assert parse_reward_spec(f"toy:{path}") == ("toy", str(path))
    assert parse_reward_spec("clip_score") == ("clip_score", None)
    reward = build_reward(str(path), "cpu")
    meta = {"include": [{"class": "circle", "count": 1}]}
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    values = reward(images, [meta, meta])
    values.sum().backward()
    assert values.shape == (2,) and images.grad.abs().sum() > 0
    with pytest.raises(UnknownNameError, match="Did you mean 'toy'"):
        build_reward("tyo", "cpu")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        build_reward("toy:missing.safetensors", "cpu")


def test_trainable_weights_are_fp32_masters_of_a_half_precision_teacher():
    """A bf16 teacher's trainable copy keeps frozen weights in bf16 and trains fp32 parameters
    (the LoRA adapters, or the whole denoiser without LoRA)."""
    from fewstep.backbones.sdxl import SDXLBackbone
    from fewstep.engine.adapt import trainable_copy
    from fewstep.options import TrainOptions

    teacher = SDXLBackbone.tiny(resolution=16).to(torch.bfloat16)
    full = trainable_copy(teacher, TrainOptions())
    assert {p.dtype for p in full.denoiser.parameters()} == {torch.float32}
    lora = trainable_copy(teacher, TrainOptions(lora_rank=4, lora_alpha=4))
    dtypes = {p.requires_grad: {q.dtype for q in lora.denoiser.parameters()
                                if q.requires_grad == p.requires_grad}
              for p in lora.denoiser.parameters()}
    assert dtypes[True] == {torch.float32} and dtypes[False] == {torch.bfloat16}
    assert {p.dtype for p in teacher.denoiser.parameters()} == {torch.bfloat16}  # untouched


# -- the run's inputs: the teacher and every file that shapes training -----------------------------

def test_resume_refuses_another_teacher_or_input_file(sit_teacher, tmp_path, capsys):
    """The recorded config holds the inputs' identities; a resume with another one is refused
    naming it (hashes of the teacher, pairs, reward, prompts, real data, init_from model)."""
    a, b = "a" * 64, "b" * 64
    Trainer(make(sit_teacher, steps=2), tmp_path / "run", inputs={"teacher": a, "pairs": a}).run(
        progress=False)
    with pytest.raises(FewstepError, match=r"teacher: aaaaaaaaaaaaaaaa\S* -> bbbbbbbbbbbbbbbb.*--run-dir"):
        Trainer(make(sit_teacher, steps=3), tmp_path / "run",
                inputs={"teacher": b, "pairs": a}).run(progress=False)
    with pytest.raises(FewstepError, match=r"pairs: a+\S* -> (none|None)"):
        Trainer(make(sit_teacher, steps=3), tmp_path / "run", inputs={"teacher": a}).run(
            progress=False)
    state = Trainer(make(sit_teacher, steps=3), tmp_path / "run",
                    inputs={"teacher": a, "pairs": a}).run(progress=False)
    assert state.resumed_from == 2 and state.step == 3


def test_a_checkpoint_from_before_inputs_were_recorded_resumes_with_a_warning(sit_teacher, tmp_path,
                                                                               capsys):
    import json

    Trainer(make(sit_teacher, steps=2), tmp_path, inputs={"teacher": "a" * 64}).run(progress=False)
    folder = checkpoint.latest(tmp_path)
    state = json.loads((folder / "state.json").read_text())
    del state["extra"]["config"]["inputs"]
    (folder / "state.json").write_text(json.dumps(state))
    checkpoint.write_manifest(folder)
    capsys.readouterr()
    resumed = Trainer(make(sit_teacher, steps=3), tmp_path, inputs={"teacher": "b" * 64})
    assert resumed.run(progress=False).resumed_from == 2
    assert "records no inputs" in capsys.readouterr().err




def _record_by_papers_name(folder, value=None):
    """Rewrite a DMD2 checkpoint's recorded options as before the rename: `ttur_ratio`."""
    import json

    state = json.loads((folder / "state.json").read_text())
    config = state["extra"]["config"]
    recorded = config.pop("generator_every")
    config["ttur_ratio"] = recorded if value is None else value
    (folder / "state.json").write_text(json.dumps(state))
    checkpoint.write_manifest(folder)


def test_a_checkpoint_that_records_an_option_by_its_papers_name_resumes(sit_teacher, tmp_path):
    """`ttur_ratio` is DMD2's name (an alias) of `generator_every`: a checkpoint that records the
    option under it is the same run, compared through the aliases; another value is not."""
    for run, value in (("same", None), ("other", 3)):
        Trainer(make(sit_teacher, steps=2), tmp_path / run).run(progress=False)
        _record_by_papers_name(checkpoint.latest(tmp_path / run), value)
    resumed = Trainer(make(sit_teacher, steps=3), tmp_path / "same").run(progress=False)
    assert resumed.resumed_from == 2
    with pytest.raises(FewstepError, match="generator_every: 3 -> 2"):
        Trainer(make(sit_teacher, steps=3), tmp_path / "other").run(progress=False)

def _toy_teacher_folder(path, seed):
    """A toy teacher folder (recipe.json with file hashes) of freshly built weights."""
    teachers.save(teachers.build("sit", resolution=16, seed=seed), teachers.Recipe("sit"), path,
                  [1.0], 0.0)
    return path


def test_run_inputs_hash_every_file_that_shapes_training(tmp_path):
    from types import SimpleNamespace

    from fewstep.engine.run import run_inputs, teacher_identity

    recipe = teachers.verify(teachers.SHIPPED / "sit")
    pairs, prompts, reward = tmp_path / "p.safetensors", tmp_path / "t.jsonl", tmp_path / "r.safetensors"
    real = tmp_path / "real"
    real.mkdir()
    for path, text in ((pairs, "z"), (pairs.with_suffix(".json"), "{}"), (prompts, "{}\n"),
                       (reward, "r"), (real / "metadata.jsonl", "{}\n")):
        path.write_text(text)
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    (stage1 / "generator.safetensors").write_text("g")
    opt = SimpleNamespace(pairs=str(pairs), init_from=str(stage1))
    got = run_inputs(recipe, opt, reward=f"toy:{reward}", train_prompts=str(prompts),
                     real_data=str(real))
    assert got["teacher"] == teacher_identity(recipe) and len(got["teacher"]) == 64
    assert set(got) == {"teacher", "pairs", "reward", "reward_sha256", "train_prompts",
                        "real_data", "init_from"}
    assert got["reward"] == f"toy:{reward}"
    for path in (pairs.with_suffix(".json"), prompts, reward, real / "metadata.jsonl",
                 stage1 / "generator.safetensors"):
        path.write_text(path.read_text() + " changed")
        changed = run_inputs(recipe, opt, reward=f"toy:{reward}", train_prompts=str(prompts),
                             real_data=str(real))
        assert [k for k in got if got[k] != changed[k]], path
        got = changed
    assert run_inputs(recipe, SimpleNamespace(), reward="hpsv2") == {
        "teacher": teacher_identity(recipe), "reward": "hpsv2"}


def test_the_cli_refuses_to_resume_or_sample_with_another_teacher(tmp_path, capsys):
    from fewstep.cli import main
    from fewstep.commands.prompts import eval_prompts
    from fewstep.engine.run import teacher_identity

    first = teachers.SHIPPED / "sit"
    other = _toy_teacher_folder(tmp_path / "other", seed=5)
    common = ["train", "--method", "dummy", "--preset", "toy", "--run-dir", str(tmp_path / "run"),
              "--no-progress"]
    assert main(common + ["--teacher", str(first), "--set", "steps=1", "batch=2",
                          "--out", str(tmp_path / "model")]) == 0
    capsys.readouterr()
    assert main(common + ["--teacher", str(other), "--set", "steps=2", "batch=2",
                          "--out", str(tmp_path / "model2")]) == 2
    err = capsys.readouterr().err
    ours, theirs = (teacher_identity(teachers.verify(t)) for t in (first, other))
    assert f"teacher: {ours[:16]}" in err and theirs[:16] in err and "--run-dir" in err
    assert not (tmp_path / "model2").exists()
    info = json.loads((tmp_path / "model" / "student.json").read_text())
    assert info["teacher_identity"] == ours and info["inputs"]["teacher"] == ours
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in eval_prompts("sit", 1)))
    assert main(["sample", "--teacher", str(other), "--student", str(tmp_path / "model"),
                 "--prompts", str(prompts), "--device", "cpu", "--out", str(tmp_path / "set")]) == 2
    err = capsys.readouterr().err
    assert ours in err and theirs in err and "teacher" in err
    assert not (tmp_path / "set").exists()


def test_load_student_checks_the_teacher_it_was_made_with(sit_teacher, tmp_path, capsys):
    from fewstep.engine.run import teacher_identity

    recipe = teachers.verify(teachers.SHIPPED / "sit")
    method = make(sit_teacher, "dummy", steps=1)
    trainer = Trainer(method, tmp_path / "run")
    trainer.run(progress=False)
    export(method, trainer, tmp_path / "model", {"teacher_sha256": recipe["sha256"]})
    load_student(tmp_path / "model", sit_teacher, recipe)  # a student from before identities: ok
    other = {"sha256": {"model.safetensors": "0" * 64}}
    with pytest.raises(FewstepError, match=f"{teacher_identity(recipe)}.*{teacher_identity(other)}"):
        load_student(tmp_path / "model", sit_teacher, other)
    export(method, trainer, tmp_path / "bare", {})
    capsys.readouterr()
    load_student(tmp_path / "bare", sit_teacher, other)  # nothing recorded: a warning, not a stop
    assert "records no teacher" in capsys.readouterr().err


def test_teacher_identity_of_a_link_is_the_link(tmp_path):
    from fewstep.engine.run import teacher_identity

    link = {"recipe": {"family": "sdxl", "resolution": 16, "world": "real"}, "weights": "/w/a",
            "dtype": "bf16", "small_files": {"unet/config.json": "1" * 64}}
    assert teacher_identity(link) == teacher_identity(json.loads(json.dumps(link)))
    for change in ({"weights": "/w/b"}, {"dtype": "fp32"},
                   {"small_files": {"unet/config.json": "2" * 64}}):
        assert teacher_identity({**link, **change}) != teacher_identity(link)
