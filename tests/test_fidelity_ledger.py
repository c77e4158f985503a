"""The fidelity ledger around the methods: `fewstep methods --fidelity` prints it, every trained
student records the entries that apply to its run (student.json), and every result table that
uses the student marks it (leaderboard, HTML report, claims audit)."""
import json
from dataclasses import dataclass

import pytest
import torch

from fewstep import audit, fidelity
from fewstep.cli import main
from fewstep.engine.distributed import DistInfo
from fewstep.engine.loop import Trainer
from fewstep.engine.run import build_method, export, toy_context
from fewstep.fidelity import Deviation
from fewstep.options import TrainOptions, choice
from fewstep.registry import METHODS
from fewstep.reporting import leaderboard, tables
from fewstep.toy import teachers
from methods.dummy import Dummy


@dataclass
class LedgeredOptions(TrainOptions):
    regression_loss: str = choice("l2", "lpips")
    stage: int = 1


LEDGER = (
    Deviation("regression_loss", "lpips", "VGG at 224 px is too slow on a CPU",
              "DMD sec. 3.3"),
    Deviation("critic precision", "fp32", "autocast everywhere", "official train_sd.py",
              ours="bf16"),
)


class Ledgered(Dummy):
    name = "ledgered"
    fidelity = "faithful"
    Options = LedgeredOptions
    PRESETS = {"toy": {**Dummy.PRESETS["toy"], "steps": 2},
               "ledgered-toy-paper": {**Dummy.PRESETS["toy"], "steps": 2,
                                      "regression_loss": "lpips"}}
    ledger = LEDGER

    @classmethod
    def for_options(cls, options):
        return Stage2 if options.stage == 2 else cls


class Stage2(Ledgered):
    """A staged method's second stage: its own entry on top of the registered class's."""
    ledger = LEDGER + (Deviation("stage-2 critic", "LoRA r32", "full critic", "official cfg",
                                 ours="full"),)


@pytest.fixture
def ledgered():
    METHODS.register("ledgered", Ledgered)
    yield "ledgered"
    for table in (METHODS._targets, METHODS._loaded, METHODS._origins):
        table.pop("ledgered", None)


@pytest.fixture(scope="module")
def sit_teacher():
    torch.manual_seed(0)
    return teachers.build("sit", resolution=16, seed=0)


# ------------------------------------------------------------------------------------- the CLI

def test_methods_fidelity_prints_each_entry_with_ours_per_preset(ledgered, capsys):
    assert main(["methods", "--fidelity", "ledgered"]) == 0
    out = capsys.readouterr().out
    assert "## ledgered" in out and "faithful" in out
    line = next(l for l in out.splitlines() if l.startswith("| `regression_loss`"))
    for text in ("| lpips |", "lpips: ledgered-toy-paper; l2: the others (default, toy)",
                 "VGG at 224 px", "DMD sec. 3.3"):
        assert text in line, text
    fixed = next(l for l in out.splitlines() if l.startswith("| critic precision"))
    assert "fp32" in fixed and "bf16 (every run)" in fixed
    # a -paper preset that keeps a nonzero entry (the fixed one) says so
    assert "ledgered-toy-paper" in out and "deviates from the paper in 1 entry" in out


def test_a_method_without_a_ledger_says_so_and_unknown_names_are_refused(capsys):
    assert main(["methods", "--fidelity", "dummy"]) == 0
    assert "no fidelity ledger declared" in capsys.readouterr().out
    assert main(["methods", "--fidelity", "dmd3"]) == 2
    assert "unknown method 'dmd3'" in capsys.readouterr().err


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("dmd", "dmd2", "amd", "rtdmd", "cdm", "dummy"):
        assert f"| {name} |" in out


def test_every_builtin_ledger_prints():
    """The built-in methods' ledgers (their owners' data) render without error."""
    from fewstep.commands.methods import fidelity_markdown
    text = fidelity_markdown(METHODS.names())
    assert all(f"## {name}" in text for name in ("dmd", "dmd2", "amd", "rtdmd", "cdm"))
    # every distillation method states its differences from its paper (the plumbing one has none)
    for name in ("dmd", "dmd2", "amd", "rtdmd", "cdm"):
        assert fidelity.ledger(METHODS.get(name)), f"{name} declares no fidelity ledger"


# --------------------------------------------------------------------------- the student record

def trained(teacher, name, tmp_path, preset="toy", overrides=None):
    ctx = toy_context(teacher, teacher.family, 16, 0, DistInfo())
    method = build_method(name, teacher, ctx, preset, dict(batch=2, **(overrides or {})))
    trainer = Trainer(method, tmp_path / "run")
    trainer.run(progress=False)
    export(method, trainer, tmp_path / "model", {"preset": preset})
    return json.loads((tmp_path / "model" / "student.json").read_text())


def test_student_json_lists_the_deviations_of_its_run(ledgered, sit_teacher, tmp_path):
    info = trained(sit_teacher, ledgered, tmp_path / "toy")
    assert info["checkpoint"] == "final"
    whats = [d["what"] for d in info["deviations"]]
    assert whats == ["regression_loss", "critic precision"]
    assert info["deviations"][0] == {"what": "regression_loss", "paper": "lpips", "ours": "l2",
                                     "why": "VGG at 224 px is too slow on a CPU",
                                     "source": "DMD sec. 3.3"}
    paper = trained(sit_teacher, ledgered, tmp_path / "paper", preset="ledgered-toy-paper")
    assert [d["what"] for d in paper["deviations"]] == ["critic precision"]
    # a staged method's record comes from the class that trained it (for_options)
    staged = trained(sit_teacher, ledgered, tmp_path / "s2", overrides={"stage": 2})
    assert "stage-2 critic" in [d["what"] for d in staged["deviations"]]


def test_a_dummy_student_records_no_deviations(sit_teacher, tmp_path):
    info = trained(sit_teacher, "dummy", tmp_path)
    assert info["deviations"] == [] and info["checkpoint"] == "final"


# ------------------------------------------------------------------------------- result tables

def score_row(method, deviations, preset="toy", metric="toy_fid"):
    res = {"value": 3.0, "ci_low": 2.5, "ci_high": 3.5, "n": 8, "higher_is_better": False,
           "version": "1", "identity": {}}
    student = {"method": method, "fidelity": "faithful", "preset": preset, "options": {},
               "deviations": deviations}
    return {"family": "sit", "method": method, "steps": 1, "nfe": 1, "guidance": 1.0,
            "results": {metric: res}, "sampling_provenance": {"student": student}}


L2 = [{"what": "regression_loss", "paper": "lpips", "ours": "l2", "why": "cpu",
       "source": "DMD sec. 3.3"}]


def test_the_leaderboard_marks_a_row_whose_run_deviates_and_lists_why():
    teacher = score_row("teacher", [])
    teacher["sampling_provenance"] = {}
    rows = [teacher, score_row("dmd", L2), score_row("dmd2", [])]
    text = leaderboard.leaderboard(rows)
    assert "| sit | dmd D1 |" in text and "| sit | dmd2 |" in text
    assert "D1: dmd (preset toy): regression_loss = l2 (paper: lpips; DMD sec. 3.3)" in text
    assert "fewstep methods --fidelity" in text


def test_a_paper_preset_with_an_entry_says_so_and_old_students_are_flagged():
    rows = [score_row("dmd2", L2, preset="dmd2-sdxl4-paper"), score_row("cdm", None)]
    del rows[1]["sampling_provenance"]["student"]["deviations"]
    text = leaderboard.leaderboard(rows)
    assert "dmd2 (preset dmd2-sdxl4-paper, a paper preset that deviates from the paper)" in text
    assert "cdm D?" in text and "records no deviations" in text


def test_the_html_tables_mark_the_deviating_run():
    row = score_row("dmd", L2)
    html = tables.leaderboard([row], ["toy_fid"])
    assert 'class="dev"' in html and "regression_loss = l2 (paper: lpips" in html


# ---------------------------------------------------------------------------------- the audit

def test_the_audit_shows_the_selection_mark_and_the_deviation_mark():
    claims, defaults = audit.load_claims("reports/claims.yaml")
    selected = {c["id"] for c in claims if c.get("selected_on_test")}
    assert {"DMD2-T2-1step-FID", "DMD2-T2-4step-FID", "DMD2-T2-4step-CLIP"} <= selected
    claim = next(c for c in claims if c["id"] == "DMD2-T2-4step-FID")
    v = audit.Verdict(claim["id"], "real", "not run", "no score")
    text = audit.render(claims, [v], defaults)
    line = next(l for l in text.splitlines() if l.startswith("| DMD2-T2-4step-FID |"))
    assert "(S)" in line and "S: the paper's checkpoint was selected on" in text
    # a verdict drawn from a run with deviations carries D and its footnote
    ident = {"resolution": [1024, 1024], "eval_resolution": 512, "mode": "clean"}
    row = score_row("dmd2", L2, preset="dmd2-sdxl4-paper", metric="fid")
    row.update(family="sdxl", nfe=4, prompt_set={"name": claim["protocol"]["prompt_set"]})
    row["results"]["fid"].update(n=10000, identity=ident)
    v = audit.judge_absolute(claim, [row], 0.02)
    assert v.deviations and "regression_loss = l2" in v.deviations[0]
    text = audit.render(claims, [v], defaults)
    line = next(l for l in text.splitlines() if l.startswith("| DMD2-T2-4step-FID |"))
    assert " D1" in line and "D1: dmd2 (preset dmd2-sdxl4-paper" in text


def test_a_malformed_selection_mark_is_named(tmp_path):
    bad = tmp_path / "claims.yaml"
    bad.write_text("claims:\n  - {id: X, paper: P, source: S, kind: relative, family: sdxl, "
                   "metric: fid, a: {method: a}, b: {method: b}, claim: a better, "
                   "selected_on_test: maybe}\n")
    with pytest.raises(audit.ClaimsError, match="claim X: selected_on_test must be true or false"):
        audit.load_claims(bad)


# ----------------------------------------------------------------------- checkpoint selection

def test_the_ledger_merges_base_classes_with_the_subclass_winning():
    class Base:
        ledger = (Deviation("a", 1, "w", "s"), Deviation("b", 2, "w", "s"))

    class Child(Base):
        ledger = (Deviation("b", 3, "child", "s"), Deviation("c", 4, "w", "s"))

    assert [(d.what, d.paper) for d in fidelity.ledger(Child)] == [("a", 1), ("b", 3), ("c", 4)]


def test_the_html_audit_shows_the_selection_and_deviation_marks():
    from fewstep.reporting.page import audit_section
    verdict = {"claim_id": "DMD2-T2-4step-FID", "world": "real", "verdict": "reproduced",
               "evidence": "e", "marks": ["S"], "deviations": ["dmd2 (preset p): x = 1"]}
    page = "".join(audit_section([verdict]))
    assert "DMD2-T2-4step-FID (S)" in page and 'class="dev"' in page and "x = 1" in page


def test_a_released_student_records_its_presets_deviations(ledgered, tmp_path):
    from safetensors.torch import save_file
    teacher_dir = teachers.SHIPPED / "sdxl"
    weights = tmp_path / "release.safetensors"
    save_file({k: v.contiguous() for k, v in teachers.load(teacher_dir).denoiser.state_dict().items()},
              str(weights))
    main(["release", "--method", ledgered, "--preset", "toy", "--teacher", str(teacher_dir),
          "--weights", str(weights), "--out", str(tmp_path / "model")])
    info = json.loads((tmp_path / "model" / "student.json").read_text())
    assert info["checkpoint"] == "released"
    assert [d["what"] for d in info["deviations"]] == ["regression_loss", "critic precision"]


def test_the_report_step_writes_the_ledger_of_its_methods(ledgered, tmp_path):
    rows = [score_row(ledgered, L2), score_row("teacher", [])]
    paths = []
    for i, row in enumerate(rows):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(row))
    out = tmp_path / "fidelity.md"
    main(["report", "--scores", *map(str, paths), "--out", str(tmp_path / "board.md"),
          "--fidelity", str(out)])
    text = out.read_text()
    assert "## ledgered (faithful)" in text and "| `regression_loss` |" in text
    assert "## teacher" not in text


def test_paper_presets_include_later_stages():
    assert fidelity.is_paper_preset("dmd2-sdxl4-paper")
    assert fidelity.is_paper_preset("rtdmd-sd3-paper-stage2")
    assert not fidelity.is_paper_preset("toy") and not fidelity.is_paper_preset(None)


def test_the_html_ledger_names_a_method_that_is_not_installed():
    from fewstep.reporting.page import ledger_section
    text = "".join(ledger_section([score_row("dmd2", []), score_row("not_installed", [])]))
    assert "## dmd2" in text and "## not_installed" in text and "Not installed" in text
