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
    """Every entry the method declares (its own and its base classes')."""
    return tuple(getattr(method_cls, "ledger", ()))


def deviations(method_cls, options) -> list[dict]:
    """The entries that apply to a run of `method_cls` with these options, described."""
    return [d.describe(options) for d in ledger(method_cls) if d.applies(options)]
