"""Triton kernels for the shared projections (docs/stca.md, section 6).

Two primitives with the signatures of :func:`stdd_kernels.reference.mix_factors` and
:func:`stdd_kernels.reference.project_mixed` (the ground truth):

- ``mix_factors``: ``x (B*T, 1+N, D)``, ``g (D,)`` -> ``gain (S, B*T, 1+N_keep)``,
  ``coefficients (S, B*T, 1+N_keep, 2I+2)`` (the factor dtype: float32, float64 for
  float64 ``x``) and ``mixed_mean (B*T, 1+N_keep, D)`` (``x``'s dtype);
- ``project_mixed``: ``qkv (B*T, 1+N, 3D)`` -> ``(S, B*T, 1+N_keep, 3D)`` in ``qkv``'s
  dtype, ``gain * qkv[r, base(r, i)] + coefficients @ basis^T``.

Layout of this file: private ``@triton.jit`` helpers (the index math is
:mod:`stdd_kernels.triton_mix_gather`'s, imported), the forward kernels, the backward
kernels (with the derivation of their formulas), then the host launchers. The
``torch.library`` ops and autograd wiring live in :mod:`stdd_kernels.triton_backend`.

Kernel design:
- ``mix_factors`` forward, one pass: a program owns one row ``r`` and a block of mixed
  tokens ``i`` (its *base tokens*: ``i = 0`` the CLS, ``i = 1 + j`` kept token ``j``). It
  reads each base token once, all ``D`` channels ``(BT, D)``, for its statistics, and per
  scale only the ``2I`` borrowed channels of the source tokens ``(BT, 2I)``; the scales'
  statistics follow from the base's and the ``2I`` changed channels, so the
  ``(S, B*T, 1+N_keep, D)`` mixed tensor is never formed. It writes ``gain`` and
  ``coefficients`` of every scale and ``mixed_mean`` (the base token's own channels
  ``[2I, D)`` copied, the mean over scales of the borrowed ones).
- ``project_mixed`` forward, one pass: a program owns a tile of flattened mixed tokens
  ``(r, i)`` (32 or 64 on a GPU: no padding of a row's ``1 + N_keep`` tokens up to a tile)
  and a block of output columns; it gathers the ``qkv`` rows of their base tokens once and, for
  every scale, rescales them and adds ``tl.dot(coefficients, basis^T)`` (rank ``2I + 2``),
  then writes the output once. See :func:`_dot_into` for the dot's precision.
- backward: see the comment above the backward kernels.

Precision. The factors are float32 (float64 for float64 tokens), as the reference's. The
reference computes them with torch reductions, which on CPU accumulate float32 in double,
and rounds a few times per factor; the kernels must be at least as accurate (at most twice
its error). So the mix_factors kernels compute in float64 and round each result once:
every sum over channels (``_wide_total``), the per-token scalars (``mu_x``, ``sd_x``,
``sd_m``, ``a``, ``1 - a``, ``k``, the backward's ``Gm``, ``Gx``) and the ``(tokens, 2I)``
tiles of the borrowed channels; the ``(tokens, D)`` tile of the base tokens stays in
``x``'s dtype in registers and is only widened on the fly, once per element (its sums, the
backward's gradient). A float32 sum over ``D = 768`` channels would put several ulps into
``sd_m``, and from there into every coefficient of the token. That is a few float64
operations per loaded element (H100: fp64 at half the fp32 rate): the kernels stay
memory-bound. Every phase read is reduced mod ``K`` (``_load_phase``), so an unchecked
phase never reads out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stdd_kernels.triton_mix_gather import (
    _channel_delta,
    _divide,
    _geometry_constants,
    _kept_cell,
    _kept_rank,
    _load_phase,
    _program_frame,
    _source_delta,
    interpreting,
    launch_config,
    needs_wide_index,
    on_device,
    output_buffer,
)

from .geometry import STCAGeometry

FACTOR_DTYPES = (torch.float32, torch.float64)
# tl.dot operand handling by (factor dtype, qkv dtype): see _dot_into.
DOT_FLOAT64, DOT_FLOAT32, DOT_BFLOAT16_SPLIT, DOT_FLOAT16_SPLIT = 0, 1, 2, 3

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
#
# Reductions call tl.reduce with triton.language's own combiners, not tl.sum / tl.max, and tl.full
# stands in for tl.zeros: those library functions are jitted when triton.language is imported and
# stay compiled-mode functions, which the interpreter cannot call after reload_kernels. The
# interpreter recognizes these combiners and reduces with numpy (a combiner of our own would be
# called element by element); compiled, this is exactly tl.sum / tl.max.
# They are private names of triton.language.standard: a Triton without them gets combiners of
# our own, the same functions (slow only in the interpreter).


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


_SUM = getattr(tl.standard, "_sum_combine", _add)
_MAX = getattr(tl.standard, "_elementwise_max", _maximum)


@triton.jit
def _total(values, axis: tl.constexpr):
    """``tl.sum(values, axis)``."""
    return tl.reduce(values, axis, _SUM)


@triton.jit
def _wide_total(values, axis: tl.constexpr):
    """``values`` summed in float64 (see "Precision" in the module docstring)."""
    return tl.reduce(values.to(tl.float64), axis, _SUM)


@triton.jit
def _base_tokens(
    mixed_tokens,
    phase,
    GRID: tl.constexpr,
    WINDOW_ROWS: tl.constexpr,
    WINDOW_COLS: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Token index (in ``(B*T, 1+N, ·)`` tensors) of the base token of each mixed token.

    ``mixed_tokens`` ``i``: 0 is the CLS (token 0), ``1 + j`` kept token ``j`` of phase
    ``phase``; the two broadcast (per-token ranks with one phase, or per-channel phases:
    the source tokens a mixed token borrows from are the same kept token ``j`` of
    another frame). Kept token ``j`` lies in window ``j // (K-m)`` at its
    ``(j mod (K-m))``-th kept cell (docs/stca.md, step 1).
    """
    CELLS: tl.constexpr = WINDOW_ROWS * WINDOW_COLS
    KEEP: tl.constexpr = CELLS - MASKED
    WINDOWS_PER_ROW: tl.constexpr = GRID // WINDOW_COLS
    kept = tl.maximum(mixed_tokens - 1, 0)
    window = kept // KEEP
    cell = _kept_cell(kept % KEEP, phase, CELLS, MASKED)
    token = (
        1
        + (window // WINDOWS_PER_ROW) * (WINDOW_ROWS * GRID)
        + (window % WINDOWS_PER_ROW) * WINDOW_COLS
        + (cell // WINDOW_COLS) * GRID
        + cell % WINDOW_COLS
    )
    return tl.where(mixed_tokens == 0, 0, token)


@triton.jit
def _narrow(values, dtype: tl.constexpr):
    """fp32 / fp64 ``values`` rounded to nearest (ties to even) in ``dtype``.

    bfloat16 by hand from the fp32 bits (from fp64 through fp32, as Triton itself converts):
    the compiled conversion is this rounding, but Triton's interpreter truncates (and
    garbles fp64 -> bfloat16), which would double the rounding error the CPU tests see.
    A few integer operations per stored element.
    """
    if dtype == tl.bfloat16:
        bits = values.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(values != values, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return values.to(dtype)


@triton.jit
def _power_of_two_scales(largest):
    """``(scale, unscale)``, exact powers of two with ``largest * scale`` in ``[1, 2)`` and
    ``scale * unscale = 1``, for fp32 ``largest >= 0`` (from its exponent bits; zero and
    subnormal get ``2**126``, inf and NaN stay what they are)."""
    exponent = (largest.to(tl.int32, bitcast=True) >> 23) & 0xFF
    exponent = tl.minimum(tl.maximum(exponent, 1), 253)
    scale = ((254 - exponent) << 23).to(tl.float32, bitcast=True)  # 2 ** (127 - exponent)
    unscale = (exponent << 23).to(tl.float32, bitcast=True)  # 2 ** (exponent - 127)
    return scale, unscale


@triton.jit
def _dot_into(accumulator, a, b, DOT_MODE: tl.constexpr):
    """``accumulator + a @ b`` for factor-dtype tiles ``a (BM, BK)``, ``b (BK, BN)``.

    DOT_MODE 0 / 1: float64 / float32 operands as they are (``ieee``: no TF32).
    2 / 3 (bfloat16 / float16 ``qkv``): tensor-core dots in the qkv dtype with float32
    accumulation, each operand split as ``hi + lo`` (``hi`` the operand rounded to the
    low dtype, ``lo`` the rounded rest) and three dots ``a_lo b_hi + a_hi b_lo +
    a_hi b_hi``: products good to about 2**-16 (bf16) / 2**-22 (fp16) instead of one
    rounding of each operand (2**-8 for bf16), which would make the result several times
    less accurate than the reference's float32 product rounded once (measured 9x its
    error in bf16 with a 30x outlier channel). ``K = 2I + 2`` is small, so the two
    extra dots cost nothing next to the memory traffic. fp16's range is small: rows of
    ``a`` and columns of ``b`` are scaled by exact powers of two into ``[1, 2)``
    first and the product scaled back.
    """
    if DOT_MODE == 0:
        return tl.dot(a, b, accumulator, input_precision="ieee", out_dtype=tl.float64)
    elif DOT_MODE == 1:
        return tl.dot(a, b, accumulator, input_precision="ieee")
    elif DOT_MODE == 2:
        a_hi = a.to(tl.bfloat16)
        a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
        b_hi = b.to(tl.bfloat16)
        b_lo = (b - b_hi.to(tl.float32)).to(tl.bfloat16)
        accumulator = tl.dot(a_lo, b_hi, accumulator)
        accumulator = tl.dot(a_hi, b_lo, accumulator)
        return tl.dot(a_hi, b_hi, accumulator)
    else:
        a_scale, a_unscale = _power_of_two_scales(tl.reduce(tl.abs(a), 1, _MAX))  # (BM,)
        b_scale, b_unscale = _power_of_two_scales(tl.reduce(tl.abs(b), 0, _MAX))  # (BN,)
        a = a * a_scale[:, None]
        b = b * b_scale[None, :]
        a_hi = a.to(tl.float16)
        a_lo = (a - a_hi.to(tl.float32)).to(tl.float16)
        b_hi = b.to(tl.float16)
        b_lo = (b - b_hi.to(tl.float32)).to(tl.float16)
        product = tl.dot(a_lo, b_hi)
        product = tl.dot(a_hi, b_lo, product)
        product = tl.dot(a_hi, b_hi, product)
        return accumulator + product * a_unscale[:, None] * b_unscale[None, :]


@triton.jit
def _factor_tile(
    x_ptr,
    phase_ptr,
    eps_ptr,
    num_frames,
    stride_x_row,
    stride_x_token,
    stride_x_channel,
    stride_phase_clip,
    stride_phase_frame,
    CHANNELS: tl.constexpr,
    BORROWED: tl.constexpr,
    NUM_MIXED: tl.constexpr,
    GRID: tl.constexpr,
    WINDOW_ROWS: tl.constexpr,
    WINDOW_COLS: tl.constexpr,
    MASKED: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
    BLOCK_BORROWED: tl.constexpr,
):
    """Prologue of the mix_factors kernels: program (row r, block of mixed tokens i).

    Reads the base tokens once, every channel, and returns them and their statistics with
    what the scales need: ``row64, clip, frame`` (scalars), ``mixed_tokens, token_ok, base (BT,)``,
    ``channels, high (BC,)`` (``high``: the channels ``[2I, D)``), ``borrowed, borrowed_ok (BB,)``
    (channels ``< 2I``), ``base_values (BT, BC)`` as stored in ``x``; in fp64: ``mean_x (BT,)``,
    ``high_sum, high_squares (BT,)`` the sums of ``x_b - mu_x`` and its square over the
    channels ``[2I, D)``, ``base_low, centred_low (BT, BB)`` the base and centred base on the
    borrowed channels, ``sd_x (BT,)`` ``= sqrt(var_x + eps)`` and ``eps``. (Only
    ``base_values`` stays in registers as a ``(BT, BC)`` tile; the ``(BT, BB)`` ones are
    ``2I / D`` of the channels.)
    """
    CELLS: tl.constexpr = WINDOW_ROWS * WINDOW_COLS
    row = tl.program_id(0)
    clip = row // num_frames
    frame = row % num_frames
    phase = _load_phase(phase_ptr + clip * stride_phase_clip + frame * stride_phase_frame, CELLS)
    row64 = row.to(tl.int64)
    mixed_tokens = tl.program_id(1) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)  # (BT,)
    token_ok = mixed_tokens < NUM_MIXED
    base = _base_tokens(mixed_tokens, phase, GRID, WINDOW_ROWS, WINDOW_COLS, MASKED)
    if WIDE_INDEX:
        base = base.to(tl.int64)
    channels = tl.arange(0, BLOCK_CHANNELS)
    channel_ok = channels < CHANNELS
    borrowed = tl.arange(0, BLOCK_BORROWED)
    borrowed_ok = borrowed < BORROWED
    if WIDE_INDEX:  # channel strides can be large too (a channel-major x)
        channels = channels.to(tl.int64)
        borrowed = borrowed.to(tl.int64)
    base_row = x_ptr + row64 * stride_x_row + base[:, None] * stride_x_token  # (BT, 1)
    base_values = tl.load(
        base_row + channels[None, :] * stride_x_channel, mask=token_ok[:, None] & channel_ok[None, :], other=0.0
    )
    base_low = tl.load(
        base_row + borrowed[None, :] * stride_x_channel, mask=token_ok[:, None] & borrowed_ok[None, :], other=0.0
    ).to(tl.float64)
    high = channel_ok & (channels >= BORROWED)
    mean_x = _divide(_wide_total(base_values, axis=1), CHANNELS)
    centred_high = tl.where(high[None, :], base_values.to(tl.float64) - mean_x[:, None], 0.0)
    high_sum = _total(centred_high, axis=1)
    high_squares = _total(centred_high * centred_high, axis=1)
    centred_low = tl.where(borrowed_ok[None, :], base_low - mean_x[:, None], 0.0)
    eps = tl.load(eps_ptr).to(tl.float64)
    var_x = _divide(high_squares + _total(centred_low * centred_low, axis=1), CHANNELS)  # biased
    return (
        row64, clip, frame, mixed_tokens, token_ok, base, channels, high, borrowed, borrowed_ok, base_values,
        mean_x, high_sum, high_squares, base_low, centred_low, tl.sqrt(var_x + eps), eps,
    )


@triton.jit
def _borrowed_values(
    x_ptr,
    phase_ptr,
    row64,
    clip,
    frame,
    num_frames,
    mixed_tokens,
    token_ok,
    borrowed,
    borrowed_ok,
    base_low,
    stride_x_row,
    stride_x_token,
    stride_x_channel,
    stride_phase_clip,
    stride_phase_frame,
    SCALE: tl.constexpr,
    MIX_CHANNELS: tl.constexpr,
    MIXING: tl.constexpr,
    GRID: tl.constexpr,
    WINDOW_ROWS: tl.constexpr,
    WINDOW_COLS: tl.constexpr,
    MASKED: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
):
    """``m[:2I]`` of the mixed tokens of one scale, ``(BT, BB)`` in ``base_low``'s dtype (fp64):
    ``mix_gather``'s value of each borrowed channel (kept token ``j`` of the source frame,
    zero outside the clip); the CLS (``i = 0``) is its own base token."""
    CELLS: tl.constexpr = WINDOW_ROWS * WINDOW_COLS
    delta, neighbour = _source_delta(borrowed, borrowed_ok, frame, num_frames, SCALE, MIX_CHANNELS, MIXING)
    source_phase = _load_phase(phase_ptr + clip * stride_phase_clip + (frame + delta) * stride_phase_frame, CELLS)
    source_tokens = _base_tokens(
        mixed_tokens[:, None], source_phase[None, :], GRID, WINDOW_ROWS, WINDOW_COLS, MASKED
    )  # (BT, BB)
    if WIDE_INDEX:
        source_tokens = source_tokens.to(tl.int64)
    channel_offsets = (row64 + delta) * stride_x_row + borrowed * stride_x_channel  # (BB,) int64
    values = tl.load(
        x_ptr + channel_offsets[None, :] + source_tokens * stride_x_token,
        mask=(token_ok & (mixed_tokens > 0))[:, None] & neighbour[None, :],
        other=0.0,
    ).to(base_low.dtype)
    return tl.where((mixed_tokens == 0)[:, None], base_low, values)


@triton.jit
def _mixed_statistics(mixed_low, base_low, mean_x, high_sum, high_squares, centred_low, borrowed_ok, eps,
                      CHANNELS: tl.constexpr, BORROWED: tl.constexpr):
    """The mixed tokens' statistics from their base tokens' and the ``2I`` changed channels.

    With ``d = m - x_b`` on the borrowed channels (zero elsewhere):
    ``mean_shift = mu_m - mu_x = sum(d) / D``;
    ``var_shift = sd_m^2 - sd_x^2 = sum(d (d + 2 (x_b - mu_x))) / D - mean_shift^2``, free of
    the cancellation of two close variances subtracted (it gives ``1 - a``), with
    ``d + 2 (x_b - mu_x)`` taken as ``(m - mu_x) + (x_b - mu_x)``; and ``sd_m`` from the
    centred values ``m_c - mu_m`` (``(m_c - mu_x) - mean_shift`` on the borrowed channels, and
    over the base's own ``n = D - 2I``: ``sum (x_c - mu_x - mean_shift)^2 = high_squares -
    mean_shift (2 high_sum - n mean_shift)``), free of the cancellation of
    ``sd_x^2 + var_shift`` when a borrowed outlier channel leaves ``sd_m << sd_x`` (the clip
    edges' zeros). All fp64. Returns ``d, m - mu_m (BT, BB; zero past 2I)``,
    ``mean_shift, var_shift, sd_m (BT,)``.
    """
    difference = tl.where(borrowed_ok[None, :], mixed_low - base_low, 0.0)
    centred_mixed = tl.where(borrowed_ok[None, :], mixed_low - mean_x[:, None], 0.0)
    mean_shift = _divide(_total(difference, axis=1), CHANNELS)
    cross = _divide(_total(difference * (centred_mixed + centred_low), axis=1), CHANNELS)
    own = high_squares - mean_shift * (2 * high_sum - (CHANNELS - BORROWED) * mean_shift)
    mixed_centred = tl.where(borrowed_ok[None, :], centred_mixed - mean_shift[:, None], 0.0)
    var_m = _divide(own + _total(mixed_centred * mixed_centred, axis=1), CHANNELS)
    var_shift = cross - mean_shift * mean_shift
    return difference, mixed_centred, mean_shift, var_shift, tl.sqrt(var_m + eps)


# --------------------------------------------------------------------------
# Forward kernels
# --------------------------------------------------------------------------


@triton.jit
def _mix_factors_forward_kernel(
    x_ptr,
    ln_weight_ptr,
    phase_ptr,
    eps_ptr,
    gain_ptr,
    coefficients_ptr,
    mean_ptr,
    num_frames,
    stride_x_row,
    stride_x_token,
    stride_x_channel,
    stride_weight,
    stride_phase_clip,
    stride_phase_frame,
    stride_gain_scale,
    stride_coefficients_scale,
    SCALES: tl.constexpr,
    MIX_CHANNELS: tl.constexpr,
    MIXING: tl.constexpr,
    CHANNELS: tl.constexpr,
    BORROWED: tl.constexpr,
    NUM_MIXED: tl.constexpr,
    GRID: tl.constexpr,
    WINDOW_ROWS: tl.constexpr,
    WINDOW_COLS: tl.constexpr,
    MASKED: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
    BLOCK_BORROWED: tl.constexpr,
):
    """Program (row r, block of mixed tokens) -> their gain, coefficients (every scale) and mean.

    Outputs contiguous: gain ``(S, B*T, NUM_MIXED)``, coefficients ``(S, B*T, NUM_MIXED,
    2I+2)``, mean ``(B*T, NUM_MIXED, D)``. Per scale: ``a = sd_x / sd_m``,
    ``1 - a = var_shift / (sd_m (sd_m + sd_x))`` (no cancellation), ``k = -mean_shift / sd_m``,
    ``u = d g / sd_m``.
    """
    COEFFICIENTS: tl.constexpr = BORROWED + 2
    (
        row64, clip, frame, mixed_tokens, token_ok, base, channels, high, borrowed, borrowed_ok,
        base_values, mean_x, high_sum, high_squares, base_low, centred_low, sd_x, eps,
    ) = _factor_tile(
        x_ptr, phase_ptr, eps_ptr, num_frames, stride_x_row, stride_x_token, stride_x_channel,
        stride_phase_clip, stride_phase_frame, CHANNELS, BORROWED, NUM_MIXED, GRID, WINDOW_ROWS, WINDOW_COLS,
        MASKED, WIDE_INDEX, BLOCK_TOKENS, BLOCK_CHANNELS, BLOCK_BORROWED,
    )
    ACC: tl.constexpr = gain_ptr.dtype.element_ty
    weight = tl.load(ln_weight_ptr + borrowed * stride_weight, mask=borrowed_ok, other=0.0).to(tl.float64)
    flat = row64 * NUM_MIXED + mixed_tokens  # (BT,) int64: (r, i) in the (B*T, NUM_MIXED) outputs
    low_mask = token_ok[:, None] & borrowed_ok[None, :]
    mixed_sum = tl.full(base_low.shape, 0, base_low.dtype)
    for s in tl.static_range(len(SCALES)):
        mixed_low = _borrowed_values(
            x_ptr, phase_ptr, row64, clip, frame, num_frames, mixed_tokens, token_ok, borrowed, borrowed_ok,
            base_low, stride_x_row, stride_x_token, stride_x_channel, stride_phase_clip, stride_phase_frame,
            SCALES[s], MIX_CHANNELS, MIXING, GRID, WINDOW_ROWS, WINDOW_COLS, MASKED, WIDE_INDEX,
        )
        mixed_sum += mixed_low
        difference, mixed_centred, mean_shift, var_shift, sd_m = _mixed_statistics(
            mixed_low, base_low, mean_x, high_sum, high_squares, centred_low, borrowed_ok, eps, CHANNELS, BORROWED
        )
        # fp64 quotients of fp64 operands (d * g is exact in fp64), each rounded once.
        scale_offset = tl.full([], s, tl.int64)
        tl.store(gain_ptr + scale_offset * stride_gain_scale + flat, (sd_x / sd_m).to(ACC), mask=token_ok)
        coefficient_row = coefficients_ptr + scale_offset * stride_coefficients_scale + flat * COEFFICIENTS
        u = difference * weight[None, :] / sd_m[:, None]
        tl.store(coefficient_row[:, None] + borrowed[None, :], u.to(ACC), mask=low_mask)
        tl.store(coefficient_row + BORROWED, (var_shift / (sd_m * (sd_m + sd_x))).to(ACC), mask=token_ok)
        tl.store(coefficient_row + BORROWED + 1, (-mean_shift / sd_m).to(ACC), mask=token_ok)

    # mixed_mean: the base token's own channels are every scale's; the borrowed ones are
    # averaged and rounded once (the CLS is its own: copied).
    mean_row = mean_ptr + flat[:, None] * CHANNELS
    tl.store(
        mean_row + channels[None, :],
        base_values,
        mask=token_ok[:, None] & (high[None, :] | ((mixed_tokens == 0)[:, None] & (channels < CHANNELS)[None, :])),
    )
    mixed_mean = _narrow(_divide(mixed_sum, len(SCALES)), mean_ptr.dtype.element_ty)
    tl.store(mean_row + borrowed[None, :], mixed_mean, mask=low_mask & (mixed_tokens > 0)[:, None])


@triton.jit
def _project_mixed_forward_kernel(
    qkv_ptr,
    gain_ptr,
    coefficients_ptr,
    basis_ptr,
    phase_ptr,
    out_ptr,
    num_frames,
    num_mixed_rows,
    width,
    stride_qkv_row,
    stride_qkv_token,
    stride_qkv_channel,
    stride_gain_scale,
    stride_gain_row,
    stride_gain_token,
    stride_coefficients_scale,
    stride_coefficients_row,
    stride_coefficients_token,
    stride_coefficients_column,
    stride_basis_channel,
    stride_basis_column,
    stride_phase_clip,
    stride_phase_frame,
    stride_out_scale,
    NUM_SCALES: tl.constexpr,
    NUM_COEFFICIENTS: tl.constexpr,
    NUM_MIXED: tl.constexpr,
    GRID: tl.constexpr,
    WINDOW_ROWS: tl.constexpr,
    WINDOW_COLS: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_MODE: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Program (column block, tile of flattened mixed tokens ``r * NUM_MIXED + i``) -> ``out``
    of every scale on that tile: ``gain * qkv[r, base] + coefficients @ basis^T``.

    ``out (S, B*T, NUM_MIXED, 3D)`` is contiguous; the rest any strides. Axis 0 runs
    over column blocks so that neighbouring programs share the gathered rows in L2.
    """
    ACC: tl.constexpr = gain_ptr.dtype.element_ty
    CELLS: tl.constexpr = WINDOW_ROWS * WINDOW_COLS
    flat = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    flat_ok = flat < num_mixed_rows
    flat = tl.where(flat_ok, flat, 0)
    row = flat // NUM_MIXED
    mixed_tokens = flat % NUM_MIXED
    clip = row // num_frames
    phase = _load_phase(phase_ptr + clip * stride_phase_clip + (row % num_frames) * stride_phase_frame, CELLS)
    base = _base_tokens(mixed_tokens, phase, GRID, WINDOW_ROWS, WINDOW_COLS, MASKED)
    row = row.to(tl.int64)  # row offsets (and the output's) can pass 2**31
    flat = flat.to(tl.int64)
    columns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    column_ok = columns < width
    k_range = tl.arange(0, BLOCK_K)
    if WIDE_INDEX:
        base = base.to(tl.int64)
        mixed_tokens = mixed_tokens.to(tl.int64)
        columns = columns.to(tl.int64)
        k_range = k_range.to(tl.int64)
    tile_ok = flat_ok[:, None] & column_ok[None, :]
    base_rows = tl.load(
        qkv_ptr
        + (row * stride_qkv_row + base * stride_qkv_token)[:, None]
        + columns[None, :] * stride_qkv_channel,
        mask=tile_ok,
        other=0.0,
    ).to(ACC)  # (BM, BN): read once for every scale
    factor_rows = row * stride_gain_row + mixed_tokens * stride_gain_token
    coefficient_rows = row * stride_coefficients_row + mixed_tokens * stride_coefficients_token
    out_offsets = flat[:, None] * width + columns[None, :]
    NUM_K_BLOCKS: tl.constexpr = (NUM_COEFFICIENTS + BLOCK_K - 1) // BLOCK_K
    if NUM_K_BLOCKS == 1:  # the usual case (2I + 2 <= BLOCK_K): one basis tile for every scale
        k = k_range
        basis = tl.load(
            basis_ptr + k[:, None] * stride_basis_column + columns[None, :] * stride_basis_channel,
            mask=(k < NUM_COEFFICIENTS)[:, None] & column_ok[None, :],
            other=0.0,
        )  # (BK, BN) = basis^T tile
    for s in tl.static_range(NUM_SCALES):
        scale_offset = tl.full([], s, tl.int64)
        gain = tl.load(gain_ptr + scale_offset * stride_gain_scale + factor_rows, mask=flat_ok, other=0.0)
        # The rank-(2I + 2) correction on its own, then added to the rescaled rows once (as the
        # reference rounds): accumulated into gain * q, its terms would round at q's magnitude.
        correction = tl.full([BLOCK_M, BLOCK_N], 0, ACC)
        for kb in tl.static_range(NUM_K_BLOCKS):
            k = kb * BLOCK_K + k_range
            k_ok = k < NUM_COEFFICIENTS
            coefficients = tl.load(
                coefficients_ptr
                + scale_offset * stride_coefficients_scale
                + coefficient_rows[:, None]
                + k[None, :] * stride_coefficients_column,
                mask=flat_ok[:, None] & k_ok[None, :],
                other=0.0,
            )  # (BM, BK)
            if NUM_K_BLOCKS > 1:
                basis = tl.load(
                    basis_ptr + k[:, None] * stride_basis_column + columns[None, :] * stride_basis_channel,
                    mask=k_ok[:, None] & column_ok[None, :],
                    other=0.0,
                )
            correction = _dot_into(correction, coefficients, basis, DOT_MODE)
        tl.store(
            out_ptr + scale_offset * stride_out_scale + out_offsets,
            _narrow(gain[:, None] * base_rows + correction, out_ptr.dtype.element_ty),
            mask=tile_ok,
        )


# --------------------------------------------------------------------------
# Backward kernels
# --------------------------------------------------------------------------
#
# project_mixed: out[s, r, i] = a_{s,r,i} q[r, base(r, i)] + C_{s,r,i} @ E^T (gain a, coefficients
# C, basis E), G its upstream gradient (S, B*T, 1+N_keep, 3D). A token of frame r is the base of
# at most one mixed token (the CLS of i = 0, kept token j of i = 1 + j; masked tokens of none), so
#     dq[r, base(r, i)] = sum_s a_{s,r,i} G[s, r, i]      (zero at masked tokens: a gather, written once)
#     da_{s,r,i}        = G[s, r, i] . q[r, base(r, i)]
#     dC                = G @ E,    dE = sum_{s,r,i} G[s, r, i]^T C_{s,r,i}   (two GEMMs, torch's)
# _project_mixed_backward_kernel runs over the tokens of qkv, all columns per program (so that
# the dot products da need no cross-program sum), all scales.
#
# mix_factors: for one mixed token m (every channel), its base token x, both of D channels,
# g the LayerNorm weight, mu / sd their means and sqrt(biased variance + eps), and
# d = m - x (zero past 2I):
#     a = sd_x / sd_m,   1 - a,   k = (mu_x - mu_m) / sd_m,   u_c = d_c g_c / sd_m (c < 2I).
# With upstream gradients G_a, G_C = [gu_0 .. gu_{2I-1}, g_1a, gk] and G_mean (mixed_mean =
# mean_s m_s), the loss reads a through G_a - g_1a =: ga. Taking m and x as independent:
#     dL/dsd_m = -(ga a + gk k + sum_c gu_c u_c) / sd_m =: Gm      (a, k, u are all ~ 1/sd_m)
#     dL/dsd_x = ga / sd_m =: Gx,   dL/dmu_m = -gk / sd_m,   dL/dmu_x = gk / sd_m
# and dsd_v/dv_c = (v_c - mu_v) / (D sd_v), dmu_v/dv_c = 1 / D give
#     dL/dm_c = [c < 2I] gu_c g_c / sd_m + Gm (m_c - mu_m) / (D sd_m) - gk / (D sd_m) + G_mean_c / S
#     dL/dx_c = -[c < 2I] gu_c g_c / sd_m + Gx (x_c - mu_x) / (D sd_x) + gk / (D sd_m)
#     dL/dg_c = gu_c d_c / sd_m (c < 2I; g enters the factors nowhere else).
# Then the chain through the gather. For c >= 2I the mixed token's channel IS the base's
# (m_c = x_c), and the two terms add: the gk terms cancel,
#     dL/dx_c (c >= 2I) = Gm (x_c - mu_m) / (D sd_m) + Gx (x_c - mu_x) / (D sd_x) + G_mean_c,
# summed over scales. Written (x_c - mu_x) alpha - beta with, per scale, x_c - mu_m =
# (x_c - mu_x) - mean_shift and Gm = -ga a / sd_m + Gm_rest:
#     alpha = sum_s (Gm / sd_m + Gx / sd_x) / D = sum_s (Gm_rest / sd_m + ga var_shift / (sd_m^3 sd_x)) / D
#     beta  = sum_s Gm mean_shift / (D sd_m)
# (-a / sd_m^2 + 1 / (sd_m sd_x) = var_shift / (sd_m^3 sd_x): no cancellation as sd_m -> sd_x).
# For c < 2I, dL/dm_c goes where mix_gather read m_c from: kept token j of another frame (the
# adjoint of mix_gather on [0, 2I): one reader per scale, a few more at the clip edges under the
# release's rule), and dL/dx_c (summed over scales) to the base token itself. For the CLS
# (i = 0: m = x on every channel, a = 1, k = 0, u = 0, Gm = -Gx) everything but G_mean cancels:
#     grad_x[r, 0] = G_mean[r, 0].
# Two passes, each output element written once:
#  1. _mix_factors_backward_kernel, the forward's programs (row r, block of mixed tokens, all
#     scales; the statistics recomputed from x): grad_x[r, base, c >= 2I] (final), and into a
#     factor-dtype buffer (S + 1, B*T, 1+N_keep, 2I) the per-scale dL/dm on the borrowed channels
#     (slots 0..S-1, zero for the CLS) and the base tokens' own dL/dx there (slot S); the
#     per-program sums of dL/dg.
#  2. _mix_factors_backward_scatter_kernel, over the tokens of x (row r', token block, channel
#     block): grad_x[r', tok, c < 2I] = slot S of its mixed token + the readers' dL/dm (the same
#     gather as mix_gather's backward); masked tokens get zeros on every channel.
# The gradients of gradients are not implemented (the ops refuse them, see triton_backend).


@triton.jit
def _project_mixed_backward_kernel(
    grad_out_ptr,
    qkv_ptr,
    gain_ptr,
    phase_ptr,
    grad_qkv_ptr,
    grad_gain_ptr,
    num_frames,
    width,
    stride_grad_scale,
    stride_grad_row,
    stride_grad_token,
    stride_grad_channel,
    stride_qkv_row,
    stride_qkv_token,
    stride_qkv_channel,
    stride_gain_scale,
    stride_gain_row,
    stride_gain_token,
    stride_phase_clip,
    stride_phase_frame,
    stride_dq_row,
    stride_dq_token,
    stride_dgain_scale,
    NUM_SCALES: tl.constexpr,
    NUM_MIXED: tl.constexpr,
    GRID: tl.constexpr,
    WINDOW_ROWS: tl.constexpr,
    WINDOW_COLS: tl.constexpr,
    MASKED: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SCALES: tl.constexpr,
):
    """Program (row r, block of qkv tokens) -> ``dq[r, tok, :]`` and ``d_gain[:, r, i]`` of the
    mixed tokens based on them, looping over column blocks of ``3D``.

    ``dq (B*T, 1+N, 3D)`` contiguous, ``d_gain (S, B*T, NUM_MIXED)`` contiguous in the
    factor dtype; sums in the factor dtype, ``dq`` rounded once.
    """
    ACC: tl.constexpr = gain_ptr.dtype.element_ty
    CELLS: tl.constexpr = WINDOW_ROWS * WINDOW_COLS
    row = tl.program_id(0)
    phase = _load_phase(
        phase_ptr + (row // num_frames) * stride_phase_clip + (row % num_frames) * stride_phase_frame, CELLS
    )
    row64 = row.to(tl.int64)
    tokens = tl.program_id(1) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)  # (BT,) in [0, 1+N)
    token_ok = tokens < 1 + GRID * GRID
    kept, kept_index = _kept_rank(tl.maximum(tokens - 1, 0), phase, GRID, WINDOW_ROWS, WINDOW_COLS, MASKED)
    is_cls = tokens == 0
    is_base = token_ok & (is_cls | kept)
    mixed_tokens = tl.where(is_cls, 0, kept_index + 1)
    if WIDE_INDEX:
        tokens = tokens.to(tl.int64)
        mixed_tokens = mixed_tokens.to(tl.int64)
    scales = tl.arange(0, BLOCK_SCALES)
    scale_ok = scales < NUM_SCALES
    gains = tl.load(
        gain_ptr + scales[None, :].to(tl.int64) * stride_gain_scale + row64 * stride_gain_row
        + mixed_tokens[:, None] * stride_gain_token,
        mask=is_base[:, None] & scale_ok[None, :],
        other=0.0,
    )  # (BT, BS)
    gain_grad = tl.full([BLOCK_TOKENS, BLOCK_SCALES], 0, tl.float64)  # dot products over 3D columns
    grad_rows = grad_out_ptr + row64 * stride_grad_row + mixed_tokens * stride_grad_token  # (BT,)
    qkv_rows = qkv_ptr + row64 * stride_qkv_row + tokens * stride_qkv_token
    dq_rows = grad_qkv_ptr + row64 * stride_dq_row + tokens * stride_dq_token
    for start in range(0, width, BLOCK_N):
        columns = start + tl.arange(0, BLOCK_N)
        column_ok = columns < width
        if WIDE_INDEX:
            columns = columns.to(tl.int64)
        read = is_base[:, None] & column_ok[None, :]
        base_rows = tl.load(
            qkv_rows[:, None] + columns[None, :] * stride_qkv_channel, mask=read, other=0.0
        ).to(ACC)
        dq = tl.full([BLOCK_TOKENS, BLOCK_N], 0, ACC)
        for s in tl.static_range(NUM_SCALES):
            grad = tl.load(
                grad_rows[:, None] + tl.full([], s, tl.int64) * stride_grad_scale
                + columns[None, :] * stride_grad_channel,
                mask=read,
                other=0.0,
            ).to(ACC)
            this_scale = scales[None, :] == s
            dq += _total(tl.where(this_scale, gains, 0.0), axis=1)[:, None] * grad
            gain_grad += tl.where(this_scale, _wide_total(grad * base_rows, axis=1)[:, None], 0.0)
        tl.store(
            dq_rows[:, None] + columns[None, :],
            _narrow(dq, grad_qkv_ptr.dtype.element_ty),
            mask=token_ok[:, None] & column_ok[None, :],
        )
    tl.store(
        grad_gain_ptr + scales[None, :].to(tl.int64) * stride_dgain_scale + (row64 * NUM_MIXED + mixed_tokens)[:, None],
        gain_grad.to(ACC),
        mask=is_base[:, None] & scale_ok[None, :],
    )


@triton.jit
def _mix_factors_backward_kernel(
    x_ptr,
    ln_weight_ptr,
    phase_ptr,
    eps_ptr,
    grad_gain_ptr,
    grad_coefficients_ptr,
    grad_mean_ptr,
    grad_x_ptr,
    borrowed_grad_ptr,
    weight_grad_ptr,
    num_frames,
    stride_x_row,
    stride_x_token,
    stride_x_channel,
    stride_weight,
    stride_phase_clip,
    stride_phase_frame,
    stride_grad_gain_scale,
    stride_grad_gain_row,
    stride_grad_gain_token,
    stride_grad_coefficients_scale,
    stride_grad_coefficients_row,
    stride_grad_coefficients_token,
    stride_grad_coefficients_column,
    stride_grad_mean_row,
    stride_grad_mean_token,
    stride_grad_mean_channel,
    stride_dx_row,
    stride_dx_token,
    stride_borrowed_scale,
    SCALES: tl.constexpr,
    MIX_CHANNELS: tl.constexpr,
    MIXING: tl.constexpr,
    CHANNELS: tl.constexpr,
    BORROWED: tl.constexpr,
    NUM_MIXED: tl.constexpr,
    GRID: tl.constexpr,
    WINDOW_ROWS: tl.constexpr,
    WINDOW_COLS: tl.constexpr,
    MASKED: tl.constexpr,
    HAS_GRAD_GAIN: tl.constexpr,
    HAS_GRAD_COEFFICIENTS: tl.constexpr,
    HAS_GRAD_MEAN: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
    BLOCK_BORROWED: tl.constexpr,
):
    """Pass 1 of mix_factors' backward (see above): program (row r, block of mixed tokens).

    Writes ``dx[r, base, c >= 2I]`` (``dx`` channel stride 1), the buffer
    ``(S + 1, B*T, NUM_MIXED, 2I)`` (contiguous, factor dtype) and this program's
    ``dL/dg[:2I]`` at row ``program`` of ``weight_grad (programs, BLOCK_BORROWED)`` (fp64).
    """
    NUM_SCALES: tl.constexpr = len(SCALES)
    (
        row64, clip, frame, mixed_tokens, token_ok, base, channels, high, borrowed, borrowed_ok,
        base_values, mean_x, high_sum, high_squares, base_low, centred_low, sd_x, eps,
    ) = _factor_tile(
        x_ptr, phase_ptr, eps_ptr, num_frames, stride_x_row, stride_x_token, stride_x_channel,
        stride_phase_clip, stride_phase_frame, CHANNELS, BORROWED, NUM_MIXED, GRID, WINDOW_ROWS, WINDOW_COLS,
        MASKED, WIDE_INDEX, BLOCK_TOKENS, BLOCK_CHANNELS, BLOCK_BORROWED,
    )
    WIDE: tl.constexpr = tl.float64  # see "Precision" in the module docstring
    weight = tl.load(ln_weight_ptr + borrowed * stride_weight, mask=borrowed_ok, other=0.0).to(WIDE)
    is_cls = mixed_tokens == 0
    patch = token_ok & (mixed_tokens > 0)
    low_mask = token_ok[:, None] & borrowed_ok[None, :]
    mixed_tokens_index = mixed_tokens.to(tl.int64) if WIDE_INDEX else mixed_tokens
    mean_grad_rows = grad_mean_ptr + row64 * stride_grad_mean_row + mixed_tokens_index * stride_grad_mean_token
    if HAS_GRAD_MEAN:
        mean_grad_low = tl.load(
            mean_grad_rows[:, None] + borrowed[None, :] * stride_grad_mean_channel, mask=low_mask, other=0.0
        ).to(WIDE)
    else:
        mean_grad_low = tl.full(base_low.shape, 0, WIDE)
    gain_grad_rows = row64 * stride_grad_gain_row + mixed_tokens_index * stride_grad_gain_token
    coefficient_grad_rows = (
        grad_coefficients_ptr + row64 * stride_grad_coefficients_row
        + mixed_tokens_index * stride_grad_coefficients_token
    )
    flat = row64 * NUM_MIXED + mixed_tokens  # (BT,) int64
    borrowed_grad_rows = borrowed_grad_ptr + flat[:, None] * BORROWED + borrowed[None, :]

    inverse_d = 1.0 / tl.full([], CHANNELS, WIDE)
    base_low_grad = tl.full(base_low.shape, 0, WIDE)
    alpha = tl.full(sd_x.shape, 0, WIDE)  # per-token sums over the scales (see above), fp64
    beta = tl.full(sd_x.shape, 0, WIDE)
    weight_grad = tl.full(weight.shape, 0, WIDE)
    for s in tl.static_range(NUM_SCALES):
        scale_offset = tl.full([], s, tl.int64)
        mixed_low = _borrowed_values(
            x_ptr, phase_ptr, row64, clip, frame, num_frames, mixed_tokens, token_ok, borrowed, borrowed_ok,
            base_low, stride_x_row, stride_x_token, stride_x_channel, stride_phase_clip, stride_phase_frame,
            SCALES[s], MIX_CHANNELS, MIXING, GRID, WINDOW_ROWS, WINDOW_COLS, MASKED, WIDE_INDEX,
        )
        difference, mixed_centred, mean_shift, var_shift, sd_m = _mixed_statistics(
            mixed_low, base_low, mean_x, high_sum, high_squares, centred_low, borrowed_ok, eps, CHANNELS, BORROWED
        )
        inverse_sd_m = 1.0 / sd_m  # (BT,)
        gain = sd_x * inverse_sd_m  # a
        shift = -mean_shift * inverse_sd_m  # k

        if HAS_GRAD_GAIN:
            grad_a = tl.load(
                grad_gain_ptr + scale_offset * stride_grad_gain_scale + gain_grad_rows, mask=token_ok, other=0.0
            ).to(WIDE)
        else:
            grad_a = tl.full(sd_x.shape, 0, WIDE)
        if HAS_GRAD_COEFFICIENTS:
            coefficient_grads = coefficient_grad_rows + scale_offset * stride_grad_coefficients_scale
            grad_u = tl.load(
                coefficient_grads[:, None] + borrowed[None, :] * stride_grad_coefficients_column,
                mask=low_mask,
                other=0.0,
            ).to(WIDE)
            grad_a -= tl.load(
                coefficient_grads + BORROWED * stride_grad_coefficients_column, mask=token_ok, other=0.0
            ).to(WIDE)  # through 1 - a
            grad_k = tl.load(
                coefficient_grads + (BORROWED + 1) * stride_grad_coefficients_column, mask=token_ok, other=0.0
            ).to(WIDE)
        else:
            grad_u = tl.full(base_low.shape, 0, WIDE)
            grad_k = tl.full(sd_x.shape, 0, WIDE)

        grad_u_direct = grad_u * weight[None, :] * inverse_sd_m[:, None]  # gu g / sd_m
        # sum_c gu_c u_c = sum_c (gu_c g_c / sd_m) d_c
        grad_sd_m_rest = -(grad_k * shift + _total(grad_u_direct * difference, axis=1)) * inverse_sd_m
        grad_sd_m = grad_sd_m_rest - grad_a * gain * inverse_sd_m  # Gm
        grad_sd_x = grad_a * inverse_sd_m  # Gx
        shift_term = grad_k * inverse_sd_m * inverse_d  # gk / (D sd_m)
        # dL/dm_c on the borrowed channels.
        mixed_grad = (
            grad_u_direct
            + (grad_sd_m * inverse_sd_m * inverse_d)[:, None] * mixed_centred
            - shift_term[:, None]
            + mean_grad_low * (1.0 / tl.full([], NUM_SCALES, WIDE))
        )
        tl.store(
            borrowed_grad_rows + scale_offset * stride_borrowed_scale,
            tl.where(is_cls[:, None], 0.0, mixed_grad).to(borrowed_grad_ptr.dtype.element_ty),
            mask=low_mask,
        )
        base_low_grad += (
            -grad_u_direct + (grad_sd_x * inverse_d / sd_x)[:, None] * centred_low + shift_term[:, None]
        )
        alpha += grad_sd_m_rest * inverse_sd_m + grad_a * var_shift / (sd_m * sd_m * sd_m * sd_x)
        beta += grad_sd_m * mean_shift * inverse_sd_m
        weight_grad += _total(tl.where(patch[:, None], grad_u * difference, 0.0) * inverse_sd_m[:, None], axis=0)

    # The base tokens' own channels [2I, D): final. The CLS: G_mean on every channel.
    if HAS_GRAD_MEAN:
        mean_grad = tl.load(
            mean_grad_rows[:, None] + channels[None, :] * stride_grad_mean_channel,
            mask=token_ok[:, None] & (channels < CHANNELS)[None, :],
            other=0.0,
        ).to(WIDE)
    else:
        mean_grad = tl.full(base_values.shape, 0, WIDE)
    # (x - mu_x) alpha - beta + G_mean, once per element in fp64: alpha and beta can be large
    # (1 / sd_m^2 where sd_m << sd_x) and nearly cancel.
    own_grad = (base_values.to(WIDE) - mean_x[:, None]) * (alpha * inverse_d)[:, None] - (beta * inverse_d)[:, None]
    own_grad = tl.where(is_cls[:, None], mean_grad, own_grad + mean_grad)
    tl.store(
        grad_x_ptr + row64 * stride_dx_row + base[:, None] * stride_dx_token + channels[None, :],
        _narrow(own_grad, grad_x_ptr.dtype.element_ty),
        mask=token_ok[:, None] & high[None, :],
    )
    tl.store(
        borrowed_grad_rows + tl.full([], NUM_SCALES, tl.int64) * stride_borrowed_scale,
        tl.where(is_cls[:, None], mean_grad_low, base_low_grad).to(borrowed_grad_ptr.dtype.element_ty),
        mask=low_mask,
    )
    program = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
    tl.store(weight_grad_ptr + program.to(tl.int64) * BLOCK_BORROWED + borrowed, weight_grad)


@triton.jit
def _mix_factors_backward_scatter_kernel(
    borrowed_grad_ptr,
    phase_ptr,
    grad_x_ptr,
    num_frames,
    num_channels,
    stride_phase_clip,
    stride_phase_frame,
    stride_borrowed_scale,
    stride_dx_row,
    stride_dx_token,
    SCALES: tl.constexpr,
    MIX_CHANNELS: tl.constexpr,
    MIXING: tl.constexpr,
    BORROWED: tl.constexpr,
    NUM_MIXED: tl.constexpr,
    GRID: tl.constexpr,
    WINDOW_ROWS: tl.constexpr,
    WINDOW_COLS: tl.constexpr,
    MASKED: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_CHANNELS: tl.constexpr,
):
    """Pass 2 of mix_factors' backward: program (row r', block of x tokens, channel block) ->
    ``dx[r', tok, c]`` for ``c < 2I`` of the CLS and kept tokens, every channel of masked ones.

    A kept token ``j`` of frame ``r'`` was read (channel ``c``, scale ``s``) only by mixed
    token ``1 + j`` of frame ``r' - delta_s(c)`` (as in mix_gather's backward; under the
    release's rule the first and last frames also by the frames its clamp sends there).
    """
    NUM_SCALES: tl.constexpr = len(SCALES)
    row64, clip, frame, phase, channels, channel_ok = _program_frame(
        phase_ptr, num_frames, num_channels, stride_phase_clip, stride_phase_frame,
        WINDOW_ROWS * WINDOW_COLS, BLOCK_CHANNELS,
    )
    tokens = tl.program_id(1) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)  # (BT,) in [0, 1+N)
    token_ok = tokens < 1 + GRID * GRID
    kept, kept_index = _kept_rank(tl.maximum(tokens - 1, 0), phase, GRID, WINDOW_ROWS, WINDOW_COLS, MASKED)
    is_cls = tokens == 0
    is_base = token_ok & (is_cls | kept)
    patch = is_base & ~is_cls
    mixed_tokens = tl.where(is_cls, 0, kept_index + 1)
    if WIDE_INDEX:
        tokens = tokens.to(tl.int64)
        mixed_tokens = mixed_tokens.to(tl.int64)
    low = channel_ok & (channels < BORROWED)
    token_offsets = mixed_tokens[:, None] * BORROWED + channels[None, :]  # (BT, BC) within a row
    stride_row: tl.constexpr = NUM_MIXED * BORROWED
    total = tl.load(
        borrowed_grad_ptr + tl.full([], NUM_SCALES, tl.int64) * stride_borrowed_scale + row64 * stride_row
        + token_offsets,
        mask=is_base[:, None] & low[None, :],
        other=0.0,
    ).to(tl.float64)  # the terms summed in fp64, rounded once
    if BORROWED > 0:
        for s in tl.static_range(NUM_SCALES):
            scale_offset = tl.full([], s, tl.int64) * stride_borrowed_scale
            block_delta = _channel_delta(channels, SCALES[s], MIX_CHANNELS, MIXING)
            reader_frame = frame - block_delta
            valid = (reader_frame >= 0) & (reader_frame < num_frames) & low
            delta = tl.where(valid, block_delta, 0)
            total += tl.load(
                borrowed_grad_ptr + scale_offset + ((row64 - delta) * stride_row)[None, :] + token_offsets,
                mask=patch[:, None] & valid[None, :],
                other=0.0,
            ).to(tl.float64)
            if MIXING == 3:
                if (frame == 0) | (frame == num_frames - 1):
                    # The release's clamp: frame 0 is also read (delta = -depth) by frames
                    # 1 .. depth-1, frame T-1 (delta = +depth) by frames T-2 .. T-depth.
                    for k in tl.static_range(1, SCALES[s]):
                        below = (block_delta < 0) & (frame == 0) & (k < -block_delta)
                        above = (block_delta > 0) & (frame == num_frames - 1) & (k < block_delta)
                        extra = (below | above) & (k < num_frames) & low
                        reader_offset = tl.where(extra, tl.where(below, k, -k), 0)  # reader row - this row
                        total += tl.load(
                            borrowed_grad_ptr + scale_offset + ((row64 + reader_offset) * stride_row)[None, :]
                            + token_offsets,
                            mask=patch[:, None] & extra[None, :],
                            other=0.0,
                        ).to(tl.float64)
    tl.store(
        grad_x_ptr + row64 * stride_dx_row + tokens[:, None] * stride_dx_token + channels[None, :],
        _narrow(total, grad_x_ptr.dtype.element_ty),
        mask=token_ok[:, None] & channel_ok[None, :] & (~is_base[:, None] | low[None, :]),
    )


# --------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def factor_launch_config(channels: int, num_mixed: int) -> tuple[int, int]:
    """``(BLOCK_TOKENS, num_warps)`` of the mix_factors kernels, whose programs hold whole
    base tokens ``(BLOCK_TOKENS, next_pow2(D))``.

    GPU: up to 4096 elements per program (D = 768 -> 4 tokens of 1024 lanes, 32 fp32
    registers per thread on 4 warps, 8 warps past 2048 lanes), the token block the
    largest power of two that pads ``1 + N_keep`` by at most 1/16 (99 -> 4).
    Not autotuned (bench/stca.py's "kernel" rows are the measurement to tune against).
    Interpreter: one program per row.
    """
    block_channels = _next_power_of_two(max(1, channels))
    num_mixed = max(1, num_mixed)
    if interpreting():
        return min(_next_power_of_two(num_mixed), max(1, 2**16 // block_channels)), 1
    block_tokens = min(_next_power_of_two(num_mixed), max(1, 4096 // block_channels))
    while block_tokens > 1 and (-num_mixed % block_tokens) * 16 > num_mixed:
        block_tokens //= 2
    return block_tokens, 4 if block_channels <= 2048 else 8


def projection_launch_config(width: int, num_coefficients: int, num_mixed_rows: int, dot_mode: int):
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps)`` of the project_mixed forward.

    GPU, by the dot's kind (sizes that compile for sm_90 without spilling, 4 warps;
    checked by tests/test_shared_projection_triton.py):
    bf16 / fp16 split dots 64 x 64 x 64 (wgmma m64n64k16; the three dots and the
    float32 rows of qkv held across the scales fill ~200 registers);
    fp64 32 x 64 x 64 (DMMA); fp32 ``ieee`` 32 x 32 x 32 (FMA, no tensor cores: larger
    tiles spill). ``BLOCK_K`` holds all ``2I + 2`` coefficients up to that size (ViT-B/16:
    50 -> 64, one dot per scale), at least 16 (``tl.dot``'s minimum).
    Interpreter: one program for up to 2**16 output elements per scale.
    """
    coefficients = max(16, _next_power_of_two(num_coefficients))
    if interpreting():
        block_n = max(16, min(_next_power_of_two(width), 4096))
        block_m = max(16, min(_next_power_of_two(num_mixed_rows), 2**16 // block_n))
        return block_m, block_n, coefficients, 1
    block_m, block_n, block_k = {
        DOT_BFLOAT16_SPLIT: (64, 64, 64),
        DOT_FLOAT16_SPLIT: (64, 64, 64),
        DOT_FLOAT64: (32, 64, 64),
        DOT_FLOAT32: (32, 32, 32),
    }[dot_mode]
    return block_m, max(16, min(block_n, _next_power_of_two(width))), min(block_k, coefficients), 4


def projection_backward_launch_config(width: int, num_tokens: int, factor: torch.dtype) -> tuple[int, int, int]:
    """``(BLOCK_TOKENS, BLOCK_N, num_warps)`` of the project_mixed backward: mix_gather's rule
    (:func:`~stdd_kernels.triton_mix_gather.launch_config`) over ``3D`` columns, whose
    ``(tokens, columns)`` tiles (qkv rows, their gradient, the upstream gradient) are in the
    factor dtype; fp64 tiles take half the columns (no spills on sm_90)."""
    block_tokens, block_n, num_warps = launch_config(width, num_tokens)
    if factor == torch.float64 and not interpreting():
        block_n = max(16, block_n // 2)
    return block_tokens, block_n, num_warps


def _factor_dtype_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_factor_tensor(tensor: torch.Tensor, name: str, dtype: torch.dtype, shape) -> None:
    if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must be a {dtype} tensor of shape {tuple(shape)}, got {tensor.dtype} "
                         f"{tuple(tensor.shape)}")


def scratch_buffer(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An internal buffer the kernels fill before reading it (tests swap in NaN-filled ones)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _eps_tensor(eps: float, dtype: torch.dtype, device) -> torch.Tensor:
    # A tensor, not a kernel argument: Triton passes Python floats as fp32, and the fp64
    # statistics need eps to fp64's precision.
    return torch.full((1,), float(eps), dtype=dtype, device=device)


def _factor_constants(geometry: STCAGeometry, channels: int) -> dict:
    return dict(
        SCALES=tuple(geometry.scales),
        MIX_CHANNELS=geometry.mix_channels,
        MIXING={"none": 0, "separate": 1, "continual": 2, "official": 3}[geometry.mixing],
        CHANNELS=channels,
        BORROWED=geometry.borrowed_channels,
        NUM_MIXED=1 + geometry.num_kept,
        BLOCK_CHANNELS=_next_power_of_two(channels),
        BLOCK_BORROWED=_next_power_of_two(max(1, geometry.borrowed_channels)),
        **_geometry_constants(geometry),
    )


def mix_factors_forward(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    phase: torch.Tensor,
    geometry: STCAGeometry,
    eps: float,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x (B*T, 1+N, D)``, ``ln_weight (D,)`` in the factor dtype, any strides ->
    ``(gain (S, B*T, 1+N_keep), coefficients (S, B*T, 1+N_keep, 2I+2), mixed_mean (B*T, 1+N_keep, D))``,
    contiguous (the caller's ``out`` triple when given)."""
    rows, _, channels = x.shape
    factor = _factor_dtype_of(x.dtype)
    _check_factor_tensor(ln_weight, "ln_weight", factor, (channels,))
    num_scales, num_mixed, borrowed = len(geometry.scales), 1 + geometry.num_kept, geometry.borrowed_channels
    like = torch.empty(0, dtype=factor, device=x.device)
    out = (None, None, None) if out is None else out
    gain = output_buffer(out[0], (num_scales, rows, num_mixed), like, "out[0]")
    coefficients = output_buffer(out[1], (num_scales, rows, num_mixed, borrowed + 2), like, "out[1]")
    mixed_mean = output_buffer(out[2], (rows, num_mixed, channels), x, "out[2]")
    if rows == 0:
        return gain, coefficients, mixed_mean
    block_tokens, num_warps = factor_launch_config(channels, num_mixed)
    grid = (rows, triton.cdiv(num_mixed, block_tokens))
    with on_device(x):
        _mix_factors_forward_kernel[grid](
            x,
            ln_weight,
            phase,
            _eps_tensor(eps, factor, x.device),
            gain,
            coefficients,
            mixed_mean,
            geometry.num_frames,
            *x.stride(),
            ln_weight.stride(0),
            *phase.stride(),
            gain.stride(0),
            coefficients.stride(0),
            WIDE_INDEX=needs_wide_index(x),
            BLOCK_TOKENS=block_tokens,
            num_warps=num_warps,
            **_factor_constants(geometry, channels),
        )
    return gain, coefficients, mixed_mean


def _dot_mode(factor: torch.dtype, dtype: torch.dtype) -> int:
    if factor == torch.float64:
        return DOT_FLOAT64
    return {torch.bfloat16: DOT_BFLOAT16_SPLIT, torch.float16: DOT_FLOAT16_SPLIT}.get(dtype, DOT_FLOAT32)


def project_mixed_forward(
    qkv: torch.Tensor,
    gain: torch.Tensor,
    coefficients: torch.Tensor,
    basis: torch.Tensor,
    phase: torch.Tensor,
    geometry: STCAGeometry,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``qkv (B*T, 1+N, 3D)``, ``gain (S, B*T, 1+N_keep)``, ``coefficients (S, B*T, 1+N_keep, K)``,
    ``basis (3D, K)`` (factor dtype: float32 or float64), any strides ->
    ``(S, B*T, 1+N_keep, 3D)`` in ``qkv``'s dtype, contiguous (the caller's ``out`` when given)."""
    rows, _, width = qkv.shape
    num_mixed = 1 + geometry.num_kept
    factor = gain.dtype
    if factor not in FACTOR_DTYPES or gain.dim() != 3 or tuple(gain.shape[1:]) != (rows, num_mixed):
        raise ValueError(f"gain must be a float32 or float64 tensor of shape (S, {rows}, {num_mixed}), "
                         f"got {gain.dtype} {tuple(gain.shape)}")
    num_scales = gain.shape[0]
    num_coefficients = coefficients.shape[-1] if coefficients.dim() == 4 else -1
    _check_factor_tensor(coefficients, "coefficients", factor, (num_scales, rows, num_mixed, max(num_coefficients, 0)))
    _check_factor_tensor(basis, "basis", factor, (width, num_coefficients))
    result = output_buffer(out, (num_scales, rows, num_mixed, width), qkv, "out")
    if result.numel() == 0:
        return result
    num_mixed_rows = rows * num_mixed
    dot_mode = _dot_mode(factor, qkv.dtype)
    block_m, block_n, block_k, num_warps = projection_launch_config(width, num_coefficients, num_mixed_rows, dot_mode)
    grid = (triton.cdiv(width, block_n), triton.cdiv(num_mixed_rows, block_m))
    with on_device(qkv):
        _project_mixed_forward_kernel[grid](
            qkv,
            gain,
            coefficients,
            basis,
            phase,
            result,
            geometry.num_frames,
            num_mixed_rows,
            width,
            *qkv.stride(),
            *gain.stride(),
            *coefficients.stride(),
            *basis.stride(),
            *phase.stride(),
            result.stride(0),
            NUM_SCALES=num_scales,
            NUM_COEFFICIENTS=num_coefficients,
            NUM_MIXED=num_mixed,
            DOT_MODE=dot_mode,
            WIDE_INDEX=needs_wide_index(qkv, gain, coefficients),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            num_warps=num_warps,
            **_geometry_constants(geometry),
        )
    return result


def project_mixed_backward(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    gain: torch.Tensor,
    coefficients: torch.Tensor,
    basis: torch.Tensor,
    phase: torch.Tensor,
    geometry: STCAGeometry,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``grad_out (S, B*T, 1+N_keep, 3D)`` any strides -> ``(grad_qkv, grad_gain, grad_coefficients,
    grad_basis)``, shaped and typed like ``qkv``, ``gain``, ``coefficients``, ``basis``.

    ``grad_qkv`` and ``grad_gain`` come from one kernel pass (into the caller's ``out`` pair
    when given); the two GEMMs ``grad_out @ basis`` and ``grad_out^T @ coefficients`` are
    torch's, on ``grad_out`` in the factor dtype.
    """
    num_scales, rows, num_mixed, width = grad_out.shape
    factor = gain.dtype
    out = (None, None) if out is None else out
    grad_qkv = output_buffer(out[0], qkv.shape, qkv, "out[0]")
    grad_gain = output_buffer(out[1], gain.shape, gain, "out[1]")
    if grad_qkv.numel() > 0:
        num_tokens = qkv.shape[1]
        block_tokens, block_n, num_warps = projection_backward_launch_config(width, num_tokens, factor)
        grid = (rows, triton.cdiv(num_tokens, block_tokens))
        with on_device(qkv):
            _project_mixed_backward_kernel[grid](
                grad_out,
                qkv,
                gain,
                phase,
                grad_qkv,
                grad_gain,
                geometry.num_frames,
                width,
                *grad_out.stride(),
                *qkv.stride(),
                *gain.stride(),
                *phase.stride(),
                grad_qkv.stride(0),
                grad_qkv.stride(1),
                grad_gain.stride(0),
                NUM_SCALES=num_scales,
                NUM_MIXED=num_mixed,
                WIDE_INDEX=needs_wide_index(grad_out, qkv, gain, grad_qkv),
                BLOCK_TOKENS=block_tokens,
                BLOCK_N=block_n,
                BLOCK_SCALES=_next_power_of_two(num_scales),
                num_warps=num_warps,
                **_geometry_constants(geometry),
            )
    grad_flat = grad_out.to(factor).reshape(-1, width)  # (S * B*T * (1+N_keep), 3D)
    num_coefficients = coefficients.shape[-1]
    grad_coefficients = (grad_flat @ basis).view(num_scales, rows, num_mixed, num_coefficients)
    grad_basis = grad_flat.T @ coefficients.reshape(-1, num_coefficients)
    return grad_qkv, grad_gain, grad_coefficients, grad_basis


def mix_factors_backward(
    grad_gain: torch.Tensor | None,
    grad_coefficients: torch.Tensor | None,
    grad_mixed_mean: torch.Tensor | None,
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    phase: torch.Tensor,
    geometry: STCAGeometry,
    eps: float,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream gradients of ``(gain, coefficients, mixed_mean)`` (any strides; ``None`` = zero)
    -> ``(grad_x (B*T, 1+N, D) contiguous (``out`` when given), grad_ln_weight (D,))``.

    Two passes (see the comment above the backward kernels); the statistics are
    recomputed from ``x``, nothing of the forward is saved.
    """
    rows, num_tokens, channels = x.shape
    factor = _factor_dtype_of(x.dtype)
    _check_factor_tensor(ln_weight, "ln_weight", factor, (channels,))
    num_scales, num_mixed, borrowed = len(geometry.scales), 1 + geometry.num_kept, geometry.borrowed_channels
    grad_x = output_buffer(out, x.shape, x, "out")
    grad_weight = torch.zeros(channels, dtype=factor, device=x.device)
    if rows == 0:
        return grad_x, grad_weight
    block_tokens, num_warps = factor_launch_config(channels, num_mixed)
    grid = (rows, triton.cdiv(num_mixed, block_tokens))
    constants = _factor_constants(geometry, channels)
    # Never empty (mixing="none" borrows nothing: every access is masked, but a kernel
    # argument should still point at memory).
    borrowed_grad = scratch_buffer((num_scales + 1, rows, num_mixed, max(borrowed, 1)), factor, x.device)
    # Per-program sums of dL/dg in fp64, summed here and rounded once.
    weight_partial = scratch_buffer((grid[0] * grid[1], constants["BLOCK_BORROWED"]), torch.float64, x.device)
    # An absent gradient is never read; x stands in as a valid pointer, with zero strides.
    grad_gain_arg = x if grad_gain is None else grad_gain
    grad_coefficients_arg = x if grad_coefficients is None else grad_coefficients
    grad_mean_arg = x if grad_mixed_mean is None else grad_mixed_mean
    with on_device(x):
        _mix_factors_backward_kernel[grid](
            x,
            ln_weight,
            phase,
            _eps_tensor(eps, factor, x.device),
            grad_gain_arg,
            grad_coefficients_arg,
            grad_mean_arg,
            grad_x,
            borrowed_grad,
            weight_partial,
            geometry.num_frames,
            *x.stride(),
            ln_weight.stride(0),
            *phase.stride(),
            *(grad_gain.stride() if grad_gain is not None else (0, 0, 0)),
            *(grad_coefficients.stride() if grad_coefficients is not None else (0, 0, 0, 0)),
            *(grad_mixed_mean.stride() if grad_mixed_mean is not None else (0, 0, 0)),
            grad_x.stride(0),
            grad_x.stride(1),
            borrowed_grad.stride(0),
            HAS_GRAD_GAIN=grad_gain is not None,
            HAS_GRAD_COEFFICIENTS=grad_coefficients is not None,
            HAS_GRAD_MEAN=grad_mixed_mean is not None,
            WIDE_INDEX=needs_wide_index(x, grad_gain, grad_coefficients, grad_mixed_mean, grad_x),
            BLOCK_TOKENS=block_tokens,
            num_warps=num_warps,
            **constants,
        )
        scatter_tokens, block_channels, scatter_warps = launch_config(channels, num_tokens)
        _mix_factors_backward_scatter_kernel[(rows, triton.cdiv(num_tokens, scatter_tokens),
                                              triton.cdiv(channels, block_channels))](
            borrowed_grad,
            phase,
            grad_x,
            geometry.num_frames,
            channels,
            *phase.stride(),
            borrowed_grad.stride(0),
            grad_x.stride(0),
            grad_x.stride(1),
            SCALES=constants["SCALES"],
            MIX_CHANNELS=constants["MIX_CHANNELS"],
            MIXING=constants["MIXING"],
            BORROWED=borrowed,
            NUM_MIXED=num_mixed,
            WIDE_INDEX=needs_wide_index(grad_x, borrowed_grad),
            BLOCK_TOKENS=scatter_tokens,
            BLOCK_CHANNELS=block_channels,
            num_warps=scatter_warps,
            **_geometry_constants(geometry),
        )
    grad_weight[:borrowed] = weight_partial[:, :borrowed].sum(dim=0).to(factor)
    return grad_x, grad_weight
