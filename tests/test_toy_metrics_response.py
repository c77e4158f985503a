"""The toy metrics respond the right way on real data: ground-truth
renders of the held-out prompts score better than each shipped teacher's one-step samples (NFE 1)
on every toy metric, on the same prompts and seeds, with the DAG's scorer settings."""
import argparse
import json

import numpy as np
import pytest
import torch

from fewstep.commands.prompts import eval_prompts
from fewstep.sampling import sample_images
from fewstep.io import write_text
from fewstep.scoring import build_metric
from fewstep.toy import teachers, world
from fewstep.toy.features import shipped_feature_net
from metrics.sampleset import write_sample_set

RES = 16
SEEDS = (0, 1, 2, 3)
N_PROMPTS = 40
TOY_METRICS = ("toy_fid", "toy_geneval", "toy_hps", "toy_imagereward")


def records(rows, family, method, nfe):
    return [{"prompt_id": r["prompt_id"], "prompt": r["prompt"], "seed": s, "family": family,
             "method": method, "nfe": nfe, "meta": r} for r in rows for s in SEEDS]


@pytest.fixture(scope="module", params=["sdxl", "sd3", "sit"])
def scored(request, tmp_path_factory):
    family, root = request.param, tmp_path_factory.mktemp(request.param)
    rows = eval_prompts(family, N_PROMPTS)
    prompts = root / "prompts.jsonl"
    write_text(prompts, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    teacher = teachers.load(teachers.SHIPPED / family).eval()
    torch.manual_seed(0)
    images, _ = sample_images(teacher, rows, SEEDS, steps=1, guidance=1.0, batch=64)
    write_sample_set(root / "teacher", images, records(rows, family, "teacher", 1))
    renders = np.stack([world.render(r, s, RES)[0] for r in rows for s in SEEDS])
    write_sample_set(root / "renders", renders, records(rows, family, "render", 0))
    args = argparse.Namespace(prompts=str(prompts), feature_net=str(shipped_feature_net(RES)),
                              reference_images=500, cache=str(root / "cache"), resamples=200,
                              confidence=0.95, bootstrap_seed=0, metric_options={})
    expected = [(r["prompt_id"], s) for r in rows for s in SEEDS]
    out = {}
    for name in TOY_METRICS:
        metric = build_metric(name, args, rows)
        out[name] = {kind: metric.score(root / kind, expected=expected, resolution=RES,
                                        allow_blank=True) for kind in ("teacher", "renders")}
    return family, out


@pytest.mark.parametrize("name", TOY_METRICS)
def test_renders_beat_the_teachers_single_step(scored, name):
    family, results = scored
    teacher, renders = results[name]["teacher"], results[name]["renders"]
    better = renders.value > teacher.value if renders.higher_is_better else renders.value < teacher.value
    assert better, (f"{family} {name}: renders {renders.value:.4f} vs teacher NFE 1 "
                    f"{teacher.value:.4f}")
