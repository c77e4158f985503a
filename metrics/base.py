"""Metric results and the Metric base class.

A result carries its value, a bootstrap confidence interval, the sample count, per-sample rows and
the metric identity (everything that must match for two numbers to be comparable: metrics.md, top).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fewstep.io import write_text

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


class Metric:
    """A metric scores a sample-set folder on disk and returns a MetricResult.

    Subclasses set `name`, `version` (bump it whenever a change can move the number) and
    `higher_is_better`, and implement `score`.
    """
    name: str = ""
    version: str = ""
    higher_is_better: bool = True

    def score(self, sample_set_folder, **ctx) -> MetricResult:
        raise NotImplementedError(
            f"{type(self).__name__} must implement score(sample_set_folder, **ctx)")

    def result(self, value, ci, n, per_sample, identity, details=None) -> MetricResult:
        """Assemble a result with this metric's name, version and direction."""
        return MetricResult(name=self.name, version=self.version,
                            higher_is_better=self.higher_is_better, value=float(value),
                            ci_low=float(ci[0]), ci_high=float(ci[1]), n=int(n),
                            per_sample=list(per_sample), identity=dict(identity),
                            details=dict(details or {}))
