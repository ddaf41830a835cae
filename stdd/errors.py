"""The errors a user fixes by changing what they gave: one base class, :class:`UsageError`.

Every error stdd raises for bad input -- a config key or value, an argument, a
file that is missing, malformed or in the way, weights that cannot be found, a
checkpoint that cannot be used -- derives from :class:`UsageError`, and its
message names the culprit (the dotted config key, the flag, the file and line).
The command lines (:func:`stdd.cli.cli_main`) print such an error as
one line ``error: <message>`` on stderr and exit with status 2; any other
exception is a bug or a failure of the environment and keeps its traceback.

A new user-facing error derives from :class:`UsageError` (and, where callers
may catch a builtin type, from that too)::

    class RunLockedError(UsageError, RuntimeError):
        '''Another process holds the run directory; the message names it.'''
"""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user; the message names what was given and what was expected."""


class InputError(UsageError, ValueError):
    """A bad argument or value (a ``ValueError`` too, for callers that catch that)."""


def one_line(message: object) -> str:
    """``message`` on one line: line breaks of a multi-line message become ``"; "``."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    return "; ".join(lines) if lines else type(message).__name__
