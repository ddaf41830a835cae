"""The ``triton`` STCA backend: ``torch.library`` ops over the Triton kernels.

Kernels and launchers: :mod:`stdd_kernels.triton_mix_gather`, :mod:`stdd_kernels.triton_pad_scatter`,
:mod:`stdd_kernels.triton_mix_project`.
This module
- registers eight ops in the ``stdd_triton`` namespace (the C++ extension uses
  ``stdd``) with ``torch.library.custom_op``, each with a fake (meta) impl so
  ``torch.compile(fullgraph=True)`` traces through them, and autograd:

  ==========================================  ==========================================
  ``stdd_triton::mix_gather``                 x (B*T, 1+N, D) -> mixed (S, B*T, 1+N_keep, D)
  ``stdd_triton::mix_gather_backward``        d_mixed -> d_x (its adjoint is mix_gather)
  ``stdd_triton::pad_scatter``                full, mixed[, residual] -> out (B*T, 1+N, D)
  ``stdd_triton::pad_scatter_backward``       d_out -> (d_full, d_mixed) (adjoint: pad_scatter)
  ``stdd_triton::mix_factors``                x, ln_weight -> (gain, coefficients, mixed_mean)
  ``stdd_triton::mix_factors_backward``       their gradients -> (d_x, d_ln_weight)
  ``stdd_triton::project_mixed``              qkv, gain, coefficients, basis -> qkv_mixed
  ``stdd_triton::project_mixed_backward``     d_qkv_mixed -> (d_qkv, d_gain, d_coefficients, d_basis)
  ==========================================  ==========================================

  mix_gather and pad_scatter are linear in their tensor inputs, so each backward op's own
  backward is the forward op: double backward works too. The shared projections
  (docs/stca.md, section 6) are not linear; their backward ops have first-order
  formulas only, and differentiating them again raises (loudly, never a silent zero).
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
from stdd_kernels.triton_mix_project import (
    mix_factors_backward,
    mix_factors_forward,
    project_mixed_backward,
    project_mixed_forward,
)
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
# Shared projections: mix_factors, project_mixed (docs/stca.md, section 6)
# --------------------------------------------------------------------------


@torch.library.custom_op("stdd_triton::mix_factors", mutates_args=())
def mix_factors_op(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    phase: torch.Tensor,
    eps: float,
    num_frames: int,
    window_rows: int,
    window_cols: int,
    masked: int,
    scales: list[int],
    channel_fold: int,
    mixing: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x (B*T, 1+N, D)``, ``ln_weight (D,)`` -> ``(gain (S, B*T, 1+N_keep), coefficients
    (S, B*T, 1+N_keep, 2I+2), mixed_mean (B*T, 1+N_keep, D))``."""
    geometry = _geometry(
        x.shape[1], x.shape[2], num_frames, window_rows, window_cols, masked, scales, channel_fold, mixing
    )
    return mix_factors_forward(x, ln_weight, phase, geometry, eps)


@mix_factors_op.register_fake
def _mix_factors_fake(x, ln_weight, phase, eps, num_frames, window_rows, window_cols, masked, scales, channel_fold,
                      mixing):
    geometry = _geometry(
        x.shape[1], x.shape[2], num_frames, window_rows, window_cols, masked, scales, channel_fold, mixing
    )
    rows, num_mixed = x.shape[0], 1 + geometry.num_kept
    factor = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (
        x.new_empty((len(scales), rows, num_mixed), dtype=factor),
        x.new_empty((len(scales), rows, num_mixed, geometry.borrowed_channels + 2), dtype=factor),
        x.new_empty((rows, num_mixed, x.shape[2])),
    )


@torch.library.custom_op("stdd_triton::mix_factors_backward", mutates_args=())
def mix_factors_backward_op(
    grad_gain: Optional[torch.Tensor],
    grad_coefficients: Optional[torch.Tensor],
    grad_mixed_mean: Optional[torch.Tensor],
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    phase: torch.Tensor,
    eps: float,
    num_frames: int,
    window_rows: int,
    window_cols: int,
    masked: int,
    scales: list[int],
    channel_fold: int,
    mixing: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``(gain, coefficients, mixed_mean)`` (None: zero) -> ``(grad_x, grad_ln_weight)``."""
    geometry = _geometry(
        x.shape[1], x.shape[2], num_frames, window_rows, window_cols, masked, scales, channel_fold, mixing
    )
    return mix_factors_backward(grad_gain, grad_coefficients, grad_mixed_mean, x, ln_weight, phase, geometry, eps)


@mix_factors_backward_op.register_fake
def _mix_factors_backward_fake(grad_gain, grad_coefficients, grad_mixed_mean, x, ln_weight, phase, eps, *settings):
    return x.new_empty(x.shape), ln_weight.new_empty(ln_weight.shape)


def _mix_factors_setup_context(ctx, inputs, output):
    x, ln_weight, phase, eps, *settings = inputs
    ctx.save_for_backward(x, ln_weight, phase)  # the backward recomputes the statistics from x
    ctx.eps = eps
    ctx.settings = settings


def _mix_factors_autograd(ctx, grad_gain, grad_coefficients, grad_mixed_mean):
    x, ln_weight, phase = ctx.saved_tensors
    grad_x, grad_ln_weight = torch.ops.stdd_triton.mix_factors_backward(
        grad_gain, grad_coefficients, grad_mixed_mean, x, ln_weight, phase, ctx.eps, *ctx.settings
    )
    return (grad_x, grad_ln_weight if ctx.needs_input_grad[1] else None, None, None) + (None,) * len(ctx.settings)


@torch.library.custom_op("stdd_triton::project_mixed", mutates_args=())
def project_mixed_op(
    qkv: torch.Tensor,
    gain: torch.Tensor,
    coefficients: torch.Tensor,
    basis: torch.Tensor,
    phase: torch.Tensor,
    num_frames: int,
    window_rows: int,
    window_cols: int,
    masked: int,
) -> torch.Tensor:
    """``qkv (B*T, 1+N, 3D)``, ``gain (S, B*T, 1+N_keep)``, ``coefficients (S, B*T, 1+N_keep, K)``,
    ``basis (3D, K)`` -> ``(S, B*T, 1+N_keep, 3D)`` in qkv's dtype."""
    geometry = _geometry(qkv.shape[1], qkv.shape[2], num_frames, window_rows, window_cols, masked, None, 1, "none")
    return project_mixed_forward(qkv, gain, coefficients, basis, phase, geometry)


@project_mixed_op.register_fake
def _project_mixed_fake(qkv, gain, coefficients, basis, phase, num_frames, window_rows, window_cols, masked):
    return qkv.new_empty((gain.shape[0], qkv.shape[0], gain.shape[2], qkv.shape[2]))


@torch.library.custom_op("stdd_triton::project_mixed_backward", mutates_args=())
def project_mixed_backward_op(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    gain: torch.Tensor,
    coefficients: torch.Tensor,
    basis: torch.Tensor,
    phase: torch.Tensor,
    num_frames: int,
    window_rows: int,
    window_cols: int,
    masked: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``grad_out (S, B*T, 1+N_keep, 3D)`` -> ``(grad_qkv, grad_gain, grad_coefficients, grad_basis)``."""
    geometry = _geometry(qkv.shape[1], qkv.shape[2], num_frames, window_rows, window_cols, masked, None, 1, "none")
    return project_mixed_backward(grad_out, qkv, gain, coefficients, basis, phase, geometry)


@project_mixed_backward_op.register_fake
def _project_mixed_backward_fake(grad_out, qkv, gain, coefficients, basis, phase, *settings):
    return qkv.new_empty(qkv.shape), gain.new_empty(gain.shape), coefficients.new_empty(
        coefficients.shape
    ), basis.new_empty(basis.shape)


def _project_mixed_setup_context(ctx, inputs, output):
    qkv, gain, coefficients, basis, phase, *settings = inputs
    ctx.save_for_backward(qkv, gain, coefficients, basis, phase)
    ctx.settings = settings


def _project_mixed_autograd(ctx, grad_out):
    qkv, gain, coefficients, basis, phase = ctx.saved_tensors
    grads = torch.ops.stdd_triton.project_mixed_backward(grad_out, qkv, gain, coefficients, basis, phase,
                                                         *ctx.settings)
    grads = tuple(grad if needed else None for grad, needed in zip(grads, ctx.needs_input_grad))
    return grads + (None,) * (1 + len(ctx.settings))


def _second_order_refused(name):
    def setup_context(ctx, inputs, output):
        pass

    def refuse(ctx, *grads):
        raise RuntimeError(
            f"stdd_triton::{name} has no derivative (double backward of the shared projections is not "
            "implemented for the triton backend; use backend='reference' for higher-order gradients)"
        )

    return refuse, setup_context


mix_factors_op.register_autograd(_mix_factors_autograd, setup_context=_mix_factors_setup_context)
project_mixed_op.register_autograd(_project_mixed_autograd, setup_context=_project_mixed_setup_context)
for _op, _name in ((mix_factors_backward_op, "mix_factors_backward"),
                   (project_mixed_backward_op, "project_mixed_backward")):
    _refuse, _setup = _second_order_refused(_name)
    _op.register_autograd(_refuse, setup_context=_setup)

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


def triton_mix_factors(
    x: torch.Tensor, ln_weight: torch.Tensor, phase: torch.Tensor, geometry: STCAGeometry, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend entry, signature of :func:`stdd_kernels.reference.mix_factors`."""
    return torch.ops.stdd_triton.mix_factors(
        x,
        ln_weight,
        phase,
        float(eps),
        geometry.num_frames,
        geometry.window[0],
        geometry.window[1],
        geometry.masked,
        list(geometry.scales),
        geometry.channel_fold,
        geometry.mixing,
    )


def triton_project_mixed(
    qkv: torch.Tensor,
    gain: torch.Tensor,
    coefficients: torch.Tensor,
    basis: torch.Tensor,
    phase: torch.Tensor,
    geometry: STCAGeometry,
) -> torch.Tensor:
    """Backend entry, signature of :func:`stdd_kernels.reference.project_mixed`."""
    return torch.ops.stdd_triton.project_mixed(
        qkv, gain, coefficients, basis, phase, geometry.num_frames, geometry.window[0], geometry.window[1],
        geometry.masked,
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
    the interpreter cannot call (``tl.full`` stands in for ``tl.zeros``; the
    sums of triton_mix_project.py call ``tl.reduce`` with ``triton.language``'s own
    combiner, which the interpreter recognizes and never calls).
    """
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older ones read the variable directly
    if knobs is not None:
        wanted = bool(knobs.runtime.interpret)
    else:
        wanted = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
    if interpreting() == wanted:
        return False
    importlib.reload(sys.modules["stdd_kernels.triton_mix_gather"])  # first: the other two import its helpers
    importlib.reload(sys.modules["stdd_kernels.triton_pad_scatter"])
    importlib.reload(sys.modules["stdd_kernels.triton_mix_project"])
    return True


register_backend(
    Backend(
        name="triton",
        mix_gather=triton_mix_gather,
        pad_scatter=triton_pad_scatter,
        supports=supports,
        auto_priority={"cuda": 20},
        description="fused Triton kernels (stdd_kernels/triton_mix_gather.py, triton_pad_scatter.py, "
        "triton_mix_project.py); CPU only under TRITON_INTERPRET=1",
        mix_factors=triton_mix_factors,
        project_mixed=triton_project_mixed,
    )
)
