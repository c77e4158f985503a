"""GenEval's official folder layout (djghosh13/geneval), for the real-world route.

* The 553-prompt metadata file, its checks and task tables are core (fewstep.geneval_prompts:
  `read_metadata`), since the prompt sets read it while the DAG is parsed.
* A fewstep sample set is written into the official layout `<root>/<00000>/metadata.jsonl` +
  `samples/<0000>.png` (sec. 4.2) for the exact legacy evaluator (route A), after asserting
  553 folders x 4 PNGs; the evaluator's result lines are read back with the count asserted
  (2,212), because the official scripts silently shrink the denominator (sec. 4.7).

Route A, "geneval-legacy" (the exact evaluator, sec. 4.3 and 4.8 A), step by step:
1. An isolated environment, separate from fewstep's: python 3.9, torch 1.12.1+cu113 (with
   torchvision 0.13.1+cu113), mmcv-full 1.7.1 compiled for the GPU's architecture (e.g.
   `MMCV_WITH_OPS=1 TORCH_CUDA_ARCH_LIST=<arch> pip install mmcv-full==1.7.1`; a build without
   the GPU's architecture fails silently on newer GPUs, as GenEval's users report; a GPU that
   cu113 cannot drive needs torch <= 2.1 with a matching CUDA instead, named in the result),
   mmdet 2.27.0 installed from a checkout of open-mmlab/mmdetection's 2.x source (tag v2.27.0)
   for its configs, open-clip-torch 2.20.0, clip-benchmark 1.4.0, and a checkout of
   djghosh13/geneval (its evaluation/ folder holds the script and object_names.txt).
2. Weights (sec. 6): the mmdet 2.x checkpoint saved as
   `$FEWSTEP_WEIGHTS/geneval/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth` and the config
   with its base chain under `$FEWSTEP_WEIGHTS/geneval/configs/`. open_clip 2.20 fetches the
   OpenAI ViT-L-14 weights on first use; on an offline machine put them in its cache first.
3. In fewstep: `write_official_layout(sample_set_folder, root)` writes
   `<root>/<5-digit prompt id>/metadata.jsonl` (the record's GenEval "meta", without prompt_id)
   and `samples/<0000..0003>.png` (images ordered by seed); it refuses a set that is not 553
   prompts x 4 images unless require_complete=False. The prompt ids must be the 5-digit line
   indices that `read_metadata` assigns (the evaluator skips folders not named by digits).
4. Run as a subprocess in the legacy environment (CUDA only):
   `python evaluation/evaluate_images.py <root> --outfile <out>/results.jsonl
   --model-path $FEWSTEP_WEIGHTS/geneval
   --model-config $FEWSTEP_WEIGHTS/geneval/configs/mask2former/<config>.py`, with <config> =
   mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco, the base name the script also expects for
   the checkpoint; its defaults are GenEval's thresholds (0.3, counting 0.9, 16 objects,
   overlap 1.0, position margin 0.1).
5. `read_official_results(<out>/results.jsonl)` reads the result lines back as per-image rows
   (prompt_id from the folder name, image, tag, score 1/0, reason) and raises unless there are
   exactly 2,212 lines (553 x 4).
Sections (sec. N) are those of metrics/notes/metrics.md.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from fewstep.geneval_prompts import TASK_SIZES
from fewstep.io import json_lines
from metrics.sampleset import load_sample_set

IMAGES_PER_PROMPT = 4


def write_official_layout(sample_set_folder, root, require_complete: bool = True) -> Path:
    """Copy a GenEval sample set into the official tree; refuse an incomplete one."""
    ss = load_sample_set(sample_set_folder)
    by_prompt: dict[str, list[int]] = {}
    for i, rec in enumerate(ss.records):
        by_prompt.setdefault(rec["prompt_id"], []).append(i)
    short = {p: len(ix) for p, ix in by_prompt.items() if len(ix) != IMAGES_PER_PROMPT}
    n_official = sum(TASK_SIZES.values())
    if require_complete and (len(by_prompt) != n_official or short):
        raise ValueError(f"{ss.folder}: {len(by_prompt)} prompts (need {n_official}) and "
                         f"{len(short)} with other than {IMAGES_PER_PROMPT} images (e.g. "
                         f"{list(short.items())[:3]}); the official evaluator would silently "
                         "shrink its denominator, so the tree is not written")
    root = Path(root)
    for pid, indices in sorted(by_prompt.items()):
        folder = root / pid
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in ss.records[indices[0]]["meta"].items() if k != "prompt_id"}
        (folder / "metadata.jsonl").write_text(json.dumps(meta) + "\n")
        for k, i in enumerate(sorted(indices, key=lambda i: ss.records[i]["seed"])):
            shutil.copyfile(ss.folder / ss.records[i]["path"], folder / "samples" / f"{k:04d}.png")
    return root


def read_official_results(path, expected_images: int = sum(TASK_SIZES.values()) * IMAGES_PER_PROMPT):
    """The legacy evaluator's result lines as per-image rows; the count must be the full set."""
    rows = [json.loads(line) for line in json_lines(Path(path).read_text())]
    if len(rows) != expected_images:
        raise ValueError(f"{path}: {len(rows)} result lines, expected {expected_images}: the "
                         "evaluator skipped images (missing folders, non-PNG files); fix the tree "
                         "and rerun rather than report a smaller denominator")
    out = []
    for row in rows:
        parts = Path(row["filename"]).parts
        out.append({"prompt_id": parts[-3], "image": parts[-1], "tag": row["tag"],
                    "score": float(bool(row["correct"])), "reason": row.get("reason", "")})
    return out
