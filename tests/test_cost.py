"""Cost cuts that must not change a number: one process start-up for several training seeds.
Several students of one teacher sampled in one `fewstep sample` call, each set byte-identical to
the set of a call of its own; several seeds trained in one `fewstep train --seeds` call, each
model identical to the model of a call of its own with `--set seed=<s>`."""
import json
from pathlib import Path

import pytest

from fewstep.cli import main
from fewstep.commands.prompts import eval_prompts


def train_tiny(teacher: Path, out: Path, seed: int) -> None:
    assert main(["train", "--method", "dmd2", "--preset", "toy", "--teacher", str(teacher),
                 "--resolution", "16", "--run-dir", str(out.with_suffix(".run")), "--out",
                 str(out), "--no-progress", "--device", "cpu", "--set", "steps=1", "batch=2",
                 "checkpoint_every=1", f"seed={seed}"]) == 0


def set_files(folder: Path) -> dict:
    """Every file of a sample set but its provenance (which records wall times)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "provenance.json"}


@pytest.fixture(scope="module")
def two_students(tmp_path_factory):
    work = tmp_path_factory.mktemp("students")
    assert main(["teacher", "install", "--family", "sit", "--resolution", "16", "--out",
                 str(work / "teacher")]) == 0
    for seed in (0, 1):
        train_tiny(work / "teacher", work / f"seed{seed}", seed)
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in eval_prompts("sit", 2)))
    return work


def test_students_sampled_in_one_call_match_their_own_calls(two_students):
    work = two_students
    common = ["sample", "--teacher", str(work / "teacher"), "--prompts", str(work / "prompts.jsonl"),
              "--seeds", "0", "1", "--device", "cpu"]
    assert main([*common, "--student", str(work / "seed0"), str(work / "seed1"),
                 "--out", str(work / "both0"), str(work / "both1")]) == 0
    for seed in (0, 1):
        assert main([*common, "--student", str(work / f"seed{seed}"),
                     "--out", str(work / f"alone{seed}")]) == 0
        assert set_files(work / f"both{seed}") == set_files(work / f"alone{seed}")
        prov = json.loads((work / f"both{seed}" / "provenance.json").read_text())
        assert prov["config"]["student"] == str(work / f"seed{seed}")
        assert prov["config"]["out"] == str(work / f"both{seed}")
    assert set_files(work / "both0") != set_files(work / "both1")  # two seeds, two students


def test_one_output_folder_per_student(two_students, capsys):
    work = two_students
    code = main(["sample", "--teacher", str(work / "teacher"), "--prompts",
                 str(work / "prompts.jsonl"), "--device", "cpu", "--student", str(work / "seed0"),
                 str(work / "seed1"), "--out", str(work / "only_one")])
    assert code != 0
    err = capsys.readouterr().err
    assert "--student has 2 folders but --out has 1" in err
    assert not (work / "only_one").exists()


def student_files(folder: Path) -> dict:
    """A model folder's weights and student.json without its wall time (train_seconds)."""
    files = {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}
    info = json.loads((folder / "student.json").read_text())
    info.pop("train_seconds")
    return {**files, "student.json": info}


def test_seeds_in_one_call_train_exactly_the_runs_of_their_own_calls(two_students):
    work = two_students
    assert main(["train", "--method", "dmd2", "--preset", "toy", "--teacher",
                 str(work / "teacher"), "--resolution", "16", "--run-dir",
                 str(work / "runs" / "seed{seed}"), "--out", str(work / "models" / "seed{seed}"),
                 "--no-progress", "--device", "cpu", "--seeds", "0", "1", "--set", "steps=1",
                 "batch=2", "checkpoint_every=1"]) == 0
    for seed in (0, 1):
        assert student_files(work / "models" / f"seed{seed}") == student_files(work / f"seed{seed}")
        info = json.loads((work / "models" / f"seed{seed}" / "student.json").read_text())
        assert info["options"]["seed"] == seed


@pytest.mark.parametrize("run_dir, out, sets, message", [
    ("r", "seed{seed}", [], "--run-dir '{tmp}/r' does not contain {seed}"),
    ("{seed}", "m", [], "--out '{tmp}/m' does not contain {seed}"),
    ("{seed}", "m{seed}", ["seed=3"], "--set gives seed= as well"),
])
def test_seeds_need_a_folder_per_seed(two_students, tmp_path, capsys, run_dir, out, sets, message):
    code = main(["train", "--method", "dmd2", "--preset", "toy", "--teacher",
                 str(two_students / "teacher"), "--run-dir", f"{tmp_path}/{run_dir}", "--out",
                 f"{tmp_path}/{out}", "--seeds", "0", "1", "--set", "steps=1", *sets])
    assert code == 2
    assert message.replace("{tmp}", str(tmp_path)) in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything is written
