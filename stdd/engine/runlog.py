"""Run logging: metrics as JSON lines + TensorBoard scalars, rank 0 only.

``metrics.jsonl`` gets one object per event (``{"event": "train", "step": 12,
"epoch": 0, "loss": ..., "lr": ..., "time": unix seconds}``); each line is
written and flushed whole, so a killed run leaves a readable file (at most its
last line cut short). A resumed run appends to the same file, after a
``{"event": "resume", "step": S, "path": <checkpoint>}`` record: what the
interrupted attempt logged for steps after S was redone by the resumed run and
is superseded. The file is never rewritten; :func:`read_metrics` gives each
step's records once, from the attempt that counts.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Union


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
        if not enabled:
            return
        self.run_directory.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_directory / "metrics.jsonl", "a", encoding="utf-8")
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


def read_metrics(run_directory: Union[str, Path], event: Optional[str] = None) -> list[dict]:
    """The records of ``<run_directory>/metrics.jsonl`` as the run's final timeline.

    At each ``resume`` record at step S, records written before it with a step
    after S are dropped (the resumed run logged those steps again); the
    ``resume`` records themselves are kept. A last line cut short by a kill is
    ignored. ``event``: keep only records of that event.
    """
    path = Path(run_directory) / "metrics.jsonl"
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
        if record.get("event") == "resume":
            records = [r for r in records if int(r.get("step", 0)) <= int(record["step"])]
        records.append(record)
    return [r for r in records if event is None or r.get("event") == event]
