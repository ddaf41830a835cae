"""Triton kernels for window-shift masking + multi-scale channel mixing (docs/stca.md, steps 1-2).

``mix_gather``: ``x (B*T, 1+N, D)`` -> ``mixed (S, B*T, 1+N_keep, D)`` with
``mixed[s, r, 1+j, ch] = x[r + d, kept_j(phase[r + d]), ch]``, ``d = delta_s(ch)``,
zero when frame ``t + d`` is outside the clip, and ``mixed[s, r, 0] = x[r, 0]``.
Ground truth: :func:`stdd_kernels.reference.mix_gather`.

Layout of this file (one operator per file): private ``@triton.jit`` helpers
(index math shared with ``triton_pad_scatter.py``), the forward and backward kernels,
then the host launchers. The ``torch.library`` ops and autograd wiring live in
:mod:`stdd_kernels.triton_backend`.

Kernel design (why it is one pass and needs no atomics):
- forward: one program per (row r, block of kept tokens, block of channels)
  reads the source tokens of every scale and writes all ``S`` outputs, plus the
  CLS copy. The frame's own channels (``[2I, D)``: 720 of 768 for ViT-B) are
  the same for every scale, so they are loaded once and stored ``S`` times;
  only the ``2I`` mixed channels are loaded per scale. Kept positions and
  source frames come from the phase tensor inside the kernel: no index
  tensors are built or read. Every phase read is reduced mod ``K`` first (as
  in the C++/CUDA kernels), so an unchecked phase (``validate=False``) outside
  ``[0, K)`` selects the cells of its residue and never reads out of bounds.
- backward: one program per (row r', block of patch tokens, block of channels)
  of ``dx``. A patch ``n`` of frame ``t'`` is kept (under ``phase[r']``, the
  frame's *own* phase) as kept token ``j`` or not at all; for scale ``s`` it was
  read only by ``mixed[s, r' - d, 1+j, ch]`` with ``d = delta_s(ch)``. So every
  ``dx`` element is a sum over scales of at most one element each: a gather,
  written exactly once, masked tokens get zeros. (The release's rule,
  ``mixing="official"``, clamps reads at the clip edges, so there the first and
  last frames are read by up to ``s`` frames each: a few more terms of the same sum.)

Index math, with ``K = w1*w2`` cells per window, ``m`` masked, ``K-m`` kept:
the kept cells of phase ``o`` are the complement of the cyclic interval
``[o, o+m) mod K``. With ``wrap = o + m - K``: if ``wrap > 0`` the masked
interval wraps and the kept cells are ``wrap, ..., o-1`` (``k``-th kept cell
= ``wrap + k``); otherwise they are ``0..o-1`` then ``o+m..K-1`` (``k``-th =
``k`` if ``k < o`` else ``k + m``).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .geometry import STCAGeometry

MIXING_CODES = {"none": 0, "separate": 1, "continual": 2, "official": 3}
INT32_LIMIT = 2**31 - 1

# --------------------------------------------------------------------------
# Index helpers (also imported by triton_pad_scatter.py)
# --------------------------------------------------------------------------


@triton.jit
def _channel_delta(channels, SCALE: tl.constexpr, MIX_CHANNELS: tl.constexpr, MIXING: tl.constexpr):
    """Frame offset ``delta_s(ch)`` read by each channel (spec step 2), shape of ``channels``.

    MIXING 0 = none (all 0), 1 = separate (``[0, I)``: ``-s``, ``[I, 2I)``: ``+s``),
    2 = continual (block ``q`` of width ``I/s``: ``q - s`` below ``I``, ``q + 1`` in
    ``[I, 2I)``), 3 = the release's rule before its clamp at the clip edges
    (:func:`_source_delta`): ``-depth`` below ``I`` and ``+depth`` on ``[I, 2I)``,
    ``depth = #{i < s : c < I >> i}`` for ``c = ch`` (``2I-1-ch`` on ``[I, 2I)``),
    the number of the release's steps ``i`` whose block ``[0, I >> i)`` (mirrored:
    ``[2I - (I >> i), 2I)``) covers the channel. Channels ``[2I, D)`` read the frame itself.
    """
    if MIXING == 0:
        delta = channels * 0
    elif MIXING == 1:
        delta = tl.where(
            channels < MIX_CHANNELS, -SCALE, tl.where(channels < 2 * MIX_CHANNELS, SCALE, 0)
        )
    elif MIXING == 3:
        left = channels < MIX_CHANNELS
        mirrored = tl.where(left, channels, 2 * MIX_CHANNELS - 1 - channels)
        depth = channels * 0
        for i in tl.static_range(SCALE):
            depth += (mirrored < (MIX_CHANNELS >> i)).to(tl.int32)
        delta = tl.where(left, -depth, tl.where(channels < 2 * MIX_CHANNELS, depth, 0))
    else:
        WIDTH: tl.constexpr = MIX_CHANNELS // SCALE
        delta = tl.where(
            channels < MIX_CHANNELS,
            channels // WIDTH - SCALE,
            tl.where(channels < 2 * MIX_CHANNELS, (channels - MIX_CHANNELS) // WIDTH + 1, 0),
        )
    return delta


@triton.jit
def _source_delta(
    channels, channel_ok, frame, num_frames, SCALE: tl.constexpr, MIX_CHANNELS: tl.constexpr, MIXING: tl.constexpr
):
    """Which frame each channel of frame ``frame`` reads, for the forward gather.

    Returns ``(delta, neighbour)``: ``frame + delta`` is the source frame
    (``delta = 0`` where there is nothing to read), ``neighbour`` marks the channels that read
    another frame's value; the others are the frame's own (``delta = 0`` on
    ``[2I, D)``) or zero. Continual and separate mixing read ``frame + delta``
    when it is inside the clip; the release's rule clamps ``frame + delta``
    into ``[0, T)``, and a mixed channel clamped onto its own frame (frame 0
    below ``I``, frame ``T-1`` on ``[I, 2I)``) is zero: the release's last
    step writing frame ``t`` reads ``t - min(depth, t)``, and none writes ``t = 0``.
    """
    delta = _channel_delta(channels, SCALE, MIX_CHANNELS, MIXING)
    if MIXING == 3:
        clamped = tl.where(delta < 0, tl.maximum(delta, -frame), tl.minimum(delta, num_frames - 1 - frame))
        neighbour = (clamped != 0) & channel_ok
        delta = tl.where(neighbour, clamped, 0)
    else:
        source_frame = frame + delta
        inside = (source_frame >= 0) & (source_frame < num_frames) & channel_ok
        neighbour = inside & (delta != 0)
        delta = tl.where(inside, delta, 0)  # any valid frame where the value is a zero
    return delta, neighbour


@triton.jit
def _kept_cell(k, phase, CELLS: tl.constexpr, MASKED: tl.constexpr):
    """Cell (``r1*w2 + r2``) of the ``k``-th kept cell, ascending, for window phase ``phase``.

    ``k`` and ``phase`` broadcast: a constant rank with per-channel phases, or
    per-token ranks with one phase.
    """
    wrap = phase + (MASKED - CELLS)
    return tl.where(wrap > 0, wrap + k, tl.where(k < phase, k, k + MASKED))


@triton.jit
def _kept_rank(
    patches,
    phase,
    GRID: tl.constexpr,
    WINDOW_ROWS: tl.constexpr,
    WINDOW_COLS: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Inverse of the kept-token map for one frame.

    ``patches``: patch indices ``n - 1`` in ``[0, P*P)``; ``phase``: the frame's
    phase (scalar). Returns ``(kept, j)``: whether the patch is kept and, where
    it is, its kept-token index ``j`` (garbage where it is not).
    """
    CELLS: tl.constexpr = WINDOW_ROWS * WINDOW_COLS
    KEEP: tl.constexpr = CELLS - MASKED
    WINDOWS_PER_ROW: tl.constexpr = GRID // WINDOW_COLS
    grid_row = patches // GRID
    grid_col = patches % GRID
    window = (grid_row // WINDOW_ROWS) * WINDOWS_PER_ROW + grid_col // WINDOW_COLS
    cell = (grid_row % WINDOW_ROWS) * WINDOW_COLS + grid_col % WINDOW_COLS
    # (c - o) mod K >= m, with c - o + K >= 1 so C's remainder is non-negative
    kept = ((cell - phase + CELLS) % CELLS) >= MASKED
    wrap = phase + (MASKED - CELLS)
    rank = tl.where(wrap > 0, cell - wrap, tl.where(cell < phase, cell, cell - MASKED))
    return kept, window * KEEP + rank


@triton.jit
def _divide(total, COUNT: tl.constexpr):
    """``total / COUNT``, correctly rounded (the reference's ``mean``), in ``total``'s float type.

    Triton's ``/`` on fp32 is the fast approximate division (``div.full.f32``,
    up to 2 ulp off); ``div_rn`` is IEEE division. fp64's ``/`` is exact already.
    """
    if total.dtype == tl.float64:
        return total / COUNT
    else:
        return tl.math.div_rn(total, tl.full(total.shape, COUNT, tl.float32))


@triton.jit
def _load_phase(pointers, CELLS: tl.constexpr):
    """Phase values at ``pointers``, reduced into ``[0, K)`` as int32 (as the C++/CUDA kernels do).

    The public ops check the range unless ``validate=False``; an unchecked value
    outside ``[0, K)`` must still never index outside the tensors. The remainder
    is taken in the tensor's own integer type (an int64 phase is not truncated
    first); ``%`` on negative integers keeps the dividend's sign (C semantics
    on the GPU), so a negative remainder gets ``K`` added.
    """
    remainder = tl.load(pointers) % CELLS
    return tl.where(remainder < 0, remainder + CELLS, remainder).to(tl.int32)


@triton.jit
def _program_frame(
    phase_ptr,
    num_frames,
    num_channels,
    stride_phase_clip,
    stride_phase_frame,
    CELLS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
):
    """Prologue of every kernel: grid axis 0 is the row ``r = clip*T + frame``, axis 2 the channel block.

    Returns ``(row64, clip, frame, phase, channels, channel_ok)``: the row as
    int64 (row offsets can pass 2**31), the frame's own phase (int32 scalar in ``[0, K)``),
    the block's channel indices ``(BC,)`` and which are ``< D``. Axis 1 (the
    token block) is the caller's.
    """
    row = tl.program_id(0)
    clip = row // num_frames
    frame = row % num_frames
    phase = _load_phase(phase_ptr + clip * stride_phase_clip + frame * stride_phase_frame, CELLS)
    channels = tl.program_id(2) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)  # (BC,)
    return row.to(tl.int64), clip, frame, phase, channels, channels < num_channels


@triton.jit
def _patch_tile(
    phase_ptr,
    num_frames,
    num_channels,
    stride_phase_clip,
    stride_phase_frame,
    GRID: tl.constexpr,
    WINDOW_ROWS: tl.constexpr,
    WINDOW_COLS: tl.constexpr,
    MASKED: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
):
    """Prologue of the kernels whose grid runs over patch tokens (mix_gather
    backward, pad_scatter forward and backward): axis 1 is the patch block.

    Returns ``(row64, frame, channels, channel_ok, patch_ok, kept, tokens,
    kept_tokens)``: ``patch_ok (BT,)`` marks patches ``n < P*P``; ``kept (BT,)``
    whether the frame's own phase keeps them (False past the grid);
    ``tokens = 1 + n`` their token index in ``(B*T, 1+N, D)`` tensors and
    ``kept_tokens = 1 + j`` their token in ``(S, B*T, 1+N_keep, D)`` tensors
    (garbage where not kept), both int64 when ``WIDE_INDEX``.
    """
    CELLS: tl.constexpr = WINDOW_ROWS * WINDOW_COLS
    row64, clip, frame, phase, channels, channel_ok = _program_frame(
        phase_ptr, num_frames, num_channels, stride_phase_clip, stride_phase_frame, CELLS, BLOCK_CHANNELS
    )
    patches = tl.program_id(1) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)  # (BT,) patch index n - 1
    patch_ok = patches < GRID * GRID
    kept, kept_index = _kept_rank(patches, phase, GRID, WINDOW_ROWS, WINDOW_COLS, MASKED)
    kept = kept & patch_ok
    tokens = patches + 1
    kept_tokens = kept_index + 1
    if WIDE_INDEX:
        tokens = tokens.to(tl.int64)
        kept_tokens = kept_tokens.to(tl.int64)
    return row64, frame, channels, channel_ok, patch_ok, kept, tokens, kept_tokens


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.jit
def _mix_gather_forward_kernel(
    x_ptr,
    phase_ptr,
    mixed_ptr,
    num_frames,
    num_channels,
    stride_x_row,
    stride_x_token,
    stride_x_channel,
    stride_phase_clip,
    stride_phase_frame,
    stride_mixed_scale,
    stride_mixed_row,
    stride_mixed_token,
    SCALES: tl.constexpr,
    MIX_CHANNELS: tl.constexpr,
    MIXING: tl.constexpr,
    GRID: tl.constexpr,
    WINDOW_ROWS: tl.constexpr,
    WINDOW_COLS: tl.constexpr,
    MASKED: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
):
    """Program (row r, kept-token block, channel block) -> ``mixed[:, r, 1+j, ch]`` for all scales.

    ``mixed`` has channel stride 1 (the launcher allocates it contiguous).
    """
    CELLS: tl.constexpr = WINDOW_ROWS * WINDOW_COLS
    KEEP: tl.constexpr = CELLS - MASKED
    WINDOWS_PER_ROW: tl.constexpr = GRID // WINDOW_COLS
    NUM_KEPT: tl.constexpr = (GRID // WINDOW_ROWS) * WINDOWS_PER_ROW * KEEP
    row64, clip, frame, own_phase, channels, channel_ok = _program_frame(
        phase_ptr, num_frames, num_channels, stride_phase_clip, stride_phase_frame, CELLS, BLOCK_CHANNELS
    )
    token_block = tl.program_id(1)
    kept = token_block * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)  # (BT,) kept-token index j
    kept_ok = kept < NUM_KEPT
    # Token of cell 0 of each kept token's window; the cell adds (c // w2) * P + c % w2.
    window = kept // KEEP
    rank = kept % KEEP
    window_origin = 1 + (window // WINDOWS_PER_ROW) * (WINDOW_ROWS * GRID) + (
        window % WINDOWS_PER_ROW
    ) * WINDOW_COLS
    out_tokens = kept + 1
    if WIDE_INDEX:
        out_tokens = out_tokens.to(tl.int64)
    out_offsets = out_tokens[:, None] * stride_mixed_token + channels[None, :]  # (BT, BC)
    out_mask = kept_ok[:, None] & channel_ok[None, :]
    out_row = mixed_ptr + row64 * stride_mixed_row

    if token_block == 0:  # CLS: copied unmixed into every scale
        cls = tl.load(x_ptr + row64 * stride_x_row + channels * stride_x_channel, mask=channel_ok)
        for i in tl.static_range(len(SCALES)):
            scale_offset = tl.full([], i, tl.int64) * stride_mixed_scale
            tl.store(out_row + scale_offset + channels, cls, mask=channel_ok)

    # The frame's own channels ([2I, D), or all without mixing) are the same for
    # every scale: read them once, (BT, BC), and store them S times.
    if MIXING == 0:
        own_channel = channel_ok
    else:
        own_channel = channel_ok & (channels >= 2 * MIX_CHANNELS)
    own_cell = _kept_cell(rank, own_phase, CELLS, MASKED)  # (BT,)
    own_tokens = window_origin + (own_cell // WINDOW_COLS) * GRID + own_cell % WINDOW_COLS
    if WIDE_INDEX:
        own_tokens = own_tokens.to(tl.int64)
    own = tl.load(
        x_ptr + row64 * stride_x_row + own_tokens[:, None] * stride_x_token + channels[None, :] * stride_x_channel,
        mask=kept_ok[:, None] & own_channel[None, :],
        other=0.0,
    )

    for i in tl.static_range(len(SCALES)):
        if MIXING == 0:
            values = own
        else:
            # (BC,): 0 on own channels and where the value is a zero
            delta, neighbour = _source_delta(channels, channel_ok, frame, num_frames, SCALES[i], MIX_CHANNELS, MIXING)
            source_phase = _load_phase(
                phase_ptr + clip * stride_phase_clip + (frame + delta) * stride_phase_frame, CELLS
            )  # (BC,): the phase of the frame each channel reads
            # Cell offset of the rank-th kept cell under each channel's source phase: (BT, BC).
            cell = _kept_cell(0, source_phase, CELLS, MASKED)
            cell_offset = tl.broadcast_to(
                ((cell // WINDOW_COLS) * GRID + cell % WINDOW_COLS)[None, :], (BLOCK_TOKENS, BLOCK_CHANNELS)
            )
            for k in tl.static_range(1, KEEP):
                cell = _kept_cell(k, source_phase, CELLS, MASKED)
                cell_offset = tl.where(
                    rank[:, None] == k, ((cell // WINDOW_COLS) * GRID + cell % WINDOW_COLS)[None, :], cell_offset
                )
            source_tokens = window_origin[:, None] + cell_offset
            if WIDE_INDEX:
                source_tokens = source_tokens.to(tl.int64)
            channel_offsets = (row64 + delta) * stride_x_row + channels * stride_x_channel  # (BC,) int64
            values = tl.load(
                x_ptr + channel_offsets[None, :] + source_tokens * stride_x_token,
                mask=kept_ok[:, None] & neighbour[None, :],
                other=0.0,
            )
            values = tl.where(own_channel[None, :], own, values)
        scale_offset = tl.full([], i, tl.int64) * stride_mixed_scale
        tl.store(out_row + scale_offset + out_offsets, values, mask=out_mask)


@triton.jit
def _mix_gather_backward_kernel(
    grad_mixed_ptr,
    phase_ptr,
    grad_x_ptr,
    num_frames,
    num_channels,
    stride_grad_scale,
    stride_grad_row,
    stride_grad_token,
    stride_grad_channel,
    stride_phase_clip,
    stride_phase_frame,
    stride_dx_row,
    stride_dx_token,
    SCALES: tl.constexpr,
    MIX_CHANNELS: tl.constexpr,
    MIXING: tl.constexpr,
    GRID: tl.constexpr,
    WINDOW_ROWS: tl.constexpr,
    WINDOW_COLS: tl.constexpr,
    MASKED: tl.constexpr,
    ACCUMULATE_FP64: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
):
    """Program (row r', patch block, channel block) -> ``dx[r', 1+n, ch]``, summed over scales.

    ``dx`` has channel stride 1. Accumulates in fp32 (fp64 for fp64 tensors).
    """
    ACC: tl.constexpr = tl.float64 if ACCUMULATE_FP64 else tl.float32
    # source_tokens: the token of mixed that read each patch (where kept).
    row64, frame, channels, channel_ok, patch_ok, kept, dx_tokens, source_tokens = _patch_tile(
        phase_ptr, num_frames, num_channels, stride_phase_clip, stride_phase_frame,
        GRID, WINDOW_ROWS, WINDOW_COLS, MASKED, WIDE_INDEX, BLOCK_TOKENS, BLOCK_CHANNELS,
    )
    dx_row = grad_x_ptr + row64 * stride_dx_row

    if tl.program_id(1) == 0:  # CLS, once per row: every scale copied it from this row
        cls = tl.full([BLOCK_CHANNELS], 0, ACC)
        for i in tl.static_range(len(SCALES)):
            scale_offset = tl.full([], i, tl.int64) * stride_grad_scale
            cls += tl.load(
                grad_mixed_ptr + scale_offset + row64 * stride_grad_row + channels * stride_grad_channel,
                mask=channel_ok,
                other=0.0,
            ).to(ACC)
        tl.store(dx_row + channels, cls.to(grad_x_ptr.dtype.element_ty), mask=channel_ok)

    total = tl.full([BLOCK_TOKENS, BLOCK_CHANNELS], 0, ACC)
    for i in tl.static_range(len(SCALES)):
        block_delta = _channel_delta(channels, SCALES[i], MIX_CHANNELS, MIXING)
        # The frame whose mixed token read this one (the release's rule too: t - delta reads
        # t - delta + clamp(delta) = this frame whenever t - delta is inside the clip).
        reader_frame = frame - block_delta
        valid = (reader_frame >= 0) & (reader_frame < num_frames) & channel_ok
        delta = tl.where(valid, block_delta, 0)
        scale_offset = tl.full([], i, tl.int64) * stride_grad_scale
        channel_offsets = scale_offset + (row64 - delta) * stride_grad_row + channels * stride_grad_channel
        total += tl.load(
            grad_mixed_ptr + channel_offsets[None, :] + source_tokens[:, None] * stride_grad_token,
            mask=kept[:, None] & valid[None, :],
            other=0.0,
        ).to(ACC)
        if MIXING == 3:
            if (frame == 0) | (frame == num_frames - 1):
                # The release's clamp: frame 0 is also read (delta = -depth) by frames
                # 1 .. depth-1, frame T-1 (delta = +depth) by frames T-2 .. T-depth.
                for k in tl.static_range(1, SCALES[i]):
                    below = (block_delta < 0) & (frame == 0) & (k < -block_delta)
                    above = (block_delta > 0) & (frame == num_frames - 1) & (k < block_delta)
                    extra = (below | above) & (k < num_frames) & channel_ok
                    reader_offset = tl.where(extra, tl.where(below, k, -k), 0)  # reader row - this row
                    extra_offsets = scale_offset + (row64 + reader_offset) * stride_grad_row + channels * stride_grad_channel
                    total += tl.load(
                        grad_mixed_ptr + extra_offsets[None, :] + source_tokens[:, None] * stride_grad_token,
                        mask=kept[:, None] & extra[None, :],
                        other=0.0,
                    ).to(ACC)
    tl.store(
        dx_row + dx_tokens[:, None] * stride_dx_token + channels[None, :],
        total.to(grad_x_ptr.dtype.element_ty),
        mask=patch_ok[:, None] & channel_ok[None, :],
    )


# --------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------


def interpreting() -> bool:
    """Whether the kernels above were built for Triton's CPU interpreter."""
    return not isinstance(_mix_gather_forward_kernel, triton.runtime.jit.JITFunction)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def launch_config(num_channels: int, num_tokens: int) -> tuple[int, int, int]:
    """``(BLOCK_TOKENS, BLOCK_CHANNELS, num_warps)`` by a small rule from ``D``.

    GPU: channel blocks of up to 256 (D=768 -> 3 blocks, no waste), up to 4096
    elements per program on 4 warps (these are copy kernels: 8-16 elements in
    flight per thread, vector loads along channels); the token block is the
    largest power of two <= 4096 / BC that pads the token count by at most 1/16
    (98 kept -> 8, 196 patches -> 16). Not autotuned: not yet measured on a
    GPU (bench/stca.py's "kernel" rows are the measurement to tune against).
    Interpreter: one program per row (the interpreter pays per program, not per element).
    """
    num_channels = max(1, num_channels)
    num_tokens = max(1, num_tokens)
    if interpreting():
        block_channels = _next_power_of_two(num_channels)
        block_tokens = min(_next_power_of_two(num_tokens), max(1, 2**16 // block_channels))
        return block_tokens, block_channels, 1
    block_channels = min(_next_power_of_two(num_channels), 256)
    block_tokens = min(_next_power_of_two(num_tokens), max(1, 4096 // block_channels))
    while block_tokens > 1 and (-num_tokens % block_tokens) * 16 > num_tokens:
        block_tokens //= 2
    return block_tokens, block_channels, 4


def max_offset(tensor: torch.Tensor) -> int:
    """Largest element offset a kernel computes for ``tensor`` (decides int32 vs int64 math)."""
    return sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))


def needs_wide_index(*tensors) -> bool:
    return any(t is not None and t.numel() > 0 and max_offset(t) > INT32_LIMIT for t in tensors)


def on_device(tensor: torch.Tensor):
    """Launch context: Triton launches on the *current* CUDA device, so make it the tensor's.

    A no-op for CPU tensors (Triton's interpreter).
    """
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _geometry_constants(geometry: STCAGeometry) -> dict:
    return dict(
        GRID=geometry.grid,
        WINDOW_ROWS=geometry.window[0],
        WINDOW_COLS=geometry.window[1],
        MASKED=geometry.masked,
    )


def output_buffer(out, shape, like: torch.Tensor, name: str) -> torch.Tensor:
    """A new contiguous output, or the caller's ``out`` after checking it fits.

    ``out`` exists so tests can hand in NaN-filled buffers and check that the
    kernel writes every element; the kernels assume channel stride 1.
    """
    shape = tuple(int(size) for size in shape)
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"{name} must be a {like.dtype} tensor of shape {shape} on {like.device}, got "
            f"{out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {out.stride()}")
    return out


def mix_gather_forward(
    x: torch.Tensor, phase: torch.Tensor, geometry: STCAGeometry, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x (B*T, 1+N, D)`` any strides, ``phase (B, T)`` int -> ``mixed (S, B*T, 1+N_keep, D)`` contiguous
    (written into ``out`` when given)."""
    rows, _, channels = x.shape
    scales = tuple(geometry.scales)
    mixed = output_buffer(out, (len(scales), rows, 1 + geometry.num_kept, channels), x, "out")
    if mixed.numel() == 0:
        return mixed
    block_tokens, block_channels, num_warps = launch_config(channels, geometry.num_kept)
    grid = (rows, triton.cdiv(geometry.num_kept, block_tokens), triton.cdiv(channels, block_channels))
    with on_device(x):
        _mix_gather_forward_kernel[grid](
            x,
            phase,
            mixed,
            geometry.num_frames,
            channels,
            *x.stride(),
            *phase.stride(),
            mixed.stride(0),
            mixed.stride(1),
            mixed.stride(2),
            SCALES=scales,
            MIX_CHANNELS=geometry.mix_channels,
            MIXING=MIXING_CODES[geometry.mixing],
            WIDE_INDEX=needs_wide_index(x, mixed),
            BLOCK_TOKENS=block_tokens,
            BLOCK_CHANNELS=block_channels,
            num_warps=num_warps,
            **_geometry_constants(geometry),
        )
    return mixed


def mix_gather_backward(
    grad_mixed: torch.Tensor,
    phase: torch.Tensor,
    geometry: STCAGeometry,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``grad_mixed (S, B*T, 1+N_keep, D)`` any strides -> ``grad_x (B*T, 1+N, D)`` contiguous
    (written into ``out`` when given).

    ``geometry.grid`` gives ``N = P*P``; masked tokens get zeros.
    """
    _, rows, _, channels = grad_mixed.shape
    num_patches = geometry.grid * geometry.grid
    grad_x = output_buffer(out, (rows, 1 + num_patches, channels), grad_mixed, "out")
    if grad_x.numel() == 0:
        return grad_x
    block_tokens, block_channels, num_warps = launch_config(channels, num_patches)
    grid = (rows, triton.cdiv(num_patches, block_tokens), triton.cdiv(channels, block_channels))
    with on_device(grad_mixed):
        _mix_gather_backward_kernel[grid](
            grad_mixed,
            phase,
            grad_x,
            geometry.num_frames,
            channels,
            *grad_mixed.stride(),
            *phase.stride(),
            grad_x.stride(0),
            grad_x.stride(1),
            SCALES=tuple(geometry.scales),
            MIX_CHANNELS=geometry.mix_channels,
            MIXING=MIXING_CODES[geometry.mixing],
            ACCUMULATE_FP64=grad_mixed.dtype == torch.float64,
            WIDE_INDEX=needs_wide_index(grad_mixed, grad_x),
            BLOCK_TOKENS=block_tokens,
            BLOCK_CHANNELS=block_channels,
            num_warps=num_warps,
            **_geometry_constants(geometry),
        )
    return grad_x
