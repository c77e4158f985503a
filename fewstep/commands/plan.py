"""fewstep plan: the estimated per-GPU memory of each paper preset per engine and world size.

The estimate and every assumption behind it are fewstep.engine.memory's (its docstring); the legend
printed under the table repeats them.
"""
from __future__ import annotations

from fewstep.engine import memory
from fewstep.errors import FewstepError

COLUMNS = ("preset", "engine", "N", "batch/GPU", "weights", "grads", "optim", "EMA", "cast",
           "act ckpt", "act full", "total ckpt", "total full")
LEGEND = """\
GiB per GPU. N: world size; batch/GPU: the preset's global_batch / N (else its per-rank batch).
weights: trained networks in fp32 (LoRA: base bf16, adapters fp32), frozen teacher denoiser and
  text encoders bf16, one fp32 VAE per backbone copy (teacher, generator, critic), reward models
  and LPIPS fp32. FSDP: trained networks / N; teacher whole (fsdp/replicate, the
  default fsdp_teacher) or / N (fsdp/shard).
grads: fp32 per trainable parameter, every network's alive at once; DDP at N > 1 adds the flat
  all-reduce buffer of the largest network. FSDP: / N.
optim: AdamW exp_avg + exp_avg_sq fp32 + a step scalar per tensor (trained weights are the fp32
  masters under bf16 autocast: no extra copy). EMA: a copy of the generator (FSDP: / N).
cast: DDP: bf16 autocast's cached casts of the trained weights (2 B/param); FSDP: the gathered
  bf16 block in use and the prefetched one plus its fp32 gradients (8 B/param of the largest block).
act: tensors saved for backward by the heaviest update's forwards with gradient, traced per sample
  on the meta device in bf16 with flash attention; ckpt: per-block activation checkpointing
  (outside + block inputs + the largest block; blocks: ResnetBlock2D, BasicTransformerBlock,
  JointTransformerBlock, SiTBlock), full: none. Not counted: CUDA context and
  fragmentation (keep ~3-5 GiB spare), no-grad workspace, data loading. "ckpt" is the
  grad_checkpointing option on: the harness then checkpoints every trained network per block
  (generator and critic; SiT's network has no switch).
Assumed: text encoders stay loaded (real captions are encoded per batch); AMD's reward is its
  reward_model (hpsv2.1: OpenCLIP ViT-H-14; dinov2_cls: DINOv2 ViT-L/14), RTDMD stage 2's HPSv2.1.
Samples per update with gradient, per batch sample (the heaviest update sets "act"):"""


def add_arguments(parser) -> None:
    parser.add_argument("--preset", action="append", metavar="NAME",
                        help="a paper preset (repeatable; default: every non-toy preset)")
    parser.add_argument("--world-size", action="append", type=int, metavar="N", dest="world_size",
                        help="processes (GPUs) of the run (repeatable; default: 1, 8 and 64)")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU (GiB)")
    parser.add_argument("--engine", choices=memory.ENGINES + ("both",), default="both")
    parser.add_argument("--teacher", choices=memory.TEACHER_PLACEMENT + ("both",),
                        default="replicate",
                        help="FSDP: the frozen teacher replicated (fsdp_teacher's default) or "
                             "sharded (fsdp_teacher = shard)")


def run(args) -> int:
    if args.gpu_gib <= 0:
        raise FewstepError(f"--gpu-gib {args.gpu_gib:g}: give the memory of one GPU in GiB (> 0)")
    named = bool(args.preset)
    presets = args.preset or sorted(memory.paper_presets())
    worlds = args.world_size or [1, 8, 64]
    for preset in presets:
        memory.method_of(preset)  # did-you-mean before any work
    engines = memory.ENGINES if args.engine == "both" else (args.engine,)
    teachers = memory.TEACHER_PLACEMENT if args.teacher == "both" else (args.teacher,)
    rows, skipped = [], []
    for preset in presets:
        fits = [w for w in worlds if memory.preset_divides(preset, w)]
        if named and len(fits) < len(worlds):
            memory.preset_options(preset, next(w for w in worlds if w not in fits))  # the error
        skipped += [(preset, w) for w in worlds if w not in fits]
        rows += memory.plan_preset(preset, fits, engines, teachers)
    print(format_table(rows, args.gpu_gib))
    print_notes(presets, skipped)
    return 0


def gib(value: int) -> str:
    return f"{value / memory.GIB:.1f}"


def fits(row, gpu_gib: float) -> str:
    limit = gpu_gib * memory.GIB
    return "/".join("yes" if total <= limit else "no" for total in (row.total_ckpt, row.total_full))


def format_table(rows, gpu_gib: float) -> str:
    header = COLUMNS + (f"fits {gpu_gib:g} GiB (ckpt/full)",)
    body = [(r.preset, r.engine if r.engine == "ddp" else f"fsdp/{r.teacher}", str(r.world),
             str(r.batch), *map(gib, (r.weights, r.gradients, r.optimiser, r.ema, r.cast,
                                      r.act_ckpt, r.act_full, r.total_ckpt, r.total_full)),
             fits(r, gpu_gib)) for r in rows]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(line, widths))) for line in (header, *body)]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def print_notes(presets, skipped) -> None:
    print()
    print(LEGEND)
    for preset in presets:
        print(f"  {preset}: {memory.forwards_text(preset)}")
    for preset, world in skipped:
        print(f"skipped: {preset} at N = {world} (its global_batch is not divisible by {world})")
    for preset in presets:
        for note in memory.not_computed(preset):
            print(f"not counted for {preset}: {note}")
