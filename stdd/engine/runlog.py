"""Run logging: metrics as JSON lines + TensorBoard scalars, rank 0 only; progress on stderr.

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

:class:`Progress` shows how far a loop is: tqdm's bar, redrawn in place, on a
terminal; on anything else (a batch job's log file, a pipe) one plain line
every N steps, without carriage returns.
"""

from __future__ import annotations

import datetime
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, TextIO, Union

from tqdm import tqdm

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
            try:  # optional package (the JSONL file is the record), needed only when run.tensorboard is on
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
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


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


class Progress:
    """How far a loop of ``total`` steps is, on ``stream`` (default stderr).

    On a terminal: tqdm's bar, redrawn in place (at most once a second). Anywhere else -- a
    batch job's log file, a pipe -- a bar would leave one carriage-return update per redraw in
    the file, so instead one plain line is printed every ``every`` steps (the step a multiple
    of it) and at the last step::

        [stdd] train: step 20/740 (3%), epoch 0, loss 1.7912, lr 3.00e-03, 0:00:07 elapsed, about 0:04:12 left

    ``initial``: steps already done (a resumed run); ``advance(n, **values)``: ``n`` more steps
    done, ``values`` shown after the position (the bar's postfix).
    """

    def __init__(self, total: int, *, desc: str, unit: str, initial: int = 0, every: int = 1,
                 stream: Optional[TextIO] = None):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.position, self.every = int(total), int(initial), max(1, int(every))
        self.desc, self.unit = desc, unit
        self._started, self._initial = time.time(), int(initial)
        self._bar = None
        if _is_terminal(self.stream):
            self._bar = tqdm(total=self.total, initial=self.position, unit=unit, desc=desc, file=self.stream,
                             dynamic_ncols=True, mininterval=1.0)

    def advance(self, n: int = 1, **values) -> None:
        self.position += n
        if self._bar is not None:
            if values:
                self._bar.set_postfix(values, refresh=False)  # drawn with the next redraw, not one per step
            self._bar.update(n)
            return
        if self.position % self.every == 0 or self.position == self.total:
            print(self.line(values), file=self.stream, flush=True)

    def line(self, values: Optional[dict] = None) -> str:
        """The plain progress line at the current position."""
        percent = 100.0 * self.position / self.total if self.total else 100.0
        parts = [f"[stdd] {self.desc}: {self.unit} {self.position}/{self.total} ({percent:.0f}%)"]
        parts += [f"{key} {value}" for key, value in (values or {}).items()]
        elapsed = time.time() - self._started
        parts.append(f"{_clock(elapsed)} elapsed")
        done = self.position - self._initial
        if 0 < done and self.position < self.total:
            parts.append(f"about {_clock(elapsed / done * (self.total - self.position))} left")
        return ", ".join(parts)

    def over(self, iterable):
        """Each item of ``iterable``, one step advanced when the loop is done with it; closed at the end."""
        try:
            for item in iterable:
                yield item
                self.advance(1)
        finally:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
