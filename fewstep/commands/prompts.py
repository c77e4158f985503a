"""fewstep prompts: the held-out prompt set of one family, as JSON lines."""
from __future__ import annotations

import json
import math

from fewstep.io import write_text
from fewstep.registry import BACKBONES


def add_arguments(p):
    p.add_argument("--family", required=True, help="backbone family (sdxl, sd3, sit)")
    p.add_argument("--n", type=int, required=True, help="number of prompts")
    p.add_argument("--out", required=True, help="output .jsonl")


def eval_prompts(family: str, n: int) -> list[dict]:
    """Text families: GenEval-grammar prompts; SiT: class labels cycled to n prompt ids."""
    from fewstep.toy import world

    BACKBONES.check(family)
    if family != "sit":
        return world.prompt_set("eval", n=n)
    reps = math.ceil(n / len(world.CLASSES))
    rows = []
    for rep in range(reps):
        for label in range(len(world.CLASSES)):
            meta = dict(world.class_meta(label))
            meta.update(prompt_id=f"class{label:03d}-r{rep}", label=label)
            rows.append(meta)
    return rows[:n]


def run(args):
    rows = eval_prompts(args.family, args.n)
    write_text(args.out, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts for {args.family} to {args.out}")
