"""The command lines' shared helpers, importable under their earlier name: they live in :mod:`stdd.cli`."""

from ..cli import (  # noqa: F401  (re-exported)
    DEBUG_ENV,
    EXIT_FAILURES,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STATUS_HELP,
    EXIT_USAGE,
    ArgumentParser,
    cli_main,
    is_override,
    is_usage_error,
    split_overrides,
)
