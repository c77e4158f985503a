"""fewstep metric-corr: the correlation matrix of the toy metrics on a fixed image set.

The toy world's metric slots must measure different things, as the real ones do (HPSv2 a
preference, ImageReward prompt alignment, the training reward of a reward-guided method a third
model). This command scores one fixed set with each toy metric's per-image score and prints the
Pearson (or Spearman) matrix; tests/test_toy_metric_independence.py recomputes it, checks that no
two toy metrics correlate above 0.9 in absolute value, and that it equals the matrix recorded in
the metrics' identities (metrics.toy_reward.CORRELATIONS).

The fixed set (16 px, seeds 0 and 1 of every held-out eval prompt):
- clean renders of the prompts (what a perfect generator draws);
- the same renders degraded (noise, blur, tint or ghosting, random strength; the feature nets'
  degradation recipe), scored against their own prompt: aligned but of poor quality;
- the same renders shuffled across prompts, scored against the wrong prompt: clean but misaligned;
- samples of the shipped toy teachers (SDXL, SD3, SiT) at 1, 2 and 4 steps: what generators draw.
"""
from __future__ import annotations

import json

import numpy as np

METRICS = ("toy_hps", "toy_imagereward", "toy_reward", "toy_geneval")
DEGRADATIONS = ("clean", "noise", "blur", "tint", "ghost")
FAMILIES = ("sdxl", "sd3", "sit")
SIT_PROMPTS = 24  # SiT's eval rows: each of its classes repeated (fewstep.selection.toy_eval_rows)


def add_arguments(p):
    p.add_argument("--res", type=int, default=16, help="image size (the shipped nets see 16 px)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="render/sample seeds")
    p.add_argument("--teacher-steps", type=int, nargs="*", default=[1, 2, 4],
                   help="shipped toy teachers' sampler steps in the set (none: renders only)")
    p.add_argument("--reward-net", default=None,
                   help="the training reward's net (default: the shipped seed-1 net, which the "
                        "DAG's reward_net rule reproduces)")
    p.add_argument("--method", choices=["pearson", "spearman"], default="pearson")
    p.add_argument("--json", action="store_true",
                   help="also print the matrix rounded to 2 decimals as JSON (the form recorded in "
                        "metrics.toy_reward.CORRELATIONS, with the set's n_images)")


def render_sets(res: int, seeds) -> dict:
    """name -> (images01 (N, 3, S, S), metas): clean, degraded and prompt-shuffled renders."""
    import torch

    from fewstep.toy import world
    from fewstep.toy.features import degrade_batch

    rows = world.prompt_set("eval")
    metas = [m for m in rows for _ in seeds]
    images = np.stack([world.render(m, s, res)[0] for m in rows for s in seeds])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    degraded, _ = degrade_batch(x, np.random.default_rng(0), 1.0, DEGRADATIONS)
    shuffled = x[np.random.default_rng(1).permutation(len(x))]
    return {"renders": (x, metas), "degraded": (degraded, metas), "mismatched": (shuffled, metas)}


def teacher_sets(res: int, seeds, steps) -> dict:
    """name -> (images01, metas): each shipped toy teacher at each step count, 8-bit quantised."""
    import torch

    from fewstep.sampling import sample_images
    from fewstep.selection import toy_eval_rows
    from fewstep.toy import teachers, world

    out = {}
    for family in FAMILIES if steps else ():
        n_rows = SIT_PROMPTS if family == "sit" else len(world.prompt_set("eval"))
        rows = toy_eval_rows(family, n_rows)
        teacher = teachers.load(teachers.SHIPPED / family).eval()
        for n in steps:
            images, jobs = sample_images(teacher, rows, list(seeds), steps=n, guidance=1.0,
                                         batch=64)
            if images.shape[-1] != res:
                raise ValueError(f"the shipped {family} teacher draws {images.shape[-1]} px "
                                 f"images; --res {res} needs --teacher-steps with no value")
            images = torch.round(images.clamp(0, 1) * 255) / 255  # as sample sets store them
            out[f"{family}@{n}"] = (images, [r for r, _ in jobs])
    return out


def fixed_set(res: int = 16, seeds=(0, 1), teacher_steps=(1, 2, 4)):
    """(images01, metas, parts): the concatenated fixed set and {part: count}."""
    import torch

    parts = {**render_sets(res, seeds), **teacher_sets(res, seeds, teacher_steps)}
    images = torch.cat([x for x, _ in parts.values()])
    metas = [m for _, ms in parts.values() for m in ms]
    return images, metas, {name: len(ms) for name, (_, ms) in parts.items()}


def geneval_scores(images01, metas) -> np.ndarray:
    """toy GenEval's per-image correctness (1/0) with its exact detector."""
    from metrics.geneval import ToyExactDetector, evaluate_image

    detector = ToyExactDetector()
    u8 = (images01 * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return np.array([float(evaluate_image(m, detector.detect(im), im)[0])
                     for m, im in zip(metas, u8)])


def metric_scores(images01, metas, reward_net=None, batch: int = 256) -> dict:
    """name -> per-image scores (N,) of every toy metric and of the training reward."""
    import torch

    from fewstep.toy.features import shipped_feature_net
    from metrics.toy_preference import ToyHPS, ToyImageReward
    from metrics.toy_reward import load_toy_reward

    size = images01.shape[-1]
    scorers = {"toy_hps": ToyHPS().reward(size), "toy_imagereward": ToyImageReward().reward(size),
               "toy_reward": load_toy_reward(reward_net or shipped_feature_net(size, "reward"))}
    out = {}
    for name, scorer in scorers.items():
        with torch.no_grad():
            out[name] = torch.cat([scorer(images01[i:i + batch], metas[i:i + batch]).double()
                                   for i in range(0, len(metas), batch)]).numpy()
    out["toy_geneval"] = geneval_scores(images01, metas)
    return out


def correlation_matrix(scores: dict, method: str = "pearson") -> dict:
    """{a: {b: r}} over the metrics in METRICS order (Pearson, or Spearman: Pearson of ranks)."""
    from scipy.stats import rankdata

    names = [n for n in METRICS if n in scores]
    rows = np.stack([rankdata(scores[n]) if method == "spearman" else scores[n] for n in names])
    r = np.corrcoef(rows)
    return {a: {b: float(r[i, j]) for j, b in enumerate(names)} for i, a in enumerate(names)}


def rounded(matrix: dict, digits: int = 2) -> dict:
    return {a: {b: round(v, digits) for b, v in row.items()} for a, row in matrix.items()}


def format_matrix(matrix: dict) -> str:
    names = list(matrix)
    width = max(len(n) for n in names) + 2
    lines = [" " * width + "".join(f"{n:>{width}}" for n in names)]
    lines += [f"{a:<{width}}" + "".join(f"{matrix[a][b]:>{width}.3f}" for b in names)
              for a in names]
    return "\n".join(lines)


def run(args):
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is fastest on a shared CPU
    try:
        images, metas, parts = fixed_set(args.res, tuple(args.seeds), tuple(args.teacher_steps))
        matrix = correlation_matrix(metric_scores(images, metas, args.reward_net), args.method)
    finally:
        torch.set_num_threads(previous)
    print(f"{args.method} correlation of per-image scores on {len(metas)} images "
          f"({', '.join(f'{k} {v}' for k, v in parts.items())}):")
    print(format_matrix(matrix))
    worst = max((abs(v), a, b) for a, row in matrix.items() for b, v in row.items() if a < b)
    print(f"largest |r| between two metrics: {worst[0]:.3f} ({worst[1]}, {worst[2]})")
    if args.json:
        print(json.dumps({"n_images": len(metas), args.method: rounded(matrix)}))
