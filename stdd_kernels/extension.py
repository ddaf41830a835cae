"""Backends ``cpp`` (CPU) and ``cuda`` (GPU): the compiled extension ``stdd_kernels._C``.

The C++/CUDA sources live in ``csrc/`` and are built by ``setup.py``
(``pip install --no-build-isolation -e .``) or, as a plain libtorch library
for C++ users, by ``CMakeLists.txt``. Loading ``_C`` registers the ops
``torch.ops.stdd.mix_gather``, ``pad_scatter``, the shared projections'
``mix_factors`` and ``project_mixed`` (docs/stca.md section 6) and their
``*_backward`` ops with the dispatcher (with autograd and meta kernels, so
``torch.compile`` traces them); this module adapts them to the backend
signatures of :mod:`stdd_kernels.dispatch` and registers the backends.

``cuda`` is registered only when the extension was compiled with nvcc; a
CPU-only build registers ``cpp`` alone. Why a backend is missing comes from
the build record ``setup.py`` wrote (:mod:`stdd_kernels.build_info`) when
there is one.
"""

from __future__ import annotations

import importlib

import torch

from . import dispatch
from .build_info import read_record
from .geometry import FLOAT_DTYPES, STCAGeometry

BUILD_RECORD = read_record()  # None when _C was built without setup.py (CMake, by hand)

try:
    # import_module, not `from . import _C`: during the package's own import the
    # latter reports a missing module as a "circular import".
    _C = importlib.import_module(f"{__package__}._C")
except ImportError as error:  # not built, or built against another torch
    if BUILD_RECORD is not None and not BUILD_RECORD.get("built"):
        raise ImportError(
            f"the C++/CUDA extension stdd_kernels._C was not built when stdd was installed: "
            f"{BUILD_RECORD.get('reason')}"
        ) from error
    raise ImportError(
        "the C++/CUDA extension stdd_kernels._C is not built or does not load "
        f"({error}); build it with `pip install --no-build-isolation -e .` "
        "(or `python setup.py build_ext --inplace`) against the installed torch"
    ) from error

CUDA_COMPILED = bool(_C.CUDA_COMPILED)


def mix_gather(x: torch.Tensor, phase: torch.Tensor, geometry: STCAGeometry) -> torch.Tensor:
    """Backend function (see :func:`stdd_kernels.reference.mix_gather`)."""
    return torch.ops.stdd.mix_gather(
        x,
        phase,
        geometry.num_frames,
        list(geometry.window),
        geometry.masked,
        list(geometry.scales),
        geometry.channel_fold,
        geometry.mixing,
    )


def pad_scatter(
    full: torch.Tensor,
    mixed: torch.Tensor,
    phase: torch.Tensor,
    geometry: STCAGeometry,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Backend function (see :func:`stdd_kernels.reference.pad_scatter`)."""
    return torch.ops.stdd.pad_scatter(
        full, mixed, phase, geometry.num_frames, list(geometry.window), geometry.masked, residual
    )


def mix_factors(
    x: torch.Tensor, ln_weight: torch.Tensor, phase: torch.Tensor, geometry: STCAGeometry, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend function (see :func:`stdd_kernels.reference.mix_factors`)."""
    return torch.ops.stdd.mix_factors(
        x,
        ln_weight,
        phase,
        geometry.num_frames,
        list(geometry.window),
        geometry.masked,
        list(geometry.scales),
        geometry.channel_fold,
        geometry.mixing,
        float(eps),
    )


def project_mixed(
    qkv: torch.Tensor,
    gain: torch.Tensor,
    coefficients: torch.Tensor,
    basis: torch.Tensor,
    phase: torch.Tensor,
    geometry: STCAGeometry,
) -> torch.Tensor:
    """Backend function (see :func:`stdd_kernels.reference.project_mixed`)."""
    return torch.ops.stdd.project_mixed(
        qkv, gain, coefficients, basis, phase, geometry.num_frames, list(geometry.window), geometry.masked
    )


def _supports(device_type: str):
    def supports(device: torch.device, dtype: torch.dtype):
        if device.type != device_type:
            return f"runs on {device_type} tensors only"
        if dtype not in FLOAT_DTYPES:
            return f"dtype {dtype} is not one of {FLOAT_DTYPES}"
        return None

    return supports


dispatch.register_backend(
    dispatch.Backend(
        name="cpp",
        mix_gather=mix_gather,
        pad_scatter=pad_scatter,
        supports=_supports("cpu"),
        auto_priority={"cpu": 10},
        description="C++ extension on CPU (csrc/stca_cpu.cpp, stca_projection_cpu.cpp: at::parallel_for, BLAS)",
        mix_factors=mix_factors,
        project_mixed=project_mixed,
    )
)

if CUDA_COMPILED:
    dispatch.register_backend(
        dispatch.Backend(
            name="cuda",
            mix_gather=mix_gather,
            pad_scatter=pad_scatter,
            supports=_supports("cuda"),
            auto_priority={"cuda": 10},
            description="CUDA extension (csrc/stca_cuda.cu, stca_projection_cuda.cu: cuBLAS for the products)",
            mix_factors=mix_factors,
            project_mixed=project_mixed,
        )
    )
else:
    recorded = BUILD_RECORD.get("reason") if BUILD_RECORD is not None and not BUILD_RECORD.get("cuda") else None
    dispatch.mark_unavailable(
        "cuda",
        f"stdd_kernels._C was built without CUDA: {recorded}"
        if recorded
        else "stdd_kernels._C was built without CUDA (torch without CUDA, no usable CUDA "
        "toolkit, or STDD_BUILD_CUDA=0 at build time)",
    )
