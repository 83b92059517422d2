"""The one exception type for bad user input, and the did-you-mean hint its messages carry.

Anything the user can fix (a missing file, a recipe typo, a corrupt image) raises `UserError`; the CLI
prints its message as one line and exits with code 2. Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import difflib


class UserError(Exception):
    """Bad input the user can fix: printed as one line, exit code 2."""


def did_you_mean(word: str, options) -> str:
    """Return ' (did you mean X?)' for the closest option, or '' if nothing is close."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_name(what: str, name: str, options) -> UserError:
    """The error for a name missing from a registry: the nearest valid one and the full list."""
    return UserError(f"unknown {what} {name!r}{did_you_mean(name, options)}; choose one of: {', '.join(map(str, options))}")
