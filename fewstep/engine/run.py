"""Assemble a training run (teacher, data, method, trainer) and export the trained student.

The exported model folder holds `generator.safetensors` (the denoiser's weights, LoRA merged,
EMA weights when the method keeps an EMA) and `student.json` (method, preset, resolved options,
sampler spec, the fidelity ledger's entries that apply to the run, which checkpoint it is (the
final one), teacher hashes and identity, the run's inputs); `fewstep sample --student` reads
exactly these, and refuses a teacher other than the one the student was made with.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fewstep.engine.adapt import merged_state_dict
from fewstep.engine.context import Context, PromptPool
from fewstep.engine.distributed import DistInfo
from fewstep.engine.loop import Trainer
from fewstep.engine.method import student_spec
from fewstep.options import as_dict, resolve
from fewstep.errors import FewstepError
from fewstep.fidelity import deviations
from fewstep.io import atomic_path, file_sha256
from fewstep.registry import METHODS
from fewstep.selection import CHECKPOINT

STUDENT_FILE, WEIGHTS_FILE = "student.json", "generator.safetensors"


def toy_real_images(family: str, resolution: int):
    """Renders of the toy world for given metadata rows: the GAN's real data, own captions."""
    from fewstep.toy import world

    def render(metas, gen: torch.Generator) -> torch.Tensor:
        seeds = torch.randint(0, 2**31 - 1, (len(metas),), generator=gen).tolist()
        if family == "sit":
            imgs = np.stack([world.render_class(m["class_label"], s, resolution)[0]
                             for m, s in zip(metas, seeds)])
            return torch.from_numpy(np.ascontiguousarray(imgs.transpose(0, 3, 1, 2), np.float32) / 255.0)
        return world.render_batch(metas, seeds, resolution)

    return render


def toy_context(teacher, family: str, resolution: int, seed: int, info: DistInfo,
                reward=None, autocast: bool = True) -> Context:
    from fewstep.toy.teachers import training_conditions

    metas, cond = training_conditions(teacher, family, seed)
    return Context(teacher, PromptPool(metas, cond), seed=seed, rank=info.rank,
                   world_size=info.world_size, device=info.device,
                   real_images=toy_real_images(family, resolution), reward=reward, autocast=autocast)


def data_context(teacher, family: str, resolution: int, seed: int, info: DistInfo,
                 prompts=None, real=None, reward=None, autocast: bool = True) -> Context:
    """The run's training data: the toy world's by default; a prompt file (and a real-image
    folder) when given. Real teachers must be given a prompt file: there is no toy prompt for them."""
    if prompts is None:
        if real is not None:
            raise FewstepError("--real-data needs --train-prompts (the generator's prompt stream)")
        return toy_context(teacher, family, resolution, seed, info, reward, autocast)
    from fewstep.train_data import ImageFolder, PromptStream, image_size

    images = ImageFolder(real, image_size(teacher)) if real is not None else None
    return Context(teacher, PromptStream(prompts, teacher), seed=seed, rank=info.rank,
                   world_size=info.world_size, device=info.device, real_data=images,
                   reward=reward, autocast=autocast)


def parse_reward_spec(spec: str) -> tuple[str, str | None]:
    """`--reward` value -> (registered scorer name, its argument): a path to a file means the toy
    reward net (backward compatible); otherwise NAME or NAME:ARG."""
    if spec.endswith(".safetensors") and ":" not in spec:
        return "toy", spec
    name, sep, arg = spec.partition(":")
    return name, (arg if sep else None)


def build_reward(spec: str, device):
    """The differentiable scorer a reward-guided method optimises (REWARDS registry)."""
    from fewstep.registry import REWARDS

    name, arg = parse_reward_spec(spec)
    return REWARDS.get(name)(arg, device)


def teacher_identity(info: dict) -> str:
    """One sha256 naming a teacher (teachers.verify's info): of its files' hashes for a toy
    teacher, of its link record (family, weights folder, dtype, small files' hashes) for a real one."""
    if info.get("recipe", {}).get("world") == "real":
        record = {k: info.get(k) for k in ("recipe", "weights", "dtype", "small_files")}
    else:
        record = info.get("sha256")
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _files_sha256(paths) -> str:
    """One sha256 over several files (name and content of each), e.g. a model folder's weights."""
    return hashlib.sha256(json.dumps({p.name: file_sha256(p) for p in paths}, sort_keys=True)
                          .encode()).hexdigest()


def run_inputs(recipe: dict, options, reward: str | None = None, train_prompts: str | None = None,
               real_data: str | None = None) -> dict:
    """The identities of everything outside the options that shapes training: the teacher, and
    the content of each input file (a changed file under the same path is another run)."""
    from fewstep.train_data import METADATA, resolve_data

    inputs = {"teacher": teacher_identity(recipe)}
    if getattr(options, "pairs", ""):  # the pairs and their prompt rows (the .json beside them)
        pairs = Path(options.pairs)
        inputs["pairs"] = _files_sha256([p for p in (pairs, pairs.with_suffix(".json"))
                                         if p.is_file()])
    if reward:
        inputs["reward"] = reward
        arg = parse_reward_spec(reward)[1]
        if arg and Path(arg).is_file():
            inputs["reward_sha256"] = file_sha256(Path(arg))
    if train_prompts:
        inputs["train_prompts"] = file_sha256(resolve_data(train_prompts))
    if real_data:  # the manifest of captions; the images are many and large
        inputs["real_data"] = file_sha256(resolve_data(real_data) / METADATA)
    if getattr(options, "init_from", ""):
        inputs["init_from"] = init_from_sha256(options.init_from)
    return inputs


def init_from_sha256(spec: str) -> str:
    """The identity of what a staged run starts from: a model folder's weights, or a weights file
    (a path, else a weights-cache entry: DMD2's released warm start)."""
    from fewstep.backbones.weights import find_entry

    path = Path(spec).expanduser()
    if not path.exists():
        path = find_entry(spec) or path
    if path.is_file():
        return _files_sha256([path])
    return _files_sha256(sorted(path.glob("*.safetensors")))


def build_method(name: str, teacher, ctx: Context, preset: str | None = None,
                 overrides: dict | None = None):
    cls = METHODS.get(name)
    options = resolve(cls.Options, cls.PRESETS, preset, overrides, method=name,
                      world_size=ctx.world_size)  # a global_batch is split over the ranks
    ctx.seed = options.seed
    return cls.for_options(options)(teacher, options, ctx)


def export(method, trainer: Trainer, out: Path, extra: dict, provenance: dict | None = None) -> dict:
    """Write the student (EMA weights when kept) and its provenance.json atomically."""
    source = trainer.emas.get("generator", trainer.nets["generator"])
    spec = student_spec(method)
    info = {"method": method.name, "fidelity": method.fidelity, "family": method.teacher.family,
            "student": spec.to_dict(), "options": as_dict(method.opt),
            # the ledger entries this run's options (and the class that trained them: a staged
            # method's stage class, from for_options) make apply; the result tables mark them "D"
            "deviations": deviations(type(method), method.opt),
            # the last iteration's weights (EMA when kept): never a checkpoint selected on any
            # prompts, least of all the evaluation ones (fewstep.selection)
            "checkpoint": CHECKPOINT,
            "weights": "ema" if "generator" in trainer.emas else "raw",
            "iterations": trainer.state.step,
            "train_seconds": round(trainer.state.seconds, 3),  # the report's training cost
            "train_threads": torch.get_num_threads(), **extra}
    # FSDP: the full weights the trainer gathered at the end (EMA's for the generator)
    gathered = trainer.exported or {}
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        save_file(_contiguous(gathered.get("generator")) or merged_state_dict(source),
                  str(tmp / WEIGHTS_FILE))
        for name, module in trainer.nets.items():  # the other networks, for staged methods (RTDMD)
            if name != "generator":
                save_file(_contiguous(gathered.get(name)) or merged_state_dict(module),
                          str(tmp / f"{name}.safetensors"))
        (tmp / STUDENT_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
        if provenance is not None:
            (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True,
                                                            default=str))
    return info


def _contiguous(state: dict | None) -> dict | None:
    return None if state is None else {k: v.detach().contiguous().cpu() for k, v in state.items()}


def recorded_teacher(info: dict) -> str | None:
    """The teacher identity a student.json records; toy students from before identities were
    recorded carry the teacher's file hashes, which give the same identity."""
    if info.get("teacher_identity"):
        return info["teacher_identity"]
    if isinstance(info.get("teacher_sha256"), dict):
        return teacher_identity({"sha256": info["teacher_sha256"]})
    return None


def check_teacher(model_dir: Path, info: dict, recipe: dict) -> None:
    """Refuse a teacher other than the one the student was made with (its encoders, codec and
    schedule are the student's own)."""
    expected, given = recorded_teacher(info), teacher_identity(recipe)
    if expected is None:
        print(f"fewstep: warning: {model_dir}/{STUDENT_FILE} records no teacher identity (made "
              "before fewstep recorded it): cannot check it was made with this teacher",
              file=sys.stderr)
    elif expected != given:
        raise FewstepError(f"{model_dir} was made with teacher {expected} but the teacher given "
                           f"has identity {given}. Give the teacher folder it was trained or "
                           "released with, or train (or release) the student again on this one")


def check_init_from(options, recipe: dict) -> None:
    """A staged run (init_from: a stage-1 model folder) starts from a model of this same teacher."""
    folder = getattr(options, "init_from", "")
    if folder and (Path(folder) / STUDENT_FILE).is_file():  # a weights file: its method's loader checks it
        check_teacher(Path(folder), json.loads((Path(folder) / STUDENT_FILE).read_text()), recipe)


def load_student(model_dir: Path, teacher, recipe: dict | None = None, fp32: bool = False):
    """(generator backbone, student.json) from an exported model folder and its teacher;
    recipe (teachers.verify's info of that teacher) makes it check the teacher's identity. The
    copy takes the teacher's dtype (sampling), or with fp32 holds the stored weights exactly (a
    later stage trains from them: a bf16 teacher's copy would round them)."""
    model_dir = Path(model_dir)
    for name in (STUDENT_FILE, WEIGHTS_FILE):
        if not (model_dir / name).is_file():
            raise FewstepError(f"{model_dir} is not a trained student: {name} is missing "
                               f"(written by `fewstep train --out`)")
    info = json.loads((model_dir / STUDENT_FILE).read_text())
    if info["family"] != teacher.family:
        raise FewstepError(f"{model_dir} holds a {info['family']} student but the teacher is "
                           f"{teacher.family}")
    if recipe is not None:
        check_teacher(model_dir, info, recipe)
    weights = model_dir / WEIGHTS_FILE
    return copy_with_weights(teacher, load_file(str(weights)), fp32, weights).eval(), info


def copy_with_weights(teacher, state: dict, fp32: bool = False, source=None):
    """A copy of the teacher whose denoiser holds `state` (in fp32 when asked); a state dict of
    another architecture is refused naming `source` and the keys that differ."""
    import copy

    net = copy.deepcopy(teacher)
    if fp32:
        net.denoiser.float()
    missing, unexpected = net.denoiser.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FewstepError(f"{source}: not a {teacher.family} denoiser state dict ({len(missing)} "
                           f"keys missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. "
                           f"{unexpected[:2]})")
    return net
