"""The hooks between the engine, the methods and the backbones: the one sampler hook, DMD2's
critic weight hook, and the family facts (LoRA targets, GAN features) each backbone states."""
import pytest
import torch
from torch import nn

from fewstep.backbones.base import Backbone, middle_block
from fewstep.engine.adapt import add_lora
from fewstep.engine.distributed import DistInfo
from fewstep.engine.gan import bottleneck_features
from fewstep.engine.loop import Trainer
from fewstep.engine.method import Method, StudentSpec, student_spec
from fewstep.engine.run import build_method, export, toy_context
from fewstep.toy import teachers
from methods.dmd2 import DMD2
from methods.dummy import Dummy


@pytest.fixture(scope="module")
def sit_teacher():
    torch.manual_seed(0)
    return teachers.build("sit", resolution=16, seed=0)


def build(teacher, name, **overrides):
    ctx = toy_context(teacher, teacher.family, 16, 0, DistInfo())
    return build_method(name, teacher, ctx, "toy", {"batch": 2, **overrides})


# -- the one sampler hook --------------------------------------------------------------------------
def test_export_writes_the_classes_sampler(sit_teacher, tmp_path):
    class TwoStep(Dummy):
        @classmethod
        def sampler(cls, teacher, options):
            return StudentSpec([1.0, 0.5], theta=0.25)

    assert not hasattr(Method, "student")  # a plugin cannot override a second sampler hook
    dummy = build(sit_teacher, "dummy")
    method = TwoStep(sit_teacher, dummy.opt, dummy.ctx)
    assert student_spec(method) == StudentSpec([1.0, 0.5], theta=0.25)
    method.opt.steps = 1
    trainer = Trainer(method, tmp_path / "run")
    trainer.run(progress=False)
    info = export(method, trainer, tmp_path / "model", {})
    assert info["student"] == StudentSpec([1.0, 0.5], theta=0.25).to_dict()


# -- DMD2's critic weight hook ---------------------------------------------------------------------
def test_dmd2_critic_weights_come_from_its_hook(sit_teacher):
    def critic_loss(method):
        method.ctx.step = 0
        return method.critic_total({})[1]["denoise"]

    plain = build(sit_teacher, "dmd2", gan_w_G=0.0, gan_w_D=0.0, generator_grid=[1.0])
    assert plain.critic_sample_weight(None, None, {}) is None

    class Reweighted(DMD2):
        def critic_sample_weight(self, x, batch, scratch):
            assert x.shape[0] == len(batch)  # the samples the weights apply to
            return torch.tensor([2.0, 0.0], dtype=torch.float64)

    weighted = Reweighted(sit_teacher, plain.opt, plain.ctx)  # the same teacher copies and draws
    base, reweighted = critic_loss(plain), critic_loss(weighted)
    assert not torch.allclose(base, reweighted)  # the weights reach the critic's denoising loss


# -- family facts live in the backbones ------------------------------------------------------------
def test_each_family_names_its_lora_targets_and_gan_features():
    for family in ("sit", "sdxl", "sd3"):
        teacher = teachers.build(family, resolution=16, seed=0)
        assert type(teacher).lora_targets, family
        names = {name.rsplit(".", 1)[-1] for name, _ in teacher.denoiser.named_modules()}
        assert any(target.rsplit(".", 1)[-1] in names for target in teacher.lora_targets), family
        feature = teacher.feature_module()
        assert any(feature is m for m in teacher.denoiser.modules()), family
        cond = teacher.encode([teacher.probe_prompt])
        x = torch.zeros(1, *teacher.latent_shape)
        with torch.no_grad():
            feats = bottleneck_features(teacher, x, torch.tensor([0.5]), cond)
        assert feats.ndim == 4, family


def test_middle_block_is_floor_half_unless_a_layer_is_named():
    blocks = [nn.Identity() for _ in range(5)]
    assert middle_block(blocks) is blocks[2] and middle_block(blocks, 4) is blocks[4]


def test_a_backbone_without_lora_targets_is_refused():
    class Bare(Backbone):
        denoiser = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="names no lora_targets"):
        add_lora(Bare(), 4, 4.0)
    with pytest.raises(NotImplementedError, match="names no GAN feature layer"):
        Bare().feature_module()
