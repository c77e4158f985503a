"""Holm's sequentially rejective multiple test (metrics/multiplicity.py) and its use in the
claims audit (one family per report) and the students-vs-teacher tables (one family per table)."""
import math

import numpy as np
import pytest

from metrics.multiplicity import direction, holm


def test_holm_adjusted_p_values_by_hand():
    """Holm 1979: sorted p_(1) <= ... <= p_(m), adjusted p_(i) = max_{j <= i} min(1, (m-j+1) p_(j)),
    returned in the input's order."""
    # sorted 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04 -> 0.06: monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]                      # capped at 1
    assert holm([0.02]) == [0.02]                              # a family of one: unadjusted
    assert holm([]) == []


def test_missing_p_values_pass_through_and_are_not_counted():
    out = holm([0.01, None, float("nan"), 0.04])
    assert out[0] == pytest.approx(0.02) and out[3] == pytest.approx(0.04)   # m = 2, not 4
    assert out[1] is None and math.isnan(out[2])


def test_holm_is_monotone_never_below_raw_and_never_above_bonferroni():
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = rng.uniform(0, 1, rng.integers(1, 12)) ** 3
        adj = np.array(holm(list(p)))
        order = np.argsort(p, kind="stable")
        assert np.all(np.diff(adj[order]) >= -1e-15)           # same order as the raw p-values
        assert np.all(adj >= p - 1e-15) and np.all(adj <= np.minimum(1, len(p) * p) + 1e-15)


@pytest.mark.parametrize("diff,p,up,expected", [
    (0.5, 0.01, True, "better"), (0.5, 0.01, False, "worse"),
    (-0.5, 0.01, True, "worse"), (-0.5, 0.01, False, "better"),
    (0.5, 0.06, True, None),                                   # adjusted p above alpha: no direction
    (0.5, None, True, None), (0.0, 0.0, True, None),
])
def test_direction_needs_the_adjusted_p_at_most_alpha_and_takes_the_estimates_sign(diff, p, up,
                                                                                    expected):
    assert direction(diff, p, 0.05, up) == expected
