"""Verdicts and training seeds (the verdict rules at the bottom of the training-seed design):
a method-vs-method claim with fewer than 3 training seeds on either side is "inconclusive (n
training seeds)", never reproduced or contradicted; a student-vs-teacher verdict from one seed
keeps its direction and says its interval covers prompts only; every student cell shows its seed
spread and what its interval covers. Score rows come by hand (fake pair functions)."""
import pytest

from fewstep import audit
from fewstep.reporting import leaderboard as board
from fewstep.reporting import tables

CLAIM = {"id": "R", "paper": "P", "source": "S", "reliability": "table", "kind": "relative",
         "family": "sdxl", "metric": "hpsv2.1", "a": {"method": "amd", "nfe": 4},
         "b": {"method": "dmd2", "nfe": 4}, "claim": "a better"}
VS_TEACHER = {**CLAIM, "id": "T", "b": {"method": "teacher", "nfe": 64}}


def res(value, per_seed=None, up=True, covers=None):
    details = {}
    if per_seed is not None:
        details = {"per_seed": {str(i): v for i, v in enumerate(per_seed)},
                   "n_training_seeds": len(per_seed), "ci_covers": covers or (
                       "training seeds and prompts" if len(per_seed) > 1
                       else "prompts (1 training seed)")}
    return {"value": value, "ci_low": value - 0.1, "ci_high": value + 0.1, "n": 72 * max(
        1, len(per_seed or [0])), "higher_is_better": up, "version": "1", "details": details}


def row(method, nfe, seeds, value=1.0, family="sdxl"):
    """A cell's aggregate with `seeds` training seeds (None: a score file from before seeds)."""
    out = {"family": family, "method": method, "nfe": nfe, "steps": nfe, "guidance": 1.0,
           "scoring_args": {"seeds": [0, 1]}, "sample_set": f"results/samples/{method}",
           "results": {"hpsv2.1": res(value, None if seeds is None or method == "teacher"
                                      else [value] * seeds)}}
    if seeds is not None and method != "teacher":
        out["n_training_seeds"] = seeds
    return out


def pair_with(p, diff=0.5):
    """A fake fewstep.pairing.paired: a clear difference, the given raw p-value and each side's
    training-seed count read from the rows as the real one does."""
    def pair(metric, a, b):
        return {"difference": diff, "ci_low": diff - 0.2, "ci_high": diff + 0.2, "level": 0.95,
                "verdict": "better", "p_value": p,
                "n_training_seeds": {"a": a.get("n_training_seeds"),
                                     "b": b.get("n_training_seeds")}}
    return pair


@pytest.mark.parametrize("k_a,k_b,expected", [
    (1, 1, "inconclusive (1 training seed)"),
    (2, 3, "inconclusive (2 training seeds)"),
    (3, 2, "inconclusive (2 training seeds)"),
    (3, 3, "reproduced"),
    (None, 3, "inconclusive (1 training seed)"),   # a score file from before training seeds
])
def test_method_vs_method_claims_need_three_training_seeds_a_side(k_a, k_b, expected):
    rows = [row("amd", 4, k_a), row("dmd2", 4, k_b)]
    v = audit.judge_relative(CLAIM, rows, "real", pair_with(0.001))
    assert v.verdict == expected
    contra = audit.judge_relative(CLAIM, rows, "real", pair_with(0.001, diff=-0.5)).verdict
    assert contra == (expected if "inconclusive" in expected else "contradicted")


def test_a_claim_against_the_teacher_keeps_its_direction_with_one_seed_and_says_so():
    rows = [row("amd", 4, 1), row("teacher", 64, None)]
    v = audit.judge_relative(VS_TEACHER, rows, "real", pair_with(0.001))
    assert v.verdict == "reproduced (1 training seed: interval covers prompts only)"
    rows[0] = row("amd", 4, 2)
    assert audit.judge_relative(VS_TEACHER, rows, "real", pair_with(0.001)).verdict == "reproduced"
    rows[0] = row("amd", 4, 1)
    v = audit.judge_relative(VS_TEACHER, rows, "real", pair_with(0.001, diff=-0.5))
    assert v.verdict == "contradicted (1 training seed: interval covers prompts only)"


def test_the_evidence_and_legend_say_what_is_resampled_and_at_what_sample_size():
    rows = [row("amd", 4, 3), row("dmd2", 4, 3)]
    verdicts = audit.audit([CLAIM], rows, {"noise_tolerance": 0.02}, pair_with(0.001))
    real = verdicts[0]
    assert "36 prompts x 2 images per prompt x 3 training seeds" in real.evidence
    text = audit.render([CLAIM], verdicts, {"noise_tolerance": 0.02})
    assert "interval covers training seeds and prompts" in text
    assert "prompts with all their images" in text and "between-seed variance / k" in text
    assert "inconclusive (n training seeds)" in text
    assert "36 prompts x 2 images per prompt; training seeds per student cell: 3" in text


def test_student_cells_show_their_seed_spread_and_what_their_interval_covers():
    three = row("dmd2", 4, 3)
    three["results"]["hpsv2.1"]["details"]["per_seed"] = {"0": 48.9, "1": 51.2, "2": 50.3}
    one, old = row("amd", 4, 1), row("dmd", 1, None)
    rows = [row("teacher", 4, None), three, one, old]
    table = board.render(rows)
    assert "seeds 48.900 / 51.200 / 50.300" in table
    assert table.count("1 seed") == 2                       # the one-seed cell and the old file
    page = board.leaderboard(rows)
    assert "training seeds and prompts" in page and "prompts (1 training seed)" in page
    html = tables.leaderboard(rows, ["hpsv2.1"])
    assert "seeds 48.900 / 51.200 / 50.300" in html and "1 seed" in html
    assert "training seeds and prompts" in html


def teacher_pair(diff, p, k):
    return {"difference": diff, "ci_low": diff - 0.2, "ci_high": diff + 0.2, "level": 0.95,
            "verdict": "better", "p_value": p, "n_training_seeds": {"a": k, "b": None}}


def test_students_vs_teacher_with_one_seed_keep_the_direction_and_label_it():
    teacher, student = row("teacher", 4, None, value=1.0), row("dmd2", 4, 1, value=1.5)
    student["against_teacher"] = {"metrics": {"hpsv2.1": teacher_pair(0.5, 0.001, 1)}}
    table = board.against_teacher([teacher, student])
    assert "better (1 training seed: interval covers prompts only)" in table
    student["against_teacher"]["metrics"]["hpsv2.1"] = teacher_pair(0.5, 0.001, 3)
    assert "interval covers prompts only" not in board.against_teacher([teacher, student])


def test_old_score_rows_without_p_values_or_seeds_still_render():
    teacher, student = row("teacher", 4, None), row("dmd2", 4, None, value=1.5)
    student["against_teacher"] = {"metrics": {"hpsv2.1": {
        "difference": 0.5, "ci_low": 0.3, "ci_high": 0.7, "level": 0.95, "verdict": "better"}}}
    table = board.against_teacher([teacher, student])
    assert "p n/a" in table and "better (1 training seed: interval covers prompts only)" in table
    html = tables.paired_table([(student, "teacher NFE 4", student["against_teacher"]["metrics"])],
                               ["hpsv2.1"], "the teacher")
    assert "p n/a" in html


def test_the_quality_plot_draws_each_training_seed_beside_the_cells_mean(tmp_path):
    from fewstep.reporting import figures

    three = row("dmd2", 4, 3)
    three["results"]["hpsv2.1"]["details"]["per_seed"] = {"1": 51.2, "0": 48.9, "2": 50.3}
    assert figures.seed_points(three, "hpsv2.1") == [48.9, 51.2, 50.3]
    assert figures.seed_points(row("amd", 4, 1), "hpsv2.1") == []      # one seed: the mean itself
    assert figures.seed_points(row("teacher", 4, None), "hpsv2.1") == []
    out = figures.quality_plot([row("teacher", 4, None), three], "hpsv2.1", "nfe",
                               tmp_path / "q.png")
    assert out.is_file()
