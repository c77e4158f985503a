"""fewstep methods: the registered methods (built in and plugins), and with --fidelity each one's
fidelity ledger: every choice that differs from its paper or official code (the option or fixed
choice, the paper's value, ours in each preset, why, the source), as the method file declares it.
"""
from __future__ import annotations

from fewstep.fidelity import markdown as fidelity_markdown  # noqa: F401 (the page this prints)


def add_arguments(p):
    p.add_argument("names", nargs="*", metavar="NAME", help="methods to show (default: all)")
    p.add_argument("--fidelity", action="store_true",
                   help="print each method's fidelity ledger (Markdown)")
    p.add_argument("--out", help="write the page to this file instead of printing it")


def listing(names) -> str:
    """One row per method: its fidelity, presets, ledger size and where it comes from."""
    from fewstep.fidelity import ledger
    from fewstep.registry import METHODS

    lines = ["| method | fidelity | presets | ledger entries | registered by |", "|---|---|---|---|---|"]
    for name in names:
        cls = METHODS.get(name)
        presets = ", ".join(cls.PRESETS) or "-"
        lines.append(f"| {name} | {cls.fidelity} | {presets} | {len(ledger(cls))} | "
                     f"{METHODS._origins.get(name, '?')} |")
    return "\n".join(lines + ["", "`fewstep methods --fidelity [NAME ...]` prints the ledgers."])


def run(args):
    from fewstep.io import write_text
    from fewstep.registry import METHODS

    names = [METHODS.check(n) for n in args.names] or METHODS.names()
    text = fidelity_markdown(names) if args.fidelity else listing(names)
    if args.out:
        write_text(args.out, text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0
