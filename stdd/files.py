"""Atomic file writes: the one way stdd writes a file that must never be seen half-written.

A write goes to a temporary file in the destination's directory, is flushed and
fsynced, then renamed over the final name (``os.replace`` is atomic on POSIX)
and the directory is fsynced, so a crash mid-write leaves either the old file
or nothing under the final name, and after a crash right after the rename the
new name survives. On any error (or Ctrl-C) the temporary file is removed; only
a process killed outright can leave one (``.<name>.stdd-<8 hex>.tmp``), which
no reader takes for the real file and :func:`remove_orphan_temporaries` removes
(by that name pattern only) when the directory's owner starts again.

The temporary file is created with mode ``0o666`` filtered by the process's
umask (as ``open()`` creates files), so the written file gets the usual
permissions (``0644`` under the common umask ``022``), not ``mkstemp``'s ``0600``:
data one user generates stays readable to the others the umask allows.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import Iterator, Union

_TEMPORARY_TAG = "stdd-"  # .<name>.stdd-<8 hex digits><suffix>: what marks a temporary file as ours
_ORPHAN_PATTERN = re.compile(r"^\..+\." + _TEMPORARY_TAG + r"[0-9a-f]{8}(\.[A-Za-z0-9]{1,16})?$")


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


def _create_temporary(path: Path, suffix: str) -> str:
    """A new empty file ``.<name>.stdd-<random><suffix>`` next to ``path``, mode 0o666 minus the umask."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        candidate = str(path.parent / f".{path.name}.{_TEMPORARY_TAG}{secrets.token_hex(4)}{suffix}")
        try:
            fd = os.open(candidate, flags, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(f"could not create a temporary file next to {path}")


def is_orphan_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_output`'s temporary files."""
    return _ORPHAN_PATTERN.match(name) is not None


def remove_orphan_temporaries(directory: Union[str, os.PathLike]) -> list[Path]:
    """Delete the temporary files a killed writer left in ``directory`` (not its subdirectories).

    Only names of the form ``.<name>.stdd-<8 hex>[.<suffix>]`` are touched. The
    caller must know that no writer is active in ``directory`` (a training run
    holds its run directory's lock). Returns the removed paths.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        if is_orphan_temporary(entry.name) and entry.is_file() and not entry.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed


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
    temporary = _create_temporary(path, suffix)
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
