"""How the extension ``stdd_kernels._C`` is built, and what its last build did.

Two things live here, in plain Python (no torch, no package imports), because
``setup.py`` loads this file by path before the package can be imported:

- :func:`find_cuda_toolkit`: the CUDA toolkit to compile ``csrc/stca_cuda.cu``
  with. Order: ``CUDA_HOME`` / ``CUDA_PATH`` if set; else the toolkit that
  ``nvcc`` on ``PATH`` belongs to (through symlinks, and by asking nvcc
  itself, since ``nvcc`` on ``PATH`` may be a wrapper script that execs the
  real one); else ``/usr/local/cuda``. A toolkit is usable when it has
  ``bin/nvcc``, ``include/cuda_runtime.h`` and a ``libcudart`` to link.
  ``tests/cpp/cmake_ctest.sh`` asks the same question:
  ``python stdd_kernels/build_info.py --cuda-root``.
- the build record ``stdd_kernels/_build.json``: ``setup.py`` writes what it
  built (CUDA, CPU only, or nothing, and why) next to where ``_C`` goes;
  :mod:`stdd_kernels.extension` and ``python -m stdd_kernels.env`` read it, so
  the reason a backend is missing is visible after the install too (pip hides
  the build's output unless run with ``-v``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

DEFAULT_CUDA_ROOT = Path("/usr/local/cuda")
# Where a toolkit keeps the libcudart to link, in the order they are tried.
CUDART_DIRS = ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib")
RECORD_NAME = "_build.json"
_NVCC_TOP = re.compile(r"^#\$ TOP=(.+)$", re.MULTILINE)


@dataclass(frozen=True)
class CudaToolkit:
    root: Path  # what CUDA_HOME must be for torch.utils.cpp_extension
    cudart_dir: Path  # the directory holding libcudart (link with -L here)
    found_by: str  # how it was found, for the build's one-line report


def cudart_dir(root: Path) -> Optional[Path]:
    """The directory of ``root`` holding ``libcudart.so`` (what ``-lcudart`` links), or None."""
    for name in CUDART_DIRS:
        if (root / name / "libcudart.so").exists():
            return root / name
    return None


def toolkit_problem(root: Path) -> Optional[str]:
    """None when ``root`` is a usable CUDA toolkit, else what is missing there."""
    if not root.is_dir():
        return f"{root} does not exist"
    if not (root / "bin" / "nvcc").is_file():
        return f"{root} has no bin/nvcc"
    if not (root / "include" / "cuda_runtime.h").is_file():
        return f"{root} has no include/cuda_runtime.h"
    if cudart_dir(root) is None:
        return f"{root} has no libcudart in any of {', '.join(CUDART_DIRS)}"
    return None


def nvcc_reported_root(nvcc: str, run: Callable = subprocess.run) -> Optional[Path]:
    """The toolkit root nvcc itself reports (``#$ TOP=...`` of ``nvcc -v --dryrun``).

    This sees through wrapper scripts, which resolving symlinks cannot. A dry
    run compiles nothing; any failure just means "no answer".
    """
    try:
        result = run(
            [nvcc, "-v", "--dryrun", "-E", "-x", "c++", os.devnull],
            capture_output=True, text=True, timeout=60, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = _NVCC_TOP.search((result.stdout or "") + (result.stderr or ""))
    if match is None:
        return None
    return Path(os.path.realpath(match.group(1).strip().strip('"')))


def find_cuda_toolkit(
    environ: Mapping[str, str] = os.environ,
    which: Callable[..., Optional[str]] = shutil.which,
    run: Callable = subprocess.run,
    default: Path = DEFAULT_CUDA_ROOT,
) -> tuple[Optional[CudaToolkit], str]:
    """The usable CUDA toolkit to build with, and a one-line account of the search.

    Returns ``(toolkit, how)`` or ``(None, why_not)``. ``CUDA_HOME`` or
    ``CUDA_PATH``, when set, is the only candidate (an explicit choice is
    never second-guessed). The arguments exist for tests.
    """
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        value = environ.get(variable)
        if value:
            root = Path(value)
            problem = toolkit_problem(root)
            if problem is not None:
                return None, f"{variable}={value} is not a usable CUDA toolkit ({problem})"
            return CudaToolkit(root, cudart_dir(root), f"set by {variable}"), f"{root}, set by {variable}"

    nvcc = which("nvcc", path=environ.get("PATH"))
    tried = [] if nvcc is not None else ["no nvcc on PATH"]
    for root, found_by in _candidates(nvcc, run, default):
        problem = toolkit_problem(root)
        if problem is None:
            return CudaToolkit(root, cudart_dir(root), found_by), f"{root}, {found_by}"
        if problem not in tried:
            tried.append(problem)
    return None, "no usable CUDA toolkit (set CUDA_HOME): " + "; ".join(tried)


def _candidates(nvcc: Optional[str], run: Callable, default: Path):
    """Toolkit roots to try, lazily: nvcc is only run when its real path gave nothing usable."""
    if nvcc is not None:
        yield Path(os.path.realpath(nvcc)).parent.parent, f"the real path of nvcc on PATH ({nvcc})"
        reported = nvcc_reported_root(nvcc, run)
        if reported is not None:
            yield reported, f"reported by nvcc on PATH ({nvcc})"
    yield default, "the default location"


# --------------------------------------------------------------------------
# The build record
# --------------------------------------------------------------------------


def write_record(directory: Path, record: dict) -> Path:
    """Write ``record`` as ``directory/_build.json`` atomically (a crash leaves the old one)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RECORD_NAME
    partial = path.with_name(f".{RECORD_NAME}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path


def read_record(directory: Path = Path(__file__).resolve().parent) -> Optional[dict]:
    """The record of the build that installed this package, or None (no record, or unreadable).

    No record is normal for a ``_C`` built by CMake or copied in by hand.
    """
    try:
        record = json.loads((directory / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _main(argv: list[str]) -> int:
    if argv != ["--cuda-root"]:
        print("usage: python stdd_kernels/build_info.py --cuda-root", file=sys.stderr)
        return 2
    toolkit, how = find_cuda_toolkit()
    if toolkit is None:
        print(how, file=sys.stderr)
        return 1
    print(toolkit.root)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
