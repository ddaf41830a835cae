"""Triton kernels for padding + the block's short-cut add (docs/stca.md, step 4).

``pad_scatter``: ``full (B*T, 1+N, D)``, ``mixed (S, B*T, 1+N_keep, D)``
[, ``residual (B*T, 1+N, D)``] -> ``out (B*T, 1+N, D)``:
``out[r, n] = avg[r, 1+j]`` where patch ``n`` is kept token ``j`` of frame ``r``
(under the frame's own phase), ``out[r, 0] = avg[r, 0]``, else ``full[r, n]``;
``avg = mean over scales of mixed``; plus ``residual`` when given.
Ground truth: :func:`stdd_kernels.reference.pad_scatter`.

Both passes run over the output grid (row, token block, channel block), so
each output element is written exactly once and nothing needs atomics:
- forward reads ``full`` only where the token is not kept and ``mixed`` only
  where it is (masked loads: no wasted bandwidth), sums the scales in fp32
  (fp64 for fp64 tensors), adds ``residual`` and rounds once;
- backward reads ``grad_out`` once and writes ``grad_full`` (zero at CLS and
  kept tokens) and ``grad_mixed`` (``grad_out / S`` for every scale at the
  kept tokens and CLS). ``grad_residual`` is ``grad_out`` itself (no pass).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stdd_kernels.triton_mix_gather import (
    _divide,
    _geometry_constants,
    _patch_tile,
    launch_config,
    needs_wide_index,
    on_device,
    output_buffer,
)

from .geometry import STCAGeometry

# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.jit
def _pad_scatter_forward_kernel(
    full_ptr,
    mixed_ptr,
    residual_ptr,
    phase_ptr,
    out_ptr,
    num_frames,
    num_channels,
    stride_full_row,
    stride_full_token,
    stride_full_channel,
    stride_mixed_scale,
    stride_mixed_row,
    stride_mixed_token,
    stride_mixed_channel,
    stride_residual_row,
    stride_residual_token,
    stride_residual_channel,
    stride_phase_clip,
    stride_phase_frame,
    stride_out_row,
    stride_out_token,
    NUM_SCALES: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    GRID: tl.constexpr,
    WINDOW_ROWS: tl.constexpr,
    WINDOW_COLS: tl.constexpr,
    MASKED: tl.constexpr,
    ACCUMULATE_FP64: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
):
    """Program (row r, patch block, channel block) -> ``out[r, 1+n, ch]`` (and CLS in block 0).

    ``out`` has channel stride 1 (the launcher allocates it contiguous).
    """
    ACC: tl.constexpr = tl.float64 if ACCUMULATE_FP64 else tl.float32
    row64, _, channels, channel_ok, patch_ok, kept, tokens, mixed_tokens = _patch_tile(
        phase_ptr, num_frames, num_channels, stride_phase_clip, stride_phase_frame,
        GRID, WINDOW_ROWS, WINDOW_COLS, MASKED, WIDE_INDEX, BLOCK_TOKENS, BLOCK_CHANNELS,
    )
    mixed_row = mixed_ptr + row64 * stride_mixed_row
    out_row = out_ptr + row64 * stride_out_row

    if tl.program_id(1) == 0:  # CLS, once per row: the mean of the scales' CLS tokens
        cls = tl.full([BLOCK_CHANNELS], 0, ACC)
        for i in tl.static_range(NUM_SCALES):
            scale_offset = tl.full([], i, tl.int64) * stride_mixed_scale
            cls += tl.load(
                mixed_row + scale_offset + channels * stride_mixed_channel, mask=channel_ok, other=0.0
            ).to(ACC)
        cls = _divide(cls, NUM_SCALES)
        if HAS_RESIDUAL:
            cls += tl.load(
                residual_ptr + row64 * stride_residual_row + channels * stride_residual_channel,
                mask=channel_ok,
                other=0.0,
            ).to(ACC)
        tl.store(out_row + channels, cls.to(out_ptr.dtype.element_ty), mask=channel_ok)

    tile_ok = patch_ok[:, None] & channel_ok[None, :]
    take_mixed = kept[:, None] & channel_ok[None, :]
    # `full` only where the token is not replaced: its kept tokens are never read.
    values = tl.load(
        full_ptr
        + row64 * stride_full_row
        + tokens[:, None] * stride_full_token
        + channels[None, :] * stride_full_channel,
        mask=tile_ok & ~take_mixed,
        other=0.0,
    ).to(ACC)
    mixed_sum = tl.full([BLOCK_TOKENS, BLOCK_CHANNELS], 0, ACC)
    for i in tl.static_range(NUM_SCALES):
        scale_offset = tl.full([], i, tl.int64) * stride_mixed_scale
        mixed_sum += tl.load(
            mixed_row
            + scale_offset
            + mixed_tokens[:, None] * stride_mixed_token
            + channels[None, :] * stride_mixed_channel,
            mask=take_mixed,
            other=0.0,
        ).to(ACC)
    values = tl.where(take_mixed, _divide(mixed_sum, NUM_SCALES), values)
    if HAS_RESIDUAL:
        values += tl.load(
            residual_ptr
            + row64 * stride_residual_row
            + tokens[:, None] * stride_residual_token
            + channels[None, :] * stride_residual_channel,
            mask=tile_ok,
            other=0.0,
        ).to(ACC)
    tl.store(
        out_row + tokens[:, None] * stride_out_token + channels[None, :],
        values.to(out_ptr.dtype.element_ty),
        mask=tile_ok,
    )


@triton.jit
def _pad_scatter_backward_kernel(
    grad_out_ptr,
    phase_ptr,
    grad_full_ptr,
    grad_mixed_ptr,
    num_frames,
    num_channels,
    stride_grad_row,
    stride_grad_token,
    stride_grad_channel,
    stride_phase_clip,
    stride_phase_frame,
    stride_full_row,
    stride_full_token,
    stride_mixed_scale,
    stride_mixed_row,
    stride_mixed_token,
    NUM_SCALES: tl.constexpr,
    GRID: tl.constexpr,
    WINDOW_ROWS: tl.constexpr,
    WINDOW_COLS: tl.constexpr,
    MASKED: tl.constexpr,
    ACCUMULATE_FP64: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
):
    """Program (row r, patch block, channel block) -> ``grad_full[r, 1+n]``, ``grad_mixed[:, r, 1+j]``.

    Both outputs have channel stride 1 (allocated contiguous by the launcher).
    """
    ACC: tl.constexpr = tl.float64 if ACCUMULATE_FP64 else tl.float32
    row64, _, channels, channel_ok, patch_ok, kept, tokens, mixed_tokens = _patch_tile(
        phase_ptr, num_frames, num_channels, stride_phase_clip, stride_phase_frame,
        GRID, WINDOW_ROWS, WINDOW_COLS, MASKED, WIDE_INDEX, BLOCK_TOKENS, BLOCK_CHANNELS,
    )
    grad_row = grad_out_ptr + row64 * stride_grad_row
    full_row = grad_full_ptr + row64 * stride_full_row
    mixed_row = grad_mixed_ptr + row64 * stride_mixed_row
    dtype = grad_full_ptr.dtype.element_ty

    if tl.program_id(1) == 0:  # CLS, once per row: it came from the mixed path only
        cls = tl.load(grad_row + channels * stride_grad_channel, mask=channel_ok, other=0.0)
        share = _divide(cls.to(ACC), NUM_SCALES).to(dtype)
        for i in tl.static_range(NUM_SCALES):
            scale_offset = tl.full([], i, tl.int64) * stride_mixed_scale
            tl.store(mixed_row + scale_offset + channels, share, mask=channel_ok)
        tl.store(full_row + channels, tl.full([BLOCK_CHANNELS], 0, dtype), mask=channel_ok)

    tile_ok = patch_ok[:, None] & channel_ok[None, :]
    grad = tl.load(
        grad_row + tokens[:, None] * stride_grad_token + channels[None, :] * stride_grad_channel,
        mask=tile_ok,
        other=0.0,
    )
    take_mixed = kept[:, None]
    tl.store(
        full_row + tokens[:, None] * stride_full_token + channels[None, :],
        tl.where(take_mixed, 0.0, grad).to(dtype),
        mask=tile_ok,
    )
    share = _divide(grad.to(ACC), NUM_SCALES).to(dtype)
    for i in tl.static_range(NUM_SCALES):
        scale_offset = tl.full([], i, tl.int64) * stride_mixed_scale
        tl.store(
            mixed_row + scale_offset + mixed_tokens[:, None] * stride_mixed_token + channels[None, :],
            share,
            mask=tile_ok & take_mixed,
        )


# --------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------


def pad_scatter_forward(
    full: torch.Tensor,
    mixed: torch.Tensor,
    phase: torch.Tensor,
    geometry: STCAGeometry,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``full``/``residual`` ``(B*T, 1+N, D)``, ``mixed (S, B*T, 1+N_keep, D)``, any strides
    -> ``out (B*T, 1+N, D)`` contiguous (the caller's ``out`` when given)."""
    rows, num_tokens, channels = full.shape
    out = output_buffer(out, full.shape, full, "out")
    if out.numel() == 0:
        return out
    num_patches = num_tokens - 1
    block_tokens, block_channels, num_warps = launch_config(channels, num_patches)
    grid = (rows, triton.cdiv(num_patches, block_tokens), triton.cdiv(channels, block_channels))
    has_residual = residual is not None
    # Without a residual the kernel never reads it; `full` stands in as a valid pointer.
    residual_arg = residual if has_residual else full
    with on_device(full):
        _pad_scatter_forward_kernel[grid](
            full,
            mixed,
            residual_arg,
            phase,
            out,
            geometry.num_frames,
            channels,
            *full.stride(),
            *mixed.stride(),
            *residual_arg.stride(),
            *phase.stride(),
            out.stride(0),
            out.stride(1),
            NUM_SCALES=mixed.shape[0],
            HAS_RESIDUAL=has_residual,
            ACCUMULATE_FP64=full.dtype == torch.float64,
            WIDE_INDEX=needs_wide_index(full, mixed, residual, out),
            BLOCK_TOKENS=block_tokens,
            BLOCK_CHANNELS=block_channels,
            num_warps=num_warps,
            **_geometry_constants(geometry),
        )
    return out


def pad_scatter_backward(
    grad_out: torch.Tensor,
    phase: torch.Tensor,
    geometry: STCAGeometry,
    num_scales: int,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad_out (B*T, 1+N, D)`` any strides -> ``(grad_full (B*T, 1+N, D),
    grad_mixed (S, B*T, 1+N_keep, D))``, both contiguous (the caller's ``out`` pair when given)."""
    rows, num_tokens, channels = grad_out.shape
    grad_full = output_buffer(None if out is None else out[0], grad_out.shape, grad_out, "out[0]")
    grad_mixed = output_buffer(
        None if out is None else out[1],
        (num_scales, rows, 1 + geometry.num_kept, channels),
        grad_out,
        "out[1]",
    )
    if grad_full.numel() == 0:
        return grad_full, grad_mixed
    num_patches = num_tokens - 1
    block_tokens, block_channels, num_warps = launch_config(channels, num_patches)
    grid = (rows, triton.cdiv(num_patches, block_tokens), triton.cdiv(channels, block_channels))
    with on_device(grad_out):
        _pad_scatter_backward_kernel[grid](
            grad_out,
            phase,
            grad_full,
            grad_mixed,
            geometry.num_frames,
            channels,
            *grad_out.stride(),
            *phase.stride(),
            grad_full.stride(0),
            grad_full.stride(1),
            grad_mixed.stride(0),
            grad_mixed.stride(1),
            grad_mixed.stride(2),
            NUM_SCALES=num_scales,
            ACCUMULATE_FP64=grad_out.dtype == torch.float64,
            WIDE_INDEX=needs_wide_index(grad_out, grad_full, grad_mixed),
            BLOCK_TOKENS=block_tokens,
            BLOCK_CHANNELS=block_channels,
            num_warps=num_warps,
            **_geometry_constants(geometry),
        )
    return grad_full, grad_mixed
