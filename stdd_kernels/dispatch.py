"""Backend registry for the STCA operators.

A backend is a pair of functions with the signatures of
:func:`stdd_kernels.reference.mix_gather` / :func:`stdd_kernels.reference.pad_scatter`
(validated tensors + :class:`~stdd_kernels.geometry.STCAGeometry`), the pair of the
shared projections (:func:`stdd_kernels.reference.mix_factors` / ``project_mixed``),
plus a ``supports(device, dtype)`` check. The reference backend is always present;
optional backends (Triton kernels, the C++/CUDA extension) live in modules
that call :func:`register_backend` when they import, and are listed in
``OPTIONAL_BACKEND_MODULES``. A module that fails to import is recorded with
its reason, which ``python -m stdd_kernels.env`` prints.

Choice order, first match wins:
1. the ``backend=`` argument of the op, unless it is ``None`` or ``"auto"``;
2. the ``STDD_BACKEND`` environment variable, unless unset or ``"auto"``;
3. automatic: the registered backend with the highest priority for the
   tensor's device type that supports its dtype.
An explicitly named backend that is unknown or cannot handle the tensors is an
error, never a silent fallback.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

ENV_VAR = "STDD_BACKEND"

# name -> module whose import registers that backend (see load_optional_backends).
OPTIONAL_BACKEND_MODULES: dict[str, str] = {
    "triton": "stdd_kernels.triton_backend",  # Triton kernels (triton_mix_gather.py, triton_pad_scatter.py)
    "cpp": "stdd_kernels.extension",  # C++ extension, CPU (csrc/)
    "cuda": "stdd_kernels.extension",  # C++/CUDA extension, GPU (csrc/)
}


@dataclass(frozen=True)
class Backend:
    name: str
    mix_gather: Callable
    pad_scatter: Callable
    # Returns None when (device, dtype) is supported, else a reason string.
    supports: Callable[[torch.device, torch.dtype], Optional[str]]
    # device type -> priority for automatic choice; absent = never chosen automatically.
    auto_priority: dict = field(default_factory=dict)
    description: str = ""
    # The shared-projection pair (docs/stca.md section 6), signatures of
    # stdd_kernels.reference.mix_factors / project_mixed; None: this backend lacks them
    # (stdd_kernels.mix_project then names it).
    mix_factors: Optional[Callable] = None
    project_mixed: Optional[Callable] = None


_REGISTRY: dict[str, Backend] = {}
_UNAVAILABLE: dict[str, str] = {}  # backend name -> why its module did not load


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend
    _UNAVAILABLE.pop(backend.name, None)


def mark_unavailable(name: str, reason: str) -> None:
    """Record why backend ``name`` cannot be used here (shown by the env report and in errors)."""
    if name not in _REGISTRY:
        _UNAVAILABLE[name] = reason


def load_optional_backends() -> None:
    """Import every optional backend module; remember why the failing ones failed."""
    for name, module in OPTIONAL_BACKEND_MODULES.items():
        if name in _REGISTRY:
            continue
        try:
            importlib.import_module(module)
        except Exception as error:  # ImportError, missing toolchain, broken build
            _UNAVAILABLE[name] = f"{type(error).__name__}: {error}"
        else:
            if name not in _REGISTRY:
                _UNAVAILABLE.setdefault(name, f"{module} imported but registered nothing")


def registered_backends() -> dict[str, Backend]:
    return dict(_REGISTRY)


def unavailable_backends() -> dict[str, str]:
    return dict(_UNAVAILABLE)


def resolve_backend(requested: Optional[str], device: torch.device, dtype: torch.dtype) -> Backend:
    """Pick the backend for tensors on ``device`` with ``dtype`` (see module docstring)."""
    source = "backend"
    if requested is None or requested == "auto":
        requested = os.environ.get(ENV_VAR) or "auto"
        source = ENV_VAR
    if requested != "auto":
        if not isinstance(requested, str) or requested not in _REGISTRY:
            known = sorted(set(_REGISTRY) | set(_UNAVAILABLE) | {"auto"})
            why = _UNAVAILABLE.get(requested) if isinstance(requested, str) else None
            detail = f" (it failed to load: {why})" if why else ""
            raise ValueError(f"{source}={requested!r} is not available{detail}; known backends: {known}")
        backend = _REGISTRY[requested]
        reason = backend.supports(device, dtype)
        if reason is not None:
            raise ValueError(f"{source}={requested!r} cannot run on {device} / {dtype}: {reason}")
        return backend
    candidates = [
        b
        for b in _REGISTRY.values()
        if device.type in b.auto_priority and b.supports(device, dtype) is None
    ]
    if not candidates:
        raise ValueError(f"no STCA backend supports tensors on {device} with dtype {dtype}")
    return max(candidates, key=lambda b: b.auto_priority[device.type])
