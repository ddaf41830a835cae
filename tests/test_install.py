"""Installing stdd: CUDA toolkit discovery, and installs that survive a broken compiler.

The toolkit tests build fake toolkit layouts in a temp dir (an ``nvcc`` that
only answers ``--dryrun``, ``include/cuda_runtime.h``, an empty
``libcudart.so``): no compiler runs. The install tests run real ``pip``
installs (editable and regular) of a temp copy of the tree into throw-away
virtual environments, with ``CXX=false``, and read the outcome back through
``python -m stdd_kernels.env`` as a user would.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from stdd_kernels import build_info
from stdd_kernels.build_info import CudaToolkit, find_cuda_toolkit

ROOT = Path(__file__).resolve().parents[1]
# What an install of the tree needs (pyproject.toml names README.md as the readme).
TREE = ("setup.py", "pyproject.toml", "README.md", "csrc", "stdd", "stdd_kernels")
BUILD_PRODUCTS = shutil.ignore_patterns("__pycache__", "*.so", build_info.RECORD_NAME, "*.egg-info")
# The one line setup.py prints when it installs without the extension.
UNAVAILABLE_LINE = "stdd: the C++/CUDA extension (backends 'cpp'/'cuda') is unavailable: building it failed"


def fake_nvcc(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def fake_toolkit(root: Path, cudart: str = "lib") -> Path:
    """A toolkit layout whose nvcc, like the real one, reports ``#$ TOP=`` on a dry run."""
    fake_nvcc(
        root / "bin" / "nvcc",
        'here=$(cd "$(dirname "$0")" && pwd)\n'
        'case " $* " in *" --dryrun "*) echo "#\\$ TOP=$here/.." >&2 ;; esac\n',
    )
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime.h").write_text("")
    (root / cudart).mkdir(parents=True)
    (root / cudart / "libcudart.so").write_bytes(b"")
    return root


def wrapper_dir(directory: Path, target: Path) -> Path:
    """A bin/ holding an ``nvcc`` shell script that execs ``target`` (realpath cannot see through it)."""
    fake_nvcc(directory / "bin" / "nvcc", f'exec "{target}" "$@"\n')
    return directory / "bin"


def never_run(*args, **kwargs):
    raise AssertionError(f"nvcc should not have been run: {args}")


# --------------------------------------------------------------------------
# Toolkit discovery
# --------------------------------------------------------------------------


def test_wrapper_script_nvcc_finds_the_toolkit_it_execs(tmp_path):
    real = fake_toolkit(tmp_path / "cuda-13.0")
    path = wrapper_dir(tmp_path / "local", real / "bin" / "nvcc")
    toolkit, how = find_cuda_toolkit({"PATH": str(path)}, default=tmp_path / "nowhere")
    # The parent of the wrapper's directory (tmp/local, torch's own guess) has no toolkit.
    assert toolkit == CudaToolkit(real.resolve(), real.resolve() / "lib", toolkit.found_by)
    assert how == f"{real.resolve()}, reported by nvcc on PATH ({path / 'nvcc'})"


def test_symlinked_nvcc_resolves_without_running_nvcc(tmp_path):
    real = fake_toolkit(tmp_path / "cuda", cudart="lib64")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").symlink_to(real / "bin" / "nvcc")
    toolkit, _ = find_cuda_toolkit({"PATH": str(tmp_path / "bin")}, run=never_run, default=tmp_path / "nowhere")
    assert toolkit.root == real.resolve() and toolkit.cudart_dir == real.resolve() / "lib64"


@pytest.mark.parametrize("cudart", ["lib64", "lib", "targets/x86_64-linux/lib"])
def test_libcudart_found_where_the_toolkit_keeps_it(tmp_path, cudart):
    real = fake_toolkit(tmp_path / "cuda", cudart=cudart)
    toolkit, _ = find_cuda_toolkit({"CUDA_HOME": str(real), "PATH": ""}, run=never_run)
    assert toolkit.cudart_dir == real / cudart


def test_cuda_home_wins_and_a_broken_one_is_not_second_guessed(tmp_path):
    chosen = fake_toolkit(tmp_path / "chosen")
    other = fake_toolkit(tmp_path / "other")
    environ = {"PATH": str(other / "bin"), "CUDA_HOME": str(chosen)}
    assert find_cuda_toolkit(environ, run=never_run)[0].root == chosen
    assert find_cuda_toolkit({"PATH": "", "CUDA_PATH": str(chosen)}, run=never_run)[0].root == chosen
    (chosen / "include" / "cuda_runtime.h").unlink()
    toolkit, why = find_cuda_toolkit(environ, run=never_run, default=other)
    assert toolkit is None
    assert why == f"CUDA_HOME={chosen} is not a usable CUDA toolkit ({chosen} has no include/cuda_runtime.h)"


def test_default_location_when_nvcc_is_not_on_path(tmp_path):
    real = fake_toolkit(tmp_path / "cuda")
    toolkit, how = find_cuda_toolkit({"PATH": str(tmp_path / "empty")}, run=never_run, default=real)
    assert how == f"{real}, the default location"


def test_no_usable_toolkit_says_what_was_tried(tmp_path):
    broken = fake_toolkit(tmp_path / "broken")
    (broken / "lib" / "libcudart.so").unlink()
    path = wrapper_dir(tmp_path / "local", broken / "bin" / "nvcc")
    toolkit, why = find_cuda_toolkit({"PATH": str(path)}, default=tmp_path / "nowhere")
    assert toolkit is None
    assert why.startswith("no usable CUDA toolkit (set CUDA_HOME): ")
    assert f"{tmp_path / 'local'} has no include/cuda_runtime.h" in why
    assert f"{broken.resolve()} has no libcudart" in why
    assert f"{tmp_path / 'nowhere'} does not exist" in why
    toolkit, why = find_cuda_toolkit({"PATH": str(tmp_path / "empty")}, default=tmp_path / "nowhere")
    assert toolkit is None and "no nvcc on PATH" in why


def test_nvcc_that_does_not_report_its_toolkit_falls_back_to_the_default(tmp_path):
    path = tmp_path / "bin"
    fake_nvcc(path / "nvcc", "echo 'nvcc fatal   : no dry runs here' >&2; exit 1\n")
    real = fake_toolkit(tmp_path / "cuda")
    toolkit, _ = find_cuda_toolkit({"PATH": str(path)}, default=real)
    assert toolkit.root == real


def test_cuda_root_command_for_cmake(tmp_path):
    """``tests/cpp/cmake_ctest.sh`` runs this file as a script (no package import)."""
    real = fake_toolkit(tmp_path / "cuda-x")
    env = {**os.environ, "PATH": f"{wrapper_dir(tmp_path / 'local', real / 'bin' / 'nvcc')}:/usr/bin:/bin"}
    env.pop("CUDA_HOME", None)
    env.pop("CUDA_PATH", None)
    script = ROOT / "stdd_kernels" / "build_info.py"
    out = subprocess.run([sys.executable, str(script), "--cuda-root"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == str(real.resolve())
    env["CUDA_HOME"] = str(tmp_path / "nowhere")
    out = subprocess.run([sys.executable, str(script), "--cuda-root"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stdout == "" and "does not exist" in out.stderr


# --------------------------------------------------------------------------
# setup.py hands the found toolkit to torch
# --------------------------------------------------------------------------


def copy_tree(destination: Path) -> Path:
    for name in TREE:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=BUILD_PRODUCTS)
        else:
            destination.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def clean_env(**extra) -> dict:
    """The environment of a user who set nothing by hand (and no PYTHONPATH into a checkout)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STDD_", "CUDA_", "TORCH_CUDA", "PYTHON"))}
    env.pop("CXX", None)
    env.update(extra)
    return env


@pytest.mark.skipif(torch.version.cuda is None, reason="this torch has no CUDA: setup.py builds CPU-only")
def test_setup_links_cudart_from_the_toolkit_it_found(tmp_path):
    """A wrapper ``nvcc`` on PATH (as /usr/local/bin/nvcc execs the real one): torch alone would
    take the wrapper's parent as CUDA_HOME and link -lcudart from its lib/, where there is none."""
    tree = copy_tree(tmp_path / "src")
    real = fake_toolkit(tmp_path / "cuda-13.0", cudart="targets/x86_64-linux/lib")
    path = wrapper_dir(tmp_path / "local", real / "bin" / "nvcc")
    probe = (
        "import json, runpy, sys\n"
        "sys.argv = ['setup.py', '--name']\n"
        "namespace = runpy.run_path('setup.py')\n"
        "from torch.utils import cpp_extension\n"
        "extension = namespace['ext_modules'][0]\n"
        "print(json.dumps({'cuda_home': cpp_extension.CUDA_HOME, 'library_dirs': extension.library_dirs,\n"
        "                  'sources': extension.sources}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tree, capture_output=True, text=True, timeout=300,
        env=clean_env(PATH=f"{path}:{os.environ['PATH']}"),
    )
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["cuda_home"] == str(real.resolve())
    assert str(real.resolve() / "targets/x86_64-linux/lib") in found["library_dirs"]
    assert "csrc/stca_cuda.cu" in found["sources"]
    assert f"CUDA (toolkit {real.resolve()}, reported by nvcc on PATH ({path / 'nvcc'}); " in out.stderr


# --------------------------------------------------------------------------
# A failed compile never fails the install
# --------------------------------------------------------------------------


def throwaway_venv(directory: Path) -> Path:
    """A new virtual environment that sees this one's packages (torch, setuptools, pip) as a plain
    path entry: their .pth files, e.g. another editable stdd, are not run there."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(directory)], check=True, timeout=300)
    python = directory / "bin" / "python"
    child_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()
    parents = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    Path(child_site, "parent_environment.pth").write_text("\n".join(parents) + "\n")
    return python


@pytest.mark.slow
@pytest.mark.parametrize("editable", [True, False], ids=["editable", "regular"])
def test_install_with_a_broken_compiler_succeeds_without_the_extension(tmp_path, editable):
    tree = copy_tree(tmp_path / "src")
    python = throwaway_venv(tmp_path / "venv")
    stale = tree / "stdd_kernels" / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}"
    if editable:
        stale.write_bytes(b"a _C from an earlier build of other sources")
    env = clean_env(CXX="false")
    install = [str(python), "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps"]
    out = subprocess.run(
        install + (["-e", str(tree)] if editable else [str(tree)]),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert sum(UNAVAILABLE_LINE in line for line in log.splitlines()) == 1, log[-3000:]
    assert not stale.exists(), "the failed build left an earlier _C in place"

    where = subprocess.run(
        [str(python), "-c", "import json, stdd_kernels; from stdd_kernels import env;"
         "print(json.dumps({'file': stdd_kernels.__file__, 'report': env.collect()}))"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert where.returncode == 0, where.stderr
    found = json.loads(where.stdout.strip().splitlines()[-1])
    package = Path(found["file"]).parent
    if editable:
        assert package == (tree / "stdd_kernels").resolve()
    else:
        assert (tmp_path / "venv").resolve() in package.parents, package
    assert not list(package.glob("_C*.so"))
    report = found["report"]
    assert report["extension_build"]["built"] is False
    assert report["extension_build"]["reason"].startswith("building it failed (")
    for name in ("cpp", "cuda"):
        assert report["backends"][name]["available"] is False
    assert "was not built when stdd was installed: building it failed" in report["backends"]["cpp"]["reason"]
    assert report["backends"]["reference"]["available"] is True

    shown = subprocess.run(
        [str(python), "-m", "stdd_kernels.env", "--require", "cpp"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert shown.returncode == 1
    assert "C++/CUDA extension build: not built: building it failed" in shown.stdout
    assert "required backend 'cpp' is unavailable: ImportError: the C++/CUDA extension" in shown.stderr
