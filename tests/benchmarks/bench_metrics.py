"""Benchmark (prints figures; not a test): images per second of each metric against the reference
package doing the same work, both measured side by side in this run, on the same images and
prompts, with random weights (no pretrained weights are needed or read).

Rows (--only picks some):
* toy_fid: the same work on both sides, ours = ToyFID's features of the set and FID against its
  cached reference statistics (shipped 16 px toy feature net), vs clean-fid's own `compute_fid` on
  the sample folder and a folder of the same reference renders, same extractor and resizer.
* toy_fid+CI: ours = the whole ToyFID.score (set checks, 1000-resample bootstrap CI, KID) against
  the same clean-fid call: the price of the CI and the gates.
* hpsv2.1: our HPSv2 metric vs the hpsv2 package's `img_score.score`, called once per prompt as
  users do; the package reloads the checkpoint on every call, which is part of its real cost.
  --arch full: open_clip's ViT-H-14 with random weights saved as an HPS checkpoint (3.9 GB) in a
  temporary weights cache, deleted afterwards; --arch tiny: the config of the parity test.
* imagereward: ImageRewardScore vs the package's own `ImageReward.score(prompt, path)` per image
  on the same model object. full: BLIP ViT-L/16 + BERT-base (THUDM's med_config) with a synthetic
  30522-entry bert vocab.txt; tiny: the parity test's setup.
* toy_geneval, toy_hps, toy_imagereward: ours only (no reference package exists).
* clip_score: ours vs a naive open_clip loop (one image and its prompt at a time), labelled so;
  full: ViT-L-14-quickgelu with random weights in the clip-l14-openai cache slot; tiny: the test's.

Each side is called once on a 2-image warm-up set first; that first call (model building
included) is reported as "load s". Then the timed calls score the whole set (time.perf_counter),
ours and the reference alternating, --repeat times (default 1), both models held at once; each
side's fastest call counts ("ours s", "ref s"). On a shared machine other load moves the figures:
use --repeat 3 where time allows.
"max|diff|" compares the values both sides returned (per-image scores; the FID value for
toy_fid), so the two sides are seen to do the same work. Toy rows score 16 px toy renders; the
other rows score toy renders at --size px. Peak resident memory is printed at the end.

    CPU:  .venv/bin/python tests/benchmarks/bench_metrics.py [--arch full|tiny] [--images N]
    GPU:  .venv/bin/python tests/benchmarks/bench_metrics.py --device cuda --batch 32 \\
              --only hpsv2.1 imagereward

Defaults: --arch full; --images 32 on the CPU with --arch tiny, 16 on the CPU with --arch full
(reduced: ViT-H-14 takes ~2 s an image on 2 idle CPU cores, and the package reloads the 3.9 GB
checkpoint once per prompt; 16 images took 4 min for the whole full run on an idle machine and
9.5 min on a busy one, and 32 would about double that), 64 on CUDA; --batch 16; --per-prompt 4
images per prompt; --size 512. Peak memory of the full run: ~13.5 GB (the HPSv2 row holds both
ViT-H-14 models while the package reloads its checkpoint).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # hpsv2_reference and the parity tests' tiny configs

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROWS = ("toy_fid", "toy_fid+CI", "hpsv2.1", "imagereward", "toy_geneval", "toy_hps", "toy_imagereward",
        "clip_score")
TOY_SIZE = 16                   # the shipped toy nets' resolution
FID_RENDERS_PER_PROMPT = 4      # toy_fid reference: renders per eval prompt (61 prompts)
BERT_VOCAB_SIZE = 30522         # bert-base-uncased; BLIP adds [DEC] and [ENC] -> 30524
THUDM_MED_CONFIG = {            # THUDM/ImageReward med_config.json (BLIP's BERT-base)
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02,
    "intermediate_size": 3072, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
    "model_type": "bert", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0,
    "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768,  # BLIP_Pretrain sets 1024
    "add_cross_attention": True}


def log(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ sample sets

@dataclass
class Images:
    """A sample set on disk: folder and its manifest rows (with image paths)."""
    folder: Path
    records: list[dict]

    @property
    def paths(self) -> list[Path]:
        return [self.folder / r["path"] for r in self.records]

    @property
    def prompts(self) -> list[str]:
        return [r["prompt"] for r in self.records]

    def __len__(self) -> int:
        return len(self.records)


def interleaved_prompts(n: int) -> list[dict]:
    """n eval-split prompts taken round-robin over the GenEval tasks (every task is timed)."""
    from fewstep.toy import world

    by_task: dict[str, list[dict]] = {}
    for meta in world.prompt_set("eval"):
        by_task.setdefault(meta["tag"], []).append(meta)
    out, queues = [], [by_task[t] for t in world.TASKS if t in by_task]
    while len(out) < n and any(queues):
        for queue in queues:
            if queue and len(out) < n:
                out.append(queue.pop(0))
    if len(out) < n:
        raise SystemExit(f"the toy eval split has {len(out)} prompts; lower --images or raise "
                         "--per-prompt")
    return out


def write_images(folder: Path, metas: list[dict], per_prompt: int, size: int) -> Images:
    """Toy renders of each prompt (seeds 0..per_prompt-1) at `size` px, as a sample set."""
    from fewstep.toy import world
    from metrics.sampleset import read_manifest, write_sample_set

    records = [{"prompt_id": m["prompt_id"], "prompt": m["prompt"], "seed": s, "family": "toy",
                "method": "bench", "nfe": 1, "meta": m} for m in metas for s in range(per_prompt)]
    images = np.stack([world.render(r["meta"], r["seed"], size)[0] for r in records])
    write_sample_set(folder, images, records)
    return Images(folder, read_manifest(folder)[0])


@dataclass
class Bench:
    """What every row needs: options, a scratch folder, the sample sets, the weights cache."""
    args: argparse.Namespace
    tmp: Path
    sets: dict = field(default_factory=dict)     # (toy|real, main|warm) -> Images

    @property
    def weights(self) -> Path:
        return self.tmp / "weights"

    @property
    def tiny(self) -> bool:
        return self.args.arch == "tiny"


def make_sets(bench: Bench) -> None:
    args = bench.args
    metas = interleaved_prompts(args.images // args.per_prompt)
    for kind, size in (("toy", TOY_SIZE), ("real", args.size)):
        main = write_images(bench.tmp / f"{kind}-main", metas, args.per_prompt, size)
        bench.sets[kind, "main"] = main
        warm = min(2, args.per_prompt)  # 2 images: FID needs 2; balanced prompts for GenEval
        bench.sets[kind, "warm"] = write_images(bench.tmp / f"{kind}-warm", metas[:2 // warm],
                                                warm, size)


# -------------------------------------------------------------------------------- measuring

@dataclass
class Side:
    """One implementation: run(images) -> values; close() releases what it holds."""
    run: Callable[[Images], np.ndarray]
    close: Callable[[], None] = lambda: None


@dataclass
class Row:
    name: str
    ours: Callable[[], Side]
    ref: Callable[[], Side] | None
    note: str
    ref_label: str = "package"
    cleanup: Callable[[], None] = lambda: None


@dataclass
class Timing:
    load_s: float
    run_s: float
    values: np.ndarray


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(side: Side, images: Images, device: str) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    values = np.asarray(side.run(images), dtype=np.float64)
    sync(device)
    return time.perf_counter() - start, values


def warmed(make_side: Callable[[], Side], warm: Images, device: str) -> tuple[Side, float]:
    """A side after its warm-up call, and that call's seconds (model building included)."""
    start = time.perf_counter()
    side = make_side()
    side.run(warm)
    sync(device)
    return side, time.perf_counter() - start


def measure_row(row: Row, warm: Images, main: Images, device: str, repeat: int) -> list[Timing]:
    """Both sides warmed up, then their timed calls alternated `repeat` times (ours, ref, ours,
    ref, ...), so load changes on a shared machine hit both; each side's fastest call counts."""
    makers = [("ours", row.ours), (row.ref_label, row.ref)]
    sides: list[tuple[Side, float]] = []
    try:
        for label, make in [(label, make) for label, make in makers if make is not None]:
            log(f"{row.name}: {label}: load + warm-up")
            sides.append(warmed(make, warm, device))
        runs: list[list] = [[] for _ in sides]
        for attempt in range(repeat):
            log(f"{row.name}: timed calls ({attempt + 1}/{repeat})")
            for (side, _), out in zip(sides, runs):
                out.append(timed(side, main, device))
        return [Timing(load_s, *min(out, key=lambda r: r[0])) for (_, load_s), out
                in zip(sides, runs)]
    finally:
        for side, _ in sides:
            side.close()
        sides.clear()
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def result_values(result, key: str) -> np.ndarray:
    return np.array([row[key] for row in result.per_sample], dtype=np.float64)


# --------------------------------------------------------------------------------- toy rows

def shipped_net(role: str) -> Path:
    from fewstep.toy.features import shipped_feature_net
    return shipped_feature_net(TOY_SIZE, role)


def cleanfid_side(bench: Bench, ref_folder: Path) -> Side:
    """clean-fid's compute_fid between the sample folder and the reference renders folder."""
    from cleanfid import fid as cfid

    from fewstep.toy.features import load_feature_net, toy_feature_extractor
    from metrics.fid import clean_resizer, single_blas_thread

    extractor = toy_feature_extractor(load_feature_net(shipped_net("fid")))

    def run(images: Images) -> np.ndarray:
        with single_blas_thread(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # scipy's sqrtm(disp=)
            value = cfid.compute_fid(str(images.folder), str(ref_folder), mode="clean",
                                     custom_feat_extractor=extractor,
                                     custom_fn_resize=clean_resizer(TOY_SIZE),
                                     device=torch.device(bench.args.device), num_workers=0,
                                     batch_size=bench.args.batch, verbose=False)
        return np.array([value])
    return Side(run)


def toy_fid_rows(bench: Bench, full: bool) -> Row:
    """full=False: ours does the reference's work (features of the set, FID against the cached
    reference statistics); full=True: the whole metric (set checks, 1000-resample CI, KID)."""
    from metrics.fid import (ReferenceSpec, ToyFID, _render_reference_folder, frechet_distance,
                             gaussian_stats)
    from metrics.sampleset import load_sample_set

    spec = ReferenceSpec("eval", None, FID_RENDERS_PER_PROMPT, resolution=TOY_SIZE)
    ref_folder = bench.tmp / ("fid-reference-full" if full else "fid-reference")
    ref_folder.mkdir()
    n_ref = len(_render_reference_folder(spec, ref_folder))

    def ours() -> Side:
        metric = ToyFID(feature_net=shipped_net("fid"), renders_per_prompt=FID_RENDERS_PER_PROMPT,
                        cache_dir=bench.tmp / "cache", device=bench.args.device,
                        batch_size=bench.args.batch)
        if full:
            return Side(lambda images: np.array([metric.score(images.folder).value]))
        ref = metric.reference(TOY_SIZE)

        def value(images: Images) -> np.ndarray:
            feats = metric.features(load_sample_set(images.folder))
            mu, sigma = gaussian_stats(feats)
            return np.array([frechet_distance(mu, sigma, ref.mu, ref.sigma, ref.sqrt_sigma)])
        return Side(value)

    note = (f"ours: the whole metric (set checks, 1000-resample CI, KID); ref: FID only, "
            f"featurising its {n_ref} reference renders per call" if full else
            "same work: features + FID (ours reads its reference statistics from its cache)")
    return Row("toy_fid+CI" if full else "toy_fid", ours,
               lambda: cleanfid_side(bench, ref_folder), note, "clean-fid")


def row_toy_geneval(bench: Bench) -> Row:
    from metrics.geneval import ToyGenEval

    def ours() -> Side:
        metric = ToyGenEval(require_all_tasks=False)
        return Side(lambda images: result_values(metric.score(images.folder), "score"))
    return Row("toy_geneval", ours, None, "no reference package (toy exact detector; official "
               "GenEval needs Mask2Former)")


def row_toy_preference(bench: Bench, slot: str) -> Row:
    from metrics.toy_preference import ToyPreference

    def ours() -> Side:
        metric = ToyPreference(slot=slot, batch_size=bench.args.batch)
        return Side(lambda images: result_values(metric.score(images.folder), "score"))
    return Row(slot, ours, None, "no reference package (a toy stand-in net, fewstep only)")


# ------------------------------------------------------------------------------------ HPSv2

def write_hps_checkpoint(bench: Bench) -> Path:
    """Random weights in the HPS layout ({"state_dict": ...}) at the cache's v2.1 path."""
    from open_clip.model import CLIP

    from metrics.hpsv2 import CHECKPOINTS, model_config
    from test_metric_hpsv2 import tiny_model  # the parity test's tiny model (widened weights)

    path = bench.weights / CHECKPOINTS["v2.1"].path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = tiny_model(0) if bench.tiny else CLIP(**model_config(None)).eval()
    torch.save({"state_dict": model.state_dict()}, path)
    del model
    gc.collect()
    return path


def hps_package_side(bench: Bench, checkpoint: Path) -> Side:
    from hpsv2_reference import adapted_hpsv2, redirected_scoring, scores_per_prompt
    from test_metric_hpsv2 import TINY_CONFIG, TINY_NAME

    configs, name = ({TINY_NAME: TINY_CONFIG}, TINY_NAME) if bench.tiny else (None, "ViT-H-14")
    stack = contextlib.ExitStack()
    package = stack.enter_context(adapted_hpsv2(configs))
    img_score = stack.enter_context(redirected_scoring(package, name, bench.args.device,
                                                       bench.tmp / "hps-root"))
    return Side(lambda images: scores_per_prompt(img_score, images.paths, images.prompts,
                                                 checkpoint), stack.close)


def row_hpsv2(bench: Bench) -> Row:
    from metrics.hpsv2 import HPSv2
    from test_metric_hpsv2 import TINY_CONFIG

    log(f"hpsv2.1: writing a random {'tiny' if bench.tiny else 'ViT-H-14'} HPS checkpoint")
    checkpoint = write_hps_checkpoint(bench)
    log(f"hpsv2.1: {checkpoint.stat().st_size / 2**30:.2f} GiB written")

    def ours() -> Side:
        from fewstep.backbones.weights import file_sha256

        # a random checkpoint is not the published one: pinned by its own hash
        metric = HPSv2(model_config=TINY_CONFIG if bench.tiny else None, device=bench.args.device,
                       batch_size=bench.args.batch, expected_sha256=file_sha256(checkpoint))
        return Side(lambda images: result_values(metric.score(images.folder), "cosine"))

    note = "ref: img_score.score once per prompt; reloads the checkpoint per call"
    return Row("hpsv2.1", ours, lambda: hps_package_side(bench, checkpoint), note,
               cleanup=lambda: checkpoint.unlink())


# ------------------------------------------------------------------------------ ImageReward

def bert_vocab(size: int = BERT_VOCAB_SIZE) -> list[str]:
    """A bert-base-uncased-like vocab.txt: [PAD], [unused*], [UNK] [CLS] [SEP] [MASK] at their
    usual ids, characters and word pieces, the toy prompts' words, then filler up to `size`."""
    from fewstep.toy import world

    letters = "abcdefghijklmnopqrstuvwxyz"
    head = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = [*"!\"&'(),-.:;?", *"0123456789", *letters, *(f"##{c}" for c in letters)]
    words = sorted(set(world.VOCAB) | {"an", "the", "on", "to", "cat", "dog", "painting", "with"})
    vocab = head + pieces + [w for w in words if w not in pieces]
    filler = (f"[unused{i}]" for i in range(99, 99 + size))
    return vocab + [next(filler) for _ in range(size - len(vocab))]


def write_image_reward_files(bench: Bench) -> dict | None:
    """med_config.json, vocab.txt and a random ImageReward.pt in the cache; the ViT config for
    tiny (None: the package's ViT-L/16)."""
    from metrics.image_reward import WEIGHTS
    from metrics.image_reward_compat import build_image_reward
    from test_metric_image_reward import SPECIAL, VISION, WORDS, med_config

    folder, vocab_file = bench.weights / "imagereward", bench.weights / WEIGHTS["tokenizer"].path
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file.parent.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + WORDS if bench.tiny else bert_vocab()
    vocab_file.write_text("\n".join(vocab) + "\n")
    config = med_config(len(vocab) + 2) if bench.tiny else THUDM_MED_CONFIG
    (folder / "med_config.json").write_text(json.dumps(config))
    vision = VISION if bench.tiny else None
    torch.manual_seed(0)
    model = build_image_reward(folder / "med_config.json", vocab_file.parent, vision=vision)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    torch.save(state, folder / "ImageReward.pt")
    return vision


def row_image_reward(bench: Bench) -> Row:
    from metrics.image_reward import WEIGHTS, ImageRewardScore

    log(f"imagereward: writing a random {'tiny' if bench.tiny else 'ViT-L/16 + BERT-base'} model")
    vision = write_image_reward_files(bench)
    shared: dict = {}

    def ours() -> Side:
        from fewstep.backbones.weights import file_sha256

        # a random checkpoint is not the published one: pinned by its own hash
        pin = file_sha256(bench.weights / WEIGHTS["checkpoint"].path)
        shared["metric"] = ImageRewardScore(vision_config=vision, device=bench.args.device,
                                            batch_size=bench.args.batch, expected_sha256=pin)
        return Side(lambda images: result_values(shared["metric"].score(images.folder), "score"))

    def package() -> Side:
        model = shared["metric"].loaded().model  # the package's ImageReward object
        return Side(lambda images: np.array([model.score(p, str(path)) for p, path
                                             in zip(images.prompts, images.paths)]))

    note = "ref: ImageReward.score(prompt, path) per image, same model (no build)"
    return Row("imagereward", ours, package, note,
               cleanup=lambda: (shared.clear(), shutil.rmtree(bench.weights / "imagereward")))


# ------------------------------------------------------------------------------- CLIP score

def clip_variant(bench: Bench):
    """(variant, weights file): the tiny test model, or ViT-L-14-quickgelu in clip-l14-openai's
    cache slot; random weights saved as open_clip's safetensors file."""
    import open_clip
    from safetensors.torch import save_file

    from metrics.base import WeightFile
    from metrics.clip_score import VARIANTS, CLIPVariant
    from test_metric_clip_score import TINY, TINY_CONFIG

    if bench.tiny:
        config = bench.tmp / f"{TINY}.json"
        config.write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(config)
        entry = "clip/tiny/open_clip_model.safetensors"
        variant = CLIPVariant("tiny-bench", TINY, "random-init", WeightFile(entry, "random"))
    else:
        variant = VARIANTS["clip-l14-openai"]
        entry = variant.weights.path.split("|")[0]
    path = bench.weights / entry
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = open_clip.create_model(variant.model_name).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return variant, path


def naive_clip_side(variant, path: Path, device: str) -> Side:
    """Plain open_clip: each image and its prompt encoded on their own, normalised, dotted."""
    import open_clip
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(
        variant.model_name, pretrained=str(path), device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(variant.model_name)

    def one(path_: Path, prompt: str) -> float:
        with torch.no_grad(), Image.open(path_) as image:
            e_img = model.encode_image(preprocess(image.convert("RGB"))[None].to(device))
            e_txt = model.encode_text(tokenizer([prompt]).to(device))
        return float((e_img / e_img.norm()) @ (e_txt / e_txt.norm()).T)

    return Side(lambda images: np.array([one(p, q) for p, q in zip(images.paths, images.prompts)]))


def row_clip_score(bench: Bench) -> Row:
    from metrics.clip_score import CLIPScore

    log(f"clip_score: writing a random {'tiny' if bench.tiny else 'ViT-L-14-quickgelu'} model")
    variant, path = clip_variant(bench)

    def ours() -> Side:
        metric = CLIPScore(variant=variant, device=bench.args.device, batch_size=bench.args.batch)
        return Side(lambda images: result_values(metric.score(images.folder), "cosine"))

    note = "no reference package; ref: naive open_clip loop, 1 image + prompt a step"
    return Row("clip_score", ours, lambda: naive_clip_side(variant, path, bench.args.device),
               note, "naive loop", cleanup=lambda: path.unlink())


# ------------------------------------------------------------------------------------ table

BUILDERS = {"toy_fid": lambda b: toy_fid_rows(b, full=False),
            "toy_fid+CI": lambda b: toy_fid_rows(b, full=True), "hpsv2.1": row_hpsv2, "imagereward": row_image_reward,
            "toy_geneval": row_toy_geneval,
            "toy_hps": lambda b: row_toy_preference(b, "toy_hps"),
            "toy_imagereward": lambda b: row_toy_preference(b, "toy_imagereward"),
            "clip_score": row_clip_score}
HEADER = (f"{'metric':15} {'ref':10} {'ours img/s':>10} {'ref img/s':>9} {'ours/ref':>8} "
          f"{'ours s':>8} {'ref s':>8} {'ours load s':>11} {'ref load s':>10} {'max|diff|':>9}"
          "  note")


def fmt(value: float | None, width: int, spec: str) -> str:
    return f"{'—':>{width}}" if value is None else f"{value:{width}{spec}}"


def format_row(row: Row, n: int, ours: Timing, ref: Timing | None) -> str:
    ref_ips = n / ref.run_s if ref else None
    diff = float(np.max(np.abs(ours.values - ref.values))) if ref else None
    return (f"{row.name:15} {row.ref_label if ref else '—':10} {fmt(n / ours.run_s, 10, '.3f')} "
            f"{fmt(ref_ips, 9, '.3f')} {fmt(ref_ips and (n / ours.run_s) / ref_ips, 8, '.2f')} "
            f"{fmt(ours.run_s, 8, '.2f')} {fmt(ref and ref.run_s, 8, '.2f')} "
            f"{fmt(ours.load_s, 11, '.2f')} {fmt(ref and ref.load_s, 10, '.2f')} "
            f"{fmt(diff, 9, '.1e')}  {row.note}")


def run_row(bench: Bench, name: str) -> str:
    row = BUILDERS[name](bench)
    kind = "toy" if name.startswith("toy_") else "real"
    warm, main = bench.sets[kind, "warm"], bench.sets[kind, "main"]
    try:
        timings = measure_row(row, warm, main, bench.args.device, bench.args.repeat)
        return format_row(row, len(main), timings[0], timings[1] if row.ref else None)
    finally:
        row.cleanup()
        gc.collect()


# ------------------------------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=None,
                   help="images per set (default: CPU 32, CPU --arch full 16, CUDA 64)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--only", nargs="+", choices=ROWS, default=list(ROWS), metavar="NAME",
                   help=f"rows to run, of {', '.join(ROWS)}")
    p.add_argument("--arch", choices=["full", "tiny"], default="full")
    p.add_argument("--per-prompt", type=int, default=4, help="images per prompt")
    p.add_argument("--size", type=int, default=512, help="px of the images of non-toy rows")
    p.add_argument("--repeat", type=int, default=1,
                   help="timed calls per side, alternating; the fastest counts")
    args = p.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.images is None:
        args.images = 64 if args.device == "cuda" else (16 if args.arch == "full" else 32)
    n_prompts = max(1, math.ceil(args.images / args.per_prompt))
    args.images = n_prompts * args.per_prompt  # every prompt gets the same number of images
    return args


def print_context(args: argparse.Namespace) -> None:
    device = args.device
    if device == "cuda":
        device += f" ({torch.cuda.get_device_name(0)})"
    print(f"torch {torch.__version__}, device {device}, torch threads {torch.get_num_threads()} "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), arch {args.arch}")
    print(f"{args.images} images ({args.images // args.per_prompt} prompts x {args.per_prompt}); "
          f"toy rows {TOY_SIZE} px, other rows {args.size} px; batch {args.batch}")


def main():
    args = parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # the packages' timm/amp imports
    tmp = Path(tempfile.mkdtemp(prefix="fewstep-bench-metrics-"))
    os.environ["FEWSTEP_WEIGHTS"] = str(tmp / "weights")  # the temporary weights cache
    bench = Bench(args, tmp)
    try:
        print_context(args)
        make_sets(bench)
        print(HEADER, flush=True)
        for name in [r for r in ROWS if r in args.only]:
            print(run_row(bench, name), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
