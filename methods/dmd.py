"""DMD: Distribution Matching Distillation (Yin et al., CVPR 2024, arXiv 2311.18828), Eq. 6-9.

One-step generator loss L_G = L_DM + lambda_reg L_reg (Eq. 7-9, Algorithm 1): the DM gradient of the
guided teacher against an unguided critic on fresh noise, plus a regression of G(z_ref) onto the
teacher's deterministic ODE samples y_ref from the same noise (pairs made by a DAG rule with the
same guidance). The critic fits the generator's samples with the teacher's own denoising loss over
the full time range (Eq. 6). One critic update per generator update, no EMA, no dropout (spec
methods/notes/dmd.md). The regression distance is the paper's VGG-LPIPS on decoded images at 224 px
(`regression = lpips`, sec. 3.3 / App. B; its VGG16 trunk comes from the weights cache), or L2 on
decoded images (the paper's App. I ablation; the toy preset's choice: VGG at 224 px does not fit
the toy world's CPU budget). FIDELITY lists what differs from the paper.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from fewstep.backbones.base import cond_cat
from fewstep.engine.dm import DistributionMatching, DMOptions
from fewstep.engine.perceptual import LPIPS_TRUNK, regression_distance
from fewstep.fidelity import Deviation
from fewstep.options import choice
from fewstep.errors import FewstepError
from fewstep.train_data import encode_rows


@dataclass
class DMDOptions(DMOptions):
    lambda_reg: float = 0.25           # dmd.lambda_reg (paper: 0.25; 0.5 for unconditional CIFAR)
    regression: str = choice("lpips", "l2")  # dmd.regression: L_reg's distance (paper: lpips)
    pairs: str = ""                    # the teacher-pair file written by `fewstep pairs`
    concat_pairs_in_dm: bool = True    # text models: the DM loss sees concat(G(z), G(z_ref)) [P, App. B]
    RANGES = {"lambda_reg": "[0, inf)"}


PAPER = {"lr": 1e-5, "warmup": 500, "grad_clip": 10.0}  # regression: the default, lpips (paper sec. 3.3)
PRESETS = {
    "dmd-sdxl-ext": {**PAPER, "teacher_guidance": 8.0},  # one step: the default grid
    "dmd-sd3-ext": {**PAPER, "teacher_guidance": 7.0},
    "dmd-sit-ext": {**PAPER, "lr": 2e-6, "concat_pairs_in_dm": False},  # unguided teacher
    # toy: the one-step SD3 student needs the iterations. Against the teacher's single guided step
    # (toy FID 201) it scored 243 at 300 iterations, a tie at 450 (198 [184, 213]) and 177 at 600
    # with batch 16; batch 12 at 600 iterations scores 167 [158, 176] for three quarters of the
    # compute, so the default DAG fits its 30 minutes (same pairs, prompts and seeds).
    # L2, not LPIPS: VGG16 at 224 px per regression pair does not fit the toy world's CPU budget
    "toy": {"lr": 1e-4, "batch": 12, "steps": 600, "warmup": 20, "teacher_guidance": 2.0,
            "checkpoint_every": 100, "regression": "l2"},
}


FIDELITY = (
    Deviation("regression", "lpips", source="DMD paper sec. 3.3 / App. B, App. I",
              why="L2 on decoded images is the paper's ablation (CIFAR FID 2.78 vs 2.66 with "
                  "LPIPS) and lambda_reg = 0.25 was tuned for LPIPS; the toy preset uses L2 "
                  "because VGG16 at 224 px does not fit the toy world's CPU budget"),
    Deviation("regression decoder", "Tiny VAE in the SD1.5 LAION runs, later the full VAE",
              ours="the family's own codec (full VAE; pixels in the toy world); no smaller "
                   "decoder is offered",
              why="one decoder per family keeps L_reg's images those the metrics see; a Tiny VAE "
                  "is cheaper but needs its own weights (not offered yet)",
              source="DMD paper App. B, Table 5"),
    Deviation("regression image range", "not stated (DMD v1 has no official code)",
              ours="decoded images clamped to [0, 1] by the codec, then mapped to [-1, 1] for "
                   "LPIPS", why="the codec's decode clamps; saturated pixels get no gradient",
              source="DMD paper App. B"),
    Deviation("normaliser_teacher", "guided", source="DMD paper Eq. 8; tianweiy/DMD2 guidance "
              "modules", why="Eq. 8 writes mu_base without saying whether it is guided; the "
                             "authors' re-implementation uses the guided prediction; unguided "
                             "is offered as an option"),
    Deviation("backbones", "SD1.5 (LAION), EDM on CIFAR-10 and ImageNet 64",
              ours="SDXL, SD3 and SiT presets (-ext) and the toy world",
              why="DMD v1 was never published on these backbones; the presets carry its recipe "
                  "over (methods/notes/dmd.md sec. 6.2)", source="DMD paper App. B"),
    Deviation("pairs sampler", "PNDM 50 steps (SD1.5), Heun (EDM)",
              ours="the harness's teacher ODE sampler (`fewstep pairs`)",
              why="the pairs come from the family's teacher sampler, with the DM loss's "
                  "guidance (sec. 3.4)", source="DMD paper App. B"),
)


class PairSet:
    """Teacher ODE pairs (z_ref, y_ref) with the prompts they were sampled for."""

    def __init__(self, path: str, teacher, guidance: float):
        if not path:
            raise FewstepError("DMD needs teacher pairs: set the `pairs` option to the file written "
                               "by `fewstep pairs` (the DAG's pairs rule), or lambda_reg = 0")
        data = load_file(path)
        self.z, self.y, self.index = data["z"], data["y"], data["prompt_index"].long()
        info = json.loads(Path(path).with_suffix(".json").read_text())
        if info.get("guidance") != guidance:
            # methods/notes/dmd.md sec. 8 item 7: pairs from another omega give a biased anchor
            raise FewstepError(f"teacher pairs {path} were sampled with guidance "
                               f"{info.get('guidance')} but the DM teacher uses {guidance}; "
                               f"regenerate them with `fewstep pairs --guidance {guidance}`")
        self.metas, self.teacher = info["metas"], teacher

    def draw(self, n: int, gen: torch.Generator, device):
        # encoded when drawn: tens of thousands of real pairs' text embeddings do not fit in memory
        i = torch.randint(len(self.z), (n,), generator=gen)
        rows = [self.metas[k] for k in self.index[i].tolist()]
        cond = {k: v.to(device) for k, v in encode_rows(self.teacher, rows).items()}
        return self.z[i].to(device), self.y[i].to(device), cond


class DMD(DistributionMatching):
    name = "dmd"
    Options = DMDOptions
    requires = ("pairs",)
    PRESETS = PRESETS
    ledger = FIDELITY

    def __init__(self, teacher, options, ctx):
        super().__init__(teacher, options, ctx)
        self.pairs = (PairSet(options.pairs, teacher, options.teacher_guidance)
                      if options.lambda_reg > 0 else None)
        # built now: a missing LPIPS trunk fails here, before any training
        self.distance = (regression_distance(options.regression, teacher)
                         if self.pairs is not None else None)

    @classmethod
    def weight_files(cls, options) -> list:
        """Cache files these options need (`fewstep weights check`): the LPIPS trunk when the
        regression loss is on and LPIPS."""
        return [LPIPS_TRUNK] if options.regression == "lpips" and options.lambda_reg > 0 else []

    def plan(self, step):
        return ["generator", "critic"]  # one critic update per generator update (no TTUR in v1)

    def loss(self, net, scratch):
        if net == "critic":
            return self.critic_loss(scratch["x"], scratch["cond"]), {}
        batch = self.ctx.prompts(self.opt.batch, "prompts")
        z = self.ctx.randn((len(batch), *self.teacher.latent_shape), "z")
        x, cond = self.generate(z, batch.cond), batch.cond
        stats = {}
        reg = torch.zeros((), device=z.device)
        if self.pairs is not None:
            z_ref, y_ref, c_ref = self.pairs.draw(self.opt.batch, self.ctx.gen("pairs"), z.device)
            x_ref = self.generate(z_ref, c_ref)
            reg = self.regression(x_ref, y_ref)
            stats["reg"] = reg
            if self.opt.concat_pairs_in_dm:
                x, cond = torch.cat([x, x_ref]), cond_cat([cond, c_ref])
        dm, dm_stats = self.dm_loss(x, cond)
        scratch["x"], scratch["cond"] = x.detach(), cond
        return dm + self.opt.lambda_reg * reg, {**stats, "dm": dm, **dm_stats}

    def regression(self, x_ref, y_ref):
        """L_reg (Eq. 9): `regression`'s distance between the decoded G(z_ref) and y_ref."""
        return self.distance(x_ref, y_ref)
