"""DMD's regression distance (fewstep/engine/perceptual.py): VGG-LPIPS on decoded images upsampled
to 224 (DMD paper sec. 3.3 / App. B; methods/notes/dmd.md sec. 3.3), or L2 (the paper's App. I
ablation, the toy preset's choice).

The LPIPS reference is the `lpips` package's own `LPIPS(net="vgg")` with a random VGG16 trunk
(pnet_rand=True: nothing downloads) and the package's shipped linear heads; its trunk is written
into a weights cache in torchvision's layout, the way a user installs the real one.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fewstep.backbones.weights import MissingWeightsError
from fewstep.engine.distributed import DistInfo
from fewstep.engine.loop import Trainer
from fewstep.engine.perceptual import LPIPS_TRUNK, regression_distance
from fewstep.engine.run import build_method, toy_context
from fewstep.errors import FewstepError
from fewstep.fidelity import deviations
from fewstep.io import write_json
from fewstep.toy import teachers, world

RES = 16
TRUNK_PTH, TRUNK_ST = LPIPS_TRUNK.path.split("|")


@pytest.fixture(scope="module")
def reference():
    """The package's LPIPS-VGG: random trunk, the package's calibrated linear heads."""
    import lpips

    torch.manual_seed(0)
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def trunk_state(reference) -> dict:
    """The reference's trunk in torchvision's vgg16 key layout (features.<index>.<param>)."""
    return {f"features.{k.split('.', 1)[1]}": v.clone().contiguous()
            for k, v in reference.net.state_dict().items()}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "weights"
    root.mkdir()
    monkeypatch.setenv("FEWSTEP_WEIGHTS", str(root))
    return root


def install_trunk(root, reference, fmt="pth"):
    path = root / (TRUNK_PTH if fmt == "pth" else TRUNK_ST)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "pth":
        torch.save(trunk_state(reference), path)
    else:
        save_file(trunk_state(reference), str(path))
    return path


class ToyDecoder(torch.nn.Module):
    """A stand-in latent family: 4-channel 8x8 latents -> RGB 16x16 images in [0, 1]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.up = torch.nn.ConvTranspose2d(4, 3, 2, stride=2)

    def decode(self, latents):
        return torch.sigmoid(self.up(latents.float()))


def package_lpips(reference, decoder, x, y):
    """What the paper's loss computes, written with the package directly."""
    def image(z):
        return F.interpolate(decoder.decode(z) * 2 - 1, size=(224, 224), mode="bilinear",
                             align_corners=False)
    return reference(image(x), image(y)).mean()


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_lpips_value_and_gradient_equal_the_package(reference, cache, fmt):
    install_trunk(cache, reference, fmt)
    decoder = ToyDecoder()
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 4, 8, 8, generator=gen)
    y = torch.randn(2, 4, 8, 8, generator=gen)
    ours_x = x0.clone().requires_grad_(True)
    ref_x = x0.clone().requires_grad_(True)
    ours = regression_distance("lpips", decoder)(ours_x, y)
    ref = package_lpips(reference, decoder, ref_x, y)
    ours.backward()
    ref.backward()
    assert ours.shape == () and float(ref.detach()) > 0
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)
    assert ours_x.grad.abs().max() > 0


def test_lpips_of_identical_images_is_zero(reference, cache):
    install_trunk(cache, reference)
    x = torch.randn(2, 4, 8, 8)
    assert float(regression_distance("lpips", ToyDecoder())(x, x)) == 0.0


def test_resolution_option_and_unknown_options(reference, cache):
    install_trunk(cache, reference)
    decoder = ToyDecoder()
    x, y = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ours = regression_distance("lpips", decoder, {"resolution": 64})(x, y)
    img = [F.interpolate(decoder.decode(v) * 2 - 1, size=(64, 64), mode="bilinear",
                         align_corners=False) for v in (x, y)]
    torch.testing.assert_close(ours, reference(*img).mean(), rtol=1e-6, atol=1e-6)
    with pytest.raises(FewstepError, match=r"\['size'\]: unknown; known: \['resolution'\]"):
        regression_distance("l2", decoder, {"size": 64})


def test_missing_trunk_names_the_file_where_it_goes_and_the_command(cache):
    with pytest.raises(FewstepError) as err:
        regression_distance("lpips", ToyDecoder())
    text = str(err.value)
    assert isinstance(err.value, MissingWeightsError)
    assert str(cache / TRUNK_PTH) in text and "fewstep weights check" in text
    assert "download.pytorch.org/models/vgg16-397923af.pth" in text


def test_l2_is_the_old_computation_bitwise():
    teacher = teachers.build("sit", resolution=RES, seed=0)
    gen = torch.Generator().manual_seed(3)
    x0, y = torch.randn(3, 3, RES, RES, generator=gen), torch.randn(3, 3, RES, RES, generator=gen)
    a, b = x0.clone().requires_grad_(True), x0.clone().requires_grad_(True)
    ours = regression_distance("l2", teacher)(a, y)
    old = torch.mean((teacher.decode(b) - teacher.decode(y)) ** 2)  # DMD.regression before
    ours.backward()
    old.backward()
    assert torch.equal(ours, old) and torch.equal(a.grad, b.grad)


def test_an_unknown_kind_names_the_allowed_ones():
    with pytest.raises(FewstepError, match=r"'lpip' is not one of 'lpips', 'l2'.*Did you mean 'lpips'"):
        regression_distance("lpip", ToyDecoder())


# -- DMD ------------------------------------------------------------------------------------------

def pairs_file(teacher, folder, guidance=2.0):
    metas = world.prompt_set("train", n=4, seed=1)
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(4, *teacher.latent_shape, generator=gen)
    y = torch.randn(4, *teacher.latent_shape, generator=gen).clamp(-1, 1)
    save_file({"z": z, "y": y, "prompt_index": torch.arange(4)}, str(folder / "p.safetensors"))
    write_json(folder / "p.json", {"metas": metas, "guidance": guidance})
    return str(folder / "p.safetensors")


def dmd(teacher, tmp_path, **overrides):
    ctx = toy_context(teacher, teacher.family, RES, 0, DistInfo())
    opts = dict(batch=2, warmup=1, steps=1, teacher_guidance=2.0, checkpoint_every=1000,
                log_every=1, lambda_reg=0.25, pairs=pairs_file(teacher, tmp_path))
    opts.update(overrides)
    return build_method("dmd", teacher, ctx, "toy", opts)


def test_dmd_trains_one_iteration_with_lpips(reference, cache, tmp_path):
    install_trunk(cache, reference)
    teacher = teachers.build("sd3", resolution=RES, seed=0)
    m = dmd(teacher, tmp_path, regression="lpips")
    before = {k: v.clone() for k, v in m.generator.denoiser.state_dict().items()}
    state = Trainer(m, tmp_path / "run").run(progress=False)
    assert state.step == 1
    logged = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    reg = next(v for k, v in logged.items() if k.endswith("reg"))
    assert 0 < reg < float("inf")
    after = m.generator.denoiser.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_dmd_asking_for_lpips_without_the_trunk_fails_at_construction(cache, tmp_path):
    teacher = teachers.build("sit", resolution=RES, seed=0)
    with pytest.raises(FewstepError, match=r"vgg16-397923af\.pth.*fewstep weights check"):
        dmd(teacher, tmp_path, regression="lpips")
    dmd(teacher, tmp_path, regression="lpips", lambda_reg=0.0)  # no regression, no trunk needed


def test_paper_and_ext_presets_use_lpips_and_the_toy_l2():
    from methods.dmd import DMD, PRESETS
    from fewstep.options import resolve

    for name in PRESETS:
        opt = resolve(DMD.Options, PRESETS, name, None, "dmd")
        want = "l2" if name == "toy" else "lpips"
        assert opt.regression == want, name
        assert any(name.endswith(s) for s in ("-paper", "-ext")) or name.startswith("toy")
    toy = resolve(DMD.Options, PRESETS, "toy", None, "dmd")
    ext = resolve(DMD.Options, PRESETS, "dmd-sit-ext", None, "dmd")
    assert "regression" in [d["what"] for d in deviations(DMD, toy)]
    assert "regression" not in [d["what"] for d in deviations(DMD, ext)]
    entry = next(d for d in DMD.ledger if d.what == "regression")
    assert entry.paper == "lpips" and "3.3" in entry.source


def test_weights_check_lists_the_trunk_for_a_config_that_trains_dmd(cache, capsys):
    from fewstep.cli import main

    code = main(["weights", "check", "--config", "workflows/config/paper/sit-imagenet256-train.yaml"])
    out = capsys.readouterr().out
    assert code == 1
    block = out.split("dmd", 1)[1]
    assert f"MISSING  {cache / TRUNK_PTH}" in out and "vgg16-397923af" in block
    assert "download.pytorch.org/models/vgg16-397923af.pth" in out
