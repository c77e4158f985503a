"""The claims audit (fewstep/audit.py): claims as data, verdicts by protocol, toy-scale evidence."""
import json

import numpy as np
import pytest

from fewstep import audit
from fewstep.cli import main
from metrics.base import MetricResult

CLAIMS = "reports/claims.yaml"


def result(name, values, higher=True, identity=None, ci=None):
    values = np.asarray(values, dtype=float)
    rows = [{"prompt_id": f"p{i // 2}", "seed": i % 2, "path": f"{i:06d}.png", "score": float(v)}
            for i, v in enumerate(values)]
    lo, hi = ci or (values.mean() - 0.1, values.mean() + 0.1)
    return MetricResult(name, "1", higher, float(values.mean()), lo, hi, len(values), rows,
                        identity or {"resolution": [16, 16]}).to_dict()


@pytest.fixture
def prompts(tmp_path):
    """The prompt file the synthetic score rows were 'sampled' from (20 prompts x seeds 0, 1)."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt_id": f"p{i}", "prompt": f"prompt {i}"}) + "\n"
                            for i in range(20)))
    return str(path)


def row(family, method, nfe, results, prompts="unused", seeds=3):
    """A score row; a student cell of `seeds` training seeds (the seed rule needs 3 a side for a
    method-vs-method verdict: tests/test_seed_verdicts.py)."""
    args = {"prompts": prompts, "seeds": [0, 1], "resolution": 16, "allow_blank": True,
            "resamples": 200, "confidence": 0.95, "bootstrap_seed": 0, "metric_options": {}}
    out = {"family": family, "method": method, "nfe": nfe, "results": results,
           "sample_set": f"results/samples/{family}/{method}", "scoring_args": args}
    if method != "teacher":
        out["n_training_seeds"] = seeds
    return out


def test_the_shipped_claims_file_loads_and_bad_claims_are_named(tmp_path):
    claims, defaults = audit.load_claims(CLAIMS)
    assert {c["paper"] for c in claims} >= {"DMD", "DMD2", "AMD", "RTDMD"}
    assert defaults["noise_tolerance"] == 0.02
    bad = tmp_path / "claims.yaml"
    bad.write_text("claims:\n  - {id: X, paper: P, source: S, kind: relative, family: sdxl, "
                   "metric: fid, a: {method: amd}, claim: a wins}\n  - {id: X, paper: P, source: S,"
                   " kind: absolut, family: sdxl, metric: fid}\n")
    with pytest.raises(audit.ClaimsError) as err:
        audit.load_claims(bad)
    text = str(err.value)
    assert "claim X: relative claims need 'b'" in text and "claim must be one of" in text
    assert "kind must be one of" in text and "duplicate claim id 'X'" in text


@pytest.mark.parametrize("value,higher,expected", [
    (10.0, True, "reproduced"),       # inside our CI [9.9, 10.1]
    (9.0, True, "reproduced"),        # ours better than claimed
    (10.25, True, "within noise"),    # 1.5 % above our upper bound
    (12.0, True, "contradicted"),
    (9.95, False, "reproduced"),      # lower is better: inside the CI
    (9.0, False, "contradicted"),     # claimed FID far below ours
    (9.8, False, "within noise"),     # 1 % below our lower bound
])
def test_absolute_verdicts(value, higher, expected):
    res = {"value": 10.0, "ci_low": 9.9, "ci_high": 10.1, "higher_is_better": higher}
    assert audit.absolute_verdict(value, res, tolerance=0.02) == expected


@pytest.mark.parametrize("lo,hi,higher,claim,expected", [
    (0.1, 0.3, True, "a better", "reproduced"),
    (-0.1, 0.3, True, "a better", "within noise"),
    (-0.3, -0.1, True, "a better", "contradicted"),
    (-0.3, -0.1, False, "a better", "reproduced"),   # lower is better (FID): negative wins
    (-0.1, 0.3, True, "a not worse", "reproduced"),
])
def test_relative_verdicts(lo, hi, higher, claim, expected):
    paired = {"difference": (lo + hi) / 2, "ci_low": lo, "ci_high": hi}
    assert audit.relative_verdict(paired, higher, claim) == expected


def test_absolute_claims_not_run_mismatch_and_match():
    claim = {"id": "C", "paper": "P", "source": "S", "kind": "absolute", "method": "amd",
             "family": "sdxl", "metric": "hpsv2.1", "value": 31.25,
             "protocol": {"nfe": 4, "resolution": 16, "identity": {"hps_version": "v2.1"}}}
    assert audit.judge_absolute(claim, [], 0.02).verdict == "not run"
    ident = {"resolution": [16, 16], "hps_version": "v2.1"}
    wrong_nfe = row("sdxl", "amd", 2, {"hpsv2.1": result("hpsv2.1", [31.0] * 4, identity=ident)})
    v = audit.judge_absolute(claim, [wrong_nfe], 0.02)
    assert v.verdict == "protocol mismatch (nfe: claim 4, ours 2)"
    ident20 = {"resolution": [16, 16], "hps_version": "v2.0"}
    v20 = row("sdxl", "amd", 4, {"hpsv2.1": result("hpsv2.1", [31.3] * 4, identity=ident20)})
    assert "hps_version: claim v2.1, ours v2.0" in audit.judge_absolute(claim, [v20], 0.02).verdict
    good = row("sdxl", "amd", 4, {"hpsv2.1": result("hpsv2.1", [31.3] * 4, identity=ident)})
    assert audit.judge_absolute(claim, [wrong_nfe, good], 0.02).verdict == "reproduced"
    claim["protocol"].update(prompt_set="drawbench", prompt_set_sha256="aaa")
    good["prompt_set"] = {"name": "drawbench", "sha256": "bbb"}  # same name, other prompts
    assert audit.judge_absolute(claim, [good], 0.02).verdict == (
        "protocol mismatch (prompt_set_sha256: claim aaa, ours bbb)")


def test_relative_claims_run_on_the_toy_world_with_the_slot_metric(prompts):
    """AMD beats DMD2 on HPSv2: not run on the paper protocol (no real scores), judged on the
    toy world with toy_hps from a real paired bootstrap over the shared prompts and seeds."""
    claims, defaults = audit.load_claims(CLAIMS)
    claim = next(c for c in claims if c["id"] == "AMD-T3-vs-DMD2")
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 40)
    rows = [row("sdxl", "amd", 4, {"toy_hps": result("toy_hps", base + 0.5)}, prompts),
            row("sdxl", "dmd2", 4, {"toy_hps": result("toy_hps", base)}, prompts)]
    from fewstep.pairing import paired
    real, toy = (audit.judge_relative(claim, rows, w, paired) for w in ("real", "toy"))
    assert real.verdict == "not run" and "hpsv2.1" in real.evidence
    assert toy.verdict == "reproduced" and toy.ours["difference"] == pytest.approx(0.5)
    rows[0]["results"]["toy_hps"] = result("toy_hps", base - 0.5)
    assert audit.judge_relative(claim, rows, "toy", paired).verdict == "contradicted"
    teacher_claim = next(c for c in claims if c["id"] == "RT-T1-ImageReward-vs-teacher")
    rows = [row("sd3", method, nfe, {"toy_imagereward": result("toy_imagereward", base + shift)},
                prompts) for method, nfe, shift in (("rtdmd", 4, 0), ("teacher", 8, 0),
                                                    ("teacher", 64, 1))]
    v = audit.judge_relative(teacher_claim, rows, "toy", paired)
    assert "largest NFE (64)" in v.evidence and v.verdict == "contradicted"


def test_cli_writes_the_audit(tmp_path, prompts):
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, 40)
    paths = []
    for method, shift in (("amd", 0.4), ("dmd2", 0.0)):
        path = tmp_path / f"{method}.json"
        path.write_text(json.dumps(row("sdxl", method, 4, {
            "toy_hps": result("toy_hps", base + shift)}, prompts)))
        paths.append(str(path))
    out, js = tmp_path / "audit.md", tmp_path / "audit.json"
    main(["audit", "--claims", CLAIMS, "--scores", *paths, "--out", str(out), "--json", str(js)])
    text = out.read_text()
    assert "| AMD-T3-vs-DMD2 |" in text and "toy-scale evidence | **reproduced**" in text
    assert "| DMD-T3 |" in text and "**not run**" in text
    verdicts = json.loads(js.read_text())
    assert {v["world"] for v in verdicts} == {"real", "toy"}


def fid_result(value, n, min_n=1000):
    """A set-level FID against fixed reference statistics (its details carry min_n)."""
    res = result("fid", [value] * 4, higher=False, identity={"resolution": [16, 16]},
                 ci=(value - 1, value + 1))
    res.update(n=n, details={"min_n": min_n, "comparable": n >= min_n, "n_reference": 5000})
    return res


def test_an_fid_below_its_comparable_size_is_not_judged_against_a_published_fid():
    claim = {"id": "C", "paper": "P", "source": "S", "kind": "absolute", "method": "dmd2",
             "family": "sdxl", "metric": "fid", "value": 19.32, "protocol": {"nfe": 4}}
    small = row("sdxl", "dmd2", 4, {"fid": fid_result(19.3, n=488)})
    v = audit.judge_absolute(claim, [small], 0.02)
    assert v.verdict == "not comparable (FID at 488 images; a published FID needs >= 1000)"
    big = row("sdxl", "dmd2", 4, {"fid": fid_result(19.3, n=10000)})
    v = audit.judge_absolute(claim, [big], 0.02)
    assert v.verdict == "reproduced" and "at 10000 images, reference fixed" in v.evidence


def test_fids_at_different_sample_sizes_are_never_compared():
    claim = {"id": "R", "paper": "P", "source": "S", "kind": "relative", "family": "sit",
             "metric": "fid", "a": {"method": "dmd2", "nfe": 4}, "b": {"method": "dmd", "nfe": 1},
             "claim": "a better"}
    rows = [row("sit", "dmd2", 4, {"fid": fid_result(10.0, n=488)}),
            row("sit", "dmd", 1, {"fid": fid_result(20.0, n=432)})]
    never = lambda *args: pytest.fail("FIDs at different N must not be paired")  # noqa: E731
    v = audit.judge_relative(claim, rows, "real", never)
    assert v.verdict == "not comparable (FID at 488 vs 432 images, reference fixed)"
    rows[1]["results"]["fid"] = fid_result(20.0, n=488)
    v = audit.judge_relative(claim, rows, "real",
                             lambda *a: {"difference": -10.0, "ci_low": -12.0, "ci_high": -8.0})
    assert v.verdict == "reproduced" and "at 488 images, reference fixed" in v.evidence


def test_a_pinned_checkpoint_is_not_the_papers_model_for_an_absolute_claim():
    """A file scored under a user's sha256 pin is not the published HPS model the paper used."""
    claim = {"id": "C", "paper": "P", "source": "S", "kind": "absolute", "method": "amd",
             "family": "sdxl", "metric": "hpsv2.1", "value": 31.25,
             "protocol": {"nfe": 4, "identity": {"hps_version": "v2.1"}}}
    ident = {"resolution": [16, 16], "hps_version": "v2.1", "checkpoint_sha256": "ab" * 32,
             "checkpoint_verified": True, "checkpoint_published": False}
    pinned = row("sdxl", "amd", 4, {"hpsv2.1": result("hpsv2.1", [31.3] * 4, identity=ident)})
    v = audit.judge_absolute(claim, [pinned], 0.02)
    assert v.verdict == ("protocol mismatch (checkpoint: claim the published file, ours a file "
                         f"pinned by its sha256 {'ab' * 32})")
    pinned["results"]["hpsv2.1"]["identity"]["checkpoint_published"] = True
    assert audit.judge_absolute(claim, [pinned], 0.02).verdict == "reproduced"


def test_a_cell_of_three_seeds_compares_its_fids_set_by_set_with_the_teacher():
    """A 3-seed cell's FID is the mean of three FIDs of 488 images each: comparable with a teacher
    set of 488 images (not "1464 vs 488"), and every evidence line names the per-set size."""
    claim = {"id": "R", "paper": "P", "source": "S", "kind": "relative", "family": "sit",
             "metric": "fid", "a": {"method": "dmd2", "nfe": 4}, "b": {"method": "teacher", "nfe": 64},
             "claim": "a better"}
    cell = fid_result(10.0, n=3 * 488)
    cell["details"]["per_seed"] = {"0": 9.0, "1": 10.0, "2": 11.0}
    rows = [row("sit", "dmd2", 4, {"fid": cell}), row("sit", "teacher", 64, {"fid": fid_result(20.0, n=488)})]
    v = audit.judge_relative(claim, rows, "real", lambda *a: {
        "difference": -10.0, "ci_low": -12.0, "ci_high": -8.0, "p_value": 0.001,
        "n_training_seeds": {"a": 3, "b": None}})
    assert "not comparable" not in v.verdict
    assert "at 488 images, reference fixed" in v.evidence
    assert audit.set_images(cell) == 488
