"""Checkpoints recognised by their sha256 (metrics/notes/metrics.md sec. 1.6, 2.5): a metric
accepts its published file's hash or one its user pins, as the `expected_sha256` option or an
environment variable. What each metric says about a refused file stays in its own module."""
from __future__ import annotations

import os
import re

from fewstep.errors import FewstepError

PIN_OPTION = "expected_sha256"
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


class CheckpointIdentityError(FewstepError, ValueError):
    """A checkpoint neither published nor pinned by its sha256 (or a malformed pin)."""


def normalised_pin(pin, where: str, published: str) -> str | None:
    """A pinned sha256 in lower case, or None when unset; anything else is refused, named.
    `published` says what an unset pin accepts (the published files and their hashes)."""
    if pin is None or (isinstance(pin, str) and not pin.strip()):
        return None
    text = pin.strip().lower() if isinstance(pin, str) else ""
    if not SHA256_PATTERN.fullmatch(text):
        raise CheckpointIdentityError(
            f"{where} = {pin!r} is not a sha256: give the 64 hexadecimal characters that "
            f"`sha256sum FILE` prints, or leave it unset to accept only {published}")
    return text


def requested_pin(pin, variable: str, published: str) -> tuple[str | None, str]:
    """(pinned sha256 or None, where it came from): the option, else the environment variable."""
    if pin is not None:
        return normalised_pin(pin, PIN_OPTION, published), f"the {PIN_OPTION} option"
    return normalised_pin(os.environ.get(variable), f"${variable}", published), f"${variable}"
