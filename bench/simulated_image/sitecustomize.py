"""Make this Python look like the GPU machine's image: the packages it lacks do not import.

Used by ``bench/rehearse_gpu_check.sh`` (the CPU rehearsal of
``bench/gpu_check.sh``) and usable by hand: put this folder first on
``PYTHONPATH`` and every Python started with it (subprocesses too) imports this
file at start-up, as ``sitecustomize``, and installs a meta-path finder that
raises ``ModuleNotFoundError`` for the packages below, whatever is installed.

The image (Python 3.12, torch, triton, pytest, pytest-xdist, timm,
torchvision, tqdm, matplotlib, tensorboard) has none of them; the ones the
GPU check needs are carried as wheels (``bench/gpu_wheels.txt``) and
installed into a ``--target`` folder. Packages found in a folder listed in
``STDD_SIMULATED_IMAGE_ALLOW`` (``os.pathsep``-separated; that ``--target``
folder) do import, as they would there. ``STDD_SIMULATED_IMAGE_MISSING``
(comma-separated) replaces the list.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

MISSING = (
    # not in the image at all
    "open_clip", "av", "omegaconf", "openai", "nvidia.dali", "xformers",
    # open_clip's and omegaconf's own dependencies the image lacks
    "ftfy", "wcwidth", "regex", "antlr4",
)


class SimulatedImageFinder(importlib.abc.MetaPathFinder):
    def __init__(self, missing, allowed_paths):
        self.missing = tuple(missing)
        self.allowed_paths = list(allowed_paths)

    def find_spec(self, fullname, path=None, target=None):
        blocked = next((name for name in self.missing if fullname == name or fullname.startswith(name + ".")), None)
        if blocked is None or fullname != blocked:
            return None  # not blocked, or a submodule of a package that was allowed to import
        # Carried: import it from the allowed folders only.
        parents = blocked.split(".")[:-1]
        search = [os.path.join(folder, *parents) for folder in self.allowed_paths]
        spec = importlib.machinery.PathFinder.find_spec(fullname, search) if search else None
        if spec is not None:
            return spec
        raise ModuleNotFoundError(f"No module named {fullname!r} (not in the simulated GPU image)", name=fullname)


def install() -> None:
    names = os.environ.get("STDD_SIMULATED_IMAGE_MISSING")
    missing = [n.strip() for n in names.split(",") if n.strip()] if names is not None else MISSING
    allowed = [os.path.abspath(p) for p in os.environ.get("STDD_SIMULATED_IMAGE_ALLOW", "").split(os.pathsep) if p]
    if not any(isinstance(finder, SimulatedImageFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, SimulatedImageFinder(missing, allowed))


install()
