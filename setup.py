"""Build script: packaging metadata lives in pyproject.toml.

This file builds the C++/CUDA extension ``stdd_kernels._C`` from ``csrc/``
(the ``cpp`` and ``cuda`` STCA backends), which setuptools can only describe
in code. The extension must be compiled against the torch that will import
it, so install with build isolation off, after torch (README.md, Install)::

    pip install torch==2.14.1 setuptools wheel ninja
    pip install --no-build-isolation -e .

What gets built:
- a CUDA extension when torch has CUDA and a usable CUDA toolkit is found
  (``stdd_kernels/build_info.py``: ``CUDA_HOME``/``CUDA_PATH``, else the
  toolkit of ``nvcc`` on ``PATH``, else ``/usr/local/cuda``); architectures
  from ``TORCH_CUDA_ARCH_LIST``, default ``8.0;9.0+PTX`` (A100, H100, and PTX
  for newer GPUs);
- else a CPU-only C++ extension, with one line saying why;
- else (no torch importable, no C++ compiler, or the compile fails) no
  extension: the install still succeeds, prints one line saying the ``cpp``
  backend is unavailable, and the reference/Triton backends work as before.
The outcome is recorded in ``stdd_kernels/_build.json``, which
``python -m stdd_kernels.env`` shows (pip prints the build's own lines only
with ``pip install -v``).

Environment: ``STDD_BUILD_CUDA=0`` forces a CPU-only build;
``STDD_REQUIRE_EXTENSION=1`` makes a missing or failed build an error;
``MAX_JOBS`` bounds parallel compile jobs (ninja is used when installed).
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
PACKAGE = "stdd_kernels"
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
UNAVAILABLE = "the C++/CUDA extension (backends 'cpp'/'cuda') is unavailable: {why}; the reference and Triton backends still work."


def _load_build_info():
    """``stdd_kernels/build_info.py`` by path: the package itself cannot be imported before it is built."""
    spec = importlib.util.spec_from_file_location("stdd_build_info", ROOT / PACKAGE / "build_info.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


build_info = _load_build_info()


def _say(line: str) -> None:
    print(f"stdd: {line}", file=sys.stderr)


def _required() -> bool:
    return os.environ.get("STDD_REQUIRE_EXTENSION", "0") not in ("", "0")


def _not_built(why: str):
    """No extension at all: say why, record it, and install the pure-Python package."""
    if _required():
        raise SystemExit(f"STDD_REQUIRE_EXTENSION=1 but {why}")
    _say(UNAVAILABLE.format(why=why))
    build_info.write_record(ROOT / PACKAGE, {"built": False, "cuda": False, "kind": None, "reason": why})
    return [], {}


def _find_cxx():
    compiler = os.environ.get("CXX", "c++").split()[0]
    return shutil.which(compiler) or shutil.which("g++") or shutil.which("clang++")


def _extensions():
    if not (ROOT / CSRC / "stca_ops.cpp").is_file():
        return _not_built(f"its sources ({CSRC}/) are not in this source tree")
    try:
        import torch
    except Exception as error:  # torch missing or broken: the pure-Python package still installs
        return _not_built(f"torch is not importable here ({type(error).__name__}: {error}); with pip, install torch first and use --no-build-isolation")
    if _find_cxx() is None:
        return _not_built("no C++ compiler found (set CXX or install g++)")

    toolkit, cpu_only_because = None, None
    if os.environ.get("STDD_BUILD_CUDA", "1") in ("", "0"):
        cpu_only_because = "STDD_BUILD_CUDA=0"
    elif torch.version.cuda is None:
        cpu_only_because = "this torch has no CUDA"
    else:
        toolkit, found = build_info.find_cuda_toolkit()
        if toolkit is None:
            cpu_only_because = found
        else:
            # torch.utils.cpp_extension reads CUDA_HOME once, when it is imported, and on its
            # own guesses the parent of nvcc's directory (wrong for a wrapper script such as
            # /usr/local/bin/nvcc): set it before the import, and the module global in case
            # something imported it earlier.
            os.environ["CUDA_HOME"] = str(toolkit.root)
    from torch.utils import cpp_extension

    # Relative paths: setuptools requires them for sources.
    sources = [f"{CSRC}/stca_ops.cpp", f"{CSRC}/stca_cpu.cpp", f"{CSRC}/stca_projection_ops.cpp",
               f"{CSRC}/stca_projection_cpu.cpp", f"{CSRC}/python_module.cpp"]
    options = dict(
        name=f"{PACKAGE}._C",
        include_dirs=[str(ROOT / CSRC)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]},
    )
    if toolkit is not None:
        cpp_extension.CUDA_HOME = str(toolkit.root)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        kind = f"CUDA (toolkit {found}; TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})"
        # torch links -lcudart from <root>/lib64 or <root>/lib; name the directory that has it.
        extension = cpp_extension.CUDAExtension(
            sources=sources + [f"{CSRC}/stca_cuda.cu", f"{CSRC}/stca_projection_cuda.cu"],
            define_macros=[("STDD_WITH_CUDA", None)],
            library_dirs=[str(toolkit.cudart_dir)],
            **options,
        )
    else:
        kind = f"CPU only ({cpu_only_because})"
        extension = cpp_extension.CppExtension(sources=sources, **options)
    _say(f"building the C++ extension {PACKAGE}._C: {kind}")
    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    built = {"built": True, "cuda": toolkit is not None, "kind": kind, "reason": cpu_only_because}

    class BuildOptionalExtension(base):
        """A failed compile leaves a working pure-Python install (unless STDD_REQUIRE_EXTENSION=1).

        Editable or not: the failed extension is dropped from the build (so
        nothing tries to copy or install a file that was never made), a
        previously built ``_C`` at the same place is removed (it would not
        match these sources), and the outcome is recorded next to ``_C``.
        """

        outcome = built

        def build_extensions(self):
            # Wraps the whole step: torch checks the compiler here before compiling anything.
            try:
                super().build_extensions()
            except Exception as error:
                if _required():
                    raise
                message = str(error).strip()
                first_line = message.splitlines()[0].rstrip(".") if message else "no message"
                why = (f"building it failed ({type(error).__name__}: {first_line}; "
                       "the compiler's own messages are in the build log: pip install -v)")
                _say(UNAVAILABLE.format(why=why))
                self.outcome = {"built": False, "cuda": False, "kind": kind, "reason": why}
                for failed in self.extensions:
                    Path(self.get_ext_fullpath(failed.name)).unlink(missing_ok=True)
                self.failed = list(self.extensions)
                self.extensions = []

        def run(self):
            inplace = self.inplace  # editable installs and `build_ext --inplace`; run() clears it while building
            self.failed = []
            super().run()
            directories = [Path(self.build_lib) / PACKAGE]
            if inplace:
                package_dir = Path(self.get_finalized_command("build_py").get_package_dir(PACKAGE)).resolve()
                for failed in self.failed:
                    (package_dir / Path(self.get_ext_filename(failed.name)).name).unlink(missing_ok=True)
                directories.append(package_dir)
            for directory in directories:
                build_info.write_record(directory, self.outcome)

    return [extension], {"build_ext": BuildOptionalExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
