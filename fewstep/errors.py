"""Errors whose message is the whole story: the CLI prints them without a traceback."""


class FewstepError(Exception):
    pass


def did_you_mean(name: str, choices, cutoff: float = 0.5) -> str:
    """' Did you mean 'a' or 'b'?' for the close matches of `name`, or '' (the one helper every
    name check uses: registries, options, presets, prompt sets, metric options)."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=3, cutoff=cutoff)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
