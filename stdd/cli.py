"""What every command line shares: its argument parser, ``key=value`` words, exit statuses, errors.

Every CLI (``stdd.train``, ``stdd.eval``, ``stdd.predict``, ``stdd.demo``,
``stdd.askg``, ``stdd.data.synthetic``) runs its ``main`` through :func:`cli_main`.
It lives beside :mod:`stdd.errors`, below every other package, so a command line
of any layer uses it without importing the layers above its own:

- a :class:`~stdd.errors.UsageError` (a config key, an argument, a file: every
  error stdd raises for bad input derives from it), a malformed command line,
  a ``ValueError`` (the library's type for a bad value, whose message names it)
  and an ``OSError`` about a file (missing, in the way, not permitted, on a
  read-only filesystem: the message names the file) print ONE line
  ``error: <message naming the culprit>``
  on stderr and exit with :data:`EXIT_USAGE` (2), without a traceback;
- Ctrl-C exits with :data:`EXIT_INTERRUPTED` (130) after one line;
- any other exception is a bug or an environment failure: its traceback is
  printed and the exit status is :data:`EXIT_INTERNAL` (3), distinct from a
  job that finished with some failed items (:data:`EXIT_FAILURES`, 1).

``STDD_DEBUG=1`` in the environment shows the traceback of a usage error too
(the exit status stays the same).

``key=value`` config overrides may stand anywhere on a command line, before or
after the options (``ArgumentParser.parse_intermixed_args``); :func:`split_overrides`
separates them from file arguments.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import traceback
from typing import Callable, Optional, Sequence

from .errors import UsageError, one_line

EXIT_OK = 0  # everything done
EXIT_FAILURES = 1  # the job ran, but some items failed (a video, a class): see its report
EXIT_USAGE = 2  # bad input: a config key or value, an argument, a file (one line on stderr)
EXIT_INTERNAL = 3  # an unexpected error (a bug or the environment): traceback on stderr
EXIT_INTERRUPTED = 130  # Ctrl-C

DEBUG_ENV = "STDD_DEBUG"  # set to 1: tracebacks for usage errors too

EXIT_STATUS_HELP = (
    "exit status: 0 done; 1 the job ran but some items failed (see its report); 2 bad input "
    "(a config key or value, an argument, a file: one line on stderr naming it; STDD_DEBUG=1 adds "
    "the traceback); 3 an unexpected error (traceback); 130 interrupted."
)

# OSErrors that are about a file the user named (str() names it), not about the machine.
_FILE_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
# ... and those without a class of their own, by errno (with the file named): a folder the user chose on a
# read-only filesystem
_FILE_ERRNOS = (errno.EROFS,)

_OVERRIDE = re.compile(r"^\+?[A-Za-z_][\w.\-]*=")


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are :class:`UsageError` (one line via :func:`cli_main`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # argparse's default prints the usage and exits 2 itself
        raise UsageError(f"{self.prog}: {message} (see --help)")

    def format_help(self) -> str:
        return super().format_help().rstrip("\n") + "\n\n" + EXIT_STATUS_HELP + "\n"

    def parse_args(self, args=None, namespace=None):
        """Options and positional words in any order (``--resume auto a.b=1`` and ``a.b=1 --resume auto``)."""
        if self._subparsers is not None:  # parse_intermixed_args does not take sub-commands
            return super().parse_args(args, namespace)
        return self.parse_intermixed_args(args, namespace)


def is_override(word: str) -> bool:
    """Whether a command-line word is a ``key=value`` / ``+key=value`` override (not an existing path)."""
    return bool(_OVERRIDE.match(word)) and not os.path.exists(word)


def split_overrides(words: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(other words, overrides)``: the ``key=value`` words of ``words`` separated from the rest."""
    others, overrides = [], []
    for word in words:
        (overrides if is_override(word) else others).append(word)
    return others, overrides


def is_usage_error(error: BaseException) -> bool:
    """Whether ``error`` is the input's problem (exit status 2, one line), see the module docstring."""
    if isinstance(error, (UsageError, ValueError, *_FILE_ERRORS)):
        return True
    return isinstance(error, OSError) and error.errno in _FILE_ERRNOS and error.filename is not None


def cli_main(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Run a CLI's ``main(argv)`` and turn its outcome into an exit status (see the module docstring)."""
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    try:
        status = main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exit_request:  # --help, or a library that exits on purpose
        code = exit_request.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_USAGE)
    except Exception as error:  # noqa: BLE001 - the one place that reports what nobody expected
        if is_usage_error(error):
            if debug:
                traceback.print_exc(file=sys.stderr)
            print(f"error: {one_line(error)}", file=sys.stderr)
            return EXIT_USAGE
        traceback.print_exc(file=sys.stderr)
        print(f"internal error (exit status {EXIT_INTERNAL}): the traceback above is a bug or a failure "
              "of the environment, not a problem with the input", file=sys.stderr)
        return EXIT_INTERNAL
    return EXIT_OK if status is None else int(status)
