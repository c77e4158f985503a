"""A method's fidelity ledger: every choice where the harness differs from the paper or its
official code, as data (the option, the paper's value, ours, why, where the paper says so).

Each method file declares `FIDELITY = (Deviation(...), ...)` and sets it as the class attribute
`ledger`. An entry about an option applies to a run when the run's value of that option differs
from the paper's (a `-paper` preset that keeps the paper's value carries no mark; the toy preset
that changes it does); an entry about a fixed choice (no option) applies to every run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Deviation:
    what: str              # an option of the method's options class, or a short name of a fixed choice
    paper: object          # the paper's or official code's value
    why: str               # why the harness differs (or offers the choice)
    source: str            # where the paper's value is stated: paper sec./Eq., or official code file
    ours: object = None    # fixed choices only: what the harness does (an option's is read from the run)

    def is_option(self, options) -> bool:
        return self.what in {f.name for f in dataclasses.fields(options)}

    def applies(self, options) -> bool:
        if not self.is_option(options):
            return True
        return _plain(getattr(options, self.what)) != _plain(self.paper)

    def describe(self, options=None) -> dict:
        """{what, paper, ours, why, source}; `ours` from the options when given."""
        ours = self.ours
        if options is not None and self.is_option(options):
            ours = _plain(getattr(options, self.what))
        return {"what": self.what, "paper": _plain(self.paper), "ours": ours, "why": self.why,
                "source": self.source}


def _plain(value):
    """Tuples and lists compare (and print) alike."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def ledger(method_cls) -> tuple[Deviation, ...]:
    """Every entry the method declares, its own and its base classes' (AMD's include DMD2's, a
    stage class's its registered class's): one per `what`, the most derived class's winning, in
    the order the bases first declared them."""
    merged: dict[str, Deviation] = {}
    for klass in reversed(getattr(method_cls, "__mro__", (method_cls,))):
        for entry in vars(klass).get("ledger", ()) or ():
            merged[entry.what] = entry
    return tuple(merged.values())


def deviations(method_cls, options) -> list[dict]:
    """The entries that apply to a run of `method_cls` with these options, described."""
    return [d.describe(options) for d in ledger(method_cls) if d.applies(options)]


def fmt(value) -> str:
    """A ledger value as tables print it: strings bare, anything else as JSON."""
    import json

    return value if isinstance(value, str) else json.dumps(_plain(value), default=str)


def summary(entry: dict) -> str:
    """One applied entry (deviations()) in a line: 'regression_loss = l2 (paper: lpips; DMD sec.
    3.3)', as the result tables' footnotes print it."""
    return (f"{entry['what']} = {fmt(entry.get('ours'))} (paper: {fmt(entry.get('paper'))}; "
            f"{entry.get('source', 'source not given')})")


def run_note(method: str, preset, entries) -> str:
    """What a result table's footnote says of a student's run: its method, its preset (a paper
    preset that deviates says so) and the entries that apply (deviations()); entries None: the
    student was recorded before the ledger."""
    if entries is None:
        return (f"{method}: its student.json records no deviations (trained before the fidelity "
                "ledger); train it again to record them")
    where = f"preset {preset}" if preset else "no preset"
    if is_paper_preset(preset):
        where += ", a paper preset that deviates from the paper"
    return f"{method} ({where}): " + "; ".join(summary(e) for e in entries)


def is_paper_preset(preset) -> bool:
    """A preset that follows a published recipe (fewstep/notes/conventions.md sec. 7), a staged
    method's later stage included (rtdmd-sd3-paper-stage2, dmd2-sdxl1-paper-warmstart)."""
    return isinstance(preset, str) and (preset.endswith("-paper") or "-paper-" in preset)


# -- the ledger as a table (`fewstep methods --fidelity`, reports/fidelity.md, the HTML report) ---

def preset_options(method_cls, name: str) -> dict:
    """{"default" and each preset: its resolved options}; a preset that does not resolve is left
    out (`fewstep config` names its error)."""
    from fewstep.options import resolve

    out = {}
    for preset in [None, *method_cls.PRESETS]:
        try:
            out[preset or "default"] = resolve(method_cls.Options, method_cls.PRESETS, preset,
                                               None, method=name)
        except (ValueError, KeyError, TypeError):  # FewstepError is a ValueError
            continue
    return out


def _ours(entry: Deviation, runs: dict) -> str:
    """What the harness does for this entry: an option's value in each preset; a fixed choice's
    value, on every run or on the presets whose training class declares it."""
    if entry.ours is not None or not any(entry.is_option(o) for o, _ in runs.values()):
        where = [p for p, (_, cls) in runs.items() if entry.what in {d.what for d in ledger(cls)}]
        scope = "every run" if len(where) == len(runs) else "presets " + ", ".join(where)
        return f"{fmt(entry.ours)} ({scope})"
    groups: dict[str, list[str]] = {}  # value -> the presets ("default": no preset) with it
    for preset, (options, _) in runs.items():
        if entry.is_option(options):
            groups.setdefault(fmt(_plain(getattr(options, entry.what))), []).append(preset)
    if len(groups) == 1:
        return f"{next(iter(groups))} (every preset)"
    common = max(groups, key=lambda v: len(groups[v]))  # the most presets' value, said last
    return "; ".join([f"{v}: {', '.join(ps)}" for v, ps in groups.items() if v != common]
                     + [f"{common}: the others ({', '.join(groups[common])})"])


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def method_ledger(name: str) -> str:
    """One method's ledger as Markdown: a line per entry (option or fixed choice, the paper's
    value, ours in each preset, why, source) and the paper presets that still deviate."""
    from fewstep.registry import METHODS

    cls = METHODS.get(name)
    runs = {p: (o, cls.for_options(o)) for p, o in preset_options(cls, name).items()}
    entries = {e.what: e for c in [cls, *(c for _, c in runs.values())] for e in ledger(c)}
    head = [f"## {name} ({cls.fidelity})", ""]
    if not entries:
        return "\n".join(head + [f"It has no fidelity ledger declared (`{cls.__module__}` sets no "
                                 "`ledger`): no difference from the paper is recorded.", ""])
    lines = ["| option or choice | paper | ours | why | source |", "|---|---|---|---|---|"]
    for e in entries.values():
        what = f"`{e.what}`" if any(e.is_option(o) for o, _ in runs.values()) else e.what
        lines.append("| " + " | ".join(_cell(c) for c in (what, fmt(e.paper), _ours(e, runs),
                                                            e.why, e.source)) + " |")
    return "\n".join(head + lines + [""] + _paper_presets(runs) + [""])


def _paper_presets(runs: dict) -> list[str]:
    """A line per -paper preset: whether it follows the paper in every ledger entry."""
    out = []
    for preset, (options, cls) in runs.items():
        if is_paper_preset(preset):
            applied = [d["what"] for d in deviations(cls, options)]
            out.append(f"- `{preset}` deviates from the paper in {len(applied)} "
                       f"entr{'y' if len(applied) == 1 else 'ies'}: {', '.join(applied)}"
                       if applied else f"- `{preset}` follows the paper in every entry")
    return out


def markdown(names) -> str:
    """The ledgers of the named methods: the page `fewstep methods --fidelity` prints and the
    report step writes as reports/fidelity.md."""
    return "\n".join([
        "# Fidelity ledger", "",
        "Every choice where a method differs from its paper or official code, as each method file "
        "declares it (`FIDELITY`; fewstep/fidelity.py). Generated by `fewstep methods --fidelity`; "
        "never edit by hand. An option's entry applies to a run when the run's value differs from "
        "the paper's; a fixed choice applies to every run. A trained student records the entries "
        "that apply to it (student.json `deviations`) and the result tables mark it D.", "",
        *(method_ledger(n) for n in names)])
