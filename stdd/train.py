"""Train STDD: ``python -m stdd.train [--config PRESET|file.yaml] [key=value ...] [--resume auto|PATH]``.

With no arguments this runs the demo (``python -m stdd.demo``): synthetic
motion videos, a tiny open_clip ViT, CPU, STDD vs a frame-only baseline.

Multi-GPU / multi-node: ``torchrun --nproc_per_node=8 -m stdd.train --config
k400_vitb16 data.root=...``. What a run writes and how it resumes:
:mod:`stdd.engine.trainer`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from omegaconf import OmegaConf

from .engine.checkpoint import CheckpointError, NonFiniteError
from .engine.config import ConfigError, load_config
from .engine.distributed import cleanup_distributed
from .engine.resume import ResumeError, parse_allowed
from .engine.runlock import RunLockError
from .engine.trainer import run_training

# Known failures of a run: one line on stderr, exit code 2 (no traceback).
RUN_ERRORS = (RunLockError, ResumeError, NonFiniteError, CheckpointError, ConfigError)


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stdd.train",
        description="Train STDD. With no arguments: run the CPU demo (python -m stdd.demo).",
    )
    parser.add_argument("--config", help="shipped preset name (demo, k400_vitb16) or a YAML file")
    parser.add_argument("--resume", default=None,
                        help="'auto' = newest loadable checkpoint in the run directory, or a checkpoint path")
    parser.add_argument("--allow-config-change", metavar="KEYS", default=None,
                        help="on resume, accept these changed keys that change what is trained (comma-separated "
                             "dotted keys, e.g. optim.epochs,data.num_frames, or 'all'); refused otherwise")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. optim.lr=1e-5)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        from .engine.comparison import run_demo

        run_demo()
        return 0
    args = build_argument_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(OmegaConf.to_yaml(cfg))
        return 0
    try:
        result = run_training(cfg, resume=args.resume, allow_config_change=parse_allowed(args.allow_config_change))
    except RUN_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()
    printable = {k: v for k, v in result.items() if k != "history"}
    print(printable)
    return 0


if __name__ == "__main__":
    sys.exit(main())
