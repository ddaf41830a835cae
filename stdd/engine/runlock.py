"""Directory locks: one training run at a time writes a ``run.output_dir``, one evaluation an ``--out-dir``.

A run takes ``<run.output_dir>/run.lock`` before it writes anything there and
holds it until it ends; all processes of one DDP run count as one run (rank 0
takes the lock for them: :func:`acquire_lock`). ``python -m stdd.eval`` holds
``<--out-dir>/eval.lock`` the same way from before it scores until its
outputs are written, so the files there come from one evaluation. The lock is
an exclusive ``flock`` on the open file, so the kernel drops it when the
holder's process ends in any way, ``kill -9`` included. The file's content
says who holds it (pid, host, start time, command); a second run on the
directory fails at once with :class:`RunLockError` naming that holder. A lock
file whose holder is gone (a killed run) is taken over, and
:attr:`RunLock.stale_holder` says whose it was. A directory that cannot be
created or written is a :class:`RunLockError` too, naming the setting that
chose it.

``flock`` is reliable on local filesystems; on network filesystems it depends
on the server's lock support (Linux NFSv4 maps it to byte-range locks).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Optional, Union

from ..errors import UsageError
from .distributed import all_gather_objects

LOCK_NAME = "run.lock"  # a training run's directory
EVAL_LOCK_NAME = "eval.lock"  # an evaluation's --out-dir


class RunLockError(UsageError, RuntimeError):
    """The run directory is in use by another run; the one-line message names the holder."""


def describe_holder(info: Optional[dict]) -> str:
    """``pid 1234 on host gpu7, started 2026-01-02T03:04:05, command: python -m stdd.train ...``."""
    if not info:
        return "an unknown process (the lock file names no holder)"
    return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}, "
            f"command: {info.get('command', '?')}")


def _read_holder(handle) -> Optional[dict]:
    handle.seek(0)
    text = handle.read()
    try:
        info = json.loads(text) if text.strip() else None
    except ValueError:
        return {"pid": "?", "host": "?", "started": "?", "command": f"(unreadable lock file content {text[:60]!r})"}
    return info if isinstance(info, dict) else None


class RunLock:
    """The exclusive lock of one directory (``with RunLock(directory): ...`` or acquire/release).

    ``acquire()`` creates the directory and raises :class:`RunLockError` when another live
    process holds it or when it cannot be created or written. The defaults are a training
    run's; an evaluation's ``--out-dir`` is ``RunLock(out, name=EVAL_LOCK_NAME,
    label="--out-dir", holder_kind="evaluation", setting="--out-dir")``. ``label``: what the
    messages call the directory; ``holder_kind``: what holds it; ``setting``: the config key
    or option that chose it.
    """

    def __init__(self, directory: Union[str, os.PathLike], *, name: str = LOCK_NAME,
                 label: str = "run directory", holder_kind: str = "run", setting: str = "run.output_dir"):
        self.directory = Path(directory)
        self.path = self.directory / name
        self.label, self.holder_kind, self.setting = label, holder_kind, setting
        self._handle = None
        self.stale_holder: Optional[dict] = None  # the previous holder whose lock was taken over, if any

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> "RunLock":
        if self._handle is not None:
            return self
        while True:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                handle = open(self.path, "a+", encoding="utf-8")
            except OSError as error:  # read-only filesystem, no permission, a file in the way, ...
                raise RunLockError(
                    f"{self.setting}={self.directory}: cannot create the {self.label} or write in it ({error}); "
                    f"expected a folder this process can write"
                ) from error
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = _read_holder(handle)
                handle.close()
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunLockError(f"{self.label} {self.directory}: cannot lock {self.path} ({error})") from error
                raise RunLockError(
                    f"{self.label} {self.directory} is in use by another {self.holder_kind} "
                    f"({describe_holder(holder)}); wait for it to end or choose another {self.setting}"
                ) from None
            # The file may have been removed by a holder that released it between our open and
            # our flock: then we locked an orphaned inode; try again with the file now there.
            try:
                same = os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
        previous = _read_holder(handle)
        self.stale_holder = previous  # whoever wrote it is gone: the kernel dropped their lock
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(self.holder_info()) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
        self._handle = handle
        return self

    @staticmethod
    def holder_info() -> dict:
        module = _main_module()
        program = ["-m", module] if module else sys.argv[:1]
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join([os.path.basename(sys.executable), *program, *sys.argv[1:]]),
        }

    def release(self) -> None:
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        try:
            self.path.unlink()  # while still locked, so nobody can lock the file we remove
        except FileNotFoundError:
            pass
        handle.close()  # closing drops the lock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _main_module() -> Optional[str]:
    """``stdd.train`` when this process runs ``python -m stdd.train`` (the module's name, not its file)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) or None


def acquire_lock(directory: Union[str, os.PathLike], context=None, **options) -> Optional[RunLock]:
    """Rank 0 locks ``directory`` for all processes of a (DDP) job; every rank raises the same
    :class:`RunLockError` when it cannot. ``options``: :class:`RunLock`'s. Returns rank 0's lock
    (None on the other ranks). ``context``: the job's ``DistributedContext`` (None: one process)."""
    lock, refusal = None, None
    if context is None or context.is_main:
        try:
            lock = RunLock(directory, **options).acquire()
        except RunLockError as error:
            refusal = str(error)
    if context is not None:
        refusal = all_gather_objects(refusal, context)[0]
    if refusal is not None:
        raise RunLockError(refusal)
    return lock


def lock_holder(directory: Union[str, os.PathLike]) -> Optional[dict]:
    """Who holds ``directory``'s run lock now (``{}`` if unnamed), or None when no live process does."""
    path = Path(directory) / LOCK_NAME
    try:
        handle = open(path, "r", encoding="utf-8")
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read_holder(handle) or {}
        return None
