"""Atomic file writes: the one way stdd writes a file that must never be seen half-written.

A write goes to a temporary file in the destination's directory, is flushed and
fsynced, then renamed over the final name (``os.replace`` is atomic on POSIX)
and the directory is fsynced, so a crash mid-write leaves either the old file
or nothing under the final name, and after a crash right after the rename the
new name survives. On any error (or Ctrl-C) the temporary file is removed; only
a process killed outright can leave one (``.<name>.<random>.tmp``), which no
reader takes for the real file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not allow opening a directory; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: Union[str, os.PathLike], *, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path next to ``path`` for a writer that wants a file name (an encoder, a library).

    When the ``with`` block ends normally the temporary file is fsynced and
    renamed over ``path``; when it raises, the temporary file is removed.
    ``suffix``: the temporary file's ending (e.g. ``path.suffix`` for a writer
    that picks the format by extension).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(temporary)
        _fsync_file(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(path.parent)


def _write_payload(payload: bytes, handle) -> None:
    """Write the bytes of a file (its own function so a test can crash a process inside it)."""
    handle.write(payload)


def atomic_write(path: Union[str, os.PathLike], data: Union[bytes, str]) -> Path:
    """Write ``data`` (bytes, or text written as UTF-8) to ``path`` atomically; returns ``path``."""
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    path = Path(path)
    with atomic_output(path) as temporary:
        with open(temporary, "wb") as handle:
            _write_payload(payload, handle)
            handle.flush()
    return path
