"""Training checkpoints: safetensors for every tensor (weights, EMA, optimiser, RNG), JSON for the rest.

Layout of a run folder:
    ckpt/step_00000400/{weights,ema,optim,rng}.safetensors + state.json
    ckpt/latest            (the name of the newest complete checkpoint)
Each checkpoint folder is written through fewstep.io.atomic_path and `latest` is replaced
atomically afterwards, so a job killed mid-save resumes from the previous checkpoint.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fewstep.io import atomic_path, write_text

KEEP = 2  # complete checkpoints kept on disk


def _flat_state(prefix: str, state: dict) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().contiguous().cpu() for k, v in state.items()}


def _optim_tensors(name: str, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Optimizer state dict split into tensors (safetensors) and the rest (JSON)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, slot in sd["state"].items():
        for key, value in slot.items():
            if torch.is_tensor(value):
                tensors[f"{name}.{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optim_state(name: str, tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith(name + "."):
            pid, slot = key[len(name) + 1:].split(".", 1)
            state.setdefault(int(pid), {})[slot] = value
    for key, value in meta["scalars"].items():
        pid, slot = key.split(".", 1)
        state.setdefault(int(pid), {})[slot] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save(run_dir: Path, step: int, networks: dict, emas: dict, optimizers: dict,
         schedulers: dict, extra: dict | None = None) -> Path:
    ckpt_root = Path(run_dir) / "ckpt"
    folder = ckpt_root / f"step_{step:08d}"
    optim_tensors, optim_meta = {}, {}
    for name, opt in optimizers.items():
        t, m = _optim_tensors(name, opt)
        optim_tensors.update(t)
        optim_meta[name] = m
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        weights = {}
        for name, module in networks.items():
            weights.update(_flat_state(name, module.state_dict()))
        save_file(weights, str(tmp / "weights.safetensors"))
        ema = {}
        for name, module in emas.items():
            ema.update(_flat_state(name, module.state_dict()))
        save_file(ema, str(tmp / "ema.safetensors"))
        save_file(optim_tensors, str(tmp / "optim.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        state = {"step": step, "optimizers": optim_meta,
                 "schedulers": {n: s.state_dict() for n, s in schedulers.items()},
                 "extra": extra or {}}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))
    write_text(ckpt_root / "latest", folder.name + "\n")
    for old in sorted(ckpt_root.glob("step_*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def latest(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "ckpt" / "latest"
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if (folder / "state.json").is_file() else None


def _load_prefixed(path: Path, name: str) -> dict:
    tensors = load_file(str(path))
    return {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}


def read_extra(folder: Path) -> dict:
    """The caller's extra record of a checkpoint (step counters, the run's config), no tensors."""
    return json.loads((Path(folder) / "state.json").read_text()).get("extra", {})


def load(folder: Path, networks: dict, emas: dict, optimizers: dict, schedulers: dict) -> dict:
    """Restore everything in place; returns state.json (its "step" is the next iteration)."""
    folder = Path(folder)
    state = json.loads((folder / "state.json").read_text())
    for name, module in networks.items():
        module.load_state_dict(_load_prefixed(folder / "weights.safetensors", name))
    for name, module in emas.items():
        module.load_state_dict(_load_prefixed(folder / "ema.safetensors", name))
    optim = load_file(str(folder / "optim.safetensors"))
    for name, opt in optimizers.items():
        opt.load_state_dict(_optim_state(name, optim, state["optimizers"][name]))
    for name, sched in schedulers.items():
        sched.load_state_dict(state["schedulers"][name])
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return state
