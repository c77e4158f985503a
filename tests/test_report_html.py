"""The static HTML report: built from real score files of small toy sets, opened in headless
Chromium (Debian's `chromium`), with every table and image rendered and a screenshot saved."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from fewstep.cli import main
from fewstep.commands.prompts import eval_prompts
from fewstep.io import write_json, write_text
from fewstep.reporting import tables
from fewstep.toy import world
from fewstep.toy.features import shipped_feature_net
from metrics.sampleset import write_sample_set

SEEDS = (0, 1)
SETS = {  # name: (method, steps, nfe, noise): noisier renders stand in for worse samplers
    "teacher-1": ("teacher", 1, 2, 0.45), "teacher-2": ("teacher", 2, 4, 0.3),
    "dmd2": ("dmd2", 4, 4, 0.1), "amd": ("amd", 4, 4, 0.2)}


def write_set(folder, rows, method, steps, nfe, noise, seed):
    rng = np.random.default_rng(seed)
    images, records = [], []
    for r in rows:
        for s in SEEDS:
            image = world.render(r, s, 16)[0].astype(np.float64)
            images.append(np.clip(image + rng.normal(0, noise * 255, image.shape), 0, 255))
            records.append({"prompt_id": r["prompt_id"], "prompt": r["prompt"], "seed": s,
                            "family": "sdxl", "method": method, "nfe": nfe, "steps": steps,
                            "guidance": 2.0 if method == "teacher" else 1.0, "meta": r})
    write_sample_set(folder, np.stack(images).astype(np.uint8), records)
    student = None if method == "teacher" else {
        "method": method, "fidelity": "reconstructed" if method == "amd" else "faithful",
        "train_seconds": 60.0 * (2 if method == "amd" else 1), "reward": None}
    write_json(folder / "provenance.json", {"timing": {"latency_s": 0.002 * nfe}, "student": student})


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    rows = eval_prompts("sdxl", 8)
    prompts = root / "prompts.jsonl"
    write_text(prompts, "".join(json.dumps(r) + "\n" for r in rows))
    common = ["--prompts", str(prompts), "--seeds", *map(str, SEEDS), "--resolution", "16",
              "--metrics", "toy_fid", "toy_geneval", "toy_hps", "--feature-net",
              str(shipped_feature_net(16)), "--reference-images", "64", "--cache",
              str(root / "cache"), "--resamples", "50", "--allow-blank"]
    scores = {}
    for i, (name, spec) in enumerate(SETS.items()):
        write_set(root / name, rows, *spec, seed=i)
        scores[name] = root / f"{name}.json"
        against = [] if spec[0] == "teacher" else ["--against", str(scores["teacher-1"]),
                                                    str(scores["teacher-2"])]
        main(["score", "--samples", str(root / name), *common, *against, "--out", str(scores[name])])
    verdicts = root / "verdicts.json"
    write_json(verdicts, [{"claim_id": "AMD-T3-vs-DMD2", "world": "toy", "verdict": "contradicted",
                           "evidence": "toy_hps: amd - dmd2 < 0", "ours": {}}])
    main(["report", "--scores", *map(str, scores.values()), "--out", str(root / "board.md"),
          "--html", str(root / "html"), "--experiment", "unit", "--verdicts", str(verdicts)])
    return root / "html"


def test_report_has_tables_plots_grid_and_audit(report):
    page = (report / "index.html").read_text()
    assert page.count("<table>") == 4  # leaderboard, against the teacher, against DMD2, audit
    assert "toy_fid ↓" in page and "toy_hps ↑" in page and "amd (reconstructed)" in page
    assert "Δ toy_fid" in page and "against DMD2" in page and "AMD-T3-vs-DMD2" in page
    images = sorted(p.name for p in (report / "img").iterdir())
    assert len(images) == 3 * 2 + 2  # each metric against NFE and latency, the grid, training cost
    for src in images:
        assert f'src="img/{src}"' in page
        with Image.open(report / "img" / src) as image:
            assert np.asarray(image).std() > 0


def test_leakage_is_marked_where_a_method_trained_on_the_metrics_model():
    row = {"method": "amd", "nfe": 4, "steps": 4, "results": {},
           "sampling_provenance": {"student": {"reward": "hpsv2", "options": {}}}}
    assert tables.trained_on(row) == {"hpsv2.1"}
    row["sampling_provenance"]["student"] = {"options": {"reward_model": "toy"}}
    assert tables.trained_on(row) == set()
    res = {"value": 30.0, "ci_low": 29.0, "ci_high": 31.0, "n": 4, "higher_is_better": True}
    row = {**row, "results": {"hpsv2.1": res},
           "sampling_provenance": {"student": {"reward": "hpsv2"}}}
    assert 'class="leak"' in tables.leaderboard([row], ["hpsv2.1"])


def chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run "
                    "installs it where it runs as root)")
    return exe


def test_report_renders_in_headless_chromium(report, tmp_path):
    exe = chromium()
    url = (report / "index.html").resolve().as_uri()
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--allow-file-access-from-files"]
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    n_images = dom.stdout.count("<img ")
    assert n_images == 8 and f'data-images-ok="{n_images}/{n_images}"' in dom.stdout
    assert dom.stdout.count("<tr>") > 10
    shot = tmp_path / "report.png"
    out = subprocess.run([*flags, "--window-size=1400,2400", f"--screenshot={shot}", url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and shot.is_file(), out.stderr[-2000:]
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"))
    assert pixels.shape == (2400, 1400) and pixels.std() > 10  # not a blank page
    if os.environ.get("FEWSTEP_SCREENSHOT_DIR"):
        shutil.copy(shot, os.environ["FEWSTEP_SCREENSHOT_DIR"])


def test_the_html_leaderboard_says_what_an_fid_interval_covers():
    res = {"value": 30.0, "ci_low": 29.0, "ci_high": 31.0, "n": 488, "higher_is_better": False,
           "details": {"min_n": 1000, "comparable": False}}
    row = {"method": "dmd2", "nfe": 4, "steps": 4, "results": {"toy_fid": res}}
    page = tables.leaderboard([row], ["toy_fid"])
    assert "toy_fid: CI at the row&#x27;s n images with the reference fixed" in page
