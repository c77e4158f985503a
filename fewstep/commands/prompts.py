"""fewstep prompts: the held-out prompt set of one family, or (--set) a benchmark prompt set read
from the data folder (fewstep.prompt_sets), as JSON lines."""
from __future__ import annotations

import json

from fewstep.io import write_text
from fewstep.registry import BACKBONES


MAX_PROMPTS = 100_000  # the config schema's bound on eval/prompts


def add_arguments(p):
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--family", help="backbone family (sdxl, sd3, sit)")
    which.add_argument("--set", dest="prompt_set", metavar="NAME",
                       help="benchmark prompt set from $FEWSTEP_WEIGHTS/prompts/ (hpdv2, geneval, "
                            "coco2014-val-captions, imagenet-classes, drawbench); also writes "
                            "OUT.provenance.json with its sha256")
    which.add_argument("--file", metavar="PATH",
                       help="a user's prompt file (JSONL rows with prompt_id and prompt, e.g. a "
                            "training caption set), checked and written with its sha256 sidecar")
    p.add_argument("--n", type=int, help="number of prompts (needed with --family; with --set, "
                                         "the subset size of coco2014-val-captions)")
    p.add_argument("--seed", type=int, help="--set only: subset seed (coco2014-val-captions)")
    p.add_argument("--allow-unofficial", action="store_true",
                   help="--set only: accept files whose counts differ from the official set")
    p.add_argument("--out", required=True, help="output .jsonl")


def eval_prompts(family: str, n: int) -> list[dict]:
    """Text families: the first n held-out GenEval-grammar prompts.

    SiT (class-conditional): every class, repeated round(n / classes) times (at least once) under
    distinct prompt ids, so classes stay balanced and the set size stays close to n. The rows are
    `fewstep.selection.toy_eval_rows`, which the config's validation-set check reads too.
    """
    from fewstep.selection import toy_eval_rows
    from fewstep.toy import world

    BACKBONES.check(family)
    if family != "sit":
        available = len(world.prompt_set("eval"))
        if n > available:
            raise ValueError(f"eval.prompts = {n}, but the toy world holds out {available} "
                             f"prompts; set eval.prompts <= {available} (and add seeds for more images)")
    return toy_eval_rows(family, n)


def run_set(args):
    from fewstep.prompt_sets import load_prompt_set, write_prompt_file

    options = {key: value for key, value in (("n", args.n), ("seed", args.seed))
               if value is not None}
    if args.allow_unofficial:
        options["require_official"] = False
    prompt_set = load_prompt_set(args.prompt_set, **options)
    write_prompt_file(prompt_set, args.out)
    print(f"wrote {len(prompt_set.rows)} prompts of {prompt_set.name} to {args.out}, "
          f"sha256 {prompt_set.sha256}")


def run_file(args):
    from fewstep.prompt_sets import load_prompt_file, write_prompt_file

    if args.n is not None or args.seed is not None or args.allow_unofficial:
        raise ValueError("--file takes no --n, --seed or --allow-unofficial: the file is used whole")
    prompt_set = load_prompt_file(args.file)
    write_prompt_file(prompt_set, args.out)
    print(f"wrote {len(prompt_set.rows)} prompts of {args.file} to {args.out}, "
          f"sha256 {prompt_set.sha256}")


def run(args):
    if args.prompt_set:
        return run_set(args)
    if args.file:
        return run_file(args)
    if args.n is None or args.seed is not None or args.allow_unofficial:
        raise ValueError("--family takes --n (the number of prompts) and neither --seed nor "
                         "--allow-unofficial (those apply to --set)")
    if not 1 <= args.n <= MAX_PROMPTS:
        raise ValueError(f"--n {args.n} is too large or too small: give 1 to {MAX_PROMPTS} prompts "
                         "(add seeds for more images per prompt)")
    rows = eval_prompts(args.family, args.n)
    write_text(args.out, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts for {args.family} to {args.out}")
