"""Plain PyTorch definition of the STCA operators: the ground truth.

Read side by side with ``docs/stca.md`` (the op contract); each section below
is named after the step of the contract it implements:

1. Window-shift masking  -> :func:`kept_cells`, :func:`kept_token_index`
2. Multi-scale channel mixing -> :func:`channel_segments`, :func:`mix_gather`;
   the authors' release's rule (``mixing="official"``) -> :func:`official_source_frames`
3. Attention on both paths -> lives in the model block (``stdd.model``); these
   ops are the data movement before and after it.
4. Padding and short-cut -> :func:`pad_scatter`
6. Shared projections (step 3 from the full path's projections) -> :func:`mix_factors`,
   :func:`projection_basis`, :func:`project_mixed`

Slow and obvious on purpose. Everything here is differentiable by autograd;
every fast path (Triton, C++/CUDA) is tested against these functions.

The functions take an already validated :class:`~stdd_kernels.geometry.STCAGeometry`
and phase tensor; the public, validating entry points are
``stdd_kernels.mix_gather`` / ``stdd_kernels.pad_scatter``.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .geometry import STCAGeometry

# --------------------------------------------------------------------------
# Step 1: window-shift masking (WSM)
# --------------------------------------------------------------------------


def kept_cells(phase: int, cells: int, masked: int) -> list[int]:
    """Cells ``c`` of a window that a frame with phase ``o`` keeps, ascending.

    The spec: a frame masks cell ``c`` iff ``(c - o) mod K < m``.
    With ``K=4, m=2``: phase 0 keeps [2, 3], 1 keeps [0, 3], 2 keeps [0, 1],
    3 keeps [1, 2].
    """
    return [c for c in range(cells) if (c - phase) % cells >= masked]


def kept_token_index(phase: torch.Tensor, geometry: STCAGeometry) -> torch.Tensor:
    """Token index (into ``1 + N`` tokens) of every kept token of every frame.

    ``phase``: ``(B, T)`` ints in ``[0, K)``. Returns int64 ``(B*T, N_keep)``:
    entry ``[b*T + t, j]`` is the token that kept token ``j`` of frame ``t`` of
    clip ``b`` reads. Per the spec, kept token ``j`` lies in window
    ``w = j // (K - m)`` (windows row-major) at the ``k = j mod (K - m)``-th
    kept cell ``c`` of the frame's phase; its patch is at grid row
    ``(w // (P/w2)) * w1 + c // w2`` and column ``(w mod (P/w2)) * w2 + c mod w2``.
    """
    table = _kept_token_table(geometry.grid, geometry.window, geometry.masked, phase.device)
    # Any integer phase is reduced mod K (negative ones too), as every backend does: an
    # unchecked out-of-range phase (validate=False) gives the result of its residue.
    return table[phase.reshape(-1).long().remainder(geometry.cells)]


def base_token_index(phase: torch.Tensor, geometry: STCAGeometry) -> torch.Tensor:
    """Token index of the *base token* of every mixed token: int64 ``(B*T, 1 + N_keep)``.

    Mixed token 0 of a frame is its CLS (token 0), mixed token ``1 + j`` stands for
    kept token ``j`` (:func:`kept_token_index`): the frame's own token that a mixed
    token equals on every channel it does not borrow (section 6 of the contract).
    """
    kept = kept_token_index(phase, geometry)
    return torch.cat([kept.new_zeros(kept.shape[0], 1), kept], dim=1)


@lru_cache(maxsize=64)
def _kept_token_table(grid: int, window: tuple[int, int], masked: int, device: torch.device) -> torch.Tensor:
    """``table[o, j]``: token index of kept token ``j`` for phase ``o`` (int64, on ``device``)."""
    w1, w2 = window
    cells = w1 * w2
    per_window = cells - masked
    windows_per_row = grid // w2
    num_kept = (grid // w1) * windows_per_row * per_window
    table = torch.empty(cells, num_kept, dtype=torch.int64)
    for o in range(cells):
        cells_o = kept_cells(o, cells, masked)
        for j in range(num_kept):
            w, k = divmod(j, per_window)
            c = cells_o[k]
            row = (w // windows_per_row) * w1 + c // w2
            col = (w % windows_per_row) * w2 + c % w2
            table[o, j] = 1 + row * grid + col
    return table.to(device)


# --------------------------------------------------------------------------
# Step 2: multi-scale channel mixing (MCM)
# --------------------------------------------------------------------------


def channel_segments(
    channels: int, mix_channels: int, scale: int, mixing: str
) -> list[tuple[int, int, int]]:
    """Split ``[0, D)`` into ``(start, stop, delta)``: channels that read frame ``t + delta``.

    - continual (Eq. 6), block width ``h = I // s``: block ``q`` of ``[0, I)``
      reads ``t - (s - q)``, block ``q`` of ``[I, 2I)`` reads ``t + q + 1``;
    - separate (Eq. 5): ``[0, I)`` reads ``t - s``, ``[I, 2I)`` reads ``t + s``;
    - none: every channel is the frame's own.
    Channels ``[2I, D)`` are always the frame's own (``delta = 0``).
    The release's rule (``"official"``) has no such split: its source frame
    depends on the frame as well, see :func:`official_source_frames`.
    """
    I = mix_channels
    if mixing == "official":
        raise ValueError("official mixing reads frame-dependent sources: use official_source_frames")
    if mixing == "none":
        return [(0, channels, 0)]
    if mixing == "separate":
        segments = [(0, I, -scale), (I, 2 * I, scale)]
    elif mixing == "continual":
        h = I // scale
        segments = [(q * h, (q + 1) * h, -(scale - q)) for q in range(scale)]
        segments += [(I + q * h, I + (q + 1) * h, q + 1) for q in range(scale)]
    else:
        raise ValueError(f"unknown mixing {mixing!r}")
    if 2 * I < channels:
        segments.append((2 * I, channels, 0))
    return segments


def official_source_frames(num_frames: int, mix_channels: int, scale: int) -> list[list[int | None]]:
    """The authors' release's mixing rule for one scale, read literally (spec section 5).

    Returns ``table[t][ch]`` for ``t < T`` and ``ch < 2I``: the frame whose kept
    token channel ``ch`` of frame ``t`` takes, ``None`` where no step writes it
    (the value stays 0). Channels ``[2I, D)`` are the frame's own. The release
    fills a zero buffer in steps ``i = 0 .. s-1`` with ``d_i = I >> i``:
    channels ``[0, d_i)`` from frame ``t - (i+1)`` for every ``t >= i+1``, and
    channels ``[2I - d_i, 2I)`` from frame ``t + (i+1)`` for every
    ``t <= T-2-i``, each step overwriting the earlier ones.
    """
    T, I = num_frames, mix_channels
    table: list[list[int | None]] = [[None] * (2 * I) for _ in range(T)]
    for i in range(scale):
        width = I >> i  # d_i
        for t in range(T):
            if t >= i + 1:
                for ch in range(width):
                    table[t][ch] = t - (i + 1)
            if t <= T - 2 - i:
                for ch in range(2 * I - width, 2 * I):
                    table[t][ch] = t + (i + 1)
    return table


def _official_source_offsets(T: int, channels: int, mix_channels: int, scale: int, device) -> torch.Tensor:
    """``(T, D)`` int64: ``source frame - t`` of every channel of every frame, or ``-T`` (never
    a valid offset) where the value is zero; from :func:`official_source_frames`."""
    table = official_source_frames(T, mix_channels, scale)
    offsets = torch.zeros(T, channels, dtype=torch.int64)  # [2I, D): the frame's own
    for t, sources in enumerate(table):
        offsets[t, : len(sources)] = torch.tensor([-T if s is None else s - t for s in sources], dtype=torch.int64)
    return offsets.to(device)


def mix_gather(x: torch.Tensor, phase: torch.Tensor, geometry: STCAGeometry) -> torch.Tensor:
    """WSM + MCM: ``x (B*T, 1+N, D)`` -> ``mixed (n_scales, B*T, 1+N_keep, D)``.

    ``mixed[s, b*T+t, 1+j, ch] = x[b*T + t + delta_s(ch), kept_j(t + delta_s(ch)), ch]``,
    zero when ``t + delta`` is outside ``[0, T)``; token 0 (CLS) is ``x``'s own.
    For the release's rule (``mixing="official"``) the source frame of a
    channel also depends on ``t``: :func:`official_source_frames`.
    """
    rows, _, channels = x.shape
    T = geometry.num_frames
    kept = kept_token_index(phase, geometry)  # (B*T, N_keep)
    row = torch.arange(rows, device=x.device)
    frame = row % T  # t of every row
    per_scale = []
    for scale in geometry.scales:
        if geometry.mixing == "official":
            offsets = _official_source_offsets(T, channels, geometry.mix_channels, scale, x.device)[frame]  # (B*T, D)
            inside = offsets > -T
            source_row = torch.where(inside, row.unsqueeze(1) + offsets, row.unsqueeze(1))  # (B*T, D)
            tokens = kept[source_row].transpose(1, 2)  # (B*T, N_keep, D): kept token j of each source frame
            channel = torch.arange(channels, device=x.device)
            values = x[source_row.unsqueeze(1), tokens, channel]  # (B*T, N_keep, D)
            patches = torch.where(inside.unsqueeze(1), values, torch.zeros_like(values))
            per_scale.append(torch.cat([x[:, :1, :], patches], dim=1))
            continue
        pieces = []
        for start, stop, delta in channel_segments(
            channels, geometry.mix_channels, scale, geometry.mixing
        ):
            source_frame = frame + delta
            inside = (source_frame >= 0) & (source_frame < T)  # zero at clip boundaries
            source_row = torch.where(inside, row + delta, row)  # any valid row when outside
            tokens = kept[source_row]  # kept token j of the source frame
            values = x[source_row.unsqueeze(1), tokens, start:stop]  # (B*T, N_keep, stop-start)
            pieces.append(torch.where(inside.view(-1, 1, 1), values, torch.zeros_like(values)))
        patches = torch.cat(pieces, dim=-1)
        per_scale.append(torch.cat([x[:, :1, :], patches], dim=1))  # CLS copied unmixed
    return torch.stack(per_scale, dim=0)


# --------------------------------------------------------------------------
# Step 4: padding and short-cut
# --------------------------------------------------------------------------


def pad_scatter(
    full: torch.Tensor,
    mixed: torch.Tensor,
    phase: torch.Tensor,
    geometry: STCAGeometry,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Padding: ``full (B*T, 1+N, D)``, ``mixed (S, B*T, 1+N_keep, D)`` -> ``(B*T, 1+N, D)``.

    ``avg`` is the mean of ``mixed`` over scales. The result equals ``full``
    except token 0, which is ``avg[:, 0]``, and the kept patch tokens, which are
    ``avg[:, 1 + j]`` at the position of kept token ``j`` (step 1). With a
    ``residual`` the short-cut add ``pad + residual`` is part of the op.
    """
    average = mixed.mean(dim=0)  # (B*T, 1+N_keep, D)
    kept = kept_token_index(phase, geometry)  # (B*T, N_keep)
    row = torch.arange(full.shape[0], device=full.device).unsqueeze(1)
    pad = full.clone()
    pad[:, 0] = average[:, 0]
    pad[row, kept] = average[:, 1:]
    if residual is not None:
        pad = pad + residual
    return pad


# --------------------------------------------------------------------------
# Section 6: shared projections (step 3 computed from the full path's work)
# --------------------------------------------------------------------------


def factor_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the per-token factors of section 6: float64 for float64 tokens, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mix_factors(
    x: torch.Tensor, ln_weight: torch.Tensor, phase: torch.Tensor, geometry: STCAGeometry, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What every mixed token's projection needs beyond its base token's.

    ``x (B*T, 1+N, D)``, ``ln_weight (D,)`` (the LayerNorm's ``g``) -> ``(gain, coefficients, mixed_mean)``:

    - ``gain (S, B*T, 1+N_keep)``: ``a = sd_x / sd_m``;
    - ``coefficients (S, B*T, 1+N_keep, 2I + 2)``: ``[(m - x)[:2I] * g[:2I] / sd_m, 1 - a, k]`` with
      ``k = (mu_x - mu_m) / sd_m``;
    - ``mixed_mean (B*T, 1+N_keep, D)``: the mean over scales of the mixed tokens, ``x``'s dtype;

    ``m`` a mixed token (:func:`mix_gather`), ``x`` its base token (:func:`base_token_index`),
    ``mu``, ``sd`` their LayerNorm statistics (``sd`` with ``eps``); ``2I`` is
    ``geometry.borrowed_channels`` (0 without mixing). ``gain`` and ``coefficients`` are in
    :func:`factor_dtype`. Then ``qkv(m) = gain * qkv(x) + coefficients @ basis.T`` for the
    :func:`projection_basis` of the same LayerNorm and projection (:func:`project_mixed`).
    Written the obvious way: the mixed tokens are gathered and their statistics taken.
    """
    dtype = factor_dtype(x.dtype)
    borrowed = geometry.borrowed_channels
    mixed = mix_gather(x, phase, geometry)  # (S, B*T, 1+N_keep, D)
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    base = x[rows, base_token_index(phase, geometry)].to(dtype)  # (B*T, 1+N_keep, D)
    mixed_wide = mixed.to(dtype)
    var_x, mu_x = torch.var_mean(base, dim=-1, unbiased=False, keepdim=True)
    var_m, mu_m = torch.var_mean(mixed_wide, dim=-1, unbiased=False, keepdim=True)
    sd_x, sd_m = (var_x + eps).sqrt(), (var_m + eps).sqrt()
    gain = sd_x / sd_m
    shift = (mu_x - mu_m) / sd_m
    borrowed_part = (mixed_wide[..., :borrowed] - base[..., :borrowed]) * ln_weight[:borrowed].to(dtype) / sd_m
    coefficients = torch.cat([borrowed_part, 1 - gain, shift], dim=-1)
    return gain.squeeze(-1), coefficients, mixed.mean(dim=0)


def projection_basis(
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor | None,
    borrowed_channels: int,
) -> torch.Tensor:
    """``(3D, 2I + 2)``: ``[W[:, :2I], W b + c, W g]`` for ``qkv(v) = W LN(v) + c``, ``LN(v) = (v - mu) / sd * g + b``.

    In the dtype of ``in_proj_weight``; the caller picks it (:func:`factor_dtype`).
    """
    weight = in_proj_weight
    offset, scale = (weight @ torch.stack([ln_bias, ln_weight], dim=1).to(weight.dtype)).unbind(1)  # one read of W
    if in_proj_bias is not None:
        offset = offset + in_proj_bias.to(weight.dtype)
    return torch.cat([weight[:, :borrowed_channels], offset.unsqueeze(1), scale.unsqueeze(1)], dim=1)


def project_mixed(
    qkv: torch.Tensor,
    gain: torch.Tensor,
    coefficients: torch.Tensor,
    basis: torch.Tensor,
    phase: torch.Tensor,
    geometry: STCAGeometry,
) -> torch.Tensor:
    """The mixed tokens' projections from the full path's: ``(S, B*T, 1+N_keep, 3D)`` in ``qkv``'s dtype.

    ``qkv (B*T, 1+N, 3D)`` the full path's projections, ``gain``, ``coefficients`` of
    :func:`mix_factors`, ``basis (3D, 2I + 2)`` of :func:`projection_basis`:
    ``out[s, r, i] = gain[s, r, i] * qkv[r, base(r, i)] + coefficients[s, r, i] @ basis.T``
    (computed in the factors' dtype, rounded once to ``qkv``'s).
    """
    rows = torch.arange(qkv.shape[0], device=qkv.device).unsqueeze(1)
    # Widened before the gather, so that the gradient of a row read by several scales is
    # summed in the factors' dtype and rounded once to qkv's (as the fused kernels do).
    base = qkv.to(gain.dtype)[rows, base_token_index(phase, geometry)]  # (B*T, 1+N_keep, 3D)
    out = gain.unsqueeze(-1) * base + coefficients @ basis.to(gain.dtype).T
    return out.to(qkv.dtype)


# --------------------------------------------------------------------------
# Phases (step 1, "Default phase" and "Training may randomize")
# --------------------------------------------------------------------------


def mask_phase(
    batch: int,
    num_frames: int,
    cells: int,
    *,
    mode: str = "eval",
    generator: torch.Generator | None = None,
    shuffle: bool = False,
    device=None,
) -> torch.Tensor:
    """Per-frame phases ``(B, T)`` int64 in ``[0, K)``.

    eval: ``phase[b, t] = t mod K``. train: ``(t + i_b) mod K`` with a random
    offset ``i_b`` per clip. With ``shuffle`` (either mode; the authors'
    release, ``docs/stca.md``) a random permutation of each clip's frame phases
    follows. Random draws use ``generator`` on the CPU, so a seeded generator
    gives the same phases on every device.
    """
    if mode == "eval" and not shuffle:
        frames = torch.arange(num_frames, dtype=torch.int64, device=device)
        return (frames % cells).unsqueeze(0).expand(batch, num_frames).contiguous()
    frames = torch.arange(num_frames, dtype=torch.int64)
    if mode == "eval":
        phase = (frames % cells).unsqueeze(0).expand(batch, num_frames)
    else:  # "train"
        offset = torch.randint(0, cells, (batch, 1), generator=generator, dtype=torch.int64)
        phase = (frames.unsqueeze(0) + offset) % cells
    if shuffle:
        order = torch.argsort(torch.rand(batch, num_frames, generator=generator), dim=1)
        phase = torch.gather(phase, 1, order)
    return phase.to(device) if device is not None else phase
