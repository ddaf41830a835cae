"""The embedded demo: STDD vs a frame-only model on synthetic motion videos, on the CPU.

    python -m stdd.demo [--variant paper|no-masking] [--out summary.json] [--work-dir runs/demo] [--resume]
                        [key=value ...]

(also what ``python -m stdd.train`` runs with no arguments). What it does:
:mod:`stdd.engine.comparison`.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from .engine import comparison
from .cli import ArgumentParser, cli_main


def run(argv: Optional[Sequence[str]] = None) -> int:
    """The command line's work; errors are raised (:func:`main` reports them)."""
    parser = ArgumentParser(prog="python -m stdd.demo", description=__doc__.split("\n")[0],
                            epilog=comparison.__doc__)
    parser.add_argument("--variant", default=comparison.DEFAULT_VARIANT, choices=list(comparison.DEMO_VARIANTS),
                        help="paper: the paper's STCA (window-shift masking on; preset demo); no-masking: masking "
                             "off (preset demo_no_masking). Default: %(default)s")
    parser.add_argument("--out", help="write the summary as JSON here")
    parser.add_argument("--work-dir", default=comparison.WORK_DIR, help="videos and the two runs go here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--resume", action="store_true",
                        help="continue the runs a killed demo left in --work-dir (default: start them over)")
    parser.add_argument("overrides", nargs="*", help="demo config overrides key=value (both runs)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    comparison.run_demo(args.work_dir, args.overrides, args.out, quiet=args.quiet, resume=args.resume,
                        variant=args.variant)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m stdd.demo``; exit status 0 done, 2 bad input (one line), 3 unexpected (traceback)."""
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
