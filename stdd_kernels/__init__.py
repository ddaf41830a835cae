"""STCA operators: window-shift masking + multi-scale channel mixing
(:func:`mix_gather`), padding + short-cut (:func:`pad_scatter`), the mixed
paths' projections from the full path's (:func:`mix_project`) and the
window phases (:func:`mask_phase`). Semantics: ``docs/stca.md``;
ground truth: :mod:`stdd_kernels.reference`.

Backends (``backend=`` argument, ``STDD_BACKEND`` environment variable, or
automatic): see :mod:`stdd_kernels.dispatch`; ``python -m stdd_kernels.env``
reports which are available here.

No submodule is named like a public function (the Triton kernels live in
``triton_mix_gather.py`` / ``triton_pad_scatter.py``), so importing any
submodule never rebinds ``stdd_kernels.mix_gather`` / ``pad_scatter``.
"""

from .dispatch import (
    ENV_VAR,
    load_optional_backends,
    registered_backends,
    resolve_backend,
    unavailable_backends,
)
from .geometry import STCAGeometry
from .ops import mask_phase, mix_gather, mix_project, pad_scatter, projection_basis  # also registers the reference backend

load_optional_backends()

__all__ = [
    "ENV_VAR",
    "STCAGeometry",
    "mask_phase",
    "mix_gather",
    "mix_project",
    "pad_scatter",
    "projection_basis",
    "registered_backends",
    "resolve_backend",
    "unavailable_backends",
]
__version__ = "0.1.0"
