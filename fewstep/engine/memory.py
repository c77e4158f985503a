"""A per-GPU memory plan of a training run: `fewstep plan`.

For a method preset, an engine (DDP or FSDP) and a world size it estimates, in bytes per GPU:

* weights: every network a run holds (methods/*.py, fewstep/engine/adapt.py): each trained network
  (generator, critic, DMD2's GAN head) keeps fp32 trainable parameters (master_weights_fp32; the
  bf16 autocast computes from them, so they are also the "fp32 masters"); a LoRA network keeps
  its base weights in the teacher's dtype (bf16) and its adapters in fp32. The frozen teacher
  denoiser and text encoders are bf16 (a teacher link's default dtype), the VAE fp32 (the
  backbones load it so), and trainable_copy deep-copies the backbone's VAE into the generator and
  the critic (the text stack is shared). Reward models and the LPIPS VGG trunk are fp32.
* gradients: fp32, one per trainable parameter; both networks' gradients can be alive at once
  (zero_grad sets a network's to None only at its next update). DDP at N > 1 adds the flat fp32
  all-reduce buffer of the largest network (fewstep.engine.distributed.average_gradients).
* optimiser: AdamW's exp_avg and exp_avg_sq in fp32 per trainable parameter, plus its fp32 step
  scalar per parameter tensor. No separate master copy: the trained parameters are fp32.
* EMA: a deep copy of the generator's denoiser (base and adapters, dtypes kept; loop.Trainer).
* cast: bf16 autocast's cached casts of the trainable fp32 parameters, 2 bytes each (CUDA, DDP).
  FSDP's mixed-precision policy casts per block instead: "cast" is then the gathered bf16 block
  being computed and the one prefetched plus its fp32 gradient before the reduce-scatter:
  4 + 4 bytes per parameter of the largest block.
* activations: tensors saved for backward by one forward with gradient, per sample, traced on the
  meta device (no weights, no compute) with flash attention standing in for attention (it saves
  q, k, v, out and an fp32 log-sum-exp, never the N x N scores), in bf16 (the CUDA autocast
  dtype; fp32 on CPU). With activation checkpointing per block (ResnetBlock2D and
  BasicTransformerBlock in a UNet, the units diffusers checkpoints; the joint/SiT blocks of a
  transformer; also the FSDP units of the "cast" column):
      act_ckpt = outside + sum(block inputs) + max(block inside),
      act_full = outside + sum(block inside),
  where `inside` is what a block saves and `outside` what the layers between blocks save.
  Per update, activations = sum over its forwards with gradient of samples x per-sample bytes
  (method_forwards); the run's peak is its heaviest update. No-grad forwards (teacher, critic's DM
  prediction, rollouts) keep no activations; their transient workspace is not counted.
* FSDP (torch.distributed.fsdp.fully_shard): weights, gradients, optimiser states and EMA of the
  trained networks are divided by the world size; the frozen teacher denoiser is sharded (/N) or
  replicated, in bf16; text encoders, VAE, reward and LPIPS stay replicated.
Batch per GPU: global_batch / N where the preset gives global_batch, else its (per-rank) batch.
Not counted: the CUDA context and allocator fragmentation (leave a few GiB), the VAE decoder and
reward model activations of DMD's LPIPS regression, DMD2's warm start and RTDMD stage 2's reward
back-propagation (named in the legend per preset), and data-loader memory.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fewstep.errors import FewstepError, did_you_mean

GIB = 2 ** 30
BF16, FP32 = 2, 4
ENGINES = ("ddp", "fsdp")
TEACHER_PLACEMENT = ("sharded", "replicated")
FAMILY_OF_PRESET = ("sdxl", "sd3", "sit")  # the family a preset names (<method>-<family>-...)
CHECKPOINT_BLOCKS = ("ResnetBlock2D", "BasicTransformerBlock", "JointTransformerBlock", "SiTBlock")
TEXT_TOKENS = {"sdxl": 77, "sd3": 77 + 256, "sit": 0}  # CLIP 77; SD3 adds T5's 256 (pipeline)

# -- the real architectures' configurations (diffusers/transformers config.json values) -----------
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)
SD3_TRANSFORMER = dict(  # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")
VAE_KL = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, sample_size=1024)
VAES = {"sdxl": dict(VAE_KL, latent_channels=4),  # SDXL VAE; SiT's sd-vae-ft-ema has its shape
        "sd3": dict(VAE_KL, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False),
        "sit": dict(VAE_KL, latent_channels=4, sample_size=256)}
LATENT = {"sdxl": (4, 128, 128), "sd3": (16, 128, 128), "sit": (4, 32, 32)}  # 1024, 1024, 256 px
# reward models by the name a preset gives (AMD reward_model; RTDMD stage 2 assumed HPSv2.1)
HPS_CLIP_H = dict(  # HPSv2.1 = OpenCLIP ViT-H-14 (image and text towers)
    text=dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
              num_attention_heads=16, max_position_embeddings=77),
    vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                num_attention_heads=16, patch_size=14, image_size=224), projection_dim=1024)
DINOV2_L = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                image_size=518)  # dinov2_cls: DINOv2 ViT-L/14, the diversity metric's default


# -- counting parameters ------------------------------------------------------------------------
@dataclass(frozen=True)
class Census:
    """What a network costs to hold: fp32 trained parameters and the bytes of everything else."""

    trained: int = 0            # trainable parameters (fp32)
    trained_tensors: int = 0    # trainable parameter tensors (AdamW keeps a step scalar each)
    frozen_bytes: int = 0       # frozen parameters and buffers, at their dtype
    params: int = 0             # all parameters

    @property
    def weight_bytes(self) -> int:
        return FP32 * self.trained + self.frozen_bytes

    def __add__(self, other: "Census") -> "Census":
        return Census(*(a + b for a, b in zip(self._tuple(), other._tuple())))

    def _tuple(self):
        return self.trained, self.trained_tensors, self.frozen_bytes, self.params


def census(module: nn.Module, frozen_dtype_bytes: int | None = None) -> Census:
    """The census of a module as it is (requires_grad marks the trained parameters); frozen
    parameters counted at `frozen_dtype_bytes` when given, else at their own dtype."""
    trained = tensors = frozen = total = 0
    for p in module.parameters():
        total += p.numel()
        if p.requires_grad:
            trained, tensors = trained + p.numel(), tensors + 1
        else:
            frozen += p.numel() * (frozen_dtype_bytes or p.element_size())
    for b in module.buffers():
        frozen += b.numel() * (frozen_dtype_bytes or b.element_size())
    return Census(trained, tensors, frozen, total)


def held_bytes(module: nn.Module, dtype_bytes: int | None = None) -> int:
    """Bytes of every parameter and buffer of a frozen copy, at `dtype_bytes` or their own dtype."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * (dtype_bytes or t.element_size()) for t in tensors)


def trained_census(denoiser: nn.Module, lora=None, frozen_dtype_bytes: int | None = BF16) -> Census:
    """A trained copy of `denoiser` as fewstep.engine.adapt.trainable_copy makes it: every
    parameter trained (fp32), or with a LoRA (adapt.LoraSpec) the adapters alone, its base frozen
    at the teacher's dtype."""
    if lora is None:
        whole = census(denoiser, frozen_dtype_bytes)
        buffers = sum(b.numel() * (frozen_dtype_bytes or b.element_size()) for b in denoiser.buffers())
        return Census(whole.params, sum(1 for _ in denoiser.parameters()), buffers, whole.params)
    # peft's injection takes seconds on a real network: one per (network, rank, targets)
    key = (lora.rank, tuple(lora.targets), frozen_dtype_bytes)
    known = _LORA_CENSUS.setdefault(denoiser, {})
    if key not in known:
        known[key] = _lora_census(denoiser, lora, frozen_dtype_bytes)
    return known[key]


_LORA_CENSUS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _lora_census(denoiser: nn.Module, lora, frozen_dtype_bytes: int | None) -> Census:
    from fewstep.engine.adapt import add_lora

    holder = _Holder(copy.deepcopy(denoiser))
    holder.requires_grad_(False)
    add_lora(holder, lora)
    return census(holder.denoiser, frozen_dtype_bytes)


class _Holder(nn.Module):
    """What add_lora needs of a backbone: a denoiser and its default LoRA targets."""

    def __init__(self, denoiser, targets=()):
        super().__init__()
        self.denoiser, self.lora_targets = denoiser, targets


# -- the real architectures on the meta device ----------------------------------------------------
def _meta(build):
    with torch.device("meta"):
        return build()


@functools.lru_cache(maxsize=None)
def real_denoiser(family: str) -> nn.Module:
    """The family's denoiser at its real configuration, on the meta device (no weights)."""
    if family == "sdxl":
        from diffusers import UNet2DConditionModel
        return _meta(lambda: UNet2DConditionModel(**SDXL_UNET))
    if family == "sd3":
        from diffusers import SD3Transformer2DModel
        return _meta(lambda: SD3Transformer2DModel(**SD3_TRANSFORMER))
    from fewstep.backbones.sit_net import SiTConfig, SiTNet
    return _meta(lambda: SiTNet(SiTConfig.named("SiT-XL/2")))


@functools.lru_cache(maxsize=None)
def frozen_extras(family: str) -> dict[str, int]:
    """Bytes of the family's text encoders (bf16) and one VAE (fp32), real configurations."""
    from diffusers import AutoencoderKL
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              T5Config, T5EncoderModel)

    vae = census(_meta(lambda: AutoencoderKL(**VAES[family])), FP32).params * FP32
    if family == "sit":
        return {"text": 0, "vae": vae}  # class labels: no text encoder
    encoders = [_meta(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)))]
    if family == "sd3":
        encoders[0] = _meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)))
        encoders.append(_meta(lambda: T5EncoderModel(T5Config(**T5_XXL))))
    encoders.append(_meta(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG))))
    return {"text": sum(census(e, BF16).params for e in encoders) * BF16, "vae": vae}


@functools.lru_cache(maxsize=None)
def extra_params(name: str) -> int:
    """Parameters of a frozen extra network: a reward model or the LPIPS VGG trunk."""
    if name.startswith("hpsv2"):
        from transformers import CLIPConfig, CLIPModel
        cfg = CLIPConfig(text_config=HPS_CLIP_H["text"], vision_config=HPS_CLIP_H["vision"],
                         projection_dim=HPS_CLIP_H["projection_dim"])
        return census(_meta(lambda: CLIPModel(cfg))).params
    if name.startswith("dinov2"):
        from transformers import Dinov2Config, Dinov2Model
        return census(_meta(lambda: Dinov2Model(Dinov2Config(**DINOV2_L)))).params
    if name == "lpips":
        from torchvision.models import vgg16
        return census(_meta(lambda: vgg16().features)).params + 1472  # + LPIPS' 1x1 "lin" layers
    raise FewstepError(f"no parameter count for the frozen network {name!r}")


# -- which networks a run holds (read from methods/*.py) ------------------------------------------
@dataclass(frozen=True)
class Network:
    """One network a run holds: its census, whether it trains (and is sharded by FSDP)."""

    role: str
    census: Census
    trained: bool
    ema: bool = False


def gan_on(options) -> bool:
    return getattr(options, "gan_w_G", 0) > 0 or getattr(options, "gan_w_D", 0) > 0


def generator_lora(options):
    from fewstep.engine.adapt import generator_lora as spec
    return spec(options)


def critic_lora(method: str, options):
    """RTDMD's critic is a LoRA of its own rank (critic_lora_rank); every other critic trains all
    its weights (DMD, DMD2, AMD, CDM: trainable_copy(teacher))."""
    from fewstep.engine.adapt import LoraSpec
    if method != "rtdmd" or options.critic_lora_rank <= 0:
        return None
    return LoraSpec(options.critic_lora_rank, options.critic_lora_alpha, tuple(options.lora_targets),
                    seed=options.seed, stream="critic",
                    names=("critic_lora_rank", "critic_lora_alpha"))


def is_regression_stage(method: str, options) -> bool:
    return method == "dmd2" and getattr(options, "stage", "dmd2") == "regression"


def has_critic(method: str, options) -> bool:
    return method in ("dmd", "dmd2", "amd", "cdm", "rtdmd") and not is_regression_stage(method, options)


def with_targets(spec, denoiser_targets):
    """A LoRA spec with the family's default targets where it names none (add_lora's rule)."""
    from dataclasses import replace
    return spec if spec is None or spec.targets else replace(spec, targets=tuple(denoiser_targets))


def trained_networks(method: str, options, denoiser: nn.Module, targets, head=None,
                     dtype_bytes: int | None = BF16) -> list[Network]:
    """The trained networks of a run (Trainer.networks) and the EMA, by census; frozen weights at
    `dtype_bytes` (the teacher's dtype; None: the denoiser's own)."""
    gen = trained_census(denoiser, with_targets(generator_lora(options), targets), dtype_bytes)
    nets = [Network("generator", gen, True, ema=options.ema_decay > 0)]
    if has_critic(method, options):
        critic = trained_census(denoiser, with_targets(critic_lora(method, options), targets),
                                dtype_bytes)
        if head is not None and gan_on(options) and method in ("dmd2", "amd"):
            critic = critic + census(head)  # the GAN head shares the critic's optimiser
        nets.append(Network("critic", critic, True))
    return nets


def frozen_networks(method: str, options, teacher_bytes: int, extras: dict) -> list[Network]:
    """The frozen networks: teacher denoiser, text encoders, VAE (one per backbone copy), reward
    and LPIPS trunk where the method uses them."""
    copies = 2 + has_critic(method, options)  # trainable_copy deep-copies the codec: teacher, G, critic
    nets = [Network("teacher", Census(frozen_bytes=teacher_bytes), False),
            Network("text", Census(frozen_bytes=extras.get("text", 0)), False),
            Network("vae", Census(frozen_bytes=extras.get("vae", 0) * copies), False)]
    for name in frozen_extra_names(method, options):
        nets.append(Network(name, Census(frozen_bytes=extras.get(name, 0)), False))
    return nets


def frozen_extra_names(method: str, options) -> list[str]:
    """The reward model (AMD; RTDMD stage 2) and the LPIPS trunk (DMD's regression, DMD2's warm
    start) a run loads."""
    names = []
    if method == "amd" and (options.dsa_enabled or options.rls_enabled):
        names.append(f"reward:{options.reward_model}")
    if method == "rtdmd" and options.stage == 2:
        names.append("reward:hpsv2.1")
    lpips = options.regression == "lpips" if hasattr(options, "regression") else False
    if lpips and (is_regression_stage(method, options) or getattr(options, "lambda_reg", 0) > 0):
        names.append("lpips")
    return names


# -- forwards with gradient per update (read from each method's loss) -----------------------------
def method_forwards(method: str, options) -> dict[str, list[tuple[str, str, float]]]:
    """{update: [(network, 'full' | 'features', samples per batch sample)]}: the forwards with
    gradient an update runs (METHOD_FORWARDS in the docstring); 'features' stops at the GAN
    feature layer (fewstep.engine.gan.bottleneck_features)."""
    o = options
    if method == "dummy" or is_regression_stage(method, o):
        return {"generator": [("generator", "full", 1)]}
    if method == "dmd":
        pairs = 1 if o.lambda_reg > 0 else 0
        return {"generator": [("generator", "full", 1 + pairs)],
                "critic": [("critic", "full", 1 + (pairs if o.concat_pairs_in_dm else 0))]}
    if method in ("dmd2", "amd"):
        gen = [("generator", "full", 1)] + ([("critic", "features", 1)] if o.gan_w_G > 0 else [])
        critic = [("critic", "full", 1)] + ([("critic", "features", 2)] if o.gan_w_D > 0 else [])
        return {"generator": gen, "critic": critic}
    if method == "cdm":
        branches = sum(1 for w in o.loss_weights if w != 0) - (o.ca_w == 0 and o.loss_weights[0] != 0)
        return {"generator": [("generator", "full", branches)], "critic": [("critic", "full", 1)]}
    if method == "rtdmd":  # the consistency term: one critic call on both endpoints (2 per sample)
        critic = [("critic", "full", 1 + (2 if o.gamma > 0 else 0))]
        gen = 1 if o.stage == 1 else o.selected_steps + 1  # PPO steps + the final x0
        return {"generator": [("generator", "full", gen)], "critic": critic}
    raise FewstepError(f"fewstep plan knows no forwards of the method {method!r}")


# -- activations: tensors saved for backward, traced ----------------------------------------------
class _FlashAttention(torch.autograd.Function):
    """Stands in for scaled_dot_product_attention in a trace: saves what flash attention saves
    (q, k, v, out, fp32 log-sum-exp), never the N x N scores the math path would."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: a trace only counts
        q, k, v = ctx.saved_tensors[:3]
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    return _FlashAttention.apply(q, k, v)


@contextlib.contextmanager
def flash_attention_stand_in():
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass
class SavedTrace:
    """Bytes saved for backward by one forward: outside the blocks, inside each block (the
    outermost checkpoint unit), and the blocks' inputs (what checkpointing keeps)."""

    outside: int = 0
    inside: dict = field(default_factory=dict)
    inputs: int = 0

    @property
    def full(self) -> int:
        return self.outside + sum(self.inside.values())

    @property
    def checkpointed(self) -> int:
        return self.outside + self.inputs + max(self.inside.values(), default=0)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Tracer:
    """saved_tensors_hooks that attribute each saved tensor (its base, once) to the block running."""

    def __init__(self, module: nn.Module):
        self.params = {id(p) for p in module.parameters()}
        self.seen: dict[int, torch.Tensor] = {}  # keeps them alive: ids stay unique
        self.block: str | None = None
        self.trace = SavedTrace()
        self.handles = []
        for name, sub in module.named_modules():
            if type(sub).__name__ in CHECKPOINT_BLOCKS:
                self.handles.append(sub.register_forward_pre_hook(self._enter(name), with_kwargs=True))
                self.handles.append(sub.register_forward_hook(self._leave(name)))

    def _fresh(self, t) -> int:
        base = t._base if t._base is not None else t
        if id(base) in self.seen or id(base) in self.params:
            return 0
        self.seen[id(base)] = base
        return _nbytes(base)

    def _enter(self, name):
        def hook(mod, args, kwargs):
            if self.block is None:
                self.block = name
                tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
                self.trace.inputs += sum(self._fresh_input(t) for t in tensors)
        return hook

    def _fresh_input(self, t) -> int:
        key = ("input", id(t))
        if key in self.seen:
            return 0
        self.seen[key] = t
        return _nbytes(t)

    def _leave(self, name):
        def hook(mod, args, out):
            if self.block == name:
                self.block = None
        return hook

    def pack(self, t):
        if id(t) not in self.params:
            size = self._fresh(t)
            if self.block is None:
                self.trace.outside += size
            else:
                self.trace.inside[self.block] = self.trace.inside.get(self.block, 0) + size
        return t

    def close(self):
        for h in self.handles:
            h.remove()


class _StopAt(Exception):
    pass


def trace_forward(module: nn.Module, run, stop_at: nn.Module | None = None) -> SavedTrace:
    """The SavedTrace of `run()` (a forward of `module` with gradient), stopped after `stop_at`
    when given (DMD2's GAN features); attention as flash attention."""
    tracer = _Tracer(module)
    stop = stop_at.register_forward_hook(lambda *a: _raise(_StopAt())) if stop_at is not None else None
    try:
        with flash_attention_stand_in(), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(tracer.pack, lambda t: t):
            run()
    except _StopAt:
        pass
    finally:
        tracer.close()
        if stop is not None:
            stop.remove()
    return tracer.trace


def _raise(err):
    raise err


def feature_module(family: str, denoiser: nn.Module) -> nn.Module:
    """DMD2's GAN feature layer (the backbones' feature_module): the UNet's mid-block, else the
    middle transformer block."""
    if family == "sdxl":
        return denoiser.mid_block
    blocks = denoiser.transformer_blocks if family == "sd3" else denoiser.blocks
    return blocks[len(blocks) // 2]


def denoiser_call(family: str, denoiser: nn.Module, batch: int, dtype, device, latent, tokens: int):
    """A closure running the denoiser on random inputs of the real call's shapes."""
    def t(*shape, dt=dtype):
        return torch.zeros(*shape, device=device, dtype=dt)
    x = t(batch, *latent)
    if family == "sdxl":
        cfg = denoiser.config
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        return lambda: denoiser(x, t(batch, dt=torch.float32) + 500, t(batch, tokens, cfg.cross_attention_dim),
                                added_cond_kwargs={"text_embeds": t(batch, pooled),
                                                   "time_ids": t(batch, 6)}).sample
    if family == "sd3":
        cfg = denoiser.config
        return lambda: denoiser(x, t(batch, tokens, cfg.joint_attention_dim),
                                t(batch, cfg.pooled_projection_dim), t(batch, dt=torch.float32)).sample
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    return lambda: denoiser(x, t(batch, dt=torch.float32), labels)


def trace_denoiser(family: str, denoiser: nn.Module, mode: str, batch: int = 1, dtype=torch.bfloat16,
                   latent=None, tokens: int | None = None) -> SavedTrace:
    """The SavedTrace of one forward of a denoiser (its own device and parameters: the meta copy of
    a real one, or a toy one on the CPU), `mode` 'full' or 'features'."""
    device = next(denoiser.parameters()).device
    latent = latent or LATENT[family]
    tokens = TEXT_TOKENS[family] if tokens is None else tokens
    run = denoiser_call(family, denoiser, batch, dtype, device, latent, tokens)
    stop = feature_module(family, denoiser) if mode == "features" else None
    return trace_forward(denoiser, run, stop)


@functools.lru_cache(maxsize=None)
def real_trace(family: str, mode: str) -> SavedTrace:
    """Per-sample trace of the real denoiser in bf16 (CUDA autocast's dtype), on the meta device."""
    # nn.Module.to: diffusers' ModelMixin.to warns about modules it would keep in fp32
    net = nn.Module.to(copy.deepcopy(real_denoiser(family)), torch.bfloat16)
    return trace_denoiser(family, net, mode, batch=1)


# -- the plan ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Static:
    """Bytes a run holds whatever its batch, per column, for one process holding everything."""

    trained: tuple[Network, ...]
    frozen: tuple[Network, ...]

    def weights(self, role: str | None = None) -> int:
        return sum(n.census.weight_bytes for n in self.trained + self.frozen
                   if role is None or n.role == role)

    def gradients(self) -> int:
        return sum(FP32 * n.census.trained for n in self.trained)

    def optimiser(self) -> int:
        return sum(2 * FP32 * n.census.trained + FP32 * n.census.trained_tensors for n in self.trained)

    def ema(self) -> int:
        return sum(n.census.weight_bytes for n in self.trained if n.ema)


def static_of(method: str, options, denoiser: nn.Module, targets, head=None,
              extras: dict | None = None, teacher_dtype_bytes: int | None = BF16) -> Static:
    """The Static of a run of `method` with `options` on a teacher whose denoiser is `denoiser`
    (at the teacher's dtype: bf16 for a real teacher, as it is for a toy one)."""
    teacher = held_bytes(denoiser, teacher_dtype_bytes)
    trained = trained_networks(method, options, denoiser, targets, head, teacher_dtype_bytes)
    frozen = frozen_networks(method, options, teacher, extras or {})
    return Static(tuple(trained), tuple(frozen))


def largest_block(denoiser: nn.Module) -> int:
    """Parameters of the largest checkpoint/FSDP unit of a denoiser."""
    sizes = [census(m).params for m in denoiser.modules() if type(m).__name__ in CHECKPOINT_BLOCKS]
    return max(sizes, default=census(denoiser).params)


def activations(method: str, options, batch: int, traces: dict) -> tuple[int, int]:
    """(checkpointed, full) activation bytes of the heaviest update: sum over its forwards with
    gradient of samples x per-sample bytes; `traces` maps 'full'/'features' to a SavedTrace."""
    per_update = []
    for forwards in method_forwards(method, options).values():
        ckpt = sum(n * batch * traces[mode].checkpointed for _, mode, n in forwards)
        full = sum(n * batch * traces[mode].full for _, mode, n in forwards)
        per_update.append((ckpt, full))
    return max(u[0] for u in per_update), max(u[1] for u in per_update)


@dataclass
class Row:
    preset: str
    engine: str          # ddp, fsdp
    teacher: str         # replicated, sharded
    world: int
    batch: int           # per GPU
    weights: int
    gradients: int
    optimiser: int
    ema: int
    cast: int
    act_ckpt: int
    act_full: int

    @property
    def static(self) -> int:
        return self.weights + self.gradients + self.optimiser + self.ema + self.cast

    @property
    def total_ckpt(self) -> int:
        return self.static + self.act_ckpt

    @property
    def total_full(self) -> int:
        return self.static + self.act_full


def _ceil_div(a: int, n: int) -> int:
    return -(-a // n)


def engine_row(preset: str, static: Static, engine: str, teacher: str, world: int, batch: int,
               acts: tuple[int, int], block_params: int, autocast: bool) -> Row:
    """One row: DDP replicates everything; FSDP divides the trained networks' weights,
    gradients, optimiser states and EMA (and a sharded teacher) by the world size."""
    frozen_other = sum(n.census.weight_bytes for n in static.frozen if n.role != "teacher")
    teacher_bytes = static.weights("teacher")
    trained_w = sum(n.census.weight_bytes for n in static.trained)
    if engine == "ddp":
        flat = max((FP32 * n.census.trained for n in static.trained), default=0) if world > 1 else 0
        cast = BF16 * sum(n.census.trained for n in static.trained) if autocast else 0
        return Row(preset, engine, "replicated", world, batch, trained_w + teacher_bytes + frozen_other,
                   static.gradients() + flat, static.optimiser(), static.ema(), cast, *acts)
    shard = _ceil_div(teacher_bytes, world) if teacher == "sharded" else teacher_bytes
    gathered = (BF16 + BF16 + FP32) * block_params  # block in use + prefetched, its fp32 grads
    return Row(preset, engine, teacher, world, batch,
               _ceil_div(trained_w, world) + shard + frozen_other,
               _ceil_div(static.gradients(), world), _ceil_div(static.optimiser(), world),
               _ceil_div(static.ema(), world), gathered, *acts)


# -- presets ----------------------------------------------------------------------------------------
def paper_presets() -> dict[str, str]:
    """{preset: method} of every method's non-toy preset (the papers' and their extensions)."""
    from fewstep.registry import METHODS

    found = {}
    for method in METHODS.names():
        for preset in METHODS.get(method).PRESETS:
            if not preset.startswith("toy"):
                found[preset] = method
    return found


def method_of(preset: str) -> str:
    """The method of a paper preset, or an error with a did-you-mean."""
    known = paper_presets()
    if preset not in known:
        raise FewstepError(f"unknown preset {preset!r} (option --preset)."
                           f"{did_you_mean(preset, known, cutoff=0.4)} Known presets: "
                           f"{', '.join(sorted(known))} (toy presets have no real architecture)")
    return known[preset]


def family_of(preset: str) -> str:
    """The backbone family a preset names (<method>-<family><variant>-...)."""
    for token in preset.split("-")[1:]:
        for family in FAMILY_OF_PRESET:
            if token.startswith(family):
                return family
    raise FewstepError(f"the preset {preset!r} names no family of "
                       f"{', '.join(FAMILY_OF_PRESET)}")


def preset_options(preset: str, world: int):
    """The resolved options of a paper preset at `world` processes; a global batch the world size
    does not divide is an error naming both."""
    from fewstep.options import resolve
    from fewstep.registry import METHODS

    method = method_of(preset)
    if world < 1:
        raise FewstepError(f"--world-size {world}: give a number of processes >= 1")
    cls = METHODS.get(method)
    try:
        return method, resolve(cls.Options, cls.PRESETS, preset, {}, method, world)
    except FewstepError as err:
        raise FewstepError(f"preset {preset} at --world-size {world}: {err}") from None


def real_head(family: str) -> nn.Module:
    """DMD2's GAN head on the real critic's features (channels, side), on the meta device."""
    from fewstep.engine.gan import DiscriminatorHead

    if family == "sdxl":
        channels, side = SDXL_UNET["block_out_channels"][-1], LATENT["sdxl"][1] // 4
    elif family == "sd3":
        cfg = SD3_TRANSFORMER
        channels, side = cfg["num_attention_heads"] * cfg["attention_head_dim"], LATENT["sd3"][1] // 2
    else:
        channels, side = 1152, LATENT["sit"][1] // 2
    return _meta(lambda: DiscriminatorHead(channels, side))


def real_extras(method: str, options, family: str) -> dict:
    extras = dict(frozen_extras(family))
    for name in frozen_extra_names(method, options):
        base = name.split(":", 1)[-1]
        extras[name] = extra_params(base) * FP32
    return extras


def plan_preset(preset: str, worlds, engines=ENGINES, teachers=("sharded",)) -> list[Row]:
    """The rows of one paper preset: each world size, engine (and FSDP teacher placement)."""
    from fewstep.registry import BACKBONES

    family = family_of(preset)
    denoiser = real_denoiser(family)
    targets = BACKBONES.get(family).lora_targets
    traces = {mode: real_trace(family, mode) for mode in ("full", "features")}
    rows = []
    for world in worlds:
        method, options = preset_options(preset, world)
        static = static_of(method, options, denoiser, targets, real_head(family),
                           real_extras(method, options, family))
        acts = activations(method, options, options.batch, traces)
        for engine in engines:
            for teacher in (teachers if engine == "fsdp" else ("replicated",)):
                rows.append(engine_row(preset, static, engine, teacher, world, options.batch, acts,
                                       largest_block(denoiser), bool(options.bf16)))
    return rows


def not_computed(preset: str) -> list[str]:
    """What the plan leaves out for this preset (printed in the legend)."""
    method = method_of(preset)
    options = preset_options(preset, 1)[1] if preset_divides(preset, 1) else None
    notes = []
    if options is not None and "lpips" in frozen_extra_names(method, options):
        notes.append("VAE-decoder and LPIPS activations of the regression loss")
    if method == "rtdmd" and options is not None and options.stage == 2:
        notes.append("VAE-decoder and reward activations of the reward back-propagation")
    return notes


def forwards_text(preset: str) -> str:
    """The forwards with gradient of each update of a preset, as the legend prints them."""
    method = method_of(preset)
    options = preset_options(preset, 1)[1] if preset_divides(preset, 1) else \
        preset_options(preset, _a_divisor(preset))[1]
    updates = method_forwards(method, options)
    return "; ".join(f"{update}: " + " + ".join(f"{n:g} x {net}" + (" to the GAN features"
                                                                    if mode == "features" else "")
                                                 for net, mode, n in forwards)
                     for update, forwards in updates.items())


def _a_divisor(preset: str) -> int:
    return next(w for w in range(1, 1025) if preset_divides(preset, w))


def preset_divides(preset: str, world: int) -> bool:
    try:
        preset_options(preset, world)
    except FewstepError:
        return False
    return True
