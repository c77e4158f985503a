"""fewstep release: a published student (local weights) as a model folder the samplers read, so a
paper's headline number can be audited without training.

The sampler (timestep grid, re-noising angle, guidance) comes from the method's preset through
`Method.sampler(teacher, options)`, never from the checkpoint's folder or file name. Weights:
* a diffusers folder of the denoiser (`config.json` + `diffusion_pytorch_model*.safetensors`,
  sharded or not), e.g. DMD2's SDXL 4-step UNet;
* a `.safetensors` file holding the denoiser's full state dict;
* `--lora`: a LoRA in the diffusers/peft format (e.g. DMD2's SDXL LoRA), loaded onto the teacher's
  denoiser and merged into it.
The generator's weights are written in the student layout (`generator.safetensors`) with
student.json recording the preset, the sampler, the source files' sha256 and the teacher's hashes
and identity (sampling it with another teacher is refused).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from fewstep.io import file_sha256


def add_arguments(p):
    p.add_argument("--method", required=True)
    p.add_argument("--preset", required=True, help="the method's preset the release was made with")
    p.add_argument("--teacher", required=True, help="teacher folder (toy or `fewstep teacher link`)")
    p.add_argument("--weights", required=True, help="diffusers folder or .safetensors file")
    p.add_argument("--lora", action="store_true", help="--weights is a LoRA to merge")
    p.add_argument("--set", nargs="*", default=[], help="option overrides KEY=VALUE")
    p.add_argument("--out", required=True, help="model folder to write")


def released_path(text: str) -> Path:
    """An absolute or existing path as given; any other relative path lives in the weights cache
    ($FEWSTEP_WEIGHTS), where the paper configs name the releases."""
    from fewstep.backbones.weights import weights_root

    path = Path(text).expanduser()
    return path if path.is_absolute() or path.exists() else weights_root() / path


def files_sha256(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    base = path.parent if path.is_file() else path
    return {str(file.relative_to(base)): file_sha256(file) for file in files}


def released_denoiser(teacher, weights: Path, lora: bool):
    """The teacher's denoiser architecture with the released weights (LoRA merged)."""
    from safetensors.torch import load_file

    from fewstep.engine.adapt import merged_state_dict

    denoiser = copy.deepcopy(teacher.denoiser)
    if lora:
        denoiser.load_lora_adapter(str(weights), prefix=None, adapter_name="release")
        return merged_state_dict(denoiser)
    if weights.is_dir():
        loaded = type(denoiser).from_pretrained(str(weights), local_files_only=True)
        state = loaded.state_dict()
    else:
        state = load_file(str(weights))
    try:
        denoiser.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not fit the teacher's {type(denoiser).__name__}: "
                         f"{str(err)[:300]}; is it a release for this family?") from err
    return {k: v.detach().contiguous().cpu() for k, v in denoiser.state_dict().items()}


def run(args):
    from safetensors.torch import save_file

    from fewstep import teachers
    from fewstep.config import parse_overrides
    from fewstep.fidelity import deviations
    from fewstep.options import as_dict, resolve
    from fewstep.engine.run import STUDENT_FILE, WEIGHTS_FILE, teacher_identity
    from fewstep.io import atomic_path
    from fewstep.registry import METHODS

    cls = METHODS.get(args.method)
    options = resolve(cls.Options, cls.PRESETS, args.preset, parse_overrides(args.set),
                      method=args.method)
    weights = released_path(args.weights)
    if not weights.exists():
        raise FileNotFoundError(f"released weights {weights} not found; give the local folder or "
                                "file of the published checkpoint (a relative path is looked up "
                                "in the weights cache, FEWSTEP_WEIGHTS)")
    info = teachers.verify(Path(args.teacher))
    teacher = teachers.load(Path(args.teacher), verified=info)
    spec = cls.sampler(teacher, options)  # from the preset, never from the file name
    state = released_denoiser(teacher, weights, args.lora)
    student = {"method": args.method, "fidelity": f"{cls.fidelity}, released checkpoint",
               "family": teacher.family, "student": spec.to_dict(), "options": as_dict(options),
               # the ledger entries the preset's options make apply (its sampler's among them)
               "deviations": deviations(cls.for_options(options), options),
               # the authors' checkpoint, chosen by them (claims.yaml marks one chosen on its
               # own test set "S")
               "checkpoint": "released",
               "preset": args.preset, "weights": "released", "iterations": None,
               "teacher_sha256": info.get("sha256"), "teacher_identity": teacher_identity(info),
               "released": {"path": str(weights.resolve()), "lora": args.lora,
                            "sha256": files_sha256(weights)}}
    with atomic_path(args.out) as tmp:
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / WEIGHTS_FILE))
        (tmp / STUDENT_FILE).write_text(json.dumps(student, indent=2, sort_keys=True, default=str))
    print(f"released {args.method} ({args.preset}, NFE {spec.nfe}) from {weights} -> {args.out}")
    return 0
