"""Plain PyTorch definition of the STCA operators: the ground truth.

Read side by side with ``docs/stca.md`` (the op contract); each section below
is named after the step of the contract it implements:

1. Window-shift masking  -> :func:`kept_cells`, :func:`kept_token_index`
2. Multi-scale channel mixing -> :func:`channel_segments`, :func:`mix_gather`
3. Attention on both paths -> lives in the model block (``stdd.model``); these
   ops are the data movement before and after it.
4. Padding and short-cut -> :func:`pad_scatter`

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
    table = _kept_token_table(geometry.grid, geometry.window, geometry.masked)
    return table.to(phase.device)[phase.reshape(-1).long()]


@lru_cache(maxsize=64)
def _kept_token_table(grid: int, window: tuple[int, int], masked: int) -> torch.Tensor:
    """``table[o, j]``: token index of kept token ``j`` for phase ``o`` (CPU, int64)."""
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
    return table


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
    """
    I = mix_channels
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


def mix_gather(x: torch.Tensor, phase: torch.Tensor, geometry: STCAGeometry) -> torch.Tensor:
    """WSM + MCM: ``x (B*T, 1+N, D)`` -> ``mixed (n_scales, B*T, 1+N_keep, D)``.

    ``mixed[s, b*T+t, 1+j, ch] = x[b*T + t + delta_s(ch), kept_j(t + delta_s(ch)), ch]``,
    zero when ``t + delta`` is outside ``[0, T)``; token 0 (CLS) is ``x``'s own.
    """
    rows, _, channels = x.shape
    T = geometry.num_frames
    kept = kept_token_index(phase, geometry)  # (B*T, N_keep)
    row = torch.arange(rows, device=x.device)
    frame = row % T  # t of every row
    per_scale = []
    for scale in geometry.scales:
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
    offset ``i_b`` per clip, and with ``shuffle`` a random permutation of each
    clip's frame phases. Random draws use ``generator`` on the CPU, so a seeded
    generator gives the same phases on every device.
    """
    if mode == "eval":
        frames = torch.arange(num_frames, dtype=torch.int64, device=device)
        return (frames % cells).unsqueeze(0).expand(batch, num_frames).contiguous()
    # "train"
    frames = torch.arange(num_frames, dtype=torch.int64)
    offset = torch.randint(0, cells, (batch, 1), generator=generator, dtype=torch.int64)
    phase = (frames.unsqueeze(0) + offset) % cells
    if shuffle:
        order = torch.argsort(torch.rand(batch, num_frames, generator=generator), dim=1)
        phase = torch.gather(phase, 1, order)
    return phase.to(device) if device is not None else phase
