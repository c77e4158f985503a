"""Evidence for a refactor of the options (prints figures; not a test): every method's options as
resolved from each of its presets (and from no preset), as JSON, so two checkouts can be compared.

    PYTHONPATH=/path/to/old .venv/bin/python tests/benchmarks/preset_options.py > old.json
    PYTHONPATH=/path/to/new .venv/bin/python tests/benchmarks/preset_options.py --compare old.json

--compare reads the old checkout's JSON, renames its options through this checkout's aliases (a
renamed option keeps its value), and lists every difference; it exits 1 when a named preset
resolves differently. Differences of the no-preset options (`null`) are listed, not counted: a
neutral default changes them by design, and the DAG always names a preset.
"""
from __future__ import annotations

import argparse
import json
import sys


def resolved() -> dict:
    """{method: {preset or "null": as_dict(options)}} as JSON values."""
    from fewstep.options import as_dict, resolve
    from fewstep.registry import METHODS

    out = {}
    for name in METHODS.names():
        cls = METHODS.get(name)
        out[name] = {str(p): as_dict(resolve(cls.Options, cls.PRESETS, p, None, name))
                     for p in [None, *cls.PRESETS]}
    return json.loads(json.dumps(out, default=str))


def renamed(method: str, options: dict) -> dict:
    """Old options under this checkout's names (an old name that is now an alias)."""
    from fewstep.options import option_aliases
    from fewstep.registry import METHODS

    aliases = option_aliases(METHODS.get(method).Options)
    return {aliases.get(k, k): v for k, v in options.items()}


def differences(old: dict, new: dict) -> list[tuple[str, str, str]]:
    """(method, preset, what changed) for every method and preset of either side."""
    found = []
    for method in sorted(set(old) | set(new)):
        for preset in sorted(set(old.get(method, {})) | set(new.get(method, {}))):
            a = renamed(method, old.get(method, {}).get(preset, {}))
            b = new.get(method, {}).get(preset, {})
            for key in sorted(set(a) | set(b)):
                if a.get(key, "<absent>") != b.get(key, "<absent>"):
                    found.append((method, preset,
                                  f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}"))
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--compare", help="JSON printed by this script in another checkout")
    args = p.parse_args()
    new = resolved()
    if not args.compare:
        print(json.dumps(new, indent=1, sort_keys=True))
        return
    with open(args.compare) as f:
        old = json.load(f)
    found = differences(old, new)
    for method, preset, what in found:
        print(f"{method} {preset}: {what}")
    presets = sum(len(v) - 1 for v in new.values())
    named = [d for d in found if d[1] != "None"]
    print(f"{presets} named presets compared, {len(named)} differences "
          f"({len(found) - len(named)} in the no-preset options)")
    sys.exit(1 if named else 0)


if __name__ == "__main__":
    main()
