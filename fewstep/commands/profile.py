"""fewstep profile install|show NAME: make `snakemake --profile NAME` find the repository's profile.

Snakemake looks for `--profile NAME` in the working directory, ~/.config/snakemake/ and
/etc/xdg/snakemake/, not in ./profiles/ (spec infra.md). `install` links
<config dir>/snakemake/NAME to profiles/NAME of this checkout, so the profile stays versioned here.
"""
from __future__ import annotations

import os
from pathlib import Path

from fewstep.errors import FewstepError

PROFILES = Path(__file__).resolve().parents[2] / "profiles"


def add_arguments(p):
    p.add_argument("action", choices=["install", "show"])
    p.add_argument("name", help="profile name: a folder of profiles/ (e.g. slurm)")
    p.add_argument("--dest", help="Snakemake's user profile folder "
                                  "(default: $XDG_CONFIG_HOME/snakemake or ~/.config/snakemake)")
    p.add_argument("--force", action="store_true", help="replace a different profile of that name")


def user_profile_dir(dest: str | None) -> Path:
    if dest:
        return Path(dest)
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "snakemake"


def install(name: str, dest: str | None = None, force: bool = False) -> Path:
    source = PROFILES / name
    if name == "default" or not (source / "config.yaml").is_file():
        known = sorted(p.name for p in PROFILES.iterdir() if p.is_dir() and p.name != "default")
        raise FewstepError(f"no installable profile '{name}' in {PROFILES}; known: {known}")
    target = user_profile_dir(dest) / name
    if target.is_symlink() and target.resolve() == source.resolve():
        return target
    if target.exists() or target.is_symlink():
        if not force:
            raise FewstepError(f"{target} already exists and is not this checkout's profile; "
                               f"compare it with {source} and pass --force to replace it")
        if target.is_symlink() or target.is_file():
            target.unlink()
        else:
            raise FewstepError(f"{target} is a folder; move it away by hand (not deleted for you)")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source.resolve(), target_is_directory=True)
    return target


def run(args):
    if args.action == "show":
        print((PROFILES / args.name / "config.yaml").read_text(), end="")
        return 0
    target = install(args.name, args.dest, args.force)
    print(f"`snakemake --profile {args.name}` now reads {target} -> {PROFILES / args.name}")
    return 0
