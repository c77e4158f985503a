"""DMD2: Improved Distribution Matching Distillation (Yin et al., NeurIPS 2024, 2405.14867), Eq. 4.

DMD's DM gradient without the regression loss, stabilised by a two-time-scale update rule (the
critic updates every iteration, the generator every r-th; sec. 4) and a diffusion-GAN
loss whose discriminator head sits on the critic's bottleneck (paper Eq. 4; sec. 3.3).
Multi-step generators train with backward simulation (sec. 5.2): one stop index shared by the
batch and all ranks, a no-grad rollout from independent noise, losses on the intermediate x0.
One-step SDXL uses the conditioning timestep k = 399 (generator_grid = (0.4,)).
Sections (sec. N) are those of methods/notes/dmd2.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fewstep import losses
from fewstep.engine.dm import DistributionMatching, DMOptions
from fewstep.engine.gan import bottleneck_features, make_head


@dataclass
class DMD2Options(DMOptions):
    generator_every: int = 5           # dmd2.ttur_ratio r: generator when iteration % r == 0
    gan_w_G: float = 5e-3              # dmd2.gan.w_G (generator GAN weight)
    gan_w_D: float = 1e-2              # dmd2.gan.w_D (discriminator loss weight in the critic)
    gan_feature_layer: int | None = None  # transformer block of the features (None: floor(L/2))
    backsim: bool = True               # dmd2.backsim (multi-step generators)
    ALIASES = {"ttur_ratio": "generator_every"}  # the paper's two-time-scale update rule
    RANGES = {"generator_every": "[1, inf)", "gan_w_G": "[0, inf)", "gan_w_D": "[0, inf)"}


PAPER = {"warmup": 500, "grad_clip": 10.0, "weight_decay": 0.01}
FOUR = (1.0, 0.75, 0.5, 0.25)
PRESETS = {
    "dmd2-sdxl4-paper": {**PAPER, "lr": 5e-7, "teacher_guidance": 8.0, "generator_grid": FOUR,
                         "batch": 2},
    "dmd2-sdxl1-paper": {**PAPER, "lr": 5e-7, "teacher_guidance": 8.0, "generator_grid": (0.4,),
                         "backsim": False, "batch": 2},
    "dmd2-sd3-ext": {**PAPER, "lr": 5e-7, "teacher_guidance": 7.0, "generator_grid": FOUR,
                     "grid_shift": 3.0},
    # one step, unguided teacher: the default grid and guidance
    "dmd2-sit-ext": {**PAPER, "lr": 2e-6, "gan_w_G": 3e-3, "backsim": False},
    # toy: 400 iterations (80 generator updates); SDXL's 4-step student scores toy FID 24.1 at 400
    # and 22.3 at 600 against the 32-step teacher's 20.8 (AMD inherits this length)
    "toy": {"lr": 1e-4, "batch": 16, "steps": 400, "warmup": 20, "teacher_guidance": 2.0,
            "generator_grid": FOUR, "checkpoint_every": 200},
}


class DMD2(DistributionMatching):
    name = "dmd2"
    Options = DMD2Options
    requires = ("real",)  # the GAN's real images with their own captions (sec. 3.2)
    PRESETS = PRESETS

    def __init__(self, teacher, options, ctx):
        super().__init__(teacher, options, ctx)
        self.gan = options.gan_w_G > 0 or options.gan_w_D > 0
        self.head = make_head(self.critic, options.gan_feature_layer, options.seed) if self.gan else None

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
        return self.ctx.prompts(self.opt.batch, stream)

    def sample(self, grad: bool):
        """(x_hat, prompts, stop): the generator turn uses the main prompt stream, critic-only
        turns a second independent stream over the same prompt set (sec. 4); one backward
        simulation stop index for the batch and all ranks (sec. 5.2)."""
        batch = self.draw_prompts("prompts" if grad else "prompts_critic")
        z = self.ctx.randn((len(batch), *self.teacher.latent_shape), "z")
        stop = 0
        if self.opt.backsim and len(self.grid) > 1:
            stop = int(self.ctx.randint(0, len(self.grid) - 1, 1, "stop", shared=True)[0])
        return self.generate(z, batch.cond, grad=grad, stop=stop), batch, stop

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
