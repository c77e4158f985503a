"""Which networks a run holds and which forwards with gradient each update runs, read from
methods/*.py and each method's loss."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fewstep.engine.memory.census import BF16, Census, census, trained_census
from fewstep.errors import FewstepError


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
