"""Build script: packaging metadata lives in pyproject.toml.

This file builds the C++/CUDA extension ``stdd_kernels._C`` from ``csrc/``
(the ``cpp`` and ``cuda`` STCA backends), which setuptools can only describe
in code. The extension must be compiled against the torch that will import
it, so install with build isolation off, after torch::

    pip install torch==2.14.1
    pip install --no-build-isolation -e .

What gets built:
- a CUDA extension when torch has CUDA and ``nvcc`` is found (``CUDA_HOME``,
  else ``nvcc`` on ``PATH``); architectures from ``TORCH_CUDA_ARCH_LIST``,
  default ``8.0;9.0+PTX`` (A100, H100, and PTX for newer GPUs);
- else a CPU-only C++ extension;
- else (no torch importable, no C++ compiler, or the compile fails) no
  extension: the install still succeeds, prints one line saying the ``cpp``
  backend is unavailable, and the reference/Triton backends work as before.

Environment: ``STDD_BUILD_CUDA=0`` forces a CPU-only build;
``STDD_REQUIRE_EXTENSION=1`` makes a failed build an error (CI uses it);
``MAX_JOBS`` bounds parallel compile jobs (ninja is used when installed).
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
UNAVAILABLE = "stdd: the C++/CUDA extension (backends 'cpp'/'cuda') is unavailable: {why}; the reference and Triton backends still work."


def _required() -> bool:
    return os.environ.get("STDD_REQUIRE_EXTENSION", "0") not in ("", "0")


def _skip(why: str):
    if _required():
        raise SystemExit(f"STDD_REQUIRE_EXTENSION=1 but {why}")
    print(UNAVAILABLE.format(why=why), file=sys.stderr)
    return [], {}


def _find_cxx():
    compiler = os.environ.get("CXX", "c++").split()[0]
    return shutil.which(compiler) or shutil.which("g++") or shutil.which("clang++")


def _extensions():
    if not (ROOT / CSRC / "stca_ops.cpp").is_file():
        return _skip(f"its sources ({CSRC}/) are not in this source tree")
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as error:  # torch missing or broken: the pure-Python package still installs
        return _skip(f"torch is not importable here ({type(error).__name__}: {error}); with pip, install torch first and use --no-build-isolation")
    if _find_cxx() is None:
        return _skip("no C++ compiler found (set CXX or install g++)")

    # Relative paths: setuptools requires them for sources.
    sources = [f"{CSRC}/stca_ops.cpp", f"{CSRC}/stca_cpu.cpp", f"{CSRC}/python_module.cpp"]
    cxx_flags = ["-O3"]
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    define_macros = []
    want_cuda = os.environ.get("STDD_BUILD_CUDA", "1") not in ("", "0")
    nvcc = None
    if want_cuda and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        candidate = Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"
        nvcc = str(candidate) if candidate.is_file() else None
    if nvcc is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        sources.append(f"{CSRC}/stca_cuda.cu")
        define_macros.append(("STDD_WITH_CUDA", None))
        extension_class = cpp_extension.CUDAExtension
        kind = f"CUDA (nvcc {nvcc}, TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})"
    else:
        extension_class = cpp_extension.CppExtension
        if not want_cuda:
            kind = "CPU only (STDD_BUILD_CUDA=0)"
        elif torch.version.cuda is None:
            kind = "CPU only (this torch has no CUDA)"
        else:
            kind = "CPU only (nvcc not found: set CUDA_HOME)"
    print(f"stdd: building the C++ extension stdd_kernels._C: {kind}", file=sys.stderr)
    extension = extension_class(
        name="stdd_kernels._C",
        sources=sources,
        include_dirs=[str(ROOT / CSRC)],
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
    )
    use_ninja = shutil.which("ninja") is not None
    base = cpp_extension.BuildExtension.with_options(use_ninja=use_ninja)

    class BuildOptionalExtension(base):
        """A failed compile leaves a working pure-Python install (unless STDD_REQUIRE_EXTENSION=1)."""

        def build_extensions(self):
            # Wraps the whole step: torch checks the compiler here before compiling anything.
            try:
                super().build_extensions()
            except Exception as error:
                if _required():
                    raise
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                print(UNAVAILABLE.format(why=f"compiling it failed ({first_line}; see the compiler output above)"),
                      file=sys.stderr)

    return [extension], {"build_ext": BuildOptionalExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
