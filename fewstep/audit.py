"""The claims audit: the papers' claims (reports/claims.yaml) against the harness's score files.

Verdicts:
* absolute claim (a number under a protocol): "not run" when no score file has the claim's
  family, method and metric; "protocol mismatch (<field>: claim X, ours Y)" when the closest
  candidate differs in a protocol field; else "reproduced" when the claimed value lies in our CI
  or ours is better, "within noise" when the claim is better than our CI by at most the noise
  tolerance (relative), and "contradicted" beyond it.
* relative claim ("A beats B"): the paired difference A - B on the shared noise (both sets carry
  the same prompts and seeds): "reproduced" when its CI excludes 0 in the claimed direction,
  "within noise" when it contains 0, "contradicted" when it excludes 0 the other way.
Relative claims are also judged on the toy world with the toy metric of the same slot; those
verdicts are labelled toy-scale evidence and never stand in for the real protocol.
The noise tolerance is a named option (claims.yaml `defaults.noise_tolerance`): the papers report
no variances, so how close is "close" is our choice, stated in the report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

KINDS = ("absolute", "relative")
RELATIVE_CLAIMS = ("a better", "a not worse")
# the toy metric in the same slot as a real one (README metrics table)
TOY_SLOT = {"fid": "toy_fid", "hpsv2.1": "toy_hps", "hpsv2.0": "toy_hps",
            "imagereward": "toy_imagereward", "geneval": "toy_geneval",
            "geneval_hf_m2f": "toy_geneval"}
PROTOCOL_FIELDS = ("nfe", "resolution", "prompt_set", "prompt_set_sha256", "n_samples")


class ClaimsError(ValueError):
    pass


@dataclass
class Verdict:
    claim_id: str
    world: str               # "real" (the claim's protocol) or "toy" (toy-scale evidence)
    verdict: str
    evidence: str = ""
    ours: dict = field(default_factory=dict)
    # the claim's marks: "L" (the method trained on the metric's model), "S" (the paper's
    # checkpoint was selected on the set the claim is measured on)
    marks: list = field(default_factory=list)
    # of each student score row the verdict used whose run deviates from its paper: the
    # footnote (fewstep.fidelity.run_note); the report marks the verdict D
    deviations: list = field(default_factory=list)


# ------------------------------------------------------------------------------- claims file

def _claim_problems(claim: dict) -> list[str]:
    where = f"claim {claim.get('id', '<no id>')}"
    problems = [f"{where}: missing {k!r}" for k in ("id", "paper", "source", "kind", "family",
                                                     "metric") if k not in claim]
    kind = claim.get("kind")
    if kind not in KINDS:
        return problems + [f"{where}: kind must be one of {KINDS}, got {kind!r}"]
    if kind == "absolute":
        problems += [f"{where}: absolute claims need {k!r}" for k in ("method", "value", "protocol")
                     if k not in claim]
    else:
        problems += [f"{where}: relative claims need {k!r}" for k in ("a", "b", "claim")
                     if k not in claim]
        if claim.get("claim", RELATIVE_CLAIMS[0]) not in RELATIVE_CLAIMS:
            problems.append(f"{where}: claim must be one of {RELATIVE_CLAIMS}")
    for flag in ("leakage", "selected_on_test"):
        if not isinstance(claim.get(flag, False), bool):
            problems.append(f"{where}: {flag} must be true or false, got {claim[flag]!r}")
    return problems


def load_claims(path) -> tuple[list[dict], dict]:
    """(claims, defaults) from a claims YAML; every malformed claim is named."""
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("claims"), list):
        raise ClaimsError(f"{path}: expected a mapping with a 'claims' list")
    claims, problems, seen = data["claims"], [], set()
    for claim in claims:
        problems += _claim_problems(claim)
        if claim.get("id") in seen:
            problems.append(f"duplicate claim id {claim['id']!r}")
        seen.add(claim.get("id"))
    if problems:
        raise ClaimsError(f"{path}:\n  " + "\n  ".join(problems))
    return claims, {"noise_tolerance": 0.02, **(data.get("defaults") or {})}


# ----------------------------------------------------------------------------- score records

def protocol_of(row: dict, metric: str) -> dict:
    """The protocol fields of one metric's result in a score file."""
    res = row["results"][metric]
    ident = res.get("identity", {})
    resolution = ident.get("resolution")
    prompt_set = row.get("prompt_set") or {}
    return {"nfe": row.get("nfe"), "resolution": resolution[0] if resolution else None,
            "prompt_set": prompt_set.get("name"), "prompt_set_sha256": prompt_set.get("sha256"),
            "n_samples": res.get("n"), "identity": ident}


def protocol_differences(claimed: dict, ours: dict) -> list[str]:
    """'field: claim X, ours Y' for every protocol field the claim fixes and ours differs in."""
    out = []
    for key in PROTOCOL_FIELDS:
        if key in claimed and claimed[key] != ours.get(key):
            out.append(f"{key}: claim {claimed[key]}, ours {ours.get(key)}")
    for key, value in (claimed.get("identity") or {}).items():
        if ours["identity"].get(key) != value:
            out.append(f"{key}: claim {value}, ours {ours['identity'].get(key)}")
    if ours["identity"].get("checkpoint_published") is False:  # a user's pin: not the paper's model
        out.append("checkpoint: claim the published file, ours a file pinned by its sha256 "
                   f"{ours['identity'].get('checkpoint_sha256')}")
    return out


def run_deviations(*rows: dict) -> list[str]:
    """The fidelity notes of the student rows a verdict used (teachers and runs that follow
    their paper in every ledger entry give none)."""
    from fewstep.fidelity import run_note

    out = []
    for row in rows:
        info = (row.get("sampling_provenance") or {}).get("student") or {}
        if row["method"] == "teacher" or not info:
            continue
        entries = info.get("deviations")
        if entries is None or entries:
            out.append(run_note(row["method"], info.get("preset"), entries))
    return out


def claim_marks(claim: dict) -> list[str]:
    """L: the method trained on the metric's model; S: the paper's checkpoint was selected on
    the set the claim is measured on (fewstep/notes/claims.md)."""
    return [m for m, key in (("L", "leakage"), ("S", "selected_on_test")) if claim.get(key)]


def candidates(rows: list[dict], family: str, method: str, metric: str) -> list[dict]:
    return [r for r in rows if r["family"] == family and r["method"] == method
            and metric in r["results"]]


# -------------------------------------------------------------------------------- verdicts

def better(x: float, y: float, higher_is_better: bool) -> bool:
    return x > y if higher_is_better else x < y


def fixed_reference(result: dict) -> bool:
    """A set-level distance to fixed reference statistics (FID): its interval resamples prompts
    at the set's size with the reference held fixed, so it covers the FID at that N, not the
    infinite-sample FID, and FIDs at different N are not comparable (their bias differs)."""
    return "min_n" in (result.get("details") or {})


def size_note(result: dict) -> str:
    """What an FID interval covers, for the evidence column ("" for other metrics)."""
    return f" at {result['n']} images, reference fixed" if fixed_reference(result) else ""


def absolute_verdict(value: float, result: dict, tolerance: float) -> str:
    """The claimed value against our estimate and CI (direction from the metric)."""
    lo, hi, up = result["ci_low"], result["ci_high"], result["higher_is_better"]
    if lo <= value <= hi or better(result["value"], value, up):
        return "reproduced"
    gap = abs(value - (hi if up else lo)) / max(abs(value), 1e-12)
    return "within noise" if gap <= tolerance else "contradicted"


def relative_verdict(paired: dict, higher_is_better: bool, claim: str) -> str:
    """Paired A - B: reproduced / within noise / contradicted for "a better" or "a not worse"."""
    lo, hi = paired["ci_low"], paired["ci_high"]
    a_better = lo > 0 if higher_is_better else hi < 0
    a_worse = hi < 0 if higher_is_better else lo > 0
    if a_worse:
        return "contradicted"
    if a_better or claim == "a not worse":
        return "reproduced"
    return "within noise"


def judge_absolute(claim: dict, rows: list[dict], tolerance: float) -> Verdict:
    found = candidates(rows, claim["family"], claim["method"], claim["metric"])
    if not found:
        return Verdict(claim["id"], "real", "not run",
                       f"no score of {claim['method']} on {claim['family']} with {claim['metric']}")
    diffs = [(protocol_differences(claim["protocol"], protocol_of(r, claim["metric"])), r)
             for r in found]
    diffs.sort(key=lambda d: len(d[0]))
    differences, row = diffs[0]
    result = row["results"][claim["metric"]]
    ours = {"value": result["value"], "ci": [result["ci_low"], result["ci_high"]],
            "score_file": row.get("score_file")}
    if differences:
        return Verdict(claim["id"], "real", "protocol mismatch (" + "; ".join(differences) + ")",
                       "closest score file differs in the protocol", ours,
                       deviations=run_deviations(row))
    evidence = (f"claimed {claim['value']}, ours {result['value']:.4g} "
                f"[{result['ci_low']:.4g}, {result['ci_high']:.4g}]{size_note(result)}")
    if fixed_reference(result) and not result["details"].get("comparable", True):
        verdict = (f"not comparable (FID at {result['n']} images; a published FID needs >= "
                   f"{result['details']['min_n']})")
    else:
        verdict = absolute_verdict(float(claim["value"]), result, tolerance)
    return Verdict(claim["id"], "real", verdict, evidence, ours, deviations=run_deviations(row))


def pick(rows: list[dict], family: str, side: dict, metric: str, world: str) -> tuple[dict | None, str]:
    """The score row of one side of a relative claim, and how it was matched.

    Real world: the exact method and NFE. Toy world: the student at its own NFE (the toy presets
    sample each method at its paper's step count), the teacher at its largest NFE (the toy
    stand-in for the papers' many-step teacher)."""
    found = candidates(rows, family, side["method"], metric)
    if world == "real":
        exact = [r for r in found if r.get("nfe") == side.get("nfe")]
        return (exact[0], f"NFE {side.get('nfe')}") if exact else (None, "")
    if not found:
        return None, ""
    if side["method"] == "teacher":
        row = max(found, key=lambda r: r.get("nfe") or 0)
        return row, f"teacher at its largest NFE ({row.get('nfe')})"
    row = found[0]
    return row, f"NFE {row.get('nfe')}"


def judge_relative(claim: dict, rows: list[dict], world: str, pair) -> Verdict:
    """pair(metric, row_a, row_b) -> paired-difference dict (difference, ci_low, ci_high)."""
    metric = claim["metric"] if world == "real" else TOY_SLOT.get(claim["metric"])
    if metric is None:
        return Verdict(claim["id"], world, "not run", f"no toy metric in the {claim['metric']} slot")
    a, how_a = pick(rows, claim["family"], claim["a"], metric, world)
    b, how_b = pick(rows, claim["family"], claim["b"], metric, world)
    if a is None or b is None:
        missing = claim["a"]["method"] if a is None else claim["b"]["method"]
        return Verdict(claim["id"], world, "not run",
                       f"no {metric} score of {missing} on {claim['family']}")
    ra, rb = a["results"][metric], b["results"][metric]
    if fixed_reference(ra) and ra["n"] != rb["n"]:
        return Verdict(claim["id"], world, f"not comparable (FID at {ra['n']} vs {rb['n']} images, "
                       "reference fixed)", f"{metric}: {claim['a']['method']} ({how_a}) and "
                       f"{claim['b']['method']} ({how_b}) were scored on sets of different size",
                       deviations=run_deviations(a, b))
    paired = pair(metric, a, b)
    up = ra["higher_is_better"]
    verdict = relative_verdict(paired, up, claim["claim"])
    evidence = (f"{metric}: {claim['a']['method']} ({how_a}) - {claim['b']['method']} ({how_b}) = "
                f"{paired['difference']:+.4g} [{paired['ci_low']:+.4g}, {paired['ci_high']:+.4g}]"
                f"{size_note(ra)} ({'higher' if up else 'lower'} is better)")
    return Verdict(claim["id"], world, verdict, evidence,
                   {"difference": paired["difference"],
                    "ci": [paired["ci_low"], paired["ci_high"]]}, deviations=run_deviations(a, b))


def audit(claims: list[dict], rows: list[dict], defaults: dict, pair) -> list[Verdict]:
    """Every claim judged on the real protocol; relative ones also on the toy world."""
    out = []
    for claim in claims:
        if claim["kind"] == "absolute":
            judged = [judge_absolute(claim, rows, float(defaults["noise_tolerance"]))]
        else:
            judged = [judge_relative(claim, rows, world, pair) for world in ("real", "toy")]
        for verdict in judged:
            verdict.marks = claim_marks(claim)
        out += judged
    return out


# ---------------------------------------------------------------------------------- report

def render(claims: list[dict], verdicts: list[Verdict], defaults: dict) -> str:
    by_id = {c["id"]: c for c in claims}
    numbers: dict[str, int] = {}  # deviation note -> its D number, in order of first use
    lines = ["# Claims audit", "",
             "Generated by `fewstep audit` from `reports/claims.yaml` and the score files; never "
             "edited by hand. Verdicts: reproduced, within noise (absolute claims: within "
             f"{100 * float(defaults['noise_tolerance']):g} % of the claimed value beyond our CI; "
             "relative claims: the paired CI contains 0), contradicted, not run, protocol "
             "mismatch (naming each differing field), not comparable (an FID on fewer images "
             "than a published one needs, or two FIDs at different sample sizes). An FID's "
             "interval resamples prompts at its set's size with the reference statistics fixed: "
             "it covers the FID at that N, not the infinite-sample FID. Toy rows are toy-scale evidence: the same "
             "relative claim on the toy world with the toy metric in the same slot, never a "
             "check of the paper's number. L: the method trained on this metric's model. "
             "S: the paper's checkpoint was selected on the set the claim is measured on (the "
             "harness evaluates its final checkpoint). D<n>: a run behind our verdict deviates "
             "from its paper (footnotes below; every method's ledger: `fewstep methods "
             "--fidelity`).", "",
             "| claim | paper (source, reliability) | claim | world | verdict | evidence |",
             "|---|---|---|---|---|---|"]
    for v in verdicts:
        c = by_id[v.claim_id]
        if c["kind"] == "absolute":
            what = f"{c['method']} {c['metric']} = {c['value']} on {c['family']}"
        else:
            what = (f"{c['a']['method']} {c['claim'].removeprefix('a ')} than "
                    f"{c['b']['method']} on {c['metric']}, {c['family']}")
        what += "".join(f" ({m})" for m in (v.marks or claim_marks(c)))
        marks = "".join(f" D{numbers.setdefault(n, len(numbers) + 1)}" for n in v.deviations)
        world = "toy-scale evidence" if v.world == "toy" else "paper protocol"
        lines.append(f"| {c['id']} | {c['paper']} ({c['source']}, {c['reliability']}) | {what} | "
                     f"{world} | **{v.verdict}**{marks} | {v.evidence} |")
    if numbers:
        lines += ["", "Deviations from the papers of the runs behind the verdicts:", ""]
        lines += [f"- D{i}: {note}" for note, i in numbers.items()]
    return "\n".join(lines) + "\n"
