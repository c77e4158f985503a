"""tests/benchmarks/gpu_check.py cannot rot: its --toy run (the same code paths as the GPU run, at
toy size on the CPU) prints one table with every row, each row's numbers finite and positive, the
ratios and MFU computed from the measured numbers; a failing row is reported in its row and the
check goes on; the full-size teachers build from the real configurations (on the meta device)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_check  # noqa: E402

PEAK = 0.05  # TFLOP/s given for the CPU run, so the MFU column is computed here too
FAMILIES = ("sdxl", "sd3", "sit")
TRAIN = [f"train {f} {k}" for f in FAMILIES for k in ("lora", "fsdp")]
SAMPLE = [f"sample {f} {k}" for f in FAMILIES for k in ("student", "teacher")]
SCORE = ["score hpsv2.1", "score imagereward"]
ORDER = [n for f in FAMILIES for n in [f"train {f} lora", f"train {f} fsdp",
                                                   f"sample {f} student", f"sample {f} teacher"]]
ORDER += SCORE
TRAIN_KEYS = ("s_per_iter", "peak_gib", "plan_gib", "tflop_per_iter", "mfu_pct")
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check") / "rows.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--toy", "--device", "cpu",
                           "--peak-tflops", str(PEAK), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert out.is_file(), proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    return proc, rows


def test_the_table_has_every_row_and_names_the_machine(run):
    proc, rows = run
    assert list(rows) == ORDER
    table = proc.stdout
    assert all(name in table for name in rows)
    assert "AVX-512" in table and "AVX2" in table and "GPU: none" in table
    assert proc.returncode == (1 if any(r["error"] for r in rows.values()) else 0)


def positive(values: dict, keys) -> None:
    for key in keys:
        assert math.isfinite(values[key]) and values[key] > 0, (key, values)


@pytest.mark.parametrize("name", TRAIN)
def test_a_training_row_measures_time_memory_plan_and_mfu(run, name):
    row = run[1][name]
    assert not row["error"] and not row["skipped"], row
    positive(row["values"], TRAIN_KEYS)
    v = row["values"]
    assert v["mfu_pct"] == pytest.approx(100 * v["tflop_per_iter"] / v["s_per_iter"] / PEAK)
    assert ("FSDP" in row["note"] or "LoRA off" in row["note"]) == name.endswith("fsdp")


@pytest.mark.parametrize("name", SAMPLE + SCORE)
def test_a_throughput_row_is_ours_against_the_reference(run, name):
    row = run[1][name]
    assert not row["error"], row
    v = row["values"]
    if name.startswith("sample sit"):  # diffusers has no SiT pipeline
        positive(v, ["ours_img_s"])
        assert "ratio" not in v and "no SiT pipeline" in row["note"]
        return
    positive(v, ["ours_img_s", "ref_img_s", "ratio"])
    assert v["ratio"] == v["ours_img_s"] / v["ref_img_s"]  # from the two measured numbers
    assert f"{v['ratio']:.3f}" in run[0].stdout


def test_a_failing_row_is_reported_and_the_check_goes_on(capsys):
    def boom():
        raise RuntimeError("out of memory\nsecond line")

    def too_big():
        raise gpu_check.Skip(99.0, "not run: the memory plan needs 99 GiB")

    rows = [gpu_check.guarded("bad", boom), gpu_check.guarded("big", too_big),
            gpu_check.guarded("good", lambda: ({"ratio": 2.0}, "fine"))]
    assert rows[0].error == "RuntimeError: out of memory" and not rows[0].values
    assert rows[1].skipped and not rows[1].error and rows[1].values == {"plan_gib": 99.0}
    assert rows[2].values == {"ratio": 2.0} and not rows[2].error
    table = gpu_check.table(rows, ["header"])
    assert "FAILED: RuntimeError: out of memory" in table and "99 GiB" in table
    assert "Traceback" in capsys.readouterr().err


def test_the_full_size_teachers_build_from_the_real_configs():
    """On the meta device (no memory, no weights): parameter counts of the real networks."""
    from fewstep.engine.memory import LATENT
    from fewstep.sampling import build_scheduler
    from gpu_check_models import build_teacher, image_side, pipeline

    params = {"sdxl": 2.567e9, "sd3": 2.028e9, "sit": 0.675e9}
    for family in FAMILIES:
        teacher = build_teacher(family, "full", "meta", torch.bfloat16)
        count = sum(p.numel() for p in teacher.denoiser.parameters())
        assert count == pytest.approx(params[family], rel=1e-3), family
        assert tuple(teacher.latent_shape) == LATENT[family]
        assert image_side(teacher) == LATENT[family][1] * 8
        if family != "sit":
            pipe = pipeline(teacher, build_scheduler(teacher.scheduler_config))
            assert (pipe.unet if family == "sdxl" else pipe.transformer) is teacher.denoiser


def test_a_cuda_device_gets_its_index():
    """torch.cuda.set_device and the NCCL group refuse "cuda" without an index."""
    assert gpu_check.resolve_device("cuda", current=lambda: 3) == "cuda:3"
    assert gpu_check.resolve_device("cuda:1", current=lambda: 3) == "cuda:1"
    assert gpu_check.resolve_device("cpu") == "cpu"
    from torch.cuda._utils import _get_device_index

    with pytest.raises(ValueError):  # why: what main would have passed to set_device
        _get_device_index(torch.device("cuda"))
    assert _get_device_index(torch.device(gpu_check.resolve_device("cuda", lambda: 0))) == 0


def test_the_header_names_the_gpu_and_its_peak():
    assert gpu_check.gpu_text("NVIDIA H100 80GB HBM3", 989.0) == \
        "GPU: NVIDIA H100 80GB HBM3, dense bf16 peak 989 TFLOP/s"
    assert "peak unknown" in gpu_check.gpu_text("Some New GPU", None)  # no crash, no MFU
    assert gpu_check.gpu_text("CPU", None) == "GPU: none (CPU run; no MFU)"
    peaks = dict(gpu_check.PEAK_BF16_TFLOPS)
    assert peaks["H100"] == 989.0 and peaks["H100 PCIe"] == 756.0


def test_a_run_the_plan_says_cannot_fit_is_skipped_not_failed(monkeypatch):
    """The GPU's memory check (a CUDA-only branch) on the toy SiT with a 1 KiB 'GPU': the
    LoRA row and the FSDP row (LoRA refused, then the full fine-tune) are skipped rows."""
    import gpu_check_train as gt
    from gpu_check_models import build_teacher

    monkeypatch.setattr(gt, "device_memory_gib", lambda device: 2 ** -20)
    teacher = build_teacher("sit", "toy", "cpu", torch.bfloat16)
    for sharding in ("ddp", "fsdp"):
        row = gpu_check.guarded(sharding, lambda: (gt.train_row(teacher, "sit", "toy", "cpu",
                                                                sharding), ""))
        assert row.skipped and not row.error, row
        assert row.values["plan_gib"] > 2 ** -20 and "not run: the memory plan needs" in row.note


def test_missing_packages_are_named_at_the_top(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fairscale" else real(name, *a))
    args = gpu_check.parse_args(["--toy", "--device", "cpu"])
    lines = gpu_check.header_lines(args, None, "CPU")
    assert lines[-1] == "missing Python packages (their rows will fail): fairscale==0.4.13"
    assert gpu_check.missing_packages() == ["fairscale==0.4.13"]


def test_the_batch_is_halved_until_the_plan_fits(monkeypatch):
    """fitted: the family's batch (2), else 1 with a note, else a skipped row."""
    import gpu_check_train as gt

    monkeypatch.setattr(gt, "plan_gib", lambda opt, *a: 10.0 * opt.batch)
    monkeypatch.setattr(gt, "device_memory_gib", lambda device: 40.0)
    assert gt.fitted(None, "sdxl", "full", "cuda:0", True, "ddp") == (2, 20.0, "")
    monkeypatch.setattr(gt, "device_memory_gib", lambda device: 10.0 + gt.SPARE_GIB)
    assert gt.fitted(None, "sdxl", "full", "cuda:0", True, "ddp") == \
        (1, 10.0, " (batch 2 would need 20 GiB)")
    monkeypatch.setattr(gt, "device_memory_gib", lambda device: 9.0)
    with pytest.raises(gt.Skip, match="needs 10.0 GiB at one rank and batch 1"):
        gt.fitted(None, "sdxl", "full", "cuda:0", False, "fsdp")
