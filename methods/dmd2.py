"""DMD2: Improved Distribution Matching Distillation (Yin et al., NeurIPS 2024, 2405.14867), Eq. 4.

DMD's DM gradient without the regression loss, stabilised by a two-time-scale update rule (the
critic updates every iteration, the generator every r-th; sec. 4) and a diffusion-GAN
loss whose discriminator head sits on the critic's bottleneck (paper Eq. 4; sec. 3.3).
Multi-step generators train with backward simulation (sec. 5.2): one stop index shared by the
batch and all ranks, a no-grad rollout from independent noise, losses on the intermediate x0, the
prompts the captions of real latents (official denoising mode); without it, on real latents
forward-noised to a random grid step. One-step SDXL uses the conditioning timestep k = 399
(generator_grid = (0.4,)) and starts from a regression warm start (sec. 5.3): the `regression`
stage (RegressionWarmStart) fits the generator to teacher ODE pairs, the DMD2 stage starts from its
model (`init_from`). The no-grad forwards (the critic's DM prediction, the rollout, the critic-only
turn's sample) run in fp32, as the official code runs them (sec. 3.1). Every remaining difference
from the official code is an entry of FIDELITY.
Sections (sec. N) are those of methods/notes/dmd2.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fewstep import losses
from fewstep.backbones.weights import WeightFile
from fewstep.engine.adapt import trainable_copy
from fewstep.engine.dm import DistributionMatching, DMOptions
from fewstep.engine.gan import bottleneck_features, make_head
from fewstep.engine.method import Method, StudentSpec
from fewstep.errors import FewstepError
from fewstep.fidelity import Deviation
from fewstep.options import choice
from methods.dmd import PairSet


@dataclass
class DMD2Options(DMOptions):
    # dmd2: the DMD2 loop; regression: the one-step SDXL model's warm start, the generator
    # regressed onto teacher ODE pairs (sec. 5.3; official train_sd_ode.py)
    stage: str = choice("dmd2", "regression")
    generator_every: int = 5           # dmd2.ttur_ratio r: generator when iteration % r == 0
    gan_w_G: float = 5e-3              # dmd2.gan.w_G (generator GAN weight)
    gan_w_D: float = 1e-2              # dmd2.gan.w_D (discriminator loss weight in the critic)
    gan_feature_layer: int | None = None  # transformer block of the features (None: floor(L/2))
    backsim: bool = True               # dmd2.backsim (multi-step generators)
    # where a multi-step generator's prompts come from (sec. 5.2): the captions of real latents
    # (the official denoising mode ignores its prompt file) or the prompt stream. One-step
    # generators always draw from the prompt stream, as the official one-step trainers do.
    backsim_prompts: str = choice("real_captions", "prompt_stream")
    # the generator's start: "" the teacher; else a dmd2 model folder (the regression stage's, or
    # an earlier DMD2 run) or a denoiser state-dict file (the official released warm start), a
    # bare name or cache-relative path looked up in the weights cache
    init_from: str = ""
    warm_start: bool = False           # dmd2.ode_warmstart: the recipe needs init_from (sec. 5.3)
    # the regression stage: teacher pairs (`fewstep pairs`) and the distance (sec. 5.3)
    pairs: str = ""
    regression: str = choice("lpips", "l2")
    ALIASES = {"ttur_ratio": "generator_every", "backsim_prompt_source": "backsim_prompts",
               "ode_warmstart": "warm_start"}
    RANGES = {"generator_every": "[1, inf)", "gan_w_G": "[0, inf)", "gan_w_D": "[0, inf)"}


# both LR schedulers tick every iteration, the generator's too on critic-only iterations (official
# trainer: the Accelerate schedulers step once per iteration)
PAPER = {"warmup": 500, "grad_clip": 10.0, "weight_decay": 0.01, "lr_schedule_on": "iteration"}
# the SDXL runs (sec. 6.1): 64 GPUs x 2 per GPU; both LR schedulers are Accelerate-prepared
# constant_with_warmup (lambda s / 500 from LR 0), ticked once per process per iteration, so the
# warm-up lasts 500 / 64 iterations; warmup_ticks = 64 keeps that at any world size
SDXL = {**PAPER, "global_batch": 128, "warmup_ticks": 64, "warmup_start": "zero", "lr": 5e-7,
        "teacher_guidance": 8.0}
FOUR = (1.0, 0.75, 0.5, 0.25)
# official ODE pretraining (sdxl_lr1e-5_8node_ode_pretraining_10k_cond399.sh, train_sd_ode.py):
# lr 1e-5, 4 pairs per GPU on 64 GPUs, warm-up 500 (Accelerate-prepared, as above), AdamW decay
# 0.01, no gradient clipping (the script passes max_grad_norm, the trainer never clips), LPIPS;
# the released checkpoint is iteration 2000
WARM_START = {"stage": "regression", "lr": 1e-5, "warmup": 500, "weight_decay": 0.01,
              "grad_clip": 0.0, "checkpoint_every": 500,  # regression: lpips (the default)
              "lr_schedule_on": "iteration"}  # one network, updated every iteration
PRESETS = {
    # paper: 20K iterations (the model zoo's 19K was picked on COCO-10k, never done here)
    "dmd2-sdxl4-paper": {**SDXL, "steps": 20000, "generator_grid": FOUR},
    "dmd2-sdxl1-paper": {**SDXL, "steps": 25000, "generator_grid": (0.4,), "backsim": False,
                         "warm_start": True},
    # stage 1 of dmd2-sdxl1-paper: distill/stages/dmd2: [dmd2-sdxl1-paper-warmstart, dmd2-sdxl1-paper]
    "dmd2-sdxl1-paper-warmstart": {**WARM_START, "steps": 2000, "global_batch": 256,
                                   "warmup_ticks": 64, "warmup_start": "zero",
                                   "teacher_guidance": 8.0, "generator_grid": (0.4,)},
    "dmd2-sd3-ext": {**PAPER, "lr": 5e-7, "teacher_guidance": 7.0, "generator_grid": FOUR,
                     "grid_shift": 3.0},
    # one step, unguided teacher: the default grid and guidance
    "dmd2-sit-ext": {**PAPER, "lr": 2e-6, "gan_w_G": 3e-3, "backsim": False},
    # toy: 400 iterations (80 generator updates); SDXL's 4-step student scores toy FID 24.1 at 400
    # and 22.3 at 600 against the 32-step teacher's 20.8 (AMD inherits this length)
    "toy": {"lr": 1e-4, "batch": 16, "steps": 400, "warmup": 20, "teacher_guidance": 2.0,
            "generator_grid": FOUR, "checkpoint_every": 200},
    # a toy warm start for the toy preset (stages [toy-warmstart, toy]): its first grid step
    # regressed onto the toy pairs (DMD's, same guidance); L2, as VGG at 224 px is not for a CPU
    "toy-warmstart": {**WARM_START, "regression": "l2", "lr": 1e-4, "batch": 8, "steps": 100,
                      "warmup": 20, "teacher_guidance": 2.0, "generator_grid": FOUR,
                      "checkpoint_every": 50},
}

OFFICIAL = "tianweiy/DMD2"
# the official warm start of the one-step SDXL model (a UNet state dict, cond. timestep 399)
RELEASED_WARM_START = WeightFile(
    path="dmd2/sdxl_lr1e-5_8node_ode_pretraining_10k_cond399_checkpoint_model_002000.bin",
    source="https://huggingface.co/tianweiy/DMD2/resolve/main/model/sdxl/"
           "sdxl_lr1e-5_8node_ode_pretraining_10k_cond399_checkpoint_model_002000.bin "
           "(official scripts/download_sdxl_1step_ode_pairs_ckpt.sh)",
    note="DMD2's one-step SDXL regression warm start (init_from of dmd2-sdxl1-paper)")
WARM_START_COMMAND = ("fewstep train --method dmd2 --preset dmd2-sdxl1-paper-warmstart "
                      "--set pairs=PAIRS --out DIR (pairs from `fewstep pairs --guidance 8`)")

FIDELITY = (
    Deviation("backsim_prompts", "real_captions", source=f"{OFFICIAL} main/sd_unified_model.py "
              "(prepare_denoising_data) and main/train_sd.py (the denoising data loader)",
              why="the official multi-step trainer takes its prompts from the real latents' "
                  "captions; the prompt stream is offered for runs whose real data has no "
                  "captions to spare"),
    Deviation("normaliser_teacher", "guided", source=f"{OFFICIAL} main/sd_guidance.py",
              why="the DM gradient's normaliser uses the guided teacher; unguided is DMD's "
                  "option, kept here for ablations"),
    Deviation("dm_t_range", (0.02, 0.98), source=f"{OFFICIAL} experiment scripts "
              "(min/max_step_percent)", why="offered for ablations"),
    Deviation("data draws", "shuffled epochs without replacement (DataLoader shuffle, drop_last)",
              ours="rows drawn with replacement per (seed, iteration, stream)",
              source=f"{OFFICIAL} main/train_sd.py",
              why="a resumed run redraws exactly what the uninterrupted run drew, without "
                  "data-loader state"),
    Deviation("teacher precision", "weights cast to bf16, run without autocast",
              ours="the teacher's dtype under bf16 autocast on CUDA (fp32 on CPU)",
              source=f"{OFFICIAL} main/sd_guidance.py",
              why="the harness loads one teacher for every method; autocast keeps its norms "
                  "and softmax in fp32, where the official bf16 weights do not"),
)
# the regression stage's own entries (its class is not DMD2's, so DMD2's do not apply to it)
WARM_START_FIDELITY = (
    Deviation("regression", "lpips", source=f"{OFFICIAL} main/train_sd_ode.py; DMD2 paper App. F.4",
              why="L2 on decoded images for the toy world: VGG at 224 px is not for a CPU"),
    Deviation("warm-start distance", "piq LPIPS(replace_pooling=True) on Tiny-VAE (taesdxl) "
              "decodes in [0, 1], at the decode resolution",
              ours="the lpips package's VGG-LPIPS on the family's own codec decodes, resized to "
                   "224 px (fewstep.engine.perceptual, DMD's distance)",
              source=f"{OFFICIAL} main/train_sd_ode.py",
              why="one LPIPS implementation and one decoder per family for DMD and DMD2; piq's "
                  "L2-pooled VGG and the Tiny VAE are not offered yet"),
    Deviation("warm-start pairs", "EulerDiscreteScheduler with trailing spacing, 50 steps, w = 8, "
              "zero null embeddings; noise stored in fp16",
              ours="the file `pairs` names, from `fewstep pairs`: --sampler scheduler (the "
                   "default; SDXL base: Euler, leading spacing) or ddim-trailing (the official "
                   "timesteps; its last step ends at alpha_bar_0, not sigma = 0), at "
                   "distill/pairs/steps",
              source=f"{OFFICIAL} main/sdxl/generate_noise_image_pairs_laion_sdxl.py",
              why="one pairs sampler per DAG for DMD and DMD2 (teachers/sampler); Euler with "
                  "trailing spacing is not offered"),
    Deviation("pair draws", "shuffled epochs without replacement (DataLoader shuffle, drop_last)",
              ours="pairs drawn with replacement per (seed, iteration)",
              source=f"{OFFICIAL} main/train_sd_ode.py",
              why="a resumed run redraws exactly what the uninterrupted run drew"),
)


class DMD2(DistributionMatching):
    name = "dmd2"
    Options = DMD2Options
    requires = ("real",)  # the GAN's real images with their own captions (sec. 3.2)
    PRESETS = PRESETS
    ledger = FIDELITY

    @classmethod
    def for_options(cls, options) -> type[Method]:
        """The regression warm start trains as its own class (one network, teacher pairs)."""
        return RegressionWarmStart if getattr(options, "stage", "dmd2") == "regression" else cls

    @classmethod
    def weight_files(cls, options) -> list[WeightFile]:
        """Cache files these options need (`fewstep weights check`): a warm start named as an
        entry of the weights cache (the official released one)."""
        path = options.init_from
        if not path or Path(path).expanduser().exists():
            return []
        if path == RELEASED_WARM_START.path:
            return [RELEASED_WARM_START]
        return [WeightFile(path, f"`{WARM_START_COMMAND}`", "DMD2's warm start (init_from)")]

    def __init__(self, teacher, options, ctx):
        super().__init__(teacher, options, ctx)
        self.gan = options.gan_w_G > 0 or options.gan_w_D > 0
        self.head = make_head(self.critic, options.gan_feature_layer, options.seed) if self.gan else None

    def initial_generator(self):
        """The teacher, or the warm start `init_from` names (sec. 5.3); a recipe that needs one
        (warm_start) and names none fails here, before any training."""
        if self.opt.init_from:
            return load_warm_start(self.opt.init_from, self.teacher, self.grid[0])
        if self.opt.warm_start:
            raise FewstepError("dmd2: this recipe (warm_start) starts the generator from a "
                               f"regression warm start and init_from names none; {how_to_warm_start()}")
        return self.teacher

    def networks(self):
        critic = nn.ModuleDict({"denoiser": self.critic.denoiser})
        if self.head is not None:
            critic["head"] = self.head  # critic and head share one optimiser (sec. 2)
        return {"generator": self.generator.denoiser, "critic": critic}

    def plan(self, step):
        return ["generator", "critic"] if step % self.opt.generator_every == 0 else ["critic"]

    # -- the generator sample of this iteration ----------------------------------------------------
    def draw_prompts(self, stream: str):
        """This iteration's prompts on `stream` (AMD draws them as groups of repeats)."""
        return self.prompt_source(self.opt.batch, stream)

    def prompt_source(self, n: int, stream: str, repeat: int = 1):
        """n prompts, each `repeat` times: a multi-step generator's are the captions of real
        latents (the official denoising mode, sec. 5.2) unless backsim_prompts = prompt_stream;
        a one-step generator's come from the prompt stream (the official one-step trainers)."""
        if len(self.grid) > 1 and self.opt.backsim_prompts == "real_captions":
            return self.ctx.real_captions(n, stream, repeat)
        return self.ctx.prompts(n, stream, repeat)

    def sample(self, grad: bool):
        """(x_hat, prompts, stop): the generator turn uses the main stream, critic-only turns a
        second independent one over the same set (sec. 4); one backward simulation stop index for
        the batch and all ranks (sec. 5.2). A multi-step generator without backward simulation
        trains on real latents instead (sample_from_real)."""
        if len(self.grid) > 1 and not self.opt.backsim:
            return self.sample_from_real(grad)
        batch = self.draw_prompts("prompts" if grad else "prompts_critic")
        z = self.ctx.randn((len(batch), *self.teacher.latent_shape), "z")
        stop = 0
        if len(self.grid) > 1:
            stop = int(self.ctx.randint(0, len(self.grid) - 1, 1, "stop", shared=True)[0])
        return self.generate(z, batch.cond, grad=grad, stop=stop), batch, stop

    def sample_from_real(self, grad: bool):
        """The official denoising mode without backward simulation (sec. 5.2): real latents with
        their own captions, each forward-noised with the batch noise to its own random grid step,
        step 0 being the pure noise. `stop` is the per-sample step index."""
        stream = "denoise" if grad else "denoise_critic"
        latents, batch = self.ctx.real(self.opt.batch, stream)
        z = self.ctx.randn(latents.shape, "z")
        step = self.ctx.randint(0, len(self.grid) - 1, len(batch), f"{stream}/step")
        t = torch.tensor(self.grid, device=z.device)[step]
        pure = (step == 0).view(-1, *[1] * (z.dim() - 1))
        x_in = torch.where(pure, z, self.generator.schedule.add_noise(latents, z, t))
        return self.generator_x0(x_in, t, batch.cond, grad), batch, step

    def logits(self, x, cond, stream: str):
        """h(phi(F_k'(x))) with a fresh k' over the full range per sample (sec. 3.3)."""
        t = self.draw_t(self.critic_times, x.shape[0], f"{stream}/t")
        eps = self.ctx.randn_like(x, f"{stream}/eps")
        x_t = self.critic.schedule.add_noise(x, eps, t)
        return self.head(bottleneck_features(self.critic, x_t, t, cond, self.opt.gan_feature_layer))

    # -- losses ------------------------------------------------------------------------------------
    def loss(self, net, scratch):
        return self.generator_loss(scratch) if net == "generator" else self.critic_total(scratch)

    def generator_loss(self, scratch):
        x, batch, stop = self.sample(grad=True)
        scratch["x"], scratch["batch"] = x.detach(), batch  # the critic turn reuses the sample
        dm, stats = self.matching_loss(x, batch, stop, scratch)
        total = dm
        if self.gan and self.opt.gan_w_G > 0:
            g_gan = losses.gan_generator_loss(self.logits(x, batch.cond, "gan_g"))
            total = total + self.opt.gan_w_G * g_gan
            stats["gan_g"] = g_gan
        return total, {"dm": dm, **stats}

    def matching_loss(self, x, batch, stop: int, scratch) -> tuple[torch.Tensor, dict]:
        """(L_DM, stats), the distribution-matching term of the generator loss (DMD Eq. 7-8); a
        method that modulates the direction (AMD's DSA) overrides it."""
        return self.dm_loss(x, batch.cond)

    def critic_sample_weight(self, x, batch, scratch) -> torch.Tensor | None:
        """Per-sample weights of the critic's denoising loss on this iteration's samples x (drawn
        for `batch`, by the generator turn or the critic-only turn); DMD2 weighs them equally
        (None). A method that reweights the critic (AMD's RLS) overrides it."""
        return None

    def critic_total(self, scratch):
        if "x" not in scratch:
            x, batch, _ = self.sample(grad=False)
        else:
            x, batch = scratch["x"], scratch["batch"]
        loss_f = self.critic_loss(x, batch.cond, weight=self.critic_sample_weight(x, batch, scratch))
        stats = {"denoise": loss_f}
        if self.gan and self.opt.gan_w_D > 0:
            real, real_batch = self.ctx.real(self.opt.batch)  # real latents, their own captions
            fake_logits = self.logits(x.detach(), batch.cond, "gan_d_fake")
            real_logits = self.logits(real, real_batch.cond, "gan_d_real")
            loss_d = losses.gan_discriminator_loss(fake_logits, real_logits)
            stats.update(gan_d=loss_d, real_logit=real_logits.mean(),
                         fake_logit=fake_logits.mean())
            loss_f = loss_f + self.opt.gan_w_D * loss_d
        return loss_f, stats


# -- the regression warm start (sec. 5.3) -----------------------------------------------------------
class RegressionWarmStart(Method):
    """Stage `regression` of dmd2 (official train_sd_ode.py): the generator alone, regressed at its
    first grid time from the pairs' noise onto the teacher's ODE samples, L = d(G(z, t_0, c), y)
    with `regression`'s distance on decoded images; no critic, no GAN. Its model is the DMD2
    stage's init_from."""

    name = "dmd2"
    Options = DMD2Options
    PRESETS = PRESETS
    requires = ("pairs",)
    ledger = WARM_START_FIDELITY

    def __init__(self, teacher, options, ctx):
        from fewstep.engine.method import student_grid
        from fewstep.engine.perceptual import regression_distance

        super().__init__(teacher, options, ctx)
        if options.init_from:
            raise FewstepError(f"dmd2 stage regression starts from the teacher (official "
                               f"train_sd_ode.py); init_from = {options.init_from!r} is the DMD2 "
                               "stage's option: drop it from this stage")
        self.pairs = teacher_pairs(options, teacher)
        self.distance = regression_distance(options.regression, teacher)  # LPIPS trunk: now
        self.grid = student_grid(teacher, options.generator_grid, options.grid_shift)
        self._generator = trainable_copy(teacher, options)

    @classmethod
    def sampler(cls, teacher, options) -> StudentSpec:
        return DMD2.sampler(teacher, options)  # the DMD2 stage's sampler: same grid

    @classmethod
    def weight_files(cls, options) -> list[WeightFile]:
        """The LPIPS trunk when the distance is LPIPS (`fewstep weights check`)."""
        from fewstep.engine.perceptual import LPIPS_TRUNK

        return [LPIPS_TRUNK] if options.regression == "lpips" else []

    def networks(self):
        return {"generator": self.generator.denoiser}

    def plan(self, step):
        return ["generator"]

    def loss(self, net, scratch):
        z, y, cond = self.pairs.draw(self.opt.batch, self.ctx.gen("pairs"), self.ctx.device)
        t = torch.full((z.shape[0],), self.grid[0], device=z.device)
        reg = self.distance(self.generator.x0(z, t, cond), y)
        return reg, {"reg": reg}


def teacher_pairs(options, teacher) -> PairSet:
    """The regression stage's pairs (DMD's PairSet: same file, same guidance check)."""
    hint = (f"write them with `fewstep pairs --teacher TEACHER --guidance "
            f"{options.teacher_guidance:g} --out FILE` (the DAG's pairs rule) and set pairs=FILE")
    if not options.pairs:
        raise FewstepError(f"dmd2 stage regression trains on teacher ODE pairs and the option "
                           f"pairs is empty: {hint}")
    if not Path(options.pairs).is_file():
        raise FewstepError(f"dmd2 stage regression: teacher pairs {options.pairs} not found: {hint}")
    return PairSet(options.pairs, teacher, options.teacher_guidance)


# -- loading a warm start ---------------------------------------------------------------------------
def how_to_warm_start() -> str:
    return (f"train one with `{WARM_START_COMMAND}` and set init_from=DIR (in the DAG: "
            "distill/stages/dmd2: [dmd2-sdxl1-paper-warmstart, dmd2-sdxl1-paper]), or put the "
            f"official released one at {RELEASED_WARM_START.path} in the weights cache (source: "
            f"{RELEASED_WARM_START.source}) and set init_from={RELEASED_WARM_START.path}")


def load_warm_start(spec: str, teacher, t0: float):
    """The generator backbone a DMD2 run starts from, in fp32: a dmd2 model folder (student.json
    and generator.safetensors: the regression stage's, or an earlier DMD2 run's) or a denoiser
    state-dict file (the official released warm start); a path, else an entry of the cache."""
    from fewstep.backbones.weights import find_entry

    given = Path(spec).expanduser()
    path = given if given.exists() else find_entry(spec)
    if path is None:
        wanted = given / "generator.safetensors" if not given.suffix else given
        raise FewstepError(f"dmd2: the warm-start checkpoint {wanted} (init_from = {spec!r}) is "
                           f"missing, here and in the weights cache; {how_to_warm_start()}")
    return warm_start_folder(path, teacher, t0) if path.is_dir() else warm_start_file(path, teacher)


def warm_start_folder(folder: Path, teacher, t0: float):
    """A dmd2 model folder's generator, checked: a dmd2 model of this family, regressed or
    trained at this run's first grid time."""
    import json

    from safetensors.torch import load_file

    from fewstep.engine.run import STUDENT_FILE, WEIGHTS_FILE, copy_with_weights

    for name in (STUDENT_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FewstepError(f"dmd2: the warm-start checkpoint {folder / name} is missing; "
                               f"{how_to_warm_start()}")
    info = json.loads((folder / STUDENT_FILE).read_text())
    if info.get("method") != "dmd2" or info.get("family") != teacher.family:
        raise FewstepError(f"{folder} holds a {info.get('method')} model of {info.get('family')}; "
                           f"a dmd2 run on {teacher.family} starts from a dmd2 model of it")
    first = float(info["student"]["grid"][0])
    if abs(first - t0) > 1e-6:
        raise FewstepError(f"the warm start {folder} was trained at t = {first:.4f} but this "
                           f"run's first grid time is {t0:.4f}: regress the warm start on this "
                           "run's generator_grid (and grid_shift)")
    return copy_with_weights(teacher, load_file(str(folder / WEIGHTS_FILE)), True, folder).eval()


def warm_start_file(path: Path, teacher):
    """A denoiser state dict (the official warm start: the UNet's, read tensor-only)."""
    from fewstep.backbones.weights import load_state_dict_file
    from fewstep.engine.run import copy_with_weights

    return copy_with_weights(teacher, load_state_dict_file(path), True, path).eval()
