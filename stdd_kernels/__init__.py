"""STCA operators: window-shift masking + multi-scale channel mixing
(:func:`mix_gather`), padding + short-cut (:func:`pad_scatter`) and the
window phases (:func:`mask_phase`). Semantics: ``docs/stca.md``;
ground truth: :mod:`stdd_kernels.reference`.

Backends (``backend=`` argument, ``STDD_BACKEND`` environment variable, or
automatic): see :mod:`stdd_kernels.dispatch`; ``python -m stdd_kernels.env``
reports which are available here.

Note on names: the Triton kernels live in the submodules
``stdd_kernels/mix_gather.py`` and ``stdd_kernels/pad_scatter.py``, whose
names equal the public functions'. Importing a submodule normally rebinds the
package attribute of that name to the module; the package class below keeps
``stdd_kernels.mix_gather`` / ``pad_scatter`` the functions. Reach the kernel
modules with ``from stdd_kernels.mix_gather import ...`` or
``importlib.import_module``, not ``import stdd_kernels.mix_gather as m``.
"""

import sys
import types

from .dispatch import (
    ENV_VAR,
    load_optional_backends,
    registered_backends,
    resolve_backend,
    unavailable_backends,
)
from .geometry import STCAGeometry
from .ops import mask_phase, mix_gather, pad_scatter  # also registers the reference backend

_PUBLIC_OPS = ("mix_gather", "pad_scatter", "mask_phase")


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if name in _PUBLIC_OPS and isinstance(value, types.ModuleType):
            return  # a kernel submodule of the same name was imported: keep the public function
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

load_optional_backends()

__all__ = [
    "ENV_VAR",
    "STCAGeometry",
    "mask_phase",
    "mix_gather",
    "pad_scatter",
    "registered_backends",
    "resolve_backend",
    "unavailable_backends",
]
__version__ = "0.1.0"
