"""Plots and sample grids of the HTML report, written as PNG files (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fewstep.reporting.tables import method_label, seed_order


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt
    return plt


def _errorbar(ax, rows, x_of, metric, **kw):
    xs = [x_of(r) for r in rows]
    ys = np.array([r["results"][metric]["value"] for r in rows])
    err = np.array([[y - r["results"][metric]["ci_low"], r["results"][metric]["ci_high"] - y]
                    for y, r in zip(ys, rows)]).T
    return ax.errorbar(xs, ys, yerr=err, capsize=3, **kw)


def seed_points(row: dict, metric: str) -> list[float]:
    """A student cell's per-training-seed values in seed order ([] for a teacher set or a cell of
    one seed, whose mean is its one value)."""
    if row["method"] == "teacher":
        return []
    per_seed = (row["results"][metric].get("details") or {}).get("per_seed") or {}
    if len(per_seed) < 2:
        return []
    return [per_seed[s] for s in sorted(per_seed, key=seed_order)]


def quality_plot(rows: list[dict], metric: str, x: str, out: Path) -> Path:
    """metric against NFE (x="nfe") or measured latency (x="latency"): the teacher as a line over
    its step counts, each student as a point (its mean over training seeds) with each seed's
    value as a small hollow mark beside it, CIs as error bars."""
    plt = _pyplot()

    def x_of(r):
        if x == "nfe":
            return r["nfe"]
        return ((r.get("sampling_provenance") or {}).get("timing") or {}).get("latency_s")

    rows = [r for r in rows if metric in r["results"] and x_of(r) is not None]
    fig, ax = plt.subplots(figsize=(4.2, 3.2), dpi=100)
    teacher = sorted((r for r in rows if r["method"] == "teacher"), key=x_of)
    if teacher:
        _errorbar(ax, teacher, x_of, metric, fmt="-o", color="black", label="teacher")
    for r in (r for r in rows if r["method"] != "teacher"):
        line = _errorbar(ax, [r], x_of, metric, fmt="s", label=method_label(r))
        seeds = seed_points(r, metric)
        if seeds:
            ax.scatter([x_of(r)] * len(seeds), seeds, s=12, facecolors="none", linewidths=0.8,
                       edgecolors=line[0].get_color())
    ax.set_xscale("log")
    from matplotlib.ticker import LogLocator, ScalarFormatter
    ax.xaxis.set_major_formatter(ScalarFormatter())   # 2, 4, 8 rather than 2x10^0
    ax.xaxis.set_minor_locator(LogLocator(subs="all"))
    if x == "nfe" and rows:  # label the NFEs shown (2, 4, 8), not 4x10^0 on the minor ticks
        from matplotlib.ticker import NullFormatter
        ax.set_xticks(sorted({x_of(r) for r in rows}))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("NFE" if x == "nfe" else "latency per image (s, batch 1)")
    up = rows[0]["results"][metric]["higher_is_better"] if rows else True
    ax.set_ylabel(f"{metric} {'↑' if up else '↓'}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def training_cost_plot(rows: list[dict], out: Path) -> Path | None:
    """Training wall time of each student (summed over resumes), per family."""
    students = [r for r in rows if r["method"] != "teacher"
                and "train_seconds" in ((r.get("sampling_provenance") or {}).get("student") or {})]
    if not students:
        return None
    plt = _pyplot()
    labels = [f"{r['family']}/{method_label(r)}" for r in students]
    minutes = [r["sampling_provenance"]["student"]["train_seconds"] / 60 for r in students]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(students) + 1.2), dpi=100)
    ax.barh(labels, minutes, color="tab:blue")
    ax.set_xlabel("training wall time (min)")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _grid_images(row: dict, keys: list[tuple]) -> list[np.ndarray]:
    from PIL import Image

    from metrics.sampleset import read_manifest

    records = read_manifest(row["sample_set"])[0]
    by_key = {(r["prompt_id"], r["seed"]): r["path"] for r in records}
    out = []
    for key in keys:
        with Image.open(Path(row["sample_set"]) / by_key[key]) as image:
            out.append(np.asarray(image.convert("RGB")))
    return out


def sample_grid(rows: list[dict], out: Path, n_prompts: int = 8) -> Path:
    """Rows: each sample set of a family; columns: the same prompts at the same seed."""
    from metrics.sampleset import read_manifest

    plt = _pyplot()
    records = read_manifest(rows[0]["sample_set"])[0]
    seed = min(r["seed"] for r in records)
    keys = list(dict.fromkeys((r["prompt_id"], seed) for r in records))[:n_prompts]
    prompts = {r["prompt_id"]: r["prompt"] for r in records}
    fig, axes = plt.subplots(len(rows), len(keys), squeeze=False, dpi=100,
                             figsize=(1.3 * len(keys) + 1.2, 1.3 * len(rows) + 0.6))
    for i, row in enumerate(rows):
        for j, image in enumerate(_grid_images(row, keys)):
            ax = axes[i][j]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(prompts[keys[j][0]][:28], fontsize=6)
        axes[i][0].set_ylabel(f"{method_label(row)}\nNFE {row['nfe']}", fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
