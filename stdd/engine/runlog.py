"""Run logging: metrics as JSON lines + TensorBoard scalars, rank 0 only.

``metrics.jsonl`` gets one object per event (``{"event": "train", "step": 12,
"epoch": 0, "loss": ..., "lr": ..., "time": unix seconds}``); each line is
written and flushed whole, so a killed run leaves a readable file (at most its
last line cut short). A resumed run appends to the same file, after a
``{"event": "resume", "step": S, "path": <checkpoint>}`` record: what the
interrupted attempt logged for steps after S was redone by the resumed run and
is superseded. A run that starts over at step 0 in a directory whose file
already holds records (an attempt killed before its first checkpoint, or whose
checkpoints are gone) appends ``{"event": "restart", "step": 0,
"superseded_up_to_step": N}``, which supersedes every earlier record after
step 0 the same way. The file is never rewritten; :func:`read_metrics` gives
each step's records once, from the attempt that counts.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Union

METRICS_NAME = "metrics.jsonl"
RESUME_EVENT = "resume"  # a run continues a checkpoint at step S
RESTART_EVENT = "restart"  # a run starts over at step 0 where earlier records are
SUPERSEDING_EVENTS = (RESUME_EVENT, RESTART_EVENT)  # records before one of these with a larger step are redone


def _plain(value):
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


class RunLogger:
    def __init__(self, run_directory: Union[str, Path], *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.run_directory = Path(run_directory)
        self._jsonl = None
        self._writer = None
        self.path = self.run_directory / METRICS_NAME
        # the largest step the file's earlier records reach (None: no earlier record), read before appending
        self.earlier_last_step: Optional[int] = None
        if not enabled:
            return
        self.run_directory.mkdir(parents=True, exist_ok=True)
        self.earlier_last_step = _last_step(self.path)
        self._jsonl = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional; the JSONL file is the record
                print("[stdd] tensorboard is not installed: logging metrics.jsonl only", file=sys.stderr)
            else:
                self._writer = SummaryWriter(log_dir=str(self.run_directory / "tensorboard"))

    def log(self, event: str, step: int, **values) -> None:
        if not self.enabled:
            return
        record = {"event": event, "step": int(step), "time": round(time.time(), 3)}
        record.update({key: _plain(value) for key, value in values.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key not in ("event", "step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{event}/{key}", value, int(step))

    def info(self, message: str) -> None:
        if self.enabled:
            print(f"[stdd] {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _last_step(path: Path) -> Optional[int]:
    """The largest step of the whole records in ``path``; None without the file or a record."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    steps = []
    for line in text.splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill: no record
    return max(steps) if steps else None


def read_metrics(run_directory: Union[str, Path], event: Optional[str] = None) -> list[dict]:
    """The records of ``<run_directory>/metrics.jsonl`` as the run's final timeline.

    At each ``resume`` record at step S (and each ``restart`` record, at step 0),
    records written before it with a step after S are dropped (the run logged
    those steps again); the ``resume`` / ``restart`` records themselves are kept.
    A last line cut short by a kill is ignored. ``event``: keep only records of
    that event.
    """
    path = Path(run_directory) / METRICS_NAME
    records: list[dict] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines) - 1:
                continue  # the partial last line of a killed run
            raise ValueError(f"{path}:{number + 1}: not a JSON record") from None
        if record.get("event") in SUPERSEDING_EVENTS:
            records = [r for r in records if int(r.get("step", 0)) <= int(record["step"])]
        records.append(record)
    return [r for r in records if event is None or r.get("event") == event]

