"""Train STDD: ``python -m stdd.train [--config PRESET|file.yaml] [key=value ...] [--resume auto|PATH]``.

With no arguments this runs the demo (``python -m stdd.demo``): synthetic
motion videos, a tiny open_clip ViT, CPU, STDD vs a frame-only baseline.

Multi-GPU / multi-node: ``torchrun --nproc_per_node=8 -m stdd.train --config
k400_vitb16 data.root=...``. What a run writes and how it resumes:
:mod:`stdd.engine.trainer`.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from omegaconf import OmegaConf

from .cli import ArgumentParser, cli_main
from .engine.comparison import run_demo
from .engine.config import load_config
from .engine.distributed import cleanup_distributed
from .engine.resume import parse_allowed
from .engine.trainer import run_training


def build_argument_parser() -> ArgumentParser:
    parser = ArgumentParser(
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


def run(argv: Optional[Sequence[str]] = None) -> int:
    """The command line's work; errors are raised (:func:`main` reports them)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        run_demo()
        return 0
    args = build_argument_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg))
        return 0
    try:
        result = run_training(cfg, resume=args.resume, allow_config_change=parse_allowed(args.allow_config_change))
    finally:
        cleanup_distributed()
    printable = {k: v for k, v in result.items() if k != "history"}
    print(printable)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m stdd.train``; exit status 0 done, 2 bad input (one line), 3 unexpected (traceback)."""
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
