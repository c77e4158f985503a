"""Which checkpoint a student is, and the rule any checkpoint selection must obey.

The harness evaluates the final checkpoint of a run (its EMA weights when the method keeps an
EMA), recorded in student.json as `"checkpoint": "final"`. It never selects on the evaluation
prompts: DMD2's model zoo lists the iteration that scored best on COCO-10k, the set its FID is
reported on (DMD2's README, model zoo; fewstep/notes/claims.md DMD2-zoo), which makes the
reported number an optimistic one; the claims audit marks such claims "S".

A selection step (choosing among saved checkpoints by a metric) must use a validation prompt set
disjoint from every evaluation set of the config: `check_validation_set` refuses one whose
canonical content hash (fewstep.prompt_sets.canonical_sha256) equals an evaluation set's, or
(text prompts) that shares prompts with one. Class-conditional sets (ImageNet labels) always
share their labels, so for them only the hash (the same rows) is refused.
"""
from __future__ import annotations

from fewstep.errors import FewstepError

CHECKPOINT = "final"  # student.json "checkpoint" of every trained student


class SelectionError(FewstepError):
    """A checkpoint-selection set that is (or overlaps) an evaluation set."""


def reference(name: str, rows: list[dict]) -> dict:
    """{name, sha256, prompts}: a prompt set as the check compares it (prompts: the text prompts,
    empty for a class-conditional set)."""
    from fewstep.prompt_sets import canonical_sha256

    texts = {r["prompt"] for r in rows if "class_label" not in r}
    return {"name": name, "sha256": canonical_sha256(rows), "prompts": texts}


def check_validation_set(validation: dict, evaluation: dict[str, dict]) -> None:
    """Refuse a validation set (reference()) that is, or shares prompts with, any evaluation set
    ({where: reference()}); the error names both sets."""
    for where, ev in evaluation.items():
        problem = None
        if validation["sha256"] == ev["sha256"]:
            problem = f"is the evaluation set {ev['name']} ({where}): the same sha256 {ev['sha256']}"
        else:
            shared = validation["prompts"] & ev["prompts"]
            if shared:
                example = sorted(shared)[0]
                problem = (f"shares {len(shared)} prompts with the evaluation set {ev['name']} "
                           f"({where}), e.g. {example!r}")
        if problem:
            raise SelectionError(
                f"checkpoint selection on {validation['name']} refused: it {problem}. Selecting "
                "a checkpoint on the prompts it is scored on inflates the score; give a "
                "validation prompt set disjoint from every evaluation set, or evaluate the "
                "final (EMA) checkpoint (what the harness does by default)")


def toy_eval_rows(family: str, n: int) -> list[dict]:
    """The toy world's evaluation prompts of a family, as `fewstep prompts` writes them
    (fewstep.commands.prompts.eval_prompts; tests/test_selection.py checks they agree): text
    families the first n held-out prompts, SiT every class round(n / classes) times."""
    from fewstep.toy import world

    if family != "sit":
        return world.prompt_set("eval", n=n)
    rows = []
    for rep in range(max(1, round(n / len(world.CLASSES)))):
        for label in range(len(world.CLASSES)):
            meta = dict(world.class_meta(label))
            meta["prompt_id"] = f"{meta['prompt_id']}-r{rep}"
            rows.append(meta)
    return rows


def evaluation_sets(config: dict) -> dict[str, dict]:
    """{"eval/prompts (family)" or "eval/prompt_sets/family": reference()} of a validated config.
    Real benchmark sets are read from the data folder (a missing file raises its error)."""
    from fewstep.prompt_sets import load_prompt_set

    out = {}
    for family in config["families"]:
        if config["world"] == "toy":
            n = config["eval"]["prompts"]
            where = f"eval/prompts ({family}, {n} prompts)"
            out[where] = reference(f"the toy {family} held-out prompts", toy_eval_rows(family, n))
            continue
        spec = dict(config["eval"]["prompt_sets"][family])
        name = spec.pop("name")
        loaded = load_prompt_set(name, **spec)
        out[f"eval/prompt_sets/{family}"] = reference(loaded.name, loaded.rows)
    return out
