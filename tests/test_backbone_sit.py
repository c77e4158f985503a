"""The SiT family: the shared backbone checks (tests/backbone_conformance.py: loader round trips,
CFG, missing files), and SiT's own: network, official-checkpoint conversion, time/sign
conversion, the upstream first-3-channels guidance, labels, loaders.

Tiny random networks only (milliseconds each); no real weights exist on this machine.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backbone_conformance import BackboneConformance
from fewstep.backbones.sit import OFFICIAL_CHECKPOINT, SiTBackbone
from fewstep.backbones.sit_net import (SIT_CONFIGS, SiTConfig, SiTNet,
                                       convert_official_sit_state_dict, official_to_ours_names,
                                       sincos_2d_table, time_features)
from fewstep.backbones.weights import WEIGHTS_ENV, MissingWeightsError

RES, HEADS = 8, 4


def tiny(**kw) -> SiTBackbone:
    kw = {"resolution": RES, "num_heads": HEADS, "hidden": 32, "depth": 2, "num_classes": 5,
          "adaln_zero": False, **kw}  # adaln_zero=False: a fresh net must not output zeros
    return SiTBackbone.tiny(**kw).eval()


def inputs(b: SiTBackbone, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *b.latent_shape, generator=g)
    t = torch.rand(n, generator=g) * 0.9 + 0.05
    return x, t, b.encode(list(range(n)))


# -- the official layout, written from willisma/SiT models.py key names (test-only inverse) --
def to_official_layout(net: SiTNet) -> dict:
    s, cfg = net.state_dict(), net.config
    off = {"pos_embed": reference_pos_embed(cfg.hidden_size, cfg.grid)[None],
           "y_embedder.embedding_table.weight": s["label_embed.weight"]}
    for kind in ("weight", "bias"):
        off[f"x_embedder.proj.{kind}"] = s[f"patch_embed.{kind}"]
        off[f"t_embedder.mlp.0.{kind}"] = s[f"time_in.{kind}"]
        off[f"t_embedder.mlp.2.{kind}"] = s[f"time_out.{kind}"]
        off[f"final_layer.adaLN_modulation.1.{kind}"] = s[f"final_modulation.{kind}"]
        off[f"final_layer.linear.{kind}"] = s[f"final_linear.{kind}"]
        for i in range(cfg.depth):
            for theirs, ours in [("attn.qkv", "qkv"), ("attn.proj", "attn_out"),
                                 ("mlp.fc1", "mlp_in"), ("mlp.fc2", "mlp_out"),
                                 ("adaLN_modulation.1", "modulation")]:
                off[f"blocks.{i}.{theirs}.{kind}"] = s[f"blocks.{i}.{ours}.{kind}"]
    return {k: v.clone() for k, v in off.items()}


def reference_pos_embed(hidden: int, grid: int) -> torch.Tensor:
    """Scalar-by-scalar MAE table: token r*grid+c; channel quarters sin(c w), cos(c w), sin(r w),
    cos(r w), w_d = 10000^(-d/(hidden/4))."""
    q = hidden // 4
    out = torch.empty(grid * grid, hidden, dtype=torch.float64)
    for r in range(grid):
        for c in range(grid):
            for d in range(q):
                w = 10000.0 ** (-d / q)
                out[r * grid + c, [d, q + d, 2 * q + d, 3 * q + d]] = torch.tensor(
                    [math.sin(c * w), math.cos(c * w), math.sin(r * w), math.cos(r * w)],
                    dtype=torch.float64)
    return out.float()


def official_reference_forward(sd: dict, x, t_sit, y, heads: int, patch: int, out_ch: int):
    """The official forward rebuilt from timm's own layers (the ones upstream uses) and the
    official key names; returns all 2C channels."""
    layers = pytest.importorskip("timm.layers")
    from timm.layers.attention import Attention

    lin = lambda h, name: F.linear(h, sd[f"{name}.weight"], sd[f"{name}.bias"])  # noqa: E731
    sub = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}  # noqa
    hidden = sd["x_embedder.proj.weight"].shape[0]
    tok = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    tok = tok.flatten(2).transpose(1, 2) + sd["pos_embed"]
    k = torch.arange(128, dtype=torch.float32)
    ang = t_sit[:, None] * torch.exp(-math.log(10000.0) * k / 128)[None]
    c = lin(F.silu(lin(torch.cat([ang.cos(), ang.sin()], 1), "t_embedder.mlp.0")),
            "t_embedder.mlp.2") + sd["y_embedder.embedding_table.weight"][y]
    norm = lambda h: F.layer_norm(h, (hidden,), eps=1e-6)  # noqa: E731
    for i in range(1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))):
        attn = Attention(hidden, num_heads=heads, qkv_bias=True)
        attn.load_state_dict(sub(f"blocks.{i}.attn."))
        mlp = layers.Mlp(hidden, 4 * hidden, act_layer=lambda: nn.GELU(approximate="tanh"))
        mlp.load_state_dict(sub(f"blocks.{i}.mlp."))
        m = lin(F.silu(c), f"blocks.{i}.adaLN_modulation.1").chunk(6, 1)
        tok = tok + m[2][:, None] * attn(norm(tok) * (1 + m[1][:, None]) + m[0][:, None])
        tok = tok + m[5][:, None] * mlp(norm(tok) * (1 + m[4][:, None]) + m[3][:, None])
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, 1)
    tok = lin(norm(tok) * (1 + scale[:, None]) + shift[:, None], "final_layer.linear")
    g = int(math.isqrt(tok.shape[1]))
    tok = tok.reshape(x.shape[0], g, g, patch, patch, out_ch)
    return torch.einsum("nhwpqc->nchpwq", tok).reshape(x.shape[0], out_ch, g * patch, g * patch)


# -- network ---------------------------------------------------------------------------------------
def test_named_xl2_config_and_official_key_set():
    assert SIT_CONFIGS["SiT-XL/2"] == {"depth": 28, "hidden_size": 1152, "num_heads": 16,
                                       "patch_size": 2}
    with torch.device("meta"):  # shapes only: no 675M-parameter allocation
        net = SiTNet(SiTConfig.named("SiT-XL/2"))
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(675e6, rel=0.01)
    assert set(official_to_ours_names(28).values()) == set(net.state_dict())
    assert net.label_embed.weight.shape == (1001, 1152)  # null class row = 1000
    assert net.final_linear.weight.shape == (2 * 2 * 8, 1152)  # learn_sigma: 2C = 8


def test_fixed_embeddings_match_official_formulas():
    assert torch.allclose(sincos_2d_table(16, 3), reference_pos_embed(16, 3), atol=1e-6)
    # diffusers' DiT divides the exponent by (half - 1): not SiT's embedding (why we own the net)
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.tensor([0.0, 0.3, 1.0])
    assert torch.allclose(time_features(t), get_timestep_embedding(
        t, 256, flip_sin_to_cos=True, downscale_freq_shift=0), atol=1e-6)
    assert not torch.allclose(time_features(t), get_timestep_embedding(
        t, 256, flip_sin_to_cos=True, downscale_freq_shift=1), atol=1e-3)


def test_learn_sigma_output_is_halved():
    b = tiny(in_channels=4)
    x, t, cond = inputs(b)
    full = b.net.forward_full(x, 1 - t, cond["y"])
    assert full.shape[1] == 8
    assert torch.equal(b.net(x, 1 - t, cond["y"]), full[:, :4])
    b1 = tiny(in_channels=4, learn_sigma=False)
    assert b1.net.forward_full(x, 1 - t, cond["y"]).shape[1] == 4


def test_network_matches_official_forward_built_from_timm_layers():
    b = tiny(in_channels=4)
    x, t, cond = inputs(b)
    sd = to_official_layout(b.net)
    ref = official_reference_forward(sd, x, 1 - t, cond["y"], HEADS, 2, 8)
    assert torch.allclose(b.net.forward_full(x, 1 - t, cond["y"]), ref, atol=1e-5)


# -- official checkpoint ---------------------------------------------------------------------------
@pytest.mark.parametrize("wrap", ["plain", "train.py"])
def test_official_checkpoint_loads_with_equal_outputs(tmp_path, wrap):
    b = tiny()
    sd = to_official_layout(b.net)
    if wrap == "train.py":  # upstream find_model takes "ema"; a wrong "model" must not be used
        sd = {"model": {k: torch.zeros_like(v) for k, v in sd.items()}, "ema": sd}
    torch.save(sd, tmp_path / OFFICIAL_CHECKPOINT)
    loaded = SiTBackbone.from_pretrained(tmp_path / OFFICIAL_CHECKPOINT, pixel_space=True,
                                         num_heads=HEADS)
    assert loaded.net.config == b.net.config
    x, t, cond = inputs(b)
    assert torch.allclose(loaded.x0(x, t, cond, 2.5), b.x0(x, t, cond, 2.5), atol=1e-6)


def test_conversion_errors_name_the_culprits():
    sd = to_official_layout(tiny().net)
    with pytest.raises(ValueError, match="unexpected keys.*blocks.0.attn.q_norm.weight"):
        convert_official_sit_state_dict({**sd, "blocks.0.attn.q_norm.weight": torch.ones(8)})
    del sd["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.mlp.fc2.bias'\]"):
        convert_official_sit_state_dict(sd)
    sd = to_official_layout(tiny().net)
    sd["pos_embed"] = sd["pos_embed"].flip(1)
    with pytest.raises(ValueError, match="pos_embed differs"):
        convert_official_sit_state_dict(sd)


# -- the shared checks, and our own folder ---------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny latent SiT (with VAE) and the folder its save_pretrained wrote."""
    backbone = tiny(resolution=16, pixel_space=False, in_channels=4)
    return backbone, backbone.save_pretrained(tmp_path_factory.mktemp("sit") / "m")


class TestSiTConformance(BackboneConformance):
    backbone_cls = SiTBackbone
    conditions = [0, 1]
    missing_files = ("config.json", "model.safetensors")

    def tiny_pixel(self):
        return tiny(resolution=16, sit_cfg_first3_channels=True)

    def check_loaded(self, backbone, loaded):
        assert loaded.latent_shape == (4, 8, 8) and not loaded.pixel_space

    def check_pixel_loaded(self, backbone, loaded, folder):
        assert loaded.sit_cfg_first3_channels and loaded.pixel_space  # the flag is saved


# -- time and sign ---------------------------------------------------------------------------------
class UpstreamVelocityStub(nn.Module):
    """Returns the exact upstream regression target d x / d t_SiT = data - noise, and checks
    that it is called with t_SiT = 1 - t."""

    def __init__(self, data, noise, t_sit_expected):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.data, self.noise, self.t_sit_expected = data, noise, t_sit_expected

    def forward(self, x, t_sit, y):
        assert torch.allclose(t_sit, self.t_sit_expected, atol=1e-6)
        return self.data - self.noise


def test_x0_recovered_from_exact_sit_velocity():
    b = tiny()
    g = torch.Generator().manual_seed(0)
    data, noise = torch.randn(4, 3, RES, RES, generator=g), torch.randn(4, 3, RES, RES, generator=g)
    t_sit = torch.tensor([0.0, 0.25, 0.7, 1.0])
    # the upstream linear path (ICPlan): x = t_SiT * data + (1 - t_SiT) * noise
    x = t_sit.view(-1, 1, 1, 1) * data + (1 - t_sit.view(-1, 1, 1, 1)) * noise
    b.net = UpstreamVelocityStub(data, noise, t_sit)
    t = 1 - t_sit
    assert torch.allclose(b.x0(x, t, b.encode([0, 1, 2, 3])), data, atol=1e-5)
    assert torch.allclose(b.schedule.add_noise(data, noise, t), x, atol=1e-6)  # same x_t


def upstream_forward_with_cfg_x0(b: SiTBackbone, x, t, cond, scale):
    """Upstream forward_with_cfg data flow: both halves in one batch, channels 0-2 guided, the
    rest per branch; the sampler keeps the first (conditional) half."""
    y = torch.cat([cond["y"], torch.full_like(cond["y"], b.num_classes)])
    out = b.net(torch.cat([x, x]), torch.cat([1 - t, 1 - t]), y)
    eps, rest = out[:, :3], out[:, 3:]
    cond_eps, uncond_eps = eps.chunk(2)
    half = uncond_eps + scale * (cond_eps - uncond_eps)
    u = torch.cat([torch.cat([half, half]), rest], dim=1)[: x.shape[0]]
    return x + t.view(-1, 1, 1, 1) * u


def test_first3_channels_flag_reproduces_upstream_guidance():
    b = tiny(in_channels=4)
    x, t, cond = inputs(b)
    with torch.no_grad():
        all_ch = b.x0(x, t, cond, 4.0)
        b.sit_cfg_first3_channels = True
        first3 = b.x0(x, t, cond, 4.0)
        assert torch.allclose(first3, upstream_forward_with_cfg_x0(b, x, t, cond, 4.0), atol=1e-5)
        assert torch.allclose(first3[:, :3], all_ch[:, :3], atol=1e-6)
        assert torch.allclose(first3[:, 3:], b.x0(x, t, cond, 1.0)[:, 3:], atol=1e-6)
        assert not torch.allclose(first3[:, 3:], all_ch[:, 3:], atol=1e-3)
        assert torch.equal(b.x0(x, t, cond, 1.0), b.x0(x, t, cond))  # no guidance: no change


# -- conditions ------------------------------------------------------------------------------------
def test_labels_null_and_dropout():
    b = tiny()
    assert b.encode([1, "2", torch.tensor(3)])["y"].tolist() == [1, 2, 3]
    assert b.null({"y": torch.tensor([0, 4])})["y"].tolist() == [5, 5]
    with pytest.raises(ValueError, match="position 1 is 'dog'.*class ids 0..4"):
        b.encode([0, "dog"])
    with pytest.raises(ValueError, match="position 0 is 5, outside 0..4"):
        b.encode([5])
    y = torch.tensor([0, 1, 2])
    assert b.net.drop_labels(y, prob=1.0).tolist() == [5, 5, 5]
    assert torch.equal(b.net.drop_labels(y, prob=0.0), y)


# -- missing weights -------------------------------------------------------------------------------
def test_missing_checkpoint_names_file_and_env(tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "cache"))
    with pytest.raises(MissingWeightsError) as err:
        SiTBackbone.from_pretrained(OFFICIAL_CHECKPOINT)  # bare name: looked up in the cache
    assert OFFICIAL_CHECKPOINT in str(err.value) and WEIGHTS_ENV in str(err.value)
    assert str(tmp_path / "cache") in str(err.value)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="save_pretrained or an official SiT checkpoint"):
        SiTBackbone.from_pretrained(tmp_path / "model.safetensors")


def test_official_checkpoint_without_vae_names_the_vae(tmp_path, monkeypatch):
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "cache"))
    torch.save(to_official_layout(tiny().net), tmp_path / OFFICIAL_CHECKPOINT)
    with pytest.raises(MissingWeightsError, match="sd-vae-ft-ema(.|\n)*FEWSTEP_WEIGHTS"):
        SiTBackbone.from_pretrained(tmp_path / OFFICIAL_CHECKPOINT, num_heads=HEADS)
