"""STDD vs the frame-only baseline on the synthetic motion set: what ``python -m stdd.demo`` runs.

:func:`run_demo`:

1. generates the synthetic motion set (``stdd.data.synthetic``: 8 classes defined only by
   motion -- moving left/right/up/down, rotating clockwise/counter-clockwise, growing/
   shrinking -- with random shape, colour, position and speed; a single frame does not
   reveal the class);
2. trains STDD (tiny open_clip ViT from random weights, STCA on) with the ``demo`` preset;
3. trains the frame-only baseline: the same model and budget with STCA off
   (``model.stca.enabled=false``: open_clip's own blocks on every frame);
4. evaluates both on the held-out videos and prints / writes a small table.

The frame-only model sees every frame but never two frames together, so it cannot tell
left from right or clockwise from counter-clockwise; STCA mixes channels between
neighbouring frames inside each block, which is what lets the model see motion.
Overrides apply to both runs (e.g. ``optim.epochs=4``). The first run generates the videos
under ``<work dir>/data`` (reused afterwards).

The two runs go to ``<work dir>/stdd`` and ``<work dir>/frame_only``. The demo marks each
run directory it creates with a ``.stdd-demo-run`` file before anything else is written
there, and only ever deletes a directory carrying that mark (to start a run over); any
other existing, non-empty directory there -- a training run of your own, say -- is left
untouched and the demo stops with an error naming it. The demo preset writes a mid-run
checkpoint every ``checkpoint.every_steps`` steps, so a demo that was killed continues
where it was with ``--resume`` (without it, the interrupted runs are started over).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import OmegaConf

from ..errors import UsageError
from ..files import atomic_write
from .checkpoint import list_checkpoints
from .config import apply_overrides, load_config
from .runlock import RunLockError, describe_holder, lock_holder

WORK_DIR = "runs/demo"  # where the videos and the two runs go unless told otherwise

VARIANTS = {
    "stdd": {"model.stca.enabled": True},
    "frame_only": {"model.stca.enabled": False},
}


def _machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


DEMO_MARKER = ".stdd-demo-run"  # in every run directory the demo created; only those are ever deleted


class DemoDirectoryError(UsageError, RuntimeError):
    """A directory the demo would use is not the demo's own; the message names it."""


def _mark(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / DEMO_MARKER, "made by python -m stdd.demo, which may delete this directory to "
                                          "start its run over\n")


def prepare_run_directory(directory: Path, resume: bool, say=print) -> Optional[str]:
    """Make ``directory`` ready for a demo run; returns the Trainer's ``resume`` argument.

    A missing or empty directory is marked and used. A marked one (a previous demo run) is
    continued with ``resume`` or else deleted and made anew. Anything else raises
    :class:`DemoDirectoryError` and is not touched; a marked one in use by a live run
    raises :class:`~stdd.engine.runlock.RunLockError`.
    """
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        raise DemoDirectoryError(f"--work-dir: {directory} exists and is not a directory the demo made; it is left "
                                 "untouched (choose another --work-dir)")
    if not directory.exists() or not any(directory.iterdir()):
        _mark(directory)
        return None
    if not (directory / DEMO_MARKER).is_file():
        raise DemoDirectoryError(
            f"--work-dir: {directory} exists and was not made by the demo (it has no {DEMO_MARKER} file): it is "
            f"left untouched; choose another --work-dir or move it away"
        )
    holder = lock_holder(directory)
    if holder is not None:
        raise RunLockError(f"--work-dir: {directory} is in use by a running demo ({describe_holder(holder)})")
    interrupted = bool(list_checkpoints(directory / "checkpoints")) and not (directory / "final.pt").is_file()
    if resume:
        return "auto"
    if interrupted:
        say(f"[demo] {directory} holds an interrupted run: starting it over (--resume continues it)")
    shutil.rmtree(directory)
    _mark(directory)
    return None


def train_and_evaluate(cfg, *, quiet: bool = False, resume: Optional[str] = None) -> dict:
    """Train ``cfg`` into ``cfg.run.output_dir`` (from scratch, or continued with ``resume="auto"``), evaluate
    on its validation set: one result row."""
    from .trainer import Trainer

    start = time.time()
    trainer = Trainer(cfg, resume=resume, quiet=quiet)
    resumed = trainer.checkpoints.last_good
    try:
        trained = trainer.train()
        train_seconds = time.time() - start
        evaluation = trainer.evaluate()
    finally:
        trainer.close()
    history = trained["history"]
    return {
        "top1": evaluation["val_top1"],
        "top5": evaluation["val_top5"],
        "val_videos": evaluation["val_videos"],
        "train_accuracy_last_epoch": history[-1].get("train_accuracy") if history else None,
        "train_loss_last_epoch": history[-1].get("train_loss") if history else None,
        "epochs": trained["epochs_done"],
        "steps": trained["global_step"],
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.time() - start, 1),
        "run_directory": str(cfg.run.output_dir),
        "resumed_from": str(resumed[0]) if resumed else None,  # times then cover only the rest of the run
    }


def run_demo(work_dir: str = WORK_DIR, overrides: Sequence[str] = (), out: Optional[str] = None,
             quiet: bool = False, resume: bool = False) -> dict:
    """Train and evaluate both variants; ``resume``: continue the runs a killed demo left in ``work_dir``."""
    from .task import prepare_synthetic

    start = time.time()
    work = Path(os.path.expanduser(work_dir))
    base = load_config("demo", [f"data.root={work / 'data'}", *overrides])
    for name in VARIANTS:  # before any work: a directory that is not the demo's stops it now, untouched
        prepare_run_directory(work / name, resume=True)
    generation_start = time.time()
    dataset = prepare_synthetic(base)
    generation_seconds = time.time() - generation_start
    rows = {}
    for name, settings in VARIANTS.items():
        cfg = apply_overrides(base, [f"{key}={value}" for key, value in settings.items()]
                              + [f"run.output_dir={work / name}"])
        def say(text: str) -> None:
            print(text, file=sys.stderr, flush=True)

        resume_from = prepare_run_directory(work / name, resume, say=say)
        if not quiet:
            say(f"[demo] training {name} ({'STCA on' if settings['model.stca.enabled'] else 'STCA off'})")
        rows[name] = train_and_evaluate(cfg, quiet=quiet, resume=resume_from)
    summary = {
        "task": "synthetic motion classes (8), held-out videos",
        "classes": list(dataset.class_names),
        "model": str(base.model.clip_name),
        "frames": int(base.data.num_frames),
        "input_size": int(base.data.input_size),
        "epochs": int(base.optim.epochs),
        "results": rows,
        "stca_minus_frame_only_top1": round(rows["stdd"]["top1"] - rows["frame_only"]["top1"], 2),
        "chance_top1": round(100.0 / len(dataset.class_names), 2),
        "data_generation_seconds": round(generation_seconds, 1),
        "total_seconds": round(time.time() - start, 1),
        "machine": _machine(),
        "config": OmegaConf.to_container(base, resolve=True),
    }
    table = [
        f"{'model':<12} {'top-1':>7} {'top-5':>7} {'train acc':>10} {'steps':>6} {'seconds':>8}",
        *[
            f"{name:<12} {row['top1']:>7.2f} {row['top5']:>7.2f} "
            f"{(row['train_accuracy_last_epoch'] or float('nan')):>10.2f} {row['steps']:>6d} {row['seconds']:>8.1f}"
            for name, row in rows.items()
        ],
        f"STCA - frame-only top-1: {summary['stca_minus_frame_only_top1']:+.2f} points "
        f"(chance {summary['chance_top1']:.1f}); total {summary['total_seconds']:.0f} s on "
        f"{summary['machine']['cpu_count']} CPU core(s)",
    ]
    summary["table"] = table
    print("\n".join(table))
    if out:
        atomic_write(out, json.dumps(summary, indent=2) + "\n")
        print(f"summary written to {out}")
    return summary
