"""Errors whose message is the whole story: the CLI prints them without a traceback."""


class FewstepError(Exception):
    pass
