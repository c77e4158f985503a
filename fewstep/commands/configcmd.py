"""fewstep config: validate a workflow config (the default one if no file is given) and print it.

The same check the Snakefile runs before building the DAG, usable before a long cluster run.
--validation-prompts FILE also checks a checkpoint-selection prompt file against the config's
evaluation sets (fewstep.selection): one that is, or shares prompts with, an evaluation set is
refused naming both.
"""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("path", nargs="?", default=None,
                   help="config .yaml (default: workflows/config/default.yaml)")
    p.add_argument("--quiet", action="store_true", help="print only the verdict")
    p.add_argument("--validation-prompts", metavar="FILE",
                   help="a prompt file (JSONL) meant for checkpoint selection: refused when it is "
                        "or overlaps one of the config's evaluation prompt sets")


def run(args):
    import yaml

    from fewstep import config as cfg

    config = cfg.load(args.path)  # raises ConfigError naming the culprit
    if not args.quiet:
        print(yaml.safe_dump(config, sort_keys=False), end="")
    if args.validation_prompts:
        ref = cfg.check_selection_set(config, args.validation_prompts, str(args.path or cfg.DEFAULT))
        print(f"{args.validation_prompts}: disjoint from every evaluation set (sha256 "
              f"{ref['sha256']})")
    print(f"{args.path or cfg.DEFAULT}: valid")
