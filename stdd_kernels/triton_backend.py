"""The ``triton`` STCA backend: ``torch.library`` ops over the Triton kernels.

Kernels and launchers: :mod:`stdd_kernels.triton_mix_gather`, :mod:`stdd_kernels.triton_pad_scatter`.
This module
- registers four ops in the ``stdd_triton`` namespace (the C++ extension uses
  ``stdd``) with ``torch.library.custom_op``, each with a fake (meta) impl so
  ``torch.compile(fullgraph=True)`` traces through them, and autograd:

  ========================================  ==========================================
  ``stdd_triton::mix_gather``               x (B*T, 1+N, D) -> mixed (S, B*T, 1+N_keep, D)
  ``stdd_triton::mix_gather_backward``      d_mixed -> d_x (its adjoint is mix_gather)
  ``stdd_triton::pad_scatter``              full, mixed[, residual] -> out (B*T, 1+N, D)
  ``stdd_triton::pad_scatter_backward``     d_out -> (d_full, d_mixed) (adjoint: pad_scatter)
  ========================================  ==========================================

  The ops are linear in their tensor inputs, so each backward op's own
  backward is the forward op: double backward works too.
- registers the dispatch backend ``triton`` (automatic on CUDA, priority 20;
  on CPU only when explicitly asked for and the kernels were built for
  Triton's interpreter, ``TRITON_INTERPRET=1``; never chosen automatically on CPU).

The ops take the STCA geometry as plain ints/strings (schema types); the
``phase`` tensor ``(B, T)`` is an integer input without gradient.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Optional

import torch
import triton

from stdd_kernels.triton_mix_gather import interpreting, mix_gather_backward, mix_gather_forward
from stdd_kernels.triton_pad_scatter import pad_scatter_backward, pad_scatter_forward

from .dispatch import Backend, register_backend
from .geometry import STCAGeometry, grid_side

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _geometry(
    num_tokens: int,
    channels: int,
    num_frames: int,
    window_rows: int,
    window_cols: int,
    masked: int,
    scales,
    channel_fold: int,
    mixing: str,
) -> STCAGeometry:
    return STCAGeometry(
        num_frames=num_frames,
        grid=grid_side(int(num_tokens), "x"),
        window=(window_rows, window_cols),
        masked=masked,
        scales=None if scales is None else tuple(scales),
        channel_fold=channel_fold,
        mixing=mixing,
        channels=int(channels),
    )


# --------------------------------------------------------------------------
# mix_gather
# --------------------------------------------------------------------------


@torch.library.custom_op("stdd_triton::mix_gather", mutates_args=())
def mix_gather_op(
    x: torch.Tensor,
    phase: torch.Tensor,
    num_frames: int,
    window_rows: int,
    window_cols: int,
    masked: int,
    scales: list[int],
    channel_fold: int,
    mixing: str,
) -> torch.Tensor:
    """``x (B*T, 1+N, D)``, ``phase (B, T)`` -> ``mixed (len(scales), B*T, 1+N_keep, D)``."""
    geometry = _geometry(
        x.shape[1], x.shape[2], num_frames, window_rows, window_cols, masked, scales, channel_fold, mixing
    )
    return mix_gather_forward(x, phase, geometry)


@mix_gather_op.register_fake
def _mix_gather_fake(x, phase, num_frames, window_rows, window_cols, masked, scales, channel_fold, mixing):
    geometry = _geometry(
        x.shape[1], x.shape[2], num_frames, window_rows, window_cols, masked, scales, channel_fold, mixing
    )
    return x.new_empty((len(scales), x.shape[0], 1 + geometry.num_kept, x.shape[2]))


@torch.library.custom_op("stdd_triton::mix_gather_backward", mutates_args=())
def mix_gather_backward_op(
    grad_mixed: torch.Tensor,
    phase: torch.Tensor,
    num_tokens: int,
    num_frames: int,
    window_rows: int,
    window_cols: int,
    masked: int,
    scales: list[int],
    channel_fold: int,
    mixing: str,
) -> torch.Tensor:
    """``grad_mixed (S, B*T, 1+N_keep, D)`` -> ``grad_x (B*T, num_tokens = 1+N, D)``."""
    geometry = _geometry(
        num_tokens, grad_mixed.shape[3], num_frames, window_rows, window_cols, masked, scales, channel_fold, mixing
    )
    return mix_gather_backward(grad_mixed, phase, geometry)


@mix_gather_backward_op.register_fake
def _mix_gather_backward_fake(
    grad_mixed, phase, num_tokens, num_frames, window_rows, window_cols, masked, scales, channel_fold, mixing
):
    return grad_mixed.new_empty((grad_mixed.shape[1], num_tokens, grad_mixed.shape[3]))


def _mix_gather_setup_context(ctx, inputs, output):
    x, phase, *settings = inputs
    ctx.save_for_backward(phase)
    ctx.num_tokens = x.shape[1]
    ctx.settings = settings


def _mix_gather_autograd(ctx, grad_mixed):
    (phase,) = ctx.saved_tensors
    grad_x = torch.ops.stdd_triton.mix_gather_backward(grad_mixed, phase, ctx.num_tokens, *ctx.settings)
    return (grad_x, None) + (None,) * len(ctx.settings)


def _mix_gather_backward_setup_context(ctx, inputs, output):
    grad_mixed, phase, num_tokens, *settings = inputs
    ctx.save_for_backward(phase)
    ctx.settings = settings


def _mix_gather_backward_autograd(ctx, grad_grad_x):
    # mix_gather_backward is the adjoint of the linear map mix_gather; its adjoint is mix_gather.
    (phase,) = ctx.saved_tensors
    grad_grad_mixed = torch.ops.stdd_triton.mix_gather(grad_grad_x, phase, *ctx.settings)
    return (grad_grad_mixed, None, None) + (None,) * len(ctx.settings)


mix_gather_op.register_autograd(_mix_gather_autograd, setup_context=_mix_gather_setup_context)
mix_gather_backward_op.register_autograd(
    _mix_gather_backward_autograd, setup_context=_mix_gather_backward_setup_context
)

# --------------------------------------------------------------------------
# pad_scatter
# --------------------------------------------------------------------------


@torch.library.custom_op("stdd_triton::pad_scatter", mutates_args=())
def pad_scatter_op(
    full: torch.Tensor,
    mixed: torch.Tensor,
    phase: torch.Tensor,
    residual: Optional[torch.Tensor],
    num_frames: int,
    window_rows: int,
    window_cols: int,
    masked: int,
) -> torch.Tensor:
    """``full (B*T, 1+N, D)``, ``mixed (S, B*T, 1+N_keep, D)``, ``residual`` like full or None
    -> ``(B*T, 1+N, D)``."""
    geometry = _geometry(full.shape[1], full.shape[2], num_frames, window_rows, window_cols, masked, None, 1, "none")
    return pad_scatter_forward(full, mixed, phase, geometry, residual)


@pad_scatter_op.register_fake
def _pad_scatter_fake(full, mixed, phase, residual, num_frames, window_rows, window_cols, masked):
    return full.new_empty(full.shape)


@torch.library.custom_op("stdd_triton::pad_scatter_backward", mutates_args=())
def pad_scatter_backward_op(
    grad_out: torch.Tensor,
    phase: torch.Tensor,
    num_scales: int,
    num_frames: int,
    window_rows: int,
    window_cols: int,
    masked: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad_out (B*T, 1+N, D)`` -> ``(grad_full (B*T, 1+N, D), grad_mixed (S, B*T, 1+N_keep, D))``."""
    geometry = _geometry(
        grad_out.shape[1], grad_out.shape[2], num_frames, window_rows, window_cols, masked, None, 1, "none"
    )
    return pad_scatter_backward(grad_out, phase, geometry, num_scales)


@pad_scatter_backward_op.register_fake
def _pad_scatter_backward_fake(grad_out, phase, num_scales, num_frames, window_rows, window_cols, masked):
    geometry = _geometry(
        grad_out.shape[1], grad_out.shape[2], num_frames, window_rows, window_cols, masked, None, 1, "none"
    )
    rows, _, channels = grad_out.shape
    return grad_out.new_empty(grad_out.shape), grad_out.new_empty(
        (num_scales, rows, 1 + geometry.num_kept, channels)
    )


def _pad_scatter_setup_context(ctx, inputs, output):
    full, mixed, phase, residual, *settings = inputs
    ctx.save_for_backward(phase)
    ctx.num_scales = mixed.shape[0]
    ctx.has_residual = residual is not None
    ctx.settings = settings


def _pad_scatter_autograd(ctx, grad_out):
    (phase,) = ctx.saved_tensors
    grad_full, grad_mixed = torch.ops.stdd_triton.pad_scatter_backward(
        grad_out, phase, ctx.num_scales, *ctx.settings
    )
    # d(out)/d(residual) is the identity: hand grad_out through, as torch's own add does.
    grad_residual = grad_out if ctx.has_residual else None
    return (grad_full, grad_mixed, None, grad_residual) + (None,) * len(ctx.settings)


def _pad_scatter_backward_setup_context(ctx, inputs, output):
    grad_out, phase, num_scales, *settings = inputs
    ctx.save_for_backward(phase)
    ctx.shape = tuple(grad_out.shape)
    ctx.mixed_shape = tuple(output[1].shape)
    ctx.settings = settings


def _pad_scatter_backward_autograd(ctx, grad_grad_full, grad_grad_mixed):
    # pad_scatter_backward is the adjoint of the linear map (full, mixed) -> pad;
    # its adjoint is pad_scatter itself (without residual).
    (phase,) = ctx.saved_tensors
    if grad_grad_full is None and grad_grad_mixed is None:
        return (None,) * (3 + len(ctx.settings))
    like = grad_grad_full if grad_grad_full is not None else grad_grad_mixed
    if grad_grad_full is None:
        grad_grad_full = like.new_zeros(ctx.shape)
    if grad_grad_mixed is None:
        grad_grad_mixed = like.new_zeros(ctx.mixed_shape)
    grad_grad_out = torch.ops.stdd_triton.pad_scatter(grad_grad_full, grad_grad_mixed, phase, None, *ctx.settings)
    return (grad_grad_out, None, None) + (None,) * len(ctx.settings)


pad_scatter_op.register_autograd(_pad_scatter_autograd, setup_context=_pad_scatter_setup_context)
pad_scatter_backward_op.register_autograd(
    _pad_scatter_backward_autograd, setup_context=_pad_scatter_backward_setup_context
)

# --------------------------------------------------------------------------
# Dispatch backend
# --------------------------------------------------------------------------


def triton_mix_gather(x: torch.Tensor, phase: torch.Tensor, geometry: STCAGeometry) -> torch.Tensor:
    """Backend entry, signature of :func:`stdd_kernels.reference.mix_gather`."""
    return torch.ops.stdd_triton.mix_gather(
        x,
        phase,
        geometry.num_frames,
        geometry.window[0],
        geometry.window[1],
        geometry.masked,
        list(geometry.scales),
        geometry.channel_fold,
        geometry.mixing,
    )


def triton_pad_scatter(
    full: torch.Tensor,
    mixed: torch.Tensor,
    phase: torch.Tensor,
    geometry: STCAGeometry,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Backend entry, signature of :func:`stdd_kernels.reference.pad_scatter`."""
    return torch.ops.stdd_triton.pad_scatter(
        full, mixed, phase, residual, geometry.num_frames, geometry.window[0], geometry.window[1], geometry.masked
    )


def supports(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} (the Triton kernels take float32, float16, bfloat16, float64)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreting():
            return None
        return (
            "the Triton kernels run on CPU only in Triton's interpreter: set TRITON_INTERPRET=1 "
            "before importing stdd_kernels"
        )
    return f"the Triton kernels do not run on {device.type} tensors"


def reload_kernels() -> bool:
    """Rebuild the kernels if ``TRITON_INTERPRET`` changed since they were defined.

    ``@triton.jit`` picks compiled or interpreted kernels when the module is
    imported; a test process on a CPU-only machine that sets
    ``TRITON_INTERPRET=1`` after ``stdd_kernels`` was imported calls this.
    Returns whether the kernels were rebuilt. The ops registered above call
    the launchers, whose globals are the reloaded modules' namespaces.

    This works because the kernels use only Triton builtins: library helpers
    written in Triton (``tl.zeros``, ``tl.sum``, ...) are jitted once when
    ``triton.language`` is imported and stay compiled-mode functions, which
    the interpreter cannot call (``tl.full`` stands in for ``tl.zeros``).
    """
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older ones read the variable directly
    if knobs is not None:
        wanted = bool(knobs.runtime.interpret)
    else:
        wanted = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
    if interpreting() == wanted:
        return False
    importlib.reload(sys.modules["stdd_kernels.triton_mix_gather"])  # first: triton_pad_scatter imports its helpers
    importlib.reload(sys.modules["stdd_kernels.triton_pad_scatter"])
    return True


register_backend(
    Backend(
        name="triton",
        mix_gather=triton_mix_gather,
        pad_scatter=triton_pad_scatter,
        supports=supports,
        auto_priority={"cuda": 20},
        description="fused Triton kernels (stdd_kernels/triton_mix_gather.py, triton_pad_scatter.py); "
        "CPU only under TRITON_INTERPRET=1",
    )
)
