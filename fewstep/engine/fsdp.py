"""FSDP2 sharding of the trained networks (option `sharding = fsdp`; DDP stays the default).

Each trained network (generator, critic and its head) and the generator's EMA are wrapped with
torch.distributed.fsdp.fully_shard, per block of the backbone (SiT `blocks`, SD3
`transformer_blocks`, UNet `down_blocks` / `mid_block` / `up_blocks`) and then as a whole, so
parameters, gradients, AdamW states and the EMA are DTensors sharded over the ranks (the memory
plan's FSDP rows, fewstep.engine.memory). FSDP reduce-scatters the gradients itself, replacing the
engine's all-reduce; clip_grad_norm_ over DTensor parameters reduces the norm over the shards, so
clipping uses the global norm. The EMA is sharded like its generator, so the elementwise EMA
update stays local to each shard. Mixed precision: bf16 compute with fp32 gradient reduction and
fp32 master weights on CUDA when `bf16` is on (FSDP2's MixedPrecisionPolicy); fp32 on CPU, like
the loop's autocast. LoRA adapters are sharded with their base blocks (the base frozen: FSDP2
keeps frozen and trained parameters in one group); the export gathers the full weights on rank 0
and merges the adapters there with peft's merge, into a meta skeleton of the network taken before
sharding (so no unsharded copy is held while training). The frozen teacher is replicated
(`fsdp_teacher = replicate`, the default: each rank holds it whole at its own dtype, bf16 for a
real teacher) or sharded per block like the trained networks (`shard`: frozen, outside every
optimiser and checkpoint; its forwards all-gather the exact weights, so the numbers are the same).
A loss that is not finite on one rank stops every rank (the loop all-reduces the guard's flag).

Checkpoints are torch.distributed.checkpoint folders (each rank writes its part) with the same
manifest rule as fewstep.engine.checkpoint: the folder is assembled under a hidden name and
renamed once every rank has written, and its manifest is written last, so a half-written
checkpoint is never the latest. A checkpoint resumes at another world size too (DCP reshards
weights, EMA and AdamW states). An optimiser that has not stepped yet is saved and restored as
unstepped (forget_state), as the DDP checkpoint does.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from fewstep.errors import FewstepError

UNIT_LISTS = ("blocks", "transformer_blocks", "down_blocks", "up_blocks")  # per-block units
UNIT_SINGLES = ("mid_block",)
FORMAT = "fsdp-dcp"  # state.json's "format" of a sharded checkpoint


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The backbone blocks of a network that FSDP wraps one by one (each one all-gathers alone)."""
    units = []
    for sub in module.modules():
        for name in UNIT_LISTS:
            blocks = getattr(sub, name, None)
            if isinstance(blocks, nn.ModuleList):
                units.extend(blocks)
        for name in UNIT_SINGLES:
            block = getattr(sub, name, None)
            if isinstance(block, nn.Module):
                units.append(block)
    return units


# Methods (and the stages of staged ones) whose FSDP training is checked against DDP at 2 ranks
# (tests/test_fsdp.py, tests/test_fsdp_methods.py); a new method is refused until it is checked,
# since it may touch parameters outside the optimiser step (CDM's after_update merge) in ways
# sharding could break.
CHECKED = {"dmd": None, "amd": None, "cdm": None, "dmd2": ("stage", ("dmd2", "regression")),
           "rtdmd": ("stage", (1, 2))}


def checked_list() -> str:
    """The checked methods and stages, for errors."""
    return ", ".join(name if rule is None else f"{name} {rule[0]} = {' | '.join(map(str, rule[1]))}"
                     for name, rule in CHECKED.items())


def unchecked(method) -> str | None:
    """The method (or stage) whose FSDP training is not checked yet, or None."""
    if method.name not in CHECKED:
        return f"method {method.name}"
    rule = CHECKED[method.name]
    if rule is not None and getattr(method.opt, rule[0], rule[1][0]) not in rule[1]:
        return f"{method.name} {rule[0]} = {getattr(method.opt, rule[0])}"
    return None


def check_shardable(method) -> None:
    """Refuse what this FSDP slice cannot train, naming the option and value."""
    what = unchecked(method)
    if what:
        raise FewstepError(f"sharding = fsdp is not checked for {what} yet (checked: "
                           f"{checked_list()}); use sharding = ddp")
    for name, module in method.networks().items():
        if not shard_units(module):
            raise FewstepError(f"sharding = fsdp: {method.name}'s {name} network "
                               f"({type(module).__name__}) has no block list to shard ("
                               f"{', '.join(UNIT_LISTS + UNIT_SINGLES)}); use sharding = ddp")


def precision_policy(opt, device: torch.device):
    """bf16 compute, fp32 reduce and master weights on CUDA under `bf16`; fp32 otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if opt.bf16 and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard(module: nn.Module, policy) -> nn.Module:
    """fully_shard each block, then the whole network (its remaining parameters: embeddings,
    head); requires a process group (a 1-process group works too)."""
    from torch.distributed.fsdp import fully_shard

    if isinstance(module, (nn.ModuleDict, nn.ModuleList)):  # no forward of its own (critic
        for child in module.children():                   # and GAN head): each one alone
            shard(child, policy)
        return module
    # innermost first: the SDXL UNet's down/up blocks hold transformer blocks that are units too
    # (shard_units lists them after their block), and fully_shard refuses a sharded parameter
    for unit in reversed(shard_units(module)):
        fully_shard(unit, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


def ensure_group(info) -> None:
    """FSDP needs a process group even for one process (tests, one-GPU runs)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "nccl" if info.device.type == "cuda" else "gloo"
    if info.world_size == 1:  # meets in memory: an inherited MASTER_PORT may be another's
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group(backend, rank=info.rank, world_size=info.world_size)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on CPU (a collective: every rank calls it; rank 0 gets them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))


def full_optimizer_state(module: nn.Module, optimizer) -> dict:
    """A copy of the unsharded optimiser state of a sharded network, keyed by parameter names, on
    CPU (a collective: every rank calls it; rank 0 gets it): what a resume at any world size
    restores. An optimiser that has not stepped keeps its empty state (forget_state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    stepped = bool(optimizer.state)
    full = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))
    if not stepped:
        optimizer.state.clear()
    return copy.deepcopy(full)  # on one process the CPU tensors are the optimiser's own


# -- LoRA export ------------------------------------------------------------------------------------
def has_lora(module: nn.Module) -> bool:
    return any("lora_" in name for name, _ in module.named_parameters())


def skeleton(module: nn.Module) -> nn.Module:
    """A copy of the module's structure (peft's LoRA layers included) on the meta device, taken
    before sharding: rank 0 fills it with the gathered full weights at export to merge the
    adapters with peft's own merge, exactly as the DDP export does. No storage is copied."""
    import itertools

    memo = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def merged_full(frame: nn.Module, state: dict) -> dict[str, torch.Tensor]:
    """The gathered full weights of a LoRA network with its adapters merged into the base weights
    under the base architecture's names (fewstep.engine.adapt.merged_state_dict), on CPU."""
    from fewstep.engine.adapt import merged_state_dict

    module = copy.deepcopy(frame).to_empty(device="cpu")
    module.load_state_dict(state)
    return merged_state_dict(module, in_place=True)


# -- checkpoints -----------------------------------------------------------------------------------
def _app_state(nets: dict, emas: dict, optimizers: dict) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    state = {}
    for name, module in nets.items():
        model, optim = get_state_dict(module, optimizers[name])
        state[f"model.{name}"], state[f"optim.{name}"] = model, optim
    for name, module in emas.items():
        state[f"ema.{name}"] = get_model_state_dict(module)
    return state


def forget_state(optimizers: dict, names) -> None:
    """Empty the state of optimisers that had not stepped: DCP's state-dict API fills an empty
    AdamW state by a step on zero gradients at lr 0 (weights unchanged, but its step count 1
    would shift the bias correction of the network's first real step away from DDP's)."""
    for name in names:
        optimizers[name].state.clear()


def save(run_dir: Path, step: int, nets: dict, emas: dict, optimizers: dict, schedulers: dict,
         extra: dict, main: bool) -> Path:
    """Every rank writes its shards into a hidden folder; rank 0 adds state, rng and the
    manifest, then renames it to step_N (the rename makes it visible, the manifest complete)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    from fewstep.engine import checkpoint
    from fewstep.io import write_text

    root = Path(run_dir) / "ckpt"
    folder = root / f"step_{step:08d}"
    tmp = root / f".partial-{folder.name}"  # not step_*: latest() never sees it
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    unstepped = sorted(n for n, o in optimizers.items() if not o.state)
    dcp.save(_app_state(nets, emas, optimizers), checkpoint_id=str(tmp))
    forget_state(optimizers, unstepped)
    if main:
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        state = {"step": step, "format": FORMAT, "world_size": dist.get_world_size(),
                 "schedulers": {n: s.state_dict() for n, s in schedulers.items()},
                 "unstepped": unstepped, "extra": extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))
        checkpoint.write_manifest(tmp)  # last: its presence says every other file is whole
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        write_text(root / "latest", folder.name + "\n")
        older = [f for f in sorted(root.glob("step_*")) if f.name <= folder.name]
        for old in older[:-checkpoint.KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return folder


def check_format(folder: Path, sharded: bool) -> dict:
    """state.json of a checkpoint this engine can resume, or an error naming `sharding`."""
    state = json.loads((Path(folder) / "state.json").read_text())
    written = "fsdp" if state.get("format") == FORMAT else "ddp"
    wanted = "fsdp" if sharded else "ddp"
    if written != wanted:
        raise FewstepError(f"the checkpoint {folder} was written with sharding = {written} and "
                           f"this run has sharding = {wanted}: resume it with sharding = "
                           f"{written}, or give a new --run-dir")
    return state


def load(folder: Path, nets: dict, emas: dict, optimizers: dict, schedulers: dict) -> dict:
    """Restore a sharded checkpoint in place (any world size: DCP reads the shards it needs)."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = check_format(folder, sharded=True)
    app = _app_state(nets, emas, optimizers)
    dcp.load(app, checkpoint_id=str(folder))
    for name, module in nets.items():
        set_state_dict(module, optimizers[name], model_state_dict=app[f"model.{name}"],
                       optim_state_dict=app[f"optim.{name}"])
    for name, module in emas.items():
        set_model_state_dict(module, app[f"ema.{name}"])
    forget_state(optimizers, state.get("unstepped", []))
    for name, sched in schedulers.items():
        sched.load_state_dict(state["schedulers"][name])
    torch.set_rng_state(load_file(str(Path(folder) / "rng.safetensors"))["torch"])
    return state
