"""The leaderboard's student-vs-teacher section: matching NFE and CI-based verdicts."""
from fewstep.reporting.leaderboard import against_teacher, render, verdict
from fewstep.scoring import matching_teacher


def result(value, half, up=False, version="1"):
    return {"value": value, "ci_low": value - half, "ci_high": value + half, "n": 8,
            "higher_is_better": up, "version": version}


def row(method, nfe, fid, half=2.0, family="sd3", steps=None):
    return {"family": family, "method": method, "nfe": nfe, "steps": steps or nfe, "guidance": 1.0,
            "results": {"toy_fid": result(fid, half)}}


TEACHERS = [row("teacher", 2, 200.0, steps=1), row("teacher", 4, 100.0, steps=2),
            row("teacher", 4, 500.0, family="sit")]


def test_matching_teacher_prefers_same_nfe_then_next_up():
    assert matching_teacher(TEACHERS, row("dmd2", 4, 30.0)) == (TEACHERS[1], "same NFE")
    assert matching_teacher(TEACHERS, row("dmd", 1, 30.0)) == (TEACHERS[0], "next NFE up")
    assert matching_teacher(TEACHERS, row("x", 8, 30.0))[0] is None


def test_verdict_needs_disjoint_intervals_in_the_metrics_direction():
    assert verdict(result(30, 2), result(100, 2)) == "better"          # FID: lower is better
    assert verdict(result(100, 2), result(30, 2)) == "worse"
    assert verdict(result(98, 2), result(100, 2)) == "tie (CIs overlap)"
    assert verdict(result(0.9, 0.01, up=True), result(0.5, 0.01, up=True)) == "better"


def test_against_teacher_table_lists_every_student_with_its_verdict():
    rows = TEACHERS + [row("dmd2", 4, 30.0), row("dmd", 1, 243.0)]
    table = against_teacher(rows)
    one_seed = " (1 training seed: interval covers prompts only)"  # rows without training seeds
    assert ("| sd3 | dmd2 | 4 | 4 | toy_fid | 30.000 | 100.000 | -70.000 | - | - | better "
            f"(unpaired){one_seed} |" in table)
    assert ("| sd3 | dmd | 1 | 2 (next NFE up) | toy_fid | 243.000 | 200.000 | +43.000 | - | - | "
            f"worse (unpaired){one_seed} |" in table)
    assert "teacher |" not in table.split("\n", 2)[2]                   # teachers are not students
    assert render(rows).count("\n") == len(rows) + 1


def test_against_teacher_uses_the_paired_comparison_when_the_score_step_made_one():
    student = row("dmd2", 4, 98.0)
    student["against_teacher"] = {"metrics": {"toy_fid": {
        "difference": -2.0, "ci_low": -3.0, "ci_high": -1.0, "verdict": "better",
        "win_rate": {"win_rate": 0.75, "ci_low": 0.6, "ci_high": 0.9}}}}
    table = against_teacher(TEACHERS + [student])
    # the unpaired intervals overlap (98 ± 2 vs 100 ± 2); the paired one excludes 0 (a score file
    # from before p-values: its raw interval decides; from before training seeds: one seed)
    assert ("| -2.000 [-3.000, -1.000] | p n/a | 0.75 [0.60, 0.90] | better (1 training seed: "
            "interval covers prompts only) |") in table
    paired = student["against_teacher"]["metrics"]["toy_fid"]
    paired.update(p_value=0.004, level=0.95, n_training_seeds={"a": 3, "b": None})
    table = against_teacher(TEACHERS + [student])
    assert "| -2.000 [-3.000, -1.000] | 0.004 / 0.004 | 0.75 [0.60, 0.90] | better |" in table


def test_the_leaderboard_names_each_familys_teacher_sampler_apart_from_the_metric_protocols():
    from fewstep.reporting.leaderboard import leaderboard

    euler = {"sampler": "scheduler", "scheduler_class": "EulerDiscreteScheduler",
             "scheduler_config": {"timestep_spacing": "leading", "steps_offset": 1}}
    rows = [row("teacher", 2, 40.0, family="sdxl"), row("teacher", 2, 30.0, family="sit"),
            row("dmd2", 2, 35.0, family="sdxl")]
    rows[0]["sampling_provenance"] = {"sampler": euler}
    rows[1]["sampling_provenance"] = {"sampler": {"sampler": "sit-euler"}}
    rows[0]["results"]["toy_fid"]["identity"] = {"metric": "fid", "sampler": {"sampler": "scheduler"}}
    page = leaderboard(rows)
    assert ("Teachers sampled with: sdxl: EulerDiscreteScheduler (timestep_spacing leading, "
            "steps_offset 1); sit: the SiT reference Euler sampler.") in page
    protocols = page.split("## Metric identities")[1]
    assert '"metric": "fid"' in protocols and "sampler" not in protocols


def fid(value, n):
    res = result(value, 2.0)
    res.update(n=n, details={"min_n": 1000, "comparable": False})
    return res


def test_fids_at_different_sizes_are_not_compared_and_the_page_says_what_their_interval_covers():
    from fewstep.reporting.leaderboard import leaderboard

    teacher, student = row("teacher", 4, 0.0), row("dmd2", 4, 0.0)
    teacher["results"] = {"toy_fid": fid(50.0, 488)}
    student["results"] = {"toy_fid": fid(30.0, 432)}
    table = against_teacher([teacher, student])
    assert "not compared (FID at 432 vs 488 images)" in table and "better" not in table
    page = leaderboard([teacher, student])
    assert "`toy_fid`: the interval resamples prompts at the row's n images" in page


def test_the_stand_in_note_says_what_each_toy_slot_measures():
    from fewstep.reporting.leaderboard import stand_ins

    rows = [{"results": {"toy_hps": {"identity": {"stands_in_for": "HPSv2"}},
                         "toy_imagereward": {"identity": {"stands_in_for": "ImageReward"}}}}]
    text = stand_ins(rows)[0]
    assert "`toy_hps` fills the HPSv2 slot (a toy reward model, not HPSv2: image quality" in text
    assert "`toy_imagereward` fills the ImageReward slot (a toy reward model, not ImageReward: " \
        "prompt alignment)" in text
