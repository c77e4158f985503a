"""DMD2 as its official code trains it (methods/notes/dmd2.md): the one-step SDXL model's regression
warm start as a stage (sec. 5.3), the multi-step generator's prompts from the real latents' own
captions (sec. 5.2), the no-backward-simulation path on forward-noised real latents at a random
grid step (sec. 5.2), the no-grad forwards (the critic's DM prediction among them) in fp32 (sec.
3.1), and the fidelity ledger of every remaining difference."""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fewstep import fidelity, planning
from fewstep import config as workflow_config
from fewstep.backbones.sdxl import SDXLBackbone
from fewstep.engine.context import Context
from fewstep.engine.distributed import DistInfo
from fewstep.engine.loop import Trainer
from fewstep.engine.method import Method, student_spec
from fewstep.engine.perceptual import regression_distance
from fewstep.engine.run import build_method, export, toy_context
from fewstep.errors import FewstepError
from fewstep.io import write_json
from fewstep.options import resolve
from fewstep.registry import METHODS
from fewstep.toy import teachers, world
from fewstep.train_data import ImageFolder, PromptStream

torch.set_num_threads(1)
RES = 16
FOUR = [1.0, 0.75, 0.5, 0.25]


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    return {f: teachers.build(f, resolution=RES, seed=0) for f in ("sdxl", "sit")}


def make(teacher, name="dmd2", preset="toy", **overrides):
    ctx = toy_context(teacher, teacher.family, RES, 0, DistInfo())
    opts = dict(batch=2, warmup=1, teacher_guidance=1.0, checkpoint_every=1000)
    opts.update(overrides)
    return build_method(name, teacher, ctx, preset, opts)


def write_pairs(folder, teacher, guidance=2.0, n=4):
    """A pairs file as `fewstep pairs` writes it: noise, teacher sample, prompt rows."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    z = torch.randn(n, *teacher.latent_shape, generator=g)
    y = torch.randn(n, *teacher.latent_shape, generator=g)
    save_file({"z": z, "y": y, "prompt_index": torch.arange(n)}, str(folder / "pairs.safetensors"))
    write_json(folder / "pairs.json", {"metas": world.prompt_set("train", n=n, seed=1),
                                       "guidance": guidance})
    return str(folder / "pairs.safetensors")


def warm_start(teacher, tmp_path, **overrides):
    """A regression stage (L2, two iterations at a large lr) trained and exported."""
    pairs = write_pairs(tmp_path / "pairs", teacher)
    opts = dict(stage="regression", pairs=pairs, regression="l2", teacher_guidance=2.0, lr=1e-2,
                steps=2, generator_grid=[0.4])
    opts.update(overrides)
    m = make(teacher, **opts)
    trainer = Trainer(m, tmp_path / "ws-run")
    trainer.run(progress=False)
    export(m, trainer, tmp_path / "ws", {"preset": "toy"})
    return tmp_path / "ws"


# -- (a) the regression warm start, a stage of dmd2 (sec. 5.3) -------------------------------------
def test_regression_stage_trains_the_generator_alone_on_teacher_pairs(built, tmp_path):
    bb = built["sdxl"]
    m = make(bb, stage="regression", pairs=write_pairs(tmp_path, bb), regression="l2",
             teacher_guidance=2.0, generator_grid=[0.4])
    assert isinstance(m, Method) and type(m) is not METHODS.get("dmd2")
    assert m.name == "dmd2" and type(m).requires == ("pairs",)
    assert list(m.networks()) == ["generator"] and m.plan(0) == m.plan(1) == ["generator"]
    assert not hasattr(m, "critic")  # no critic copy is made for a stage that has none
    assert student_spec(m).grid == [float(bb.schedule.t_of_k(399))]  # the one-step sampler, k = 399
    m.ctx.step = 3
    loss, stats = m.loss("generator", {})
    z, y, cond = m.pairs.draw(2, m.ctx.gen("pairs"), "cpu")
    t = torch.full((2,), m.grid[0])
    expected = regression_distance("l2", bb)(m.generator.x0(z, t, cond), y)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0) and "reg" in stats
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.generator.denoiser.parameters())
    assert all(p.grad is None for p in m.teacher.parameters())


def test_regression_stage_names_its_missing_pairs(built, tmp_path):
    bb = built["sdxl"]
    with pytest.raises(FewstepError, match=r"dmd2 stage regression .*pairs.*fewstep pairs"):
        make(bb, stage="regression", regression="l2")
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FewstepError, match=rf"{missing}.*fewstep pairs"):
        make(bb, stage="regression", regression="l2", pairs=str(missing))
    with pytest.raises(FewstepError, match=r"stage regression starts from the teacher.*init_from"):
        make(bb, stage="regression", regression="l2", pairs=write_pairs(tmp_path, bb),
             teacher_guidance=2.0, init_from=str(tmp_path))
    with pytest.raises(FewstepError, match=r"regression: 'lpip' is not one of"):
        make(bb, stage="regression", regression="lpip")


def test_dmd2_stage_starts_from_the_exported_warm_start(built, tmp_path):
    bb = built["sdxl"]
    folder = warm_start(bb, tmp_path)
    exported = load_file(str(folder / "generator.safetensors"))
    assert any(not torch.equal(v, bb.denoiser.state_dict()[k]) for k, v in exported.items())
    m = make(bb, init_from=str(folder), warm_start=True, generator_grid=[0.4], backsim=False)
    for k, v in m.generator.denoiser.state_dict().items():
        assert torch.equal(v, exported[k]), k
    for k, v in m.critic.denoiser.state_dict().items():  # the critic starts from the teacher
        assert torch.equal(v, bb.denoiser.state_dict()[k]), k
    # the warm start regressed the generator at its own first time; another one is refused
    with pytest.raises(FewstepError, match=r"warm start .* trained at t = .* first grid time"):
        make(bb, init_from=str(folder), generator_grid=FOUR)


def test_missing_warm_start_fails_before_training_naming_file_and_command(built, tmp_path):
    bb = built["sdxl"]
    command = "fewstep train --method dmd2 --preset dmd2-sdxl1-paper-warmstart"
    with pytest.raises(FewstepError, match=rf"init_from.*{command}"):
        make(bb, warm_start=True, generator_grid=[0.4], backsim=False)
    folder = tmp_path / "no-warm-start"
    with pytest.raises(FewstepError, match=rf"{folder / 'generator.safetensors'}.*{command}"):
        make(bb, warm_start=True, init_from=str(folder), generator_grid=[0.4], backsim=False)


def test_sdxl1_paper_is_the_official_two_stage_recipe():
    cls = METHODS.get("dmd2")
    ws = resolve(cls.Options, cls.PRESETS, "dmd2-sdxl1-paper-warmstart", None, "dmd2")
    # the official ODE pretraining script: LPIPS on teacher pairs at k = 399, lr 1e-5, no
    # clipping (the script passes max_grad_norm, its trainer never clips), checkpoint 2000
    assert cls.for_options(ws).requires == ("pairs",)
    assert (ws.stage, ws.regression, ws.lr, ws.grad_clip, ws.steps) == ("regression", "lpips", 1e-5, 0.0, 2000)
    assert tuple(ws.generator_grid) == (0.4,) and ws.teacher_guidance == 8.0
    one = resolve(cls.Options, cls.PRESETS, "dmd2-sdxl1-paper", None, "dmd2")
    assert cls.for_options(one) is cls and one.warm_start and one.stage == "dmd2"
    assert tuple(one.generator_grid) == (0.4,) and not one.backsim
    four = resolve(cls.Options, cls.PRESETS, "dmd2-sdxl4-paper", None, "dmd2")
    assert not four.warm_start  # the 4-step model starts from the teacher [P, App. F.4]
    # 64 GPUs: 2 per GPU (4 pairs per GPU in the warm start); Accelerate ticks the warm-up 64x
    assert (four.steps, one.steps, ws.steps) == (20000, 25000, 2000)
    assert (four.global_batch, one.global_batch, ws.global_batch) == (128, 128, 256)
    for o in (four, one, ws):
        assert (o.warmup, o.warmup_ticks, o.warmup_start, o.lr_schedule_on) == (500, 64, "zero", "iteration")


def test_the_dag_gives_the_regression_stage_pairs_and_the_dmd2_stage_its_init():
    cfg = copy.deepcopy(workflow_config.load(workflow_config.DEFAULT))
    cfg["distill"].update(methods=["dmd2"], stages={"dmd2": ["toy-warmstart", "toy"]})
    workflow_config.validate(cfg)
    runs = planning.runs(cfg)
    assert runs["dmd2-stage1"] == planning.Run("dmd2", "toy-warmstart", None)
    first = planning.train_inputs(cfg, "sdxl", "dmd2-stage1", 0)
    assert first["pairs"] == "results/pairs/sdxl.safetensors" and "init" not in first
    assert "--set pairs=results/pairs/sdxl.safetensors" in planning.train_args(cfg, "sdxl", "dmd2-stage1", 0)
    second = planning.train_inputs(cfg, "sdxl", "dmd2", 0)
    assert second["init"] == "results/models/sdxl/dmd2-stage1/seed0" and "pairs" not in second
    assert "init_from=results/models/sdxl/dmd2-stage1/seed0" in planning.train_args(cfg, "sdxl", "dmd2", 0)
    cls = METHODS.get("dmd2")
    toy_ws = resolve(cls.Options, cls.PRESETS, "toy-warmstart", None, "dmd2")
    assert planning.pairs_guidance(cfg) == toy_ws.teacher_guidance


def test_toy_warm_start_then_dmd2_trains_end_to_end(built, tmp_path):
    bb = built["sdxl"]
    folder = warm_start(bb, tmp_path, generator_grid=FOUR)
    m = make(bb, init_from=str(folder), steps=2, ttur_ratio=1)
    state = Trainer(m, tmp_path / "run").run(progress=False)
    assert state.step == 2 and np.isfinite(state.last["generator/loss"])


def test_amd_refuses_the_warm_start_stage_and_the_unreconstructed_real_latent_path(built):
    bb = built["sit"]
    with pytest.raises(FewstepError, match="amd.*stage regression.*--method dmd2"):
        make(bb, "amd", stage="regression", dsa_enabled=False, rls_enabled=False, batch=4)
    with pytest.raises(FewstepError, match="amd.*backsim"):
        make(bb, "amd", backsim=False, dsa_enabled=False, rls_enabled=False, batch=4)


# -- (b) the multi-step generator's prompts: the real latents' captions (sec. 5.2) ------------------
def real_world(tmp_path, **overrides):
    """A tiny SDXL on a prompt file and a captioned image folder whose captions differ."""
    teacher = SDXLBackbone.tiny(resolution=16, seed=3)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "train.jsonl").write_text("".join(
        json.dumps({"prompt_id": f"p{i}", "prompt": c}) + "\n"
        for i, c in enumerate(["a red circle", "two blue squares"])))
    folder = tmp_path / "real"
    folder.mkdir()
    rows = []
    for i, caption in enumerate(["a green triangle", "a yellow star", "a white moon"]):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "prompt": caption})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    images = ImageFolder(folder, (16, 16))
    ctx = Context(teacher, PromptStream(tmp_path / "train.jsonl", teacher), real_data=images)
    opts = dict(batch=3, warmup=1, checkpoint_every=1000, teacher_guidance=1.0)
    return build_method("dmd2", teacher, ctx, "toy", {**opts, **overrides}), images


def test_backsim_prompts_are_the_real_latents_captions(tmp_path):
    m, images = real_world(tmp_path)
    assert m.opt.backsim and len(m.grid) == 4 and m.opt.backsim_prompts == "real_captions"
    for step, grad, stream in ((0, True, "prompts"), (1, False, "prompts_critic")):
        m.ctx.step = step
        _, batch, _ = m.sample(grad=grad)
        rows = images.draw_rows(3, m.ctx.gen(stream))
        assert [r["prompt"] for r in batch.metas] == [r["prompt"] for r in rows]
        expected = m.teacher.encode_uncached([r["prompt"] for r in rows])
        for key in expected:
            assert torch.allclose(batch.cond[key], expected[key], atol=1e-6), key
    other, _ = real_world(tmp_path / "b", backsim_prompts="prompt_stream")
    other.ctx.step = 0
    _, batch, _ = other.sample(grad=True)
    assert {r["prompt"] for r in batch.metas} <= {"a red circle", "two blue squares"}


def test_amd_groups_repeat_real_captions(tmp_path):
    """AMD draws DMD2's prompts as groups: B real captions, each K times (one group each)."""
    from methods.amd import AMD

    m, images = real_world(tmp_path)
    opts = resolve(AMD.Options, AMD.PRESETS, "toy", dict(batch=4, group_size=2, dsa_enabled=False,
                                                        rls_enabled=False, warmup=1), "amd")
    amd = AMD(m.teacher, opts, m.ctx)
    amd.ctx.step = 0
    batch = amd.draw_prompts("prompts")
    rows = images.draw_rows(2, amd.ctx.gen("prompts"))
    assert [r["prompt"] for r in batch.metas] == [r["prompt"] for r in rows for _ in range(2)]
    assert batch.groups.tolist() == [0, 0, 1, 1]


def test_one_step_generators_keep_the_prompt_stream(tmp_path):
    """The official one-step trainers draw their prompts from the prompt file (no denoising mode)."""
    m, _ = real_world(tmp_path, generator_grid=[0.4], backsim=False)
    m.ctx.step = 0
    _, batch, _ = m.sample(grad=True)
    assert {r["prompt"] for r in batch.metas} <= {"a red circle", "two blue squares"}


def test_every_preset_draws_the_official_prompts():
    cls = METHODS.get("dmd2")
    assert cls.Options().backsim_prompts == "real_captions"
    for preset in cls.PRESETS:  # the toy world's real captions are draws of its prompt pool
        assert resolve(cls.Options, cls.PRESETS, preset, None, "dmd2").backsim_prompts == "real_captions"
    alias = resolve(cls.Options, cls.PRESETS, "toy", {"backsim_prompt_source": "prompt_stream"}, "dmd2")
    assert alias.backsim_prompts == "prompt_stream"


# -- (c) without backward simulation: forward-noised real latents at a random grid step -------------
def test_without_backsim_the_generator_trains_on_noised_real_latents(built):
    bb = built["sdxl"]
    m = make(bb, backsim=False, batch=4)
    grid = m.grid
    seen_t = set()
    for step in range(6):
        m.ctx.step = step
        calls, reals, noises = [], [], {}
        real, randn, x0 = m.ctx.real, m.ctx.randn, m.generator.x0

        def spy_real(n, stream="real"):
            out = real(n, stream)
            reals.append(out)
            return out

        def spy_randn(shape, stream):
            noises[stream] = randn(shape, stream)
            return noises[stream]

        def spy_x0(x, t, c, guidance=1.0):
            calls.append((x.clone(), t.clone(), torch.is_grad_enabled()))
            return x0(x, t, c, guidance)

        m.ctx.real, m.ctx.randn, m.generator.x0 = spy_real, spy_randn, spy_x0
        try:
            x_hat, batch, _ = m.sample(grad=True)
        finally:
            del m.ctx.real, m.ctx.randn, m.generator.x0
        assert len(calls) == 1 and calls[0][2] and x_hat.requires_grad  # one call, with gradient
        x_in, t, _ = calls[0]
        (latents, real_batch), = reals
        assert batch.metas == real_batch.metas  # the real latents' own captions
        assert all(any(abs(float(v) - g) < 1e-6 for g in grid) for v in t)
        seen_t.update(round(float(v), 6) for v in t)
        z = noises["z"]
        noisy = m.teacher.schedule.add_noise(latents, z, t)
        pure = torch.isclose(t, torch.tensor(grid[0]))
        expected = torch.where(pure.view(-1, 1, 1, 1), z, noisy)  # step 0 is pure noise (official)
        assert torch.allclose(x_in, expected, atol=1e-6)
    assert len(seen_t) > 2  # a random grid step per sample, not only step 0 from noise


# -- (d) precision: the no-grad forwards in fp32, as the official code runs them (sec. 3.1) ---------
def dtypes_of(module):
    seen = []

    def hook(mod, args, out):  # a diffusers UNet returns an output object
        seen.append(getattr(out, "sample", out).dtype)

    handle = module.register_forward_hook(hook)
    return seen, handle


@pytest.mark.parametrize("family", ["sdxl", "sit"])
def test_critic_dm_prediction_runs_in_float32_under_autocast(built, family):
    bb = built[family]
    m = make(bb, teacher_guidance=2.0, generator_grid=[1.0])
    m.ctx.step = 0
    x = torch.randn(2, *bb.latent_shape)
    cond = bb.encode([0, 1] if family == "sit" else ["a red circle"] * 2)
    critic, h1 = dtypes_of(m.critic.denoiser)
    teacher, h2 = dtypes_of(m.teacher.denoiser)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, _, p_real, p_fake = m.teacher_and_critic(x, cond)
    finally:
        h1.remove(), h2.remove()
    assert teacher and all(d == torch.bfloat16 for d in teacher)  # autocast was on
    assert critic == [torch.float32] and p_fake.dtype == torch.float32


def test_no_grad_generator_forwards_run_in_float32_under_autocast(built):
    """The backward-simulation rollout and the critic-only turn's sample: fp32 (official
    sample_backward and the no-gradient generator forward run outside autocast); the generator
    call that carries the gradient stays under autocast."""
    bb = built["sdxl"]
    m = make(bb)
    z = torch.randn(2, *bb.latent_shape)
    cond = bb.encode(["a red circle"] * 2)
    seen, handle = dtypes_of(m.generator.denoiser)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m.generate(z, cond, grad=True, stop=2)
            rollout_and_grad = list(seen)
            seen.clear()
            m.generate(z, cond, grad=False, stop=2)
    finally:
        handle.remove()
    assert rollout_and_grad == [torch.float32, torch.float32, torch.bfloat16]
    assert seen == [torch.float32] * 3


def test_amd_critic_branch_runs_in_float32_under_autocast(built):
    bb = built["sit"]
    m = make(bb, "amd", dsa_enabled=False, rls_enabled=False, batch=4, teacher_guidance=2.0)
    m.ctx.step = 0
    critic, handle = dtypes_of(m.critic.denoiser)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m.teacher_critic_branches(torch.randn(2, *bb.latent_shape), bb.encode([0, 1]))
    finally:
        handle.remove()
    assert critic == [torch.float32]


# -- the fidelity ledger ----------------------------------------------------------------------------
def test_dmd2_declares_its_ledger_and_amd_inherits_it():
    from methods import amd, dmd2

    cls = METHODS.get("dmd2")
    assert cls.ledger is dmd2.FIDELITY and dmd2.FIDELITY
    options = cls.Options()
    for entry in dmd2.FIDELITY + dmd2.WARM_START_FIDELITY:
        assert entry.source and entry.why
        assert entry.is_option(options) or entry.ours is not None, entry.what
    assert {e.what for e in fidelity.ledger(METHODS.get("dmd2"))} <= \
        {e.what for e in fidelity.ledger(amd.AMD)}
    whats = {e.what for e in dmd2.FIDELITY}
    assert "backsim_prompts" in whats


def test_which_ledger_entries_apply():
    cls = METHODS.get("dmd2")

    def applied(preset, **over):
        options = resolve(cls.Options, cls.PRESETS, preset, over or None, "dmd2")
        return {d["what"] for d in fidelity.deviations(cls.for_options(options), options)}

    fixed = {e.what for e in cls.ledger if not e.is_option(cls.Options())}
    assert applied("dmd2-sdxl4-paper") == fixed  # the paper preset deviates only where it must
    assert applied("toy") == fixed  # the toy preset too (its real captions are its prompt pool)
    assert "backsim_prompts" in applied("toy", backsim_prompts="prompt_stream")
    assert "regression" not in applied("dmd2-sdxl1-paper-warmstart")
    assert "regression" in applied("toy-warmstart")  # L2: VGG at 224 px is not for a CPU


# -- the warm start's files: the released checkpoint, `fewstep weights check`, the CLI -------------
def test_the_released_warm_start_state_dict_is_a_warm_start(built, tmp_path, monkeypatch):
    """The official warm start is a UNet state dict (a .bin read tensor-only), found in the
    weights cache under the name `fewstep weights check` lists."""
    from methods.dmd2 import DMD2, RELEASED_WARM_START

    bb = built["sdxl"]
    state = {k: v + 0.01 for k, v in bb.denoiser.state_dict().items()}
    file = tmp_path / "cache" / RELEASED_WARM_START.path
    file.parent.mkdir(parents=True)
    torch.save(state, file)
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(tmp_path / "cache"))
    m = make(bb, init_from=RELEASED_WARM_START.path, warm_start=True, generator_grid=[0.4],
             backsim=False)
    for k, v in m.generator.denoiser.state_dict().items():
        assert torch.equal(v, state[k]), k
    options = resolve(DMD2.Options, DMD2.PRESETS, "dmd2-sdxl1-paper",
                      {"init_from": RELEASED_WARM_START.path}, "dmd2")
    assert DMD2.weight_files(options) == [RELEASED_WARM_START]
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(tmp_path / "empty"))
    with pytest.raises(FewstepError, match=rf"{RELEASED_WARM_START.path}.*huggingface.co/tianweiy/DMD2"):
        make(bb, init_from=RELEASED_WARM_START.path, generator_grid=[0.4], backsim=False)
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.bin")
    with pytest.raises(FewstepError, match=r"other.bin: not a sdxl denoiser state dict"):
        make(bb, init_from=str(tmp_path / "other.bin"), generator_grid=[0.4], backsim=False)


def test_weights_check_lists_the_warm_start_files(tmp_path):
    from fewstep.commands.weights import method_needs
    from fewstep.engine.perceptual import LPIPS_TRUNK
    from methods.dmd2 import RELEASED_WARM_START

    cfg = copy.deepcopy(workflow_config.load(workflow_config.DEFAULT))
    cfg["distill"].update(methods=["dmd2"],
                          stages={"dmd2": ["dmd2-sdxl1-paper-warmstart", "dmd2-sdxl1-paper"]})
    needs = method_needs(cfg)  # the DAG's stage 1 makes the warm start: only LPIPS's trunk
    assert [n.entry for n in needs["method dmd2 (dmd2-sdxl1-paper-warmstart)"]] == [LPIPS_TRUNK.path]
    assert needs["method dmd2 (dmd2-sdxl1-paper)"] == []
    cfg["distill"].update(stages={}, preset="dmd2-sdxl1-paper",
                          overrides={"dmd2": {"init_from": RELEASED_WARM_START.path}})
    needs = method_needs(cfg)  # the released warm start instead of stage 1
    assert [n.entry for n in needs["method dmd2 (dmd2-sdxl1-paper)"]] == [RELEASED_WARM_START.path]


def test_the_cli_trains_the_warm_start_then_dmd2_from_it(tmp_path):
    from fewstep.cli import main

    teacher = tmp_path / "teacher"
    main(["teacher", "install", "--family", "sit", "--resolution", "16", "--out", str(teacher)])
    pairs = str(tmp_path / "pairs.safetensors")
    main(["pairs", "--teacher", str(teacher), "--count", "4", "--steps", "2", "--guidance", "2.0",
          "--out", pairs])
    common = ["train", "--method", "dmd2", "--teacher", str(teacher), "--resolution", "16",
              "--no-progress"]
    assert main(common + ["--preset", "toy-warmstart", "--run-dir", str(tmp_path / "r1"),
                          "--out", str(tmp_path / "ws"), "--set", "steps=2", f"pairs={pairs}"]) == 0
    info = json.loads((tmp_path / "ws" / "student.json").read_text())
    assert info["method"] == "dmd2" and info["options"]["stage"] == "regression"
    assert [d["what"] for d in info["deviations"]][:1] == ["regression"]  # L2 in the toy world
    assert main(common + ["--preset", "toy", "--run-dir", str(tmp_path / "r2"), "--out",
                          str(tmp_path / "m"), "--set", "steps=2", "ttur_ratio=1",
                          f"init_from={tmp_path / 'ws'}"]) == 0
    info = json.loads((tmp_path / "m" / "student.json").read_text())
    assert info["options"]["init_from"] == str(tmp_path / "ws") and "init_from" in info["inputs"]
