"""The embedded demo: STDD vs a frame-only model on synthetic motion videos, on the CPU.

    python -m stdd.demo [--out summary.json] [--work-dir runs/demo] [--resume] [key=value ...]

(also what ``python -m stdd.train`` runs with no arguments). What it does:
:mod:`stdd.engine.comparison`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .engine import comparison
from .engine.checkpoint import CheckpointError, NonFiniteError
from .engine.config import ConfigError
from .engine.resume import ResumeError
from .engine.runlock import RunLockError

# Known failures: one line on stderr, exit code 2 (no traceback).
DEMO_ERRORS = (ConfigError, comparison.DemoDirectoryError, RunLockError, ResumeError, NonFiniteError, CheckpointError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stdd.demo", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=comparison.__doc__)
    parser.add_argument("--out", help="write the summary as JSON here")
    parser.add_argument("--work-dir", default=comparison.WORK_DIR, help="videos and the two runs go here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--resume", action="store_true",
                        help="continue the runs a killed demo left in --work-dir (default: start them over)")
    parser.add_argument("overrides", nargs="*", help="demo config overrides key=value (both runs)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        comparison.run_demo(args.work_dir, args.overrides, args.out, quiet=args.quiet, resume=args.resume)
    except DEMO_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
