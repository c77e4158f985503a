"""fewstep prompts: the held-out prompt set of one family, as JSON lines."""
from __future__ import annotations

import json

from fewstep.io import write_text
from fewstep.registry import BACKBONES


def add_arguments(p):
    p.add_argument("--family", required=True, help="backbone family (sdxl, sd3, sit)")
    p.add_argument("--n", type=int, required=True, help="number of prompts")
    p.add_argument("--out", required=True, help="output .jsonl")


def eval_prompts(family: str, n: int) -> list[dict]:
    """Text families: the first n held-out GenEval-grammar prompts.

    SiT (class-conditional): every class, repeated round(n / classes) times (at least once) under
    distinct prompt ids, so classes stay balanced and the set size stays close to n.
    """
    from fewstep.toy import world

    BACKBONES.check(family)
    if family != "sit":
        available = len(world.prompt_set("eval"))
        if n > available:
            raise ValueError(f"eval.prompts = {n}, but the toy world holds out {available} "
                             f"prompts; set eval.prompts <= {available} (and add seeds for more images)")
        return world.prompt_set("eval", n=n)
    reps = max(1, round(n / len(world.CLASSES)))
    rows = []
    for rep in range(reps):
        for label in range(len(world.CLASSES)):
            meta = dict(world.class_meta(label))
            meta["prompt_id"] = f"{meta['prompt_id']}-r{rep}"
            rows.append(meta)
    return rows


def run(args):
    rows = eval_prompts(args.family, args.n)
    write_text(args.out, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts for {args.family} to {args.out}")
