"""Training checkpoints: safetensors for every tensor (weights, EMA, optimiser, RNG), JSON for the
rest.

Layout of a run folder:
    ckpt/step_00000400/{weights,ema,optim,rng}.safetensors + state.json + manifest.json
    ckpt/latest            (the name of the newest checkpoint written; for people, not trusted)
Each checkpoint folder is written through fewstep.io.atomic_path, and inside it manifest.json (the
sha256 of every other file) is written last, atomically: a folder is a complete checkpoint only
when its manifest is there and every hash matches. Resume takes the newest complete one and says
on stderr which newer ones it skipped and why, so a save torn by a crash or a full disk costs one
checkpoint interval, not the run. Folders without a manifest (a save that never finished, or a
checkpoint of a fewstep from before manifests) count as incomplete.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fewstep.io import atomic_path, file_sha256, write_text

KEEP = 2  # complete checkpoints kept on disk
MANIFEST = "manifest.json"


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
        write_manifest(tmp)  # last: its presence says every other file is whole
    write_text(ckpt_root / "latest", folder.name + "\n")
    # only folders up to this step are older; a newer one was skipped on resume (torn) and stays
    # for inspection until this run saves over it or passes it
    older = [f for f in sorted(ckpt_root.glob("step_*")) if f.name <= folder.name]
    for old in older[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def write_manifest(folder: Path) -> None:
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    write_text(folder / MANIFEST, json.dumps(
        {"files": {name: file_sha256(folder / name) for name in files}}, indent=1) + "\n")


def problem(folder: Path) -> str | None:
    """Why a checkpoint folder is not a complete checkpoint, or None when it is."""
    folder = Path(folder)
    try:
        listed = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return (f"no {MANIFEST} (its save did not finish, or it was written by a fewstep from "
                "before checkpoints carried one)")
    except (ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST} is unreadable ({err})"
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != digest:
            return f"{name} does not match its sha256 in {MANIFEST} (truncated or changed)"
    return None


def latest(run_dir: Path, report: bool = True) -> Path | None:
    """The newest complete checkpoint of a run, or None; each newer folder that is skipped is
    named on stderr with the reason (report=False: quietly, for the other ranks)."""
    skipped = 0
    for folder in sorted((Path(run_dir) / "ckpt").glob("step_*"), reverse=True):
        why = problem(folder)
        if why is None:
            if skipped and report:
                print(f"fewstep: resuming from {folder.name}, the newest complete checkpoint",
                      file=sys.stderr)
            return folder
        skipped += 1
        if report:
            print(f"fewstep: skipped checkpoint {folder}: {why}", file=sys.stderr)
    if skipped and report:
        print("fewstep: no complete checkpoint left; training starts from iteration 0",
              file=sys.stderr)
    return None


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
