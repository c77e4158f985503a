"""Multiplicity control for tables of paired verdicts: Holm's sequentially rejective Bonferroni
procedure (Holm 1979, "A simple sequentially rejective multiple test procedure", Scand. J.
Statist. 6:65-70), which controls the family-wise error rate at alpha for any dependence between
the tests. A table that issues many 95 % verdicts (the claims audit, the students-vs-teacher
table) decides each by its Holm-adjusted p-value, so that the chance of any false "better" /
"worse" / "contradicted" in the table is at most alpha, not alpha per cell.

Adjusted p-values (Holm 1979, sec. 2, in the adjusted form of Wright 1992, "Adjusted P-values for
simultaneous inference", Biometrics 48): with the m p-values of the family sorted p_(1) <= ... <=
p_(m), adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)); hypothesis i is rejected at
family-wise level alpha iff its adjusted p <= alpha (the same rejections as the step-down test).
"""
from __future__ import annotations

import math
from typing import Sequence


def _missing(p) -> bool:
    return p is None or (isinstance(p, float) and math.isnan(p))


def resolvable(m: int, n_resamples: int | None, alpha: float) -> bool:
    """Whether Holm can reject anything in a family of m bootstrap p-values: the smallest p a
    bootstrap of R resamples gives is 2 / (R + 1) (metrics.stats.bootstrap_p_value), and Holm's
    first step needs m * p <= alpha. Unknown R (None): True (no claim)."""
    return n_resamples is None or m * 2.0 / (n_resamples + 1) <= alpha


def min_resamples(m: int, alpha: float) -> int:
    """The fewest bootstrap resamples with which a family of m tests can reject at alpha."""
    return math.ceil(2.0 * m / alpha - 1 - 1e-9)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values in the input's order. None / NaN entries (no test: a comparison
    without a p-value) are returned as given and do not count in the family's size."""
    present = [i for i, p in enumerate(p_values) if not _missing(p)]
    out = list(p_values)
    m, running = len(present), 0.0
    for rank, i in enumerate(sorted(present, key=lambda i: float(p_values[i]))):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))  # monotone step-down
        out[i] = running
    return out


def family_size(p_values: Sequence[float | None]) -> int:
    """How many tests a family holds (the p-values that are not None / NaN)."""
    return sum(not _missing(p) for p in p_values)


def direction(difference: float, p_adjusted: float | None, alpha: float,
              higher_is_better: bool) -> str | None:
    """"better" / "worse" for A - B when the (adjusted) p-value is at most alpha, by the sign of the
    estimate in the metric's direction; None when the test does not reject (or has no p-value)."""
    if _missing(p_adjusted) or p_adjusted > alpha or difference == 0:
        return None
    return "better" if (difference > 0) == higher_is_better else "worse"
