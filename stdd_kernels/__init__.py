"""STCA operators: window-shift masking + multi-scale channel mixing
(:func:`mix_gather`), padding + short-cut (:func:`pad_scatter`) and the
window phases (:func:`mask_phase`). Semantics: ``shared/STCA_SPEC.md``;
ground truth: :mod:`stdd_kernels.reference`.

Backends (``backend=`` argument, ``STDD_BACKEND`` environment variable, or
automatic): see :mod:`stdd_kernels.dispatch`; ``python -m stdd_kernels.env``
reports which are available here.

Note on names: the Triton kernels live in the submodules
``stdd_kernels/mix_gather.py`` and ``stdd_kernels/pad_scatter.py``, whose
names equal the public functions'. The optional backends are imported below,
before the functions are bound, so ``stdd_kernels.mix_gather`` is always the
function; reach the kernel modules with ``from stdd_kernels.mix_gather import ...``
or ``importlib.import_module``, not ``import stdd_kernels.mix_gather as m``.
"""

from .dispatch import (
    ENV_VAR,
    load_optional_backends,
    registered_backends,
    resolve_backend,
    unavailable_backends,
)
from .geometry import STCAGeometry

from . import ops as _ops  # registers the reference backend

load_optional_backends()  # must run before the public names below are bound

from .ops import mask_phase, mix_gather, pad_scatter  # noqa: E402

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
