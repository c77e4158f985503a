"""Holm's sequentially rejective multiple test (metrics/multiplicity.py) and its use in the
claims audit (one family per report) and the students-vs-teacher tables (one family per table)."""
import math

import numpy as np
import pytest

from metrics.multiplicity import direction, holm


def test_holm_adjusted_p_values_by_hand():
    """Holm 1979: sorted p_(1) <= ... <= p_(m), adjusted p_(i) = max_{j <= i} min(1, (m-j+1) p_(j)),
    returned in the input's order."""
    # sorted 0.005 (x4 = 0.02), 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04, then
    # 0.06: monotone)
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
    (0.5, 0.06, True, None),                          # adjusted p above alpha: no direction
    (0.5, None, True, None), (0.0, 0.0, True, None),
])
def test_direction_needs_the_adjusted_p_at_most_alpha_and_takes_the_estimates_sign(diff, p, up,
                                                                                    expected):
    assert direction(diff, p, 0.05, up) == expected


# ------------------------------------------------------------------ the claims audit: one family

def claim(cid, a):
    return {"id": cid, "paper": "P", "source": "S", "reliability": "table", "kind": "relative",
            "family": "sdxl", "metric": "hpsv2.1", "a": {"method": a, "nfe": 4},
            "b": {"method": "dmd2", "nfe": 4}, "claim": "a better"}


def cell(method, seeds=3):
    res = {"value": 1.0, "ci_low": 0.9, "ci_high": 1.1, "n": 72 * seeds, "higher_is_better": True,
           "version": "1", "details": {}}
    return {"family": "sdxl", "method": method, "nfe": 4, "steps": 4, "guidance": 1.0,
            "n_training_seeds": seeds, "scoring_args": {"seeds": [0, 1]},
            "sample_set": f"s/{method}", "results": {"hpsv2.1": res}}


def pair_by_method(p_of):
    """A fake pair function: every raw interval excludes 0; the raw p-value by A's method."""
    def pair(metric, a, b):
        return {"difference": 0.5, "ci_low": 0.1, "ci_high": 0.9, "level": 0.95,
                "verdict": "better", "p_value": p_of[a["method"]],
                "n_training_seeds": {"a": a["n_training_seeds"], "b": b["n_training_seeds"]}}
    return pair


def test_the_audit_decides_relative_verdicts_by_holm_over_the_whole_report():
    from fewstep import audit

    claims = [claim("A", "amd"), claim("B", "rtdmd"), claim("C", "dmd")]
    rows = [cell(m) for m in ("amd", "rtdmd", "dmd", "dmd2")]
    # raw p 0.02, 0.03, 0.03: each alone below 0.05; Holm over three: 0.06, 0.06, 0.06
    pair = pair_by_method({"amd": 0.02, "rtdmd": 0.03, "dmd": 0.03})
    verdicts = audit.audit(claims, rows, {"noise_tolerance": 0.02}, pair)
    real = [v for v in verdicts if v.world == "real"]
    assert [v.verdict for v in real] == ["within noise"] * 3
    assert real[0].p_value == 0.02 and real[0].p_holm == pytest.approx(0.06)
    assert real[0].family == 3
    assert "p = 0.02, Holm p = 0.06 (family of 3)" in real[0].evidence
    assert "[+0.1, +0.9]" in real[0].evidence                  # the raw interval stays shown
    pair = pair_by_method({"amd": 0.001, "rtdmd": 0.03, "dmd": 0.03})
    verdicts = audit.audit(claims, rows, {"noise_tolerance": 0.02}, pair)
    assert [v.verdict for v in verdicts if v.world == "real"] == [
        "reproduced", "within noise", "within noise"]         # 0.003; 0.06; 0.06
    text = audit.render(claims, verdicts, {"noise_tolerance": 0.02})
    assert "Holm-adjusted p-value decides" in text and "family of 3" in text
    assert "alpha = 0.05" in text


def test_comparisons_left_inconclusive_by_the_seed_rule_are_not_in_the_family():
    from fewstep import audit

    claims = [claim("A", "amd"), claim("B", "rtdmd")]
    rows = [cell("amd"), cell("rtdmd", seeds=1), cell("dmd2")]
    pair = pair_by_method({"amd": 0.04, "rtdmd": 0.001})
    real = [v for v in audit.audit(claims, rows, {"noise_tolerance": 0.02}, pair)
            if v.world == "real"]
    assert real[0].verdict == "reproduced" and real[0].family == 1   # 0.04 alone
    assert real[1].verdict == "inconclusive (1 training seed)" and real[1].p_holm is None


# ----------------------------------------------------- students-vs-teacher tables: one per table

def student(method, family, diff, p, seeds=3):
    s = cell(method, seeds)
    s["family"] = family
    s["against_teacher"] = {"metrics": {"hpsv2.1": {
        "difference": diff, "ci_low": diff - 0.2, "ci_high": diff + 0.2, "level": 0.95,
        "verdict": "better", "p_value": p, "n_training_seeds": {"a": seeds, "b": None}}}}
    return s


def teacher(family):
    t = cell("teacher")
    t.update(family=family, method="teacher")
    del t["n_training_seeds"]
    return t


def test_the_students_vs_teacher_table_is_one_holm_family():
    from fewstep.reporting.leaderboard import against_teacher, leaderboard

    rows = [teacher("sdxl"), teacher("sd3"), student("dmd2", "sdxl", 0.5, 0.03),
            student("amd", "sd3", -0.5, 0.04)]
    table = against_teacher(rows)
    # raw 0.03 and 0.04 across two families' rows: Holm 0.06 and 0.06, both ties
    assert "| 0.030 / 0.060 |" in table and "| 0.040 / 0.060 |" in table
    assert table.count("tie (Holm p > 0.05)") == 2 and "better" not in table
    rows[2] = student("dmd2", "sdxl", 0.5, 0.01)                      # 0.02 and 0.04
    table = against_teacher(rows)
    assert "| 0.010 / 0.020 | - | better |" in table and "| 0.040 / 0.040 | - | worse |" in table
    page = leaderboard(rows)
    assert "Holm-adjusted p-value decides" in page and "family of 2" in page


def test_each_html_paired_table_is_its_own_holm_family():
    from fewstep.reporting import tables

    rows = [student("dmd2", "sdxl", 0.5, 0.03), student("amd", "sdxl", 0.5, 0.04)]
    pairs = [(s, "teacher NFE 4", s["against_teacher"]["metrics"]) for s in rows]
    html = tables.paired_table(pairs, ["hpsv2.1"], "the teacher")
    assert html.count("tie (Holm p &gt; 0.05)") == 2 and "Holm p 0.060" in html
    assert "family of 2" in html and "p 0.030" in html
    alone = tables.paired_table(pairs[:1], ["hpsv2.1"], "the teacher")
    assert "better" in alone and "family of 1" in alone
    # against DMD2 (method vs method): fewer than 3 seeds is inconclusive and not counted
    rows[0]["against_teacher"]["metrics"]["hpsv2.1"]["n_training_seeds"] = {"a": 3, "b": 3}
    rows[1]["against_teacher"]["metrics"]["hpsv2.1"]["n_training_seeds"] = {"a": 2, "b": 3}
    html = tables.paired_table(pairs, ["hpsv2.1"], "DMD2", vs_teacher=False)
    assert "inconclusive (2 training seeds)" in html and "family of 1" in html


def test_a_bootstrap_p_value_floor_says_when_a_family_can_reject_nothing():
    from metrics.multiplicity import min_resamples, resolvable

    # the smallest bootstrap p-value is 2 / (R + 1): 105 tests at alpha 0.05 need R >= 4199
    assert not resolvable(105, 1000, 0.05)
    assert resolvable(105, 4199, 0.05) and not resolvable(105, 4198, 0.05)
    assert min_resamples(105, 0.05) == 4199
    assert resolvable(3, None, 0.05)  # unknown R: no claim either way


def test_the_table_legend_warns_when_its_resamples_cannot_reach_holms_threshold():
    from fewstep.reporting.tables import holm_legend

    assert "bootstrap.resamples" in holm_legend(105, 0.05, resamples=1000)
    assert "4199" in holm_legend(105, 0.05, resamples=1000)
    assert "bootstrap.resamples" not in holm_legend(105, 0.05, resamples=5000)


def test_t_level_p_values_have_no_resample_floor():
    """A cell of several training seeds gets its p-value from the t level (continuous), so only
    the bootstrap p-values of a table set its resolution."""
    from fewstep.reporting.tables import family_resamples

    t_level = {"n_resamples": 1000, "p_value": 1e-6,
               "method": "t, Welch-Satterthwaite df 4.1 (training seeds: ...)"}
    boot = {"n_resamples": 2000, "p_value": 0.002, "method": "percentile (groups)"}
    assert family_resamples([(t_level,), (t_level,)]) is None
    assert family_resamples([(t_level,), (boot,), (None,)]) == 2000
