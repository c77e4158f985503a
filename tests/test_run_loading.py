"""Loading a stage's starting point: exact fp32 weights from a bf16 teacher, and init_from that is
a file (DMD2's released warm start) rather than a model folder."""
import json

import pytest
import torch
from safetensors.torch import save_file

from fewstep.engine.run import STUDENT_FILE, WEIGHTS_FILE, check_init_from, load_student, run_inputs
from fewstep.toy import teachers

TEACHER = teachers.SHIPPED / "sit"


def stored_student(tmp_path, teacher):
    """A model folder whose fp32 weights are not representable in bf16."""
    state = {k: v.float() + 1e-4 for k, v in teacher.denoiser.state_dict().items()}
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / STUDENT_FILE).write_text(json.dumps({"family": "sit", "method": "rtdmd"}))
    return folder, state


def test_a_bf16_teachers_copy_keeps_a_stage_models_fp32_weights_when_asked(tmp_path):
    teacher = teachers.load(TEACHER)
    teacher.denoiser.to(torch.bfloat16)  # a real teacher loaded in bf16
    folder, state = stored_student(tmp_path, teacher)
    rounded, _ = load_student(folder, teacher)  # sampling: the teacher's dtype, as before
    assert next(rounded.denoiser.parameters()).dtype == torch.bfloat16
    exact, _ = load_student(folder, teacher, fp32=True)  # a later stage trains from it
    for key, value in exact.denoiser.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, state[key]), key
    assert next(teacher.denoiser.parameters()).dtype == torch.bfloat16  # the teacher untouched


def test_init_from_a_weights_file_is_hashed_and_not_read_as_a_model_folder(tmp_path):
    class Opt:
        init_from = str(tmp_path / "warm.safetensors")

    save_file({"w": torch.ones(2)}, Opt.init_from)
    recipe = {"sha256": {"a": "0" * 64}}
    check_init_from(Opt, recipe)  # a file: its loader checks it, not the model-folder check
    first = run_inputs(recipe, Opt)["init_from"]
    save_file({"w": torch.zeros(2)}, Opt.init_from)
    assert run_inputs(recipe, Opt)["init_from"] != first  # another file is another run
