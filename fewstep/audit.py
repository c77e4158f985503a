"""The claims audit: the papers' claims (reports/claims.yaml) against the harness's score files.

Verdicts:
* absolute claim (a number under a protocol): "not run" when no score file has the claim's
  family, method and metric; "protocol mismatch (<field>: claim X, ours Y)" when the closest
  candidate differs in a protocol field; else "reproduced" when the claimed value lies in our CI
  or ours is better, "within noise" when the claim is better than our CI by at most the noise
  tolerance (relative), and "contradicted" beyond it.
* relative claim ("A beats B"): the paired difference A - B on the shared noise (both sets carry
  the same prompts and seeds). Its interval resamples training seeds and then prompts with all
  their images (one training seed: prompts only). The verdict is decided by the Holm-adjusted
  p-value (metrics/multiplicity.py; one family: every tested relative verdict of the report) and
  the sign of the difference: "reproduced" when adjusted p <= alpha (1 - the interval's level)
  in the claimed direction, "contradicted" the other way, "within noise" otherwise; a paired dict
  without a p-value (a score file from before p-values) is decided by its raw interval and is not
  in the family.
* training seeds: a method-vs-method claim with fewer than MIN_TRAINING_SEEDS trained seeds on
  either side is "inconclusive (n training seeds)", never reproduced or contradicted (one run per
  method says nothing about the method); a claim against a teacher keeps its direction and says
  "(1 training seed: interval covers prompts only)" when the student has one.
Relative claims are also judged on the toy world with the toy metric of the same slot; those
verdicts are labelled toy-scale evidence and never stand in for the real protocol.
The noise tolerance is a named option (claims.yaml `defaults.noise_tolerance`): the papers report
no variances, so how close is "close" is our choice, stated in the report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from metrics.multiplicity import direction, holm

KINDS = ("absolute", "relative")
RELATIVE_CLAIMS = ("a better", "a not worse")
# the toy metric in the same slot as a real one (README metrics table)
TOY_SLOT = {"fid": "toy_fid", "hpsv2.1": "toy_hps", "hpsv2.0": "toy_hps",
            "imagereward": "toy_imagereward", "geneval": "toy_geneval",
            "geneval_hf_m2f": "toy_geneval"}
# a method-vs-method verdict needs this many trained replicates a side (a released checkpoint,
# 0 trained seeds, is the published model itself and is judged as it is)
MIN_TRAINING_SEEDS = 3
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
    # relative verdicts: the raw two-sided p-value, the Holm-adjusted one and the family's size
    # (None where the comparison was not tested: no p-value, or the training-seed rule decided)
    p_value: float | None = None
    p_holm: float | None = None
    family: int | None = None


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


def set_images(result: dict) -> int:
    """The images behind one FID: a cell of k training seeds averages k FIDs of n / k images each
    (its n counts every seed's images), and FIDs compare only at equal set size."""
    return result["n"] // max(1, len((result.get("details") or {}).get("per_seed") or {}))


def size_note(result: dict) -> str:
    """What an FID interval covers, for the evidence column ("" for other metrics)."""
    return f" at {set_images(result)} images, reference fixed" if fixed_reference(result) else ""


def absolute_verdict(value: float, result: dict, tolerance: float) -> str:
    """The claimed value against our estimate and CI (direction from the metric)."""
    lo, hi, up = result["ci_low"], result["ci_high"], result["higher_is_better"]
    if lo <= value <= hi or better(result["value"], value, up):
        return "reproduced"
    gap = abs(value - (hi if up else lo)) / max(abs(value), 1e-12)
    return "within noise" if gap <= tolerance else "contradicted"


def raw_direction(paired: dict, higher_is_better: bool) -> str | None:
    """"better" / "worse" for A when the raw interval excludes 0 (the rule of a paired dict
    without a p-value), else None."""
    lo, hi = paired["ci_low"], paired["ci_high"]
    if lo > 0 or hi < 0:
        return "better" if (lo > 0) == higher_is_better else "worse"
    return None


def relative_verdict(paired: dict, higher_is_better: bool, claim: str,
                     p_adjusted: float | None = None) -> str:
    """Paired A - B: reproduced / within noise / contradicted for "a better" or "a not worse".
    Decided by the (Holm-adjusted) p-value and the estimate's sign where there is a p-value
    (p_adjusted, else the paired dict's own p_value: a family of one), else by the raw CI."""
    p = paired.get("p_value") if p_adjusted is None else p_adjusted
    if p is None:
        way = raw_direction(paired, higher_is_better)
    else:
        way = direction(paired["difference"], p, alpha_of(paired), higher_is_better)
    if way == "worse":
        return "contradicted"
    if way == "better" or claim == "a not worse":
        return "reproduced"
    return "within noise"


def alpha_of(paired: dict) -> float:
    """The test's level: 1 - the paired interval's level (0.05 for a 95 % interval)."""
    return round(1.0 - float(paired.get("level") or 0.95), 10)


def training_seeds(row: dict, paired: dict | None = None, side: str = "a") -> int | None:
    """Trained replicates behind a score row: None for a teacher set (no training seed), 0 for a
    released checkpoint, 1 for a score file from before training seeds."""
    if row["method"] == "teacher":
        return None
    k = ((paired or {}).get("n_training_seeds") or {}).get(side)
    k = row.get("n_training_seeds") if k is None else k
    return 1 if k is None else int(k)


def seeds_text(k: int) -> str:
    return f"{k} training seed{'' if k == 1 else 's'}"


def seed_rule(k_a: int | None, k_b: int | None) -> str | None:
    """A method-vs-method comparison (no teacher side) with a side of fewer than
    MIN_TRAINING_SEEDS trained seeds: "inconclusive (n training seeds)"; else None."""
    if k_a is None or k_b is None:
        return None
    trained = [k for k in (k_a, k_b) if k > 0]
    if trained and min(trained) < MIN_TRAINING_SEEDS:
        return f"inconclusive ({seeds_text(min(trained))})"
    return None


def teacher_label(k_a: int | None, k_b: int | None) -> str:
    """What a verdict against a teacher (the side with no training seed) says about its interval
    when training randomness is not in it: one trained seed, or a released checkpoint."""
    if (k_a is None) == (k_b is None):  # method vs method, or teacher vs teacher
        return ""
    k_student = k_a if k_b is None else k_b
    if k_student == 1:
        return " (1 training seed: interval covers prompts only)"
    if k_student == 0:
        return " (released checkpoint: interval covers prompts only)"
    return ""


def sample_size(row: dict, metric: str) -> dict:
    """n prompts, images per prompt and training seeds behind one side's score."""
    k = training_seeds(row)
    per_prompt = len((row.get("scoring_args") or {}).get("seeds") or []) or None
    n = row["results"][metric]["n"]
    prompts = n // (per_prompt * max(k or 1, 1)) if per_prompt else None
    return {"prompts": prompts, "images_per_prompt": per_prompt, "training_seeds": k}


def size_text(size: dict) -> str:
    if size["prompts"] is None:
        return "sample size unrecorded"
    out = f"{size['prompts']} prompts x {size['images_per_prompt']} images per prompt"
    k = size["training_seeds"]
    return out + ("" if k is None else " (released checkpoint)" if k == 0
                  else f" x {seeds_text(k)}")


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
        verdict = (f"not comparable (FID at {set_images(result)} images; a published FID needs >= "
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


def p_text(p: float | None) -> str:
    return "p n/a" if p is None else f"p = {p:.2g}"


def judge_relative(claim: dict, rows: list[dict], world: str, pair) -> Verdict:
    """pair(metric, row_a, row_b) -> paired-difference dict (difference, ci_low, ci_high, level,
    p_value, n_training_seeds). Judged alone (a family of one); audit() adjusts the family."""
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
    if fixed_reference(ra) and set_images(ra) != set_images(rb):
        return Verdict(claim["id"], world, f"not comparable (FID at {set_images(ra)} vs "
                       f"{set_images(rb)} images, "
                       "reference fixed)", f"{metric}: {claim['a']['method']} ({how_a}) and "
                       f"{claim['b']['method']} ({how_b}) were scored on sets of different size",
                       deviations=run_deviations(a, b))
    paired = pair(metric, a, b)
    up = ra["higher_is_better"]
    k_a, k_b = training_seeds(a, paired, "a"), training_seeds(b, paired, "b")
    ruled = seed_rule(k_a, k_b)
    p = paired.get("p_value")
    sizes = {"a": sample_size(a, metric), "b": sample_size(b, metric)}
    ours = {"difference": paired["difference"], "ci": [paired["ci_low"], paired["ci_high"]],
            "level": paired.get("level"), "p_value": p, "higher_is_better": up,
            "n_training_seeds": {"a": k_a, "b": k_b}, "sample": sizes}
    evidence = (f"{metric}: {claim['a']['method']} ({how_a}) - {claim['b']['method']} ({how_b}) = "
                f"{paired['difference']:+.4g} [{paired['ci_low']:+.4g}, {paired['ci_high']:+.4g}]"
                f"{size_note(ra)} ({'higher' if up else 'lower'} is better), {p_text(p)}"
                f"{' (not tested: too few training seeds)' if ruled and p is not None else ''}; "
                f"{claim['a']['method']}: {size_text(sizes['a'])}; "
                f"{claim['b']['method']}: {size_text(sizes['b'])}")
    if ruled:
        verdict = ruled
    else:
        verdict = relative_verdict(paired, up, claim["claim"]) + teacher_label(k_a, k_b)
    tested = p if ruled is None else None
    return Verdict(claim["id"], world, verdict, evidence, ours, deviations=run_deviations(a, b),
                   p_value=tested, p_holm=tested, family=None if tested is None else 1)


def adjust_family(claims: list[dict], verdicts: list[Verdict]) -> None:
    """Holm over every tested relative verdict of the report (those with a p-value the seed rule
    left to the test): each verdict re-decided by its adjusted p, its evidence given both."""
    by_id = {c["id"]: c for c in claims}
    family = [v for v in verdicts if v.p_value is not None]
    for v, adjusted in zip(family, holm([v.p_value for v in family])):
        o = v.ours
        seeds = o["n_training_seeds"]
        paired = {"difference": o["difference"], "ci_low": o["ci"][0], "ci_high": o["ci"][1],
                  "level": o["level"], "p_value": v.p_value}
        v.verdict = relative_verdict(paired, o["higher_is_better"], by_id[v.claim_id]["claim"],
                                     adjusted) + teacher_label(seeds["a"], seeds["b"])
        v.p_holm, v.family = adjusted, len(family)
        v.evidence = v.evidence.replace(
            p_text(v.p_value), f"{p_text(v.p_value)}, Holm p = {adjusted:.2g} (family of "
                               f"{len(family)})", 1)


def audit(claims: list[dict], rows: list[dict], defaults: dict, pair) -> list[Verdict]:
    """Every claim judged on the real protocol; relative ones also on the toy world; the tested
    relative verdicts of the whole report form one Holm family."""
    out = []
    for claim in claims:
        if claim["kind"] == "absolute":
            judged = [judge_absolute(claim, rows, float(defaults["noise_tolerance"]))]
        else:
            judged = [judge_relative(claim, rows, world, pair) for world in ("real", "toy")]
        for verdict in judged:
            verdict.marks = claim_marks(claim)
        out += judged
    adjust_family(claims, out)
    return out


# ---------------------------------------------------------------------------------- report

def sizes_legend(verdicts: list[Verdict]) -> str:
    """The sample sizes behind the relative verdicts: prompts x images per prompt, and the
    training seeds of the student cells."""
    sides = [size for v in verdicts if "sample" in v.ours for size in v.ours["sample"].values()]
    shapes = sorted({f"{s['prompts']} prompts x {s['images_per_prompt']} images per prompt"
                     for s in sides if s["prompts"] is not None})
    seeds = sorted({s["training_seeds"] for s in sides if s["training_seeds"] is not None})
    if not sides:
        return ""
    released = " (0: a released checkpoint)" if 0 in seeds else ""
    return (f" Sample sizes behind the relative verdicts: {', '.join(shapes) or 'unrecorded'}; "
            f"training seeds per student cell: {', '.join(map(str, seeds)) or '-'}{released} "
            "(teachers have none); each verdict's evidence gives its own.")


def relative_legend(verdicts: list[Verdict], defaults: dict) -> str:
    """How relative verdicts are decided: what is resampled, the seed rule, Holm's family."""
    family = next((v.family for v in verdicts if v.family), 0)
    levels = {v.ours.get("level") for v in verdicts if v.family}
    alpha = ", ".join(f"{1 - (lv or 0.95):.2g}" for lv in sorted(levels, key=str)) or "0.05"
    return ("Relative claims: the paired difference A - B on the same prompts and noise; its "
            "interval covers training seeds and prompts (the prompt bootstrap's variance, prompts "
            "with all their images, plus each side's between-seed variance / k, a t quantile "
            "with Welch-Satterthwaite df; a cell of one training seed contributes its prompts "
            "only). The "
            f"Holm-adjusted p-value decides (Holm 1979; one family of {family} tested relative "
            f"verdicts in this report, alpha = {alpha} = 1 - the interval's level): reproduced "
            "when it is at most alpha with the difference in the claimed direction, "
            "contradicted when at most alpha the other way, within noise otherwise; the raw "
            "paired interval and raw two-sided p (t level; prompt bootstrap where both sides "
            "have one run) are shown beside it (a raw interval "
            "that excludes 0 can be within noise after the adjustment). A paired difference "
            "without a p-value (p n/a: a score file from before p-values) is decided by its raw "
            "interval and is not in the family. Training seeds: a method-vs-method claim with "
            f"fewer than {MIN_TRAINING_SEEDS} training seeds on either side is inconclusive (n "
            "training seeds), never reproduced or contradicted, and is not tested; a claim "
            "against a teacher keeps its direction and says when the student has one training "
            "seed (its interval covers prompts only); a score file without training seeds "
            "counts as one; a released checkpoint is judged as the published model."
            + sizes_legend(verdicts))


def render(claims: list[dict], verdicts: list[Verdict], defaults: dict) -> str:
    by_id = {c["id"]: c for c in claims}
    numbers: dict[str, int] = {}  # deviation note -> its D number, in order of first use
    lines = ["# Claims audit", "",
             "Generated by `fewstep audit` from `reports/claims.yaml` and the score files; never "
             "edited by hand. Verdicts: reproduced, within noise (absolute claims: within "
             f"{100 * float(defaults['noise_tolerance']):g} % of the claimed value beyond our CI; "
             "relative claims: not significant after the Holm adjustment), contradicted, "
             "inconclusive (n training seeds), not run, protocol "
             "mismatch (naming each differing field), not comparable (an FID on fewer images "
             "than a published one needs, or two FIDs at different sample sizes). An FID's "
             "interval resamples prompts at its set's size with the reference statistics fixed: "
             "it covers the FID at that N, not the infinite-sample FID. Toy rows are toy-scale evidence: the same "
             "relative claim on the toy world with the toy metric in the same slot, never a "
             "check of the paper's number. L: the method trained on this metric's model. "
             "S: the paper's checkpoint was selected on the set the claim is measured on (the "
             "harness evaluates its final checkpoint). D<n>: a run behind our verdict deviates "
             "from its paper (footnotes below; every method's ledger: `fewstep methods "
             "--fidelity`).", "", relative_legend(verdicts, defaults), "",
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
