"""STDD vs the frame-only baseline on the synthetic motion set: what ``python -m stdd.demo`` runs.

:func:`run_demo`:

1. generates the synthetic motion set (``stdd.data.synthetic``: classes defined only by motion,
   with random shape, colour, position and speed; a single frame does not reveal the class). The
   ``paper`` variant (preset ``demo``) uses six of the eight: moving left/right/up/down, growing,
   shrinking; ``no-masking`` (preset ``demo_no_masking``) all eight, with the two rotations;
2. trains STDD (tiny open_clip ViT from random weights, every block an STCA block) with the preset;
3. trains the frame-only baseline: the same model and budget with STCA off
   (``model.stca.enabled=false``: open_clip's own blocks on every frame);
4. evaluates both on the held-out videos, writes ``per_class.csv`` and ``confusion.png`` into each
   run directory and prints the report: a table, per-class top-1, what the numbers mean, where
   the files are.

The frame-only model sees every frame but never two frames together, so it cannot tell
left from right or growing from shrinking; STCA mixes channels between neighbouring frames
inside each block, which is what lets the model see the direction of a motion.
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

from ..data.synthetic import MOTION_CLASSES
from ..errors import UsageError
from ..files import atomic_write
from .checkpoint import list_checkpoints
from .config import apply_overrides, load_config
from .metrics import confusion_matrix, per_class_accuracy, plot_confusion_matrix, write_per_class_csv
from .runlock import RunLockError, describe_holder, lock_holder
from .task import prepare_synthetic
from .trainer import Trainer

WORK_DIR = "runs/demo"  # where the videos and the two runs go unless told otherwise

VARIANTS = {
    "stdd": {"model.stca.enabled": True},
    "frame_only": {"model.stca.enabled": False},
}

# --variant -> the preset both runs start from. "paper": the paper's STCA (window-shift masking 0.5 of every
# 2x2 window, continual mixing at scales (1, 2)); "no-masking": the earlier demo, masking off.
DEMO_VARIANTS = {"paper": "demo", "no-masking": "demo_no_masking"}
DEFAULT_VARIANT = "paper"


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
    on its validation set, write ``per_class.csv`` and ``confusion.png`` there: one result row."""
    start = time.time()
    trainer = Trainer(cfg, resume=resume, quiet=quiet)
    resumed = trainer.checkpoints.last_good
    try:
        trained = trainer.train()
        train_seconds = time.time() - start
        evaluation = trainer.evaluate(details=True)
        class_names = list(trainer.task.class_names)
    finally:
        trainer.close()
    history = trained["history"]
    run_directory = Path(cfg.run.output_dir)
    matrix = confusion_matrix(torch.tensor(evaluation["val_labels"]), torch.tensor(evaluation["val_predictions"]),
                              len(class_names))
    accuracy, _ = per_class_accuracy(matrix)
    write_per_class_csv(run_directory / "per_class.csv", class_names, matrix)
    plot_confusion_matrix(run_directory / "confusion.png", matrix, class_names,
                          title=f"{run_directory.name}: top-1 {evaluation['val_top1']:.1f}%")
    return {
        "top1": evaluation["val_top1"],
        "top5": evaluation["val_top5"],
        "val_videos": evaluation["val_videos"],
        "per_class_top1": {name: round(float(value), 2) for name, value in zip(class_names, accuracy)},
        "train_accuracy_last_epoch": history[-1].get("train_accuracy") if history else None,
        "train_loss_last_epoch": history[-1].get("train_loss") if history else None,
        "epochs": trained["epochs_done"],
        "steps": trained["global_step"],
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.time() - start, 1),
        "run_directory": str(run_directory),
        "per_class_csv": str(run_directory / "per_class.csv"),
        "confusion_png": str(run_directory / "confusion.png"),
        "tensorboard": str(run_directory / "tensorboard") if cfg.run.tensorboard else None,
        "resumed_from": str(resumed[0]) if resumed else None,  # times then cover only the rest of the run
    }


def _stca_setting(cfg) -> str:
    stca = cfg.model.stca
    if float(stca.mask_ratio) == 0.0:
        masking = "no window-shift masking"
    else:
        masking = f"window-shift masking {float(stca.mask_ratio):g} of each {stca.window[0]}x{stca.window[1]} window"
    return (f"{masking}, {stca.mixing} mixing at scales {tuple(stca.scales)}, channel fold {stca.channel_fold}")


def _opposites(classes: Sequence[str]) -> str:
    """The pairs of the demo's classes that differ only in their direction, as the report names them."""
    pairs = []
    for index, first in enumerate(classes):
        for second in classes[index + 1:]:
            if MOTION_CLASSES[first][0] == MOTION_CLASSES[second][0]:
                pairs.append(f"{first} from {second}")
    return ", ".join(pairs) or "none of these classes differ in direction only"


def report_lines(summary: dict) -> list[str]:
    """The end-of-demo report: the table, what the numbers mean, where the files are."""
    rows = summary["results"]
    lines = [
        f"{'model':<12} {'top-1':>7} {'top-5':>7} {'train acc':>10} {'steps':>6} {'seconds':>8}",
        *[
            f"{name:<12} {row['top1']:>7.2f} {row['top5']:>7.2f} "
            f"{(row['train_accuracy_last_epoch'] or float('nan')):>10.2f} {row['steps']:>6d} {row['seconds']:>8.1f}"
            for name, row in rows.items()
        ],
        f"STDD - frame-only top-1: {summary['stca_minus_frame_only_top1']:+.2f} points; total "
        f"{summary['total_seconds']:.0f} s on {summary['machine']['cpu_count']} CPU core(s)",
        "",
        f"What it means: top-1 on {rows['stdd']['val_videos']} held-out videos of {len(summary['classes'])} classes "
        f"defined only by motion; chance is {summary['chance_top1']:.1f}%. The frame-only model encodes every frame "
        "on its own, so it can at best tell the kind of motion (along which axis, a rotation, a change of size) "
        f"from how the frames differ as a set, never its direction ({_opposites(summary['classes'])}). STDD's "
        f"blocks mix channels between neighbouring frames ({summary['stca']}), which is what lets it see the "
        "direction.",
        "",
        f"{'per class top-1':<28}" + "".join(f"{name:>12}" for name in rows),
        *[f"{cls:<28}" + "".join(f"{rows[name]['per_class_top1'][cls]:>12.1f}" for name in rows)
          for cls in summary["classes"]],
        "",
    ]
    for name, row in rows.items():
        lines.append(f"{name}: {row['run_directory']} (config.yaml, metrics.jsonl, final.pt); confusion matrix "
                     f"{row['confusion_png']}, per class {row['per_class_csv']}")
    if any(row["tensorboard"] for row in rows.values()):
        lines.append(f"TensorBoard: tensorboard --logdir {summary['work_dir']}")
    return lines


def run_demo(work_dir: str = WORK_DIR, overrides: Sequence[str] = (), out: Optional[str] = None,
             quiet: bool = False, resume: bool = False, variant: str = DEFAULT_VARIANT) -> dict:
    """Train and evaluate STDD and frame-only with the ``variant``'s preset (:data:`DEMO_VARIANTS`);
    ``resume``: continue the runs a killed demo left in ``work_dir``."""
    if variant not in DEMO_VARIANTS:
        raise UsageError(f"--variant {variant!r}: expected one of {', '.join(DEMO_VARIANTS)}")
    start = time.time()
    work = Path(os.path.expanduser(work_dir))
    base = load_config(DEMO_VARIANTS[variant], [f"data.root={work / 'data'}", *overrides])
    for name in VARIANTS:  # before any work: a directory that is not the demo's stops it now, untouched
        prepare_run_directory(work / name, resume=True)
    generation_start = time.time()
    dataset = prepare_synthetic(base)
    generation_seconds = time.time() - generation_start

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    rows = {}
    for name, settings in VARIANTS.items():
        cfg = apply_overrides(base, [f"{key}={value}" for key, value in settings.items()]
                              + [f"run.output_dir={work / name}"])
        resume_from = prepare_run_directory(work / name, resume, say=say)
        if not quiet:
            say(f"[demo] training {name} ({'STCA on' if settings['model.stca.enabled'] else 'STCA off'})")
        rows[name] = train_and_evaluate(cfg, quiet=quiet, resume=resume_from)
    summary = {
        "task": "synthetic motion classes, held-out videos",
        "variant": variant,
        "stca": _stca_setting(base),
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
        "work_dir": str(work),
        "machine": _machine(),
        "config": OmegaConf.to_container(base, resolve=True),
    }
    summary["table"] = report_lines(summary)
    print("\n".join(summary["table"]))
    if out:
        atomic_write(out, json.dumps(summary, indent=2) + "\n")
        print(f"summary written to {out}")
    return summary
