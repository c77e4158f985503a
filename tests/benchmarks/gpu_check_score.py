"""The GPU check's scoring rows: HPSv2.1 and ImageReward images per second at batch 32 through the
harness's metrics (metrics/hpsv2.py, metrics/image_reward.py) against the reference packages
(hpsv2 1.2.0's img_score.score, once per prompt as its users call it, reloading the checkpoint;
image-reward 1.5's ImageReward.score per image), on the same images and prompts, with random
weights in the real classes. The rows, models and timing are tests/benchmarks/bench_metrics.py's
(row_hpsv2, row_image_reward, measure_row): full size is open_clip's ViT-H-14 (HPSv2.1) and BLIP
ViT-L/16 + BERT-base (ImageReward); toy size the parity tests' tiny configurations.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import bench_metrics as bm

ROWS = {"hpsv2.1": bm.row_hpsv2, "imagereward": bm.row_image_reward}


def bench_args(device: str, size: str, batch: int, images: int, repeat: int) -> argparse.Namespace:
    # 16 images per prompt: the package reloads the HPS checkpoint (3.9 GB) once per prompt
    per_prompt = min(16, images)
    return argparse.Namespace(device=device, batch=batch, arch="full" if size == "full" else "tiny",
                              images=images, per_prompt=per_prompt,
                              size=512 if size == "full" else 64, repeat=repeat)


class Scoring:
    """A temporary weights cache and the sample sets, shared by the scoring rows."""

    def __init__(self, device: str, size: str, batch: int, images: int, repeat: int):
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-check-score-"))
        self.saved_weights = os.environ.get("FEWSTEP_WEIGHTS")
        os.environ["FEWSTEP_WEIGHTS"] = str(self.tmp / "weights")
        self.bench = bm.Bench(bench_args(device, size, batch, images, repeat), self.tmp)
        bm.make_sets(self.bench)

    def rates(self, name: str) -> tuple[float, float, str]:
        """(ours images/s, package images/s, note) of one row, measured side by side."""
        row = ROWS[name](self.bench)
        warm, main = self.bench.sets["real", "warm"], self.bench.sets["real", "main"]
        args = self.bench.args
        try:
            ours, ref = bm.measure_row(row, warm, main, args.device, args.repeat)
        finally:
            row.cleanup()
        diff = float(abs(ours.values - ref.values).max())
        note = (f"{len(main)} images of {args.size} px, {len(main) // args.per_prompt} prompts, "
                f"max|diff| {diff:.1e}; {row.note}")
        return len(main) / ours.run_s, len(main) / ref.run_s, note

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.saved_weights is None:
            os.environ.pop("FEWSTEP_WEIGHTS", None)
        else:
            os.environ["FEWSTEP_WEIGHTS"] = self.saved_weights
