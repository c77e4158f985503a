"""The GPU check: one command, one table, on full-size random-initialised architectures built from
the real configurations (SDXL base UNet and VAE, SD3-medium transformer and VAE, SiT-XL/2 with the
SD VAE; no weights needed):

* train <family> lora / fsdp: one DMD2 training iteration through the harness's engine
  (build_method + Trainer), the generator a LoRA (rank 64, alpha 8) on one GPU, and FSDP2 on one
  rank (`sharding = fsdp`, a 1-process group; where the engine refuses LoRA under FSDP, that row
  trains the full generator and says so). Seconds per iteration (mean over one TTUR cycle, after
  two warm-up iterations), peak memory (torch.cuda.max_memory_allocated; on the CPU the process's
  peak RSS), the memory plan's estimate for the same run (fewstep.engine.memory), FLOPs
  (FlopCounterMode) and MFU against the GPU's dense bf16 peak. Batch per GPU: DMD2's 2 (SDXL,
  SD3; SiT 8), halved while the plan (+3 GiB spare) exceeds the GPU's memory (grad_checkpointing
  on for SDXL and SD3: generator and critic checkpointed per block); a run that does not
  fit at batch 1 is not started and its row says so (e.g. a full fine-tune of SDXL or SD3 under
  FSDP at one rank: it needs more ranks).
* sample <family> student / teacher: images per second of the harness's samplers against
  diffusers' own pipeline on the same modules and settings, and their ratio (SiT: no pipeline).
* score hpsv2.1 / imagereward: images per second at batch 32 of the harness's metrics against the
  reference packages on the same images, and their ratio.

    .venv/bin/python tests/benchmarks/gpu_check.py                 # CUDA when available
    .venv/bin/python tests/benchmarks/gpu_check.py --toy --device cpu   # same code, toy size

Each row is printed as soon as it is measured (a run cut short keeps what it measured). Each row
is guarded: a failure prints its error in that row and the check goes on; the exit status is
then 1. --json PATH writes the rows with full-precision numbers (tests/test_gpu_check.py
runs --toy and checks them).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

import torch  # noqa: E402

from gpu_check_train import Skip  # noqa: E402

FAMILIES = ("sdxl", "sd3", "sit")
SECTIONS = ("train", "sample", "score")
# dense bf16 tensor-core peaks (datasheets, without sparsity); the first name found in
# torch.cuda.get_device_name counts, so the specific variants come first
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0))
# what the rows import beyond torch (module: the pip requirement this check was written against)
PACKAGES = {"diffusers": "diffusers==0.42.1", "transformers": "transformers", "peft": "peft",
            "open_clip": "open_clip_torch==3.3.0", "ftfy": "ftfy==6.3.1",
            "wcwidth": "wcwidth", "fairscale": "fairscale==0.4.13",
            "ImageReward": "image-reward==1.5", "hpsv2": "hpsv2==1.2.0"}
COLUMNS = (("s_per_iter", "s/iter", ".3f"), ("peak_gib", "peak GiB", ".2f"),
           ("plan_gib", "plan GiB", ".2f"), ("tflop_per_iter", "TFLOP/iter", ".3g"),
           ("mfu_pct", "MFU %", ".2f"), ("ours_img_s", "ours img/s", ".3g"),
           ("ref_img_s", "ref img/s", ".3g"), ("ratio", "ours/ref", ".3f"))


@dataclass
class Row:
    name: str
    values: dict = field(default_factory=dict)
    note: str = ""
    error: str = ""
    skipped: bool = False


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def guarded(name: str, measure) -> Row:
    """measure() -> (values, note) as a row; a run the memory plan says cannot fit is a skipped
    row, any other exception the row's error (its traceback on stderr), and the check goes on."""
    start = time.perf_counter()
    try:
        row = Row(name, *measure())
    except Skip as skip:
        row = Row(name, {"plan_gib": skip.plan}, skip.note, skipped=True)
    except Exception as err:  # noqa: BLE001: every failure is reported in its row
        traceback.print_exc()
        row = Row(name, error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
        traceback.clear_frames(err.__traceback__)
    free_memory()
    print(f"  [{time.strftime('%H:%M:%S')}] {name}: {time.perf_counter() - start:.1f} s"
          + (f" FAILED {row.error}" if row.error else ""), file=sys.stderr, flush=True)
    return row


def attempt(name: str, make):
    """(make(), "") or (None, its error), guarded like a row (for what several rows share)."""
    held = {}
    row = guarded(name, lambda: (held.__setitem__("value", make()), ({}, ""))[1])
    return held.get("value"), row.error


def resolve_device(name: str, current=None) -> str:
    """A CUDA device with its index ("cuda" -> "cuda:<current>"): torch.cuda.set_device and the
    NCCL group of the FSDP rows refuse a CUDA device without one."""
    device = torch.device(name)
    if device.type != "cuda" or device.index is not None:
        return str(device)
    return f"cuda:{(current or torch.cuda.current_device)()}"


def ratio(ours: float, ref: float) -> float:
    return ours / ref


def peak_tflops(device: str, override: float | None) -> tuple[float | None, str]:
    """(dense bf16 peak in TFLOP/s, the device's name)."""
    if torch.device(device).type != "cuda":
        return override, "CPU"
    name = torch.cuda.get_device_name()
    found = next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)
    return (override or found), name


def cpu_line() -> str:
    """The CPU model and its AVX-512 / AVX2 flags (lscpu, else /proc/cpuinfo)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    if not text and Path("/proc/cpuinfo").is_file():
        text = Path("/proc/cpuinfo").read_text()
    info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    info = {k.strip().lower(): v.strip() for k, v in info.items()}
    model = info.get("model name", "unknown CPU")
    flags = set(info.get("flags", "").split())
    avx = ", ".join(f"{n} {'yes' if f in flags else 'no'}" for n, f in
                    (("AVX-512", "avx512f"), ("AVX2", "avx2")))
    return f"{model} ({avx}), {os.cpu_count()} cores"


# -- rows ------------------------------------------------------------------------------------------
def train_values(result, peak: float | None) -> dict:
    values = {"s_per_iter": result.seconds, "peak_gib": result.peak_gib,
              "plan_gib": result.plan_gib, "tflop_per_iter": result.flops / 1e12}
    if peak:
        values["mfu_pct"] = 100 * result.flops / result.seconds / (peak * 1e12)
    return values


def train_rows(teacher, family: str, args, peak: float | None):
    import gpu_check_train as gt

    def lora():
        result = gt.train_row(teacher, family, args.size, args.device, "ddp")
        return train_values(result, peak), result.note

    def fsdp():
        result = gt.train_row(teacher, family, args.size, args.device, "fsdp")
        return train_values(result, peak), result.note

    yield guarded(f"train {family} lora", lora)
    yield guarded(f"train {family} fsdp", fsdp)


def sample_rows(teacher, family: str, args):
    import gpu_check_sample as gs

    def one(who: str):
        ours, ref, settings = gs.sample_row(teacher, family, who, args.images, args.teacher_steps,
                                            args.device, args.repeat)
        if ref is None:
            return {"ours_img_s": ours}, f"{settings}; diffusers has no SiT pipeline: no ratio"
        return {"ours_img_s": ours, "ref_img_s": ref, "ratio": ratio(ours, ref)}, settings

    for who in ("student", "teacher"):
        yield guarded(f"sample {family} {who}", lambda: one(who))


def section_names(family: str, section: str) -> list[str]:
    kinds = {"train": ("lora", "fsdp"), "sample": ("student", "teacher")}[section]
    return [f"{section} {family} {k}" for k in kinds]


def family_rows(family: str, args, peak: float | None):
    """The family's training and sampling rows as they are measured, on one teacher: denoiser
    and text encoders in bf16, the VAE in fp32, on the GPU and (toy) on the CPU alike."""
    from gpu_check_models import build_teacher

    sections = [s for s in ("train", "sample") if s in args.sections]
    if not sections:
        return
    teacher, error = attempt(f"build {family}", lambda: build_teacher(
        family, args.size, args.device, torch.bfloat16))
    for section in sections:
        if error:
            yield from (Row(n, error=f"building the {family} teacher: {error}")
                        for n in section_names(family, section))
        elif section == "train":
            yield from train_rows(teacher, family, args, peak)
        else:
            yield from sample_rows(teacher, family, args)
    del teacher
    free_memory()


def score_rows(args):
    from gpu_check_score import ROWS, Scoring

    # bench_metrics' own device names: cpu or cuda (the current device, set by main)
    scoring, error = attempt("score sets", lambda: Scoring(
        torch.device(args.device).type, args.size, args.score_batch, args.score_images,
        args.score_repeat))
    if error:
        yield from (Row(f"score {n}", error=f"writing the sample sets: {error}") for n in ROWS)
        return

    def one(name: str):
        ours, ref, note = scoring.rates(name)
        return {"ours_img_s": ours, "ref_img_s": ref, "ratio": ratio(ours, ref)}, \
            f"batch {args.score_batch}, {note}"

    try:
        for name in ROWS:
            yield guarded(f"score {name}", lambda: one(name))
    finally:
        scoring.close()


# -- the table -------------------------------------------------------------------------------------
def cell(row: Row, key: str, spec: str, width: int) -> str:
    value = row.values.get(key)
    return f"{'—' if value is None else format(value, spec):>{width}}"


WIDTHS = [max(len(label), 10) for _, label, _ in COLUMNS]


def column_header() -> str:
    return f"{'row':24}" + " ".join(f"{label:>{w}}" for (_, label, _), w in zip(COLUMNS, WIDTHS)) \
        + "  note"


def line(row: Row) -> str:
    cells = " ".join(cell(row, k, spec, w) for (k, _, spec), w in zip(COLUMNS, WIDTHS))
    return f"{row.name:24}{cells}  {f'FAILED: {row.error}' if row.error else row.note}"


def table(rows: list[Row], header: list[str]) -> str:
    return "\n".join(header + [column_header()] + [line(r) for r in rows])


def gpu_text(device_name: str, peak: float | None) -> str:
    if device_name == "CPU":
        return "GPU: none (CPU run" + (f"; MFU against a given peak of {peak:g} TFLOP/s)"
                                       if peak else "; no MFU)")
    if peak is None:
        return f"GPU: {device_name}, dense bf16 peak unknown (no MFU; give --peak-tflops)"
    return f"GPU: {device_name}, dense bf16 peak {peak:g} TFLOP/s"


def missing_packages() -> list[str]:
    """The requirements of PACKAGES not importable here (the rows that need them will fail)."""
    import importlib.util

    return [spec for module, spec in PACKAGES.items() if importlib.util.find_spec(module) is None]


def header_lines(args, peak: float | None, device_name: str) -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        diffusers = version("diffusers")
    except PackageNotFoundError:
        diffusers = "missing"
    missing = missing_packages()
    return [f"gpu_check ({args.size} size) on {args.device}: CPU {cpu_line()}; "
            f"{gpu_text(device_name, peak)}",
            f"torch {torch.__version__}, diffusers {diffusers}; teachers random-initialised from "
            f"the real configs ({args.size} size); ratio = ours / ref"] + (
        [f"missing Python packages (their rows will fail): {' '.join(missing)}"] if missing else [])


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--toy", action="store_true", help="toy-size models (the CPU check)")
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense bf16 peak (default: from the GPU's name)")
    p.add_argument("--images", type=int, default=4, help="images per sampling call (one batch)")
    p.add_argument("--teacher-steps", type=int, default=None,
                   help="teacher sampler steps (default: 8 full size, 2 toy)")
    p.add_argument("--score-images", type=int, default=None, help="default 32 full, 4 toy")
    p.add_argument("--score-batch", type=int, default=32)
    p.add_argument("--repeat", type=int, default=None,
                   help="timed calls per side, alternating; the fastest counts (2 full, 1 toy)")
    p.add_argument("--score-repeat", type=int, default=1,
                   help="timed scoring calls per side (the HPSv2 package reloads its 3.9 GB "
                        "checkpoint per prompt: one call is long enough)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 with --toy, where more threads only "
                        "contend on a shared machine; torch's default otherwise)")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    args.size = "toy" if args.toy else "full"
    args.teacher_steps = args.teacher_steps or (2 if args.toy else 8)
    args.score_images = args.score_images or (4 if args.toy else 32)
    args.repeat = args.repeat or (1 if args.toy else 2)
    args.threads = args.threads or (1 if args.toy else None)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = resolve_device(args.device)
    if torch.device(args.device).type == "cuda":
        torch.cuda.set_device(torch.device(args.device))
    peak, device_name = peak_tflops(args.device, args.peak_tflops)
    print("\n".join(header_lines(args, peak, device_name) + [column_header()]), flush=True)
    start, rows = time.perf_counter(), []
    sections = [family_rows(family, args, peak) for family in args.families]
    if "score" in args.sections:
        sections.append(score_rows(args))
    for section in sections:  # each row printed as soon as it is measured
        for row in section:
            print(line(row), flush=True)
            rows.append(row)
    close_group()
    print(f"wall time {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 1 if any(r.error for r in rows) else 0


def close_group() -> None:
    """The 1-process group the FSDP rows started (fewstep.engine.fsdp.ensure_group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
