"""No output path outside its own folder: experiment names are conservative, the HTML report lives
strictly inside the leaderboard's folder, and an atomic folder write never replaces the working
directory, an ancestor of it, or a folder it was told to protect."""
import os

import pytest

from fewstep import config
from fewstep.io import UnsafeTargetError, atomic_path


@pytest.mark.parametrize("name", [".", "..", ".hidden", "-rf", "a/b", "a b", ""])
def test_experiment_names_are_conservative(name):
    cfg = config.load()
    cfg["mlflow"]["experiment"] = name
    with pytest.raises(config.ConfigError, match="mlflow/experiment"):
        config.validate(cfg)


@pytest.mark.parametrize("name", ["fewstep-toy", "paper.sdxl_v2", "A1"])
def test_ordinary_experiment_names_pass(name):
    cfg = config.load()
    cfg["mlflow"]["experiment"] = name
    config.validate(cfg)


def test_atomic_write_refuses_the_working_directory_and_its_ancestors(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "reports").mkdir(parents=True)
    monkeypatch.chdir(work)
    for target in (".", "..", "reports/..", str(tmp_path)):
        with pytest.raises(UnsafeTargetError, match="refusing to replace"):
            with atomic_path(target) as tmp:
                tmp.mkdir()
    assert (work / "reports").is_dir()


def test_atomic_write_refuses_a_protected_folder(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "leaderboard.md").write_text("board")
    with pytest.raises(UnsafeTargetError, match="refusing to replace"):
        with atomic_path(reports / ".", protect=[reports]) as tmp:
            tmp.mkdir()
    with atomic_path(reports / "exp", protect=[reports]) as tmp:  # inside it is fine
        tmp.mkdir()
    assert (reports / "leaderboard.md").read_text() == "board" and (reports / "exp").is_dir()


def test_report_html_folder_must_lie_inside_the_leaderboards_folder(tmp_path, monkeypatch):
    from fewstep.commands import report

    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "claims.yaml").write_text("claims: []\n")
    for html in ("reports/.", "reports", ".", "elsewhere"):
        with pytest.raises(ValueError, match="inside reports"):
            report.html_folder(html, "reports/leaderboard.md")
    assert report.html_folder("reports/fewstep-toy", "reports/leaderboard.md").name == "fewstep-toy"
    assert (tmp_path / "reports" / "claims.yaml").is_file()
    assert os.listdir(tmp_path / "reports") == ["claims.yaml"]
