"""fewstep config: validate a workflow config (the default one if no file is given) and print it.

The same check the Snakefile runs before building the DAG, usable before a long cluster run.
"""
from __future__ import annotations


def add_arguments(p):
    p.add_argument("path", nargs="?", default=None,
                   help="config .yaml (default: workflows/config/default.yaml)")
    p.add_argument("--quiet", action="store_true", help="print only the verdict")


def run(args):
    import yaml

    from fewstep import config as cfg

    config = cfg.load(args.path)  # raises ConfigError naming the culprit
    if not args.quiet:
        print(yaml.safe_dump(config, sort_keys=False), end="")
    print(f"{args.path or cfg.DEFAULT}: valid")
