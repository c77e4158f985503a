"""Metric results and the Metric base class.

A result carries its value, a bootstrap confidence interval, the sample count, per-sample rows and
the metric identity (everything that must match for two numbers to be comparable:
metrics/notes/metrics.md, top).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from fewstep.backbones.weights import WeightFile
from fewstep.io import write_text
from metrics.stats import DEFAULT_INTERVAL, DEFAULT_LEVEL, DEFAULT_RESAMPLES

RESULT_FIELDS = ("name", "version", "higher_is_better", "value", "ci_low", "ci_high", "n",
                 "per_sample", "identity", "details")


@dataclass
class MetricResult:
    name: str
    version: str
    higher_is_better: bool
    value: float
    ci_low: float
    ci_high: float
    n: int                                  # number of samples scored (the denominator)
    per_sample: list = field(default_factory=list)   # one dict per sample (prompt_id, seed, ...)
    identity: dict = field(default_factory=dict)     # protocol: extractor, mode, reference set, ...
    details: dict = field(default_factory=dict)      # sub-scores (per task, KID, ...)

    def __post_init__(self):
        for key in ("value", "ci_low", "ci_high"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"MetricResult {self.name}: {key} must be a finite number, got {v!r}")
            setattr(self, key, float(v))
        if not self.ci_low <= self.ci_high:
            raise ValueError(f"MetricResult {self.name}: ci_low {self.ci_low} > ci_high {self.ci_high}")
        if not isinstance(self.n, int) or self.n <= 0:
            raise ValueError(f"MetricResult {self.name}: n must be a positive integer, got {self.n!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "MetricResult":
        unknown = sorted(set(data) - set(RESULT_FIELDS))
        missing = [k for k in RESULT_FIELDS[:7] if k not in data]
        if unknown or missing:
            raise ValueError(f"not a MetricResult: unknown keys {unknown}, missing keys {missing}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "MetricResult":
        return cls.from_dict(json.loads(text))

    def save(self, path) -> Path:
        """Write the JSON atomically (temporary file, then rename)."""
        write_text(path, self.to_json() + "\n")
        return Path(path)

    @classmethod
    def load(cls, path) -> "MetricResult":
        return cls.from_json(Path(path).read_text())


def paired_summary(ci, higher_is_better: bool, **extra) -> dict:
    """A paired difference A - B as a dict, with the verdict its CI supports and the two-sided
    bootstrap p-value of H0 difference = 0 from the same draws (metrics.stats.bootstrap_p_value;
    None where the CI has none)."""
    if ci.low > 0 or ci.high < 0:
        a_higher = ci.low > 0
        verdict = "better" if a_higher == higher_is_better else "worse"
    else:
        verdict = "tie (CI contains 0)"
    return {"difference": ci.estimate, "ci_low": ci.low, "ci_high": ci.high, "level": ci.level,
            "method": ci.method, "verdict": verdict, "p_value": ci.p_value,
            "n_resamples": ci.n_resamples, **extra}


@dataclass
class Metric:
    """A metric scores a sample-set folder on disk and returns a MetricResult.

    Subclasses are dataclasses whose public fields are the options a config may set. They set the
    class attributes `name`, `version` (bump it whenever a change can move the number) and
    `higher_is_better`, and implement `score_set` (set-level metrics such as FID) or, through
    `PerImageMetric`, only `image_scores` and `identity`. `score` loads and checks the sample set
    once for all of them. Sharded scoring splits score_set at its seam: `image_columns` (what each
    image alone gives: scores, feature vectors, detection rows; a shard's concatenate into the
    set's) and `result_from_columns` (every statistic over images, prompts and the reference), so
    `fewstep score --partial` on K shards and `fewstep score-merge` give the whole set's result. Metrics with weights list them in `weight_files` (what `fewstep weights
    check` reports).

    The bootstrap settings (n_resamples, level, seed, interval) are keyword-only fields of this
    base: the scorer sets them for every metric from its context (`from_options`), a config's
    metric_options never does (`bootstrap.interval` is the config's one place for the interval).
    interval: how a CI is read from the bootstrap (metrics.stats.INTERVAL_METHODS). A plain mean
    (per-image metrics, their paired differences, GenEval's per-task CIs) takes all three; a
    set-level statistic through `stats.bootstrap` has no per-resample standard error, so a
    studentized request uses BCa there (`set_interval`) and ci_method names the one used. FID keeps
    its recentred percentile interval whatever is asked (its ci_method says so). The interval is
    not part of a metric's identity: the value does not depend on it.

    Training seeds (cells): a cell is one (family, method) trained once per training seed, each
    replicate scored on the same (prompt_id, image seed) grid. `replicate_statistic` gives the
    metric's statistic of one replicate on a resample; `cell_result` aggregates a cell (mean over
    replicates, interval over training seeds and prompts: `metrics.seed_level`) and
    `paired_difference_cells` compares two cells (or a cell with a one-element teacher cell),
    paired on the shared prompts and noise. One replicate per side is exactly today's result and
    paired_difference. With more than one replicate a side, `seed_level` (metrics.seed_level,
    config `bootstrap.seed_level`) decides: "t" (default), the prompt bootstrap's variance plus each
    side's between-run variance / k with a Welch-Satterthwaite t quantile, which covers at the
    nominal rate with 3 seeds; or "bootstrap", the two-stage percentile bootstrap (recentred where
    the metric is, `recentred`: FID), which is narrow with few seeds. `interval` does not apply
    there (BCa's jackknife and the studentized standard error have no two-level form); ci_method
    says which was used.

    Differentiable scorers for training share one call signature, `reward(images01 (B, 3, H, W) in
    [0, 1], metas: list of prompt-row dicts with "prompt") -> (B,) tensor`, higher is better,
    gradients flowing to the images (see metrics/toy_reward.py).
    """
    name: ClassVar[str] = ""
    version: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    recentred: ClassVar[bool] = False      # two-level intervals recentred on the estimate (FID)

    n_resamples: int = field(default=DEFAULT_RESAMPLES, kw_only=True)
    level: float = field(default=DEFAULT_LEVEL, kw_only=True)
    seed: int = field(default=0, kw_only=True)
    interval: str = field(default=DEFAULT_INTERVAL, kw_only=True)
    seed_level: str = field(default="t", kw_only=True)   # metrics.seed_level.SEED_LEVELS

    # -- building from a config --------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> list[str]:
        """The options a config may set: the public init fields, less the bootstrap settings."""
        import dataclasses

        if not dataclasses.is_dataclass(cls):
            return []
        return [f.name for f in dataclasses.fields(cls)
                if f.init and not f.name.startswith("_") and f.name not in RESERVED_OPTIONS]

    @classmethod
    def check_options(cls, options, name: str | None = None) -> None:
        """Raise ValueError naming an unknown option (with the close names) or a non-mapping.

        name: the metric's registry name for the message (default: the class's `name`)."""
        from fewstep.errors import did_you_mean

        name = name or cls.name or cls.__name__
        if not isinstance(options, dict):
            raise ValueError(f"metric_options/{name} must be a mapping of option: value, got "
                             f"{type(options).__name__}")
        known = cls.option_names()
        for key in options:
            if key not in known:
                raise ValueError(f"metric_options/{name}: {cls.__name__} has no option {key!r}."
                                 f"{did_you_mean(key, known)} Its options: "
                                 f"{', '.join(known) or 'none'}")

    @classmethod
    def from_options(cls, options: dict, context, name: str | None = None) -> "Metric":
        """The metric for one scoring job: the config's `options` (checked) over the defaults the
        metric takes from the job's `context`, with the job's bootstrap settings.

        context: any object with the attributes
          n_resamples, level, seed   bootstrap settings of the job (every metric);
          interval                   the CI method (absent: percentile, as before the option);
          prompts                    path of the scored prompt .jsonl;
          prompt_rows                its rows (class-conditional sets carry "class_label");
          feature_net                the toy feature net file (toy FID), or None;
          reference_images           how many reference renders the toy FID draws in all;
          cache                      folder of cached reference statistics.
        A metric reads only what its `context_defaults` names; the scorer never names a metric.
        `name`: the registry name the options were configured under (it names them in errors).
        """
        cls.check_options(options, name)
        bootstrap = dict(n_resamples=context.n_resamples, level=context.level, seed=context.seed,
                         interval=getattr(context, "interval", None) or DEFAULT_INTERVAL,
                         seed_level=getattr(context, "seed_level", None) or "t")
        return cls(**bootstrap, **{**cls.context_defaults(context), **options})

    @classmethod
    def context_defaults(cls, context) -> dict:
        """Options this metric takes from the scoring job's context unless the config sets them
        (default: none; the toy FID takes its feature net and reference renders from it)."""
        return {}

    def weight_files(self) -> list[WeightFile]:
        """Files this metric reads from the weights cache (none for the toy metrics)."""
        return []

    # -- scoring -----------------------------------------------------------------------------------
    def score(self, sample_set_folder, expected=None, resolution=None, allow_blank=False,
              **ctx) -> MetricResult:
        """Score a sample-set folder: `load_weights`, then load and check the set once (expected:
        the (prompt_id, seed) grid; resolution: the image size; allow_blank: accept constant
        images, which a toy model may legitimately draw), then `score_set`."""
        from metrics.sampleset import load_sample_set

        self.load_weights()
        ss = load_sample_set(sample_set_folder, expected=expected, resolution=resolution,
                             allow_blank=allow_blank)
        return self.score_set(ss, allow_blank)

    def load_weights(self) -> None:
        """Load what scoring needs before any image is read, so that a missing weights file fails
        first (default: nothing; most metrics load on first use)."""

    def score_set(self, ss, allow_blank: bool) -> MetricResult:
        """The result on a loaded, checked SampleSet (allow_blank: recorded in the details): the
        set's per-image columns (`image_columns`, remembered for the paired comparison that
        follows), then `result_from_columns`. A metric may override this whole instead."""
        columns = self.image_columns(ss)
        self.remember_columns(ss, columns)
        return self.result_from_columns(ss, columns, allow_blank)

    # -- sharded scoring: per-image columns of a shard, the result from all of them -----------
    def image_columns(self, ss) -> dict:
        """{column: one entry per image of `ss`, in manifest order}: what each image alone gives
        (scores, feature vectors, detection rows), never a statistic over several images, so a
        shard's columns (fewstep score --partial) concatenated in set order are the whole set's.
        Entries: numbers or vectors (a float64 array) or JSON rows (a list of dicts)."""
        raise NotImplementedError(f"{type(self).__name__} must implement image_columns(ss) and "
                                  "result_from_columns(ss, columns, allow_blank) (or image_scores, "
                                  "as a PerImageMetric; or score_set, and it cannot score shards)")

    def result_from_columns(self, ss, columns: dict, allow_blank: bool) -> MetricResult:
        """The result of the whole set `ss` from its `image_columns` (value, interval, per-sample
        rows, details): the statistics over images, prompts and the reference live here."""
        raise NotImplementedError(f"{type(self).__name__} must implement result_from_columns")

    def remember_columns(self, ss, columns: dict) -> None:
        """Keep the columns of the set just scored (one set: the last), keyed by its manifest's
        sha256 (image bytes and prompts), so its paired comparison reads them instead of
        featurising the set again, and a merge of shards hands over the merged columns."""
        self._remembered = (ss.manifest_sha256, columns)

    def columns_of(self, ss) -> dict:
        """The remembered columns when `ss` is the set they were computed on, else computed."""
        remembered = getattr(self, "_remembered", None)
        if remembered is not None and remembered[0] == ss.manifest_sha256:
            return remembered[1]
        return self.image_columns(ss)

    def per_image_result(self, ss, scores, identity: dict, extra: dict | None = None,
                         details: dict | None = None) -> "MetricResult":
        """Result of a per-image metric: mean score with a cluster-bootstrap CI over prompts, one
        row per image (extra: more per-image columns, e.g. the raw cosine), count checked."""
        import numpy as np

        from metrics.stats import cluster_mean_ci

        scores = np.asarray(scores, dtype=np.float64)
        if len(scores) != len(ss) or not np.isfinite(scores).all():  # fewstep/notes/pitfalls.md C.12
            raise RuntimeError(f"scored {len(scores)} images of {len(ss)}, or got NaN/inf")
        ci = cluster_mean_ci(scores, ss.prompt_ids(), n_resamples=self.n_resamples,
                             level=self.level, seed=self.seed, method=self.interval)
        extra = extra or {}
        per_sample = [{"prompt_id": r["prompt_id"], "seed": r["seed"], "path": r["path"],
                       **{k: float(v[i]) for k, v in extra.items()}, "score": float(scores[i])}
                      for i, r in enumerate(ss.records)]
        details = {"ci_method": ci.method, "ci_level": self.level,
                   "n_resamples": self.n_resamples, **(details or {})}
        return self.result(ci.estimate, (ci.low, ci.high), len(ss), per_sample, identity, details)

    # -- paired comparison of two sample sets on one (prompt_id, seed) grid ------------------------
    def set_statistic(self, rows: list[dict]) -> float:
        """The metric's value from per-sample rows (default: mean of "score"); override where the
        metric is not a plain mean (GenEval: mean over tasks)."""
        return float(sum(r["score"] for r in rows) / len(rows))

    def strata(self, rows: list[dict]):
        """Bootstrap strata per prompt (None: unstratified)."""
        return None

    def paired_difference(self, a: MetricResult, b: MetricResult, folder_a=None, folder_b=None,
                          **load_kw) -> dict:
        """value(A) - value(B) with a paired cluster-bootstrap CI (prompts resampled, both sets on
        the same prompts and seeds, so shared prompt difficulty cancels), plus the per-prompt win
        rate of A over B. Set-level metrics (FID) override this with their own resampling."""
        from metrics.stats import align_pairs, bootstrap, cluster_mean_ci, group_indices, win_rate

        keys_a = [(r["prompt_id"], r["seed"]) for r in a.per_sample]
        keys_b = [(r["prompt_id"], r["seed"]) for r in b.per_sample]
        ia, ib = align_pairs(keys_a, keys_b)
        rows_a, rows_b = [a.per_sample[i] for i in ia], [b.per_sample[i] for i in ib]
        prompts = [r["prompt_id"] for r in rows_a]
        stats = dict(n_resamples=self.n_resamples, level=self.level, seed=self.seed)
        strata = self.strata(rows_a)
        if type(self).set_statistic is Metric.set_statistic and strata is None:
            # a plain mean: mean(A) - mean(B) on a resample is the mean of the per-sample
            # differences, so the vectorised cluster bootstrap draws the same resamples
            diffs = [ra["score"] - rb["score"] for ra, rb in zip(rows_a, rows_b)]
            ci = cluster_mean_ci(diffs, prompts, method=self.interval, **stats)
        else:
            ci = bootstrap(lambda idx: self.set_statistic([rows_a[i] for i in idx])
                           - self.set_statistic([rows_b[i] for i in idx]),
                           group_indices(prompts)[1], strata=strata, method=self.set_interval(),
                           **stats)
        wins = win_rate([r["score"] for r in rows_a], keys_a, [r["score"] for r in rows_b], keys_a,
                        higher_is_better=self.higher_is_better, **stats)
        return paired_summary(ci, self.higher_is_better, win_rate=wins)

    # -- cells of training-seed replicates ---------------------------------------------------------
    def replicate_statistic(self, result: MetricResult, folder, keys,
                            **load_kw) -> Callable[[np.ndarray], float]:
        """f(idx) -> float: this metric's value of one replicate on a resample, idx indexing `keys`
        (the shared (prompt_id, seed) grid; duplicates allowed). Default: the replicate's per-sample
        rows put in the order of `keys` (align_pairs refuses another grid), then set_statistic (a
        plain mean runs vectorised). Set-level metrics (FID) override it from their folder."""
        from metrics.stats import align_pairs

        _, order = align_pairs(keys, sample_keys(result))
        rows = [result.per_sample[i] for i in order]
        if type(self).set_statistic is Metric.set_statistic:
            scores = np.array([r["score"] for r in rows], dtype=np.float64)
            return lambda idx: float(scores[idx].mean())
        return lambda idx: self.set_statistic([rows[i] for i in idx])

    def cell_result(self, replicates: list, seeds: list | None = None, **load_kw) -> MetricResult:
        """A cell's result over its replicates [(MetricResult, sample-set folder)], one per training
        seed (`seeds`: their labels, None for a released checkpoint; default 0, 1, ...).

        value: the mean of the replicates' values; interval: over training seeds and prompts with
        all their images (`two_level_ci`, no B side), so it covers training randomness too. n: images over all replicates; per_sample: [] (each
        replicate keeps its rows in its own score file). One replicate: exactly its own result.
        details: the first replicate's, plus per_seed, seed_sd (sample sd; None for one),
        n_training_seeds, ci_method, ci_covers. Replicates of another identity: ValueError."""
        results = [r for r, _ in replicates]
        check_same_identity(results)
        labels = seed_labels(len(results), seeds)
        values = [r.value for r in results]
        k = len(results) if seeds is None else sum(s is not None for s in seeds)
        details = {**results[0].details, "per_seed": dict(zip(labels, values)),
                   "seed_sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                   "n_training_seeds": k}
        if len(results) == 1:
            covers = "prompts (1 training seed)" if k else "prompts (released checkpoint)"
            return dataclasses.replace(results[0], details={**details, "ci_covers": covers})
        ci = self.two_level_ci(replicates, None, **load_kw)
        details.update(ci_method=ci.method, ci_covers="training seeds and prompts")
        return dataclasses.replace(results[0], value=float(np.mean(values)), ci_low=ci.low,
                                   ci_high=ci.high, n=sum(r.n for r in results), per_sample=[],
                                   details=details)

    def paired_difference_cells(self, cell_a: list, cell_b: list, **load_kw) -> dict:
        """value(A) - value(B) of two cells [(MetricResult, folder)] on one (prompt_id, seed) grid,
        as a paired_summary dict with "p_value" and "n_training_seeds" {"a": k_a, "b": k_b} (the
        number of replicates; a teacher is a one-element cell). One replicate each: exactly
        paired_difference. Otherwise the seed-level interval (`two_level_ci`: A's and B's training
        seeds independent, prompts shared), and the win rate on per-image scores averaged over each
        side's replicates (prompts resampled only), or a note where there is no per-image score."""
        counts = {"a": len(cell_a), "b": len(cell_b)}
        if len(cell_a) == 1 and len(cell_b) == 1:
            (a, folder_a), (b, folder_b) = cell_a[0], cell_b[0]
            return {**self.paired_difference(a, b, folder_a, folder_b, **load_kw),
                    "n_training_seeds": counts}
        for cell in (cell_a, cell_b):
            check_same_identity([r for r, _ in cell])
        ci = self.two_level_ci(cell_a, cell_b, **load_kw)
        return paired_summary(ci, self.higher_is_better, **self.cell_win_rate(cell_a, cell_b),
                              n_training_seeds=counts)

    def two_level_ci(self, cell_a: list, cell_b: list | None, **load_kw):
        """metrics.seed_level.seed_level_interval on replicate_statistic callables over the first
        replicate's (prompt_id, seed) grid, with this metric's strata, settings, recentring and
        seed level."""
        from metrics.seed_level import seed_level_interval
        from metrics.stats import group_indices

        first = cell_a[0][0]
        keys = sample_keys(first)
        stats = [[self.replicate_statistic(r, f, keys, **load_kw) for r, f in cell]
                 for cell in (cell_a, cell_b) if cell is not None]
        with self.bootstrap_context():
            ci = seed_level_interval(stats[0], stats[1] if len(stats) > 1 else None,
                                     group_indices([k[0] for k in keys])[1],
                                     strata=self.strata(first.per_sample),
                                     n_resamples=self.n_resamples, level=self.level,
                                     seed=self.seed, recentre=self.recentred,
                                     seed_level=self.seed_level)
        if self.interval == "percentile" or self.recentred:
            return ci
        note = f" ({self.interval} asked: it has no form with several training seeds)"
        return dataclasses.replace(ci, method=ci.method + note)

    def cell_win_rate(self, cell_a: list, cell_b: list) -> dict:
        """{"win_rate": ...} on per-image scores averaged over each side's replicates (a prompt's
        mean over its images and the side's training seeds), or {"win_rate_note": why not}."""
        from metrics.stats import align_pairs, win_rate

        rows = [row for cell in (cell_a, cell_b) for r, _ in cell for row in r.per_sample]
        if not all("score" in row for row in rows):
            return {"win_rate_note": "no win rate: this metric has no per-image score"}
        keys = sample_keys(cell_a[0][0])
        means = [np.mean([[r.per_sample[i]["score"] for i in align_pairs(keys, sample_keys(r))[1]]
                          for r, _ in cell], axis=0) for cell in (cell_a, cell_b)]
        wins = win_rate(means[0], keys, means[1], keys, higher_is_better=self.higher_is_better,
                        n_resamples=self.n_resamples, level=self.level, seed=self.seed)
        wins["note"] = ("per-image scores averaged over training seeds; its CI resamples prompts "
                        "only")
        return {"win_rate": wins}

    def bootstrap_context(self):
        """Context entered around the many statistic calls of a two-level bootstrap (default:
        none; the toy FID limits BLAS to one thread)."""
        return contextlib.nullcontext()

    def set_interval(self) -> str:
        """The interval for a set-level statistic (`stats.bootstrap`): the one asked, except that
        studentized, which needs a standard error on every resample, becomes BCa (Efron &
        Tibshirani 1993, ch. 14: BCa needs only the jackknife, which any statistic has)."""
        return "bca" if self.interval == "studentized" else self.interval

    def result(self, value, ci, n, per_sample, identity, details=None) -> MetricResult:
        """Assemble a result with this metric's name, version and direction."""
        return MetricResult(name=self.name, version=self.version,
                            higher_is_better=self.higher_is_better, value=float(value),
                            ci_low=float(ci[0]), ci_high=float(ci[1]), n=int(n),
                            per_sample=list(per_sample), identity=dict(identity),
                            details=dict(details or {}))


@dataclass
class PerImageMetric(Metric):
    """A metric that is the mean of one score per image (HPSv2, ImageReward, CLIP score, the toy
    preference slots): subclasses implement `image_scores` and `identity`, and may add details.
    The value is the mean with a cluster-bootstrap CI over prompts; paired comparisons use the
    per-image scores (Metric.paired_difference)."""

    def image_scores(self, ss) -> dict:
        """{"score": one float per image in manifest order, ...}: other keys are more per-image
        columns written before the score (e.g. the raw cosine of a rescaled score)."""
        raise NotImplementedError(f"{type(self).__name__} must implement image_scores(ss)")

    def identity(self, ss) -> dict:
        """Everything that must match for two numbers of this metric to be comparable."""
        raise NotImplementedError(f"{type(self).__name__} must implement identity(ss)")

    def score_details(self, columns: dict) -> dict:
        """Set-level details from the per-image columns (default: none)."""
        return {}

    def image_columns(self, ss) -> dict:
        """Each image's scores are its own: image_scores is the per-image column set."""
        return dict(self.image_scores(ss))

    def result_from_columns(self, ss, columns: dict, allow_blank: bool) -> MetricResult:
        columns = dict(columns)
        scores = columns.pop("score")
        details = {**self.score_details({"score": scores, **columns}),
                   "blank_images_allowed": bool(allow_blank)}
        return self.per_image_result(ss, scores, self.identity(ss), columns, details)


def sample_keys(result: MetricResult) -> list[tuple]:
    """The (prompt_id, seed) grid of a result, in its per-sample order."""
    return [(r["prompt_id"], r["seed"]) for r in result.per_sample]


def seed_labels(n: int, seeds) -> list[str]:
    """per_seed keys: the training seed as text, "released" for None (default 0..n-1)."""
    if seeds is None:
        return [str(i) for i in range(n)]
    if len(seeds) != n:
        raise ValueError(f"seeds {list(seeds)} label {len(seeds)} replicates; the cell has {n}")
    return ["released" if s is None else str(s) for s in seeds]


def check_same_identity(results: list) -> None:
    """The replicates of a cell must be one measurement protocol: same metric, version and
    identity; a ValueError names the keys that differ."""
    if not results:
        raise ValueError("a cell needs at least one replicate (MetricResult, sample-set folder)")
    first = results[0]
    for other in results[1:]:
        keys = sorted(k for k in set(first.identity) | set(other.identity)
                      if first.identity.get(k) != other.identity.get(k))
        keys += [k for k in ("name", "version") if getattr(first, k) != getattr(other, k)]
        if keys:
            raise ValueError(f"replicates of one cell differ in {first.name} identity keys {keys}: "
                             "score every training seed with one protocol")


# Options of a metric that a config may not set: bookkeeping, or set by the harness itself.
RESERVED_OPTIONS = ("n_resamples", "level", "seed", "interval", "seed_level")
