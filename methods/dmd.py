"""DMD: Distribution Matching Distillation (Yin et al., CVPR 2024, arXiv 2311.18828), Eq. 6-9.

One-step generator loss L_G = L_DM + lambda_reg L_reg (Eq. 7-9, Algorithm 1): the DM gradient of the
guided teacher against an unguided critic on fresh noise, plus a regression of G(z_ref) onto the
teacher's deterministic ODE samples y_ref from the same noise (pairs made by a DAG rule with the
same guidance). The critic fits the generator's samples with the teacher's own denoising loss over
the full time range (Eq. 6). One critic update per generator update, no EMA, no dropout (spec
methods/notes/dmd.md). The regression distance is L2 on decoded images (the paper's CIFAR ablation,
and the toy world's choice); LPIPS (`dmd.regression = lpips`) would need VGG-LPIPS weights, not
supported.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from fewstep.backbones.base import cond_cat
from fewstep.engine.dm import DistributionMatching, DMOptions
from fewstep.options import choice
from fewstep.errors import FewstepError
from fewstep.train_data import encode_rows


@dataclass
class DMDOptions(DMOptions):
    lambda_reg: float = 0.25           # dmd.lambda_reg (paper: 0.25; 0.5 for unconditional CIFAR)
    regression: str = choice("l2", "lpips")  # dmd.regression (lpips is refused: no VGG weights)
    pairs: str = ""                    # the teacher-pair file written by `fewstep pairs`
    concat_pairs_in_dm: bool = True    # text models: the DM loss sees concat(G(z), G(z_ref)) [P, App. B]
    RANGES = {"lambda_reg": "[0, inf)"}


PAPER = {"lr": 1e-5, "warmup": 500, "grad_clip": 10.0}
PRESETS = {
    "dmd-sdxl-ext": {**PAPER, "teacher_guidance": 8.0},  # one step: the default grid
    "dmd-sd3-ext": {**PAPER, "teacher_guidance": 7.0},
    "dmd-sit-ext": {**PAPER, "lr": 2e-6, "concat_pairs_in_dm": False},  # unguided teacher
    # toy: the one-step SD3 student needs the iterations. Against the teacher's single guided step
    # (toy FID 201) it scored 243 at 300 iterations, a tie at 450 (198 [184, 213]) and 177 at 600
    # with batch 16; batch 12 at 600 iterations scores 167 [158, 176] for three quarters of the
    # compute, so the default DAG fits its 30 minutes (same pairs, prompts and seeds).
    "toy": {"lr": 1e-4, "batch": 12, "steps": 600, "warmup": 20, "teacher_guidance": 2.0,
            "checkpoint_every": 100},
}


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

    def __init__(self, teacher, options, ctx):
        super().__init__(teacher, options, ctx)
        if options.regression == "lpips":
            raise FewstepError("dmd.regression = lpips needs VGG-LPIPS weights, which fewstep does "
                               "not load; use dmd.regression = l2")
        self.pairs = (PairSet(options.pairs, teacher, options.teacher_guidance)
                      if options.lambda_reg > 0 else None)

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
        """L2 between decoded images (DMD App. I's alternative to LPIPS)."""
        return torch.mean((self.teacher.decode(x_ref) - self.teacher.decode(y_ref)) ** 2)
