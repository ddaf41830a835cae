"""The reference STCA ops against the op contract (docs/stca.md), element by element.

Inputs encode where each element lives: ``x[row, token, ch] = code(row, token, ch)``
(exact in float64), so every output element names the input element it came
from. Expected outputs are computed by a loop-by-loop reading of the spec
written independently of ``stdd_kernels/reference.py`` (no shared helpers),
plus literal cases worked out by hand from the spec's text.
"""

from __future__ import annotations

import re

import pytest
import torch

import stdd_kernels
from stdd_kernels import reference


def code(row: int, token: int, channel: int) -> float:
    return row * 1_000_000 + token * 1_000 + channel


def encoded(rows: int, tokens: int, channels: int, scale: float = 1.0) -> torch.Tensor:
    r = torch.arange(rows, dtype=torch.float64).view(-1, 1, 1)
    t = torch.arange(tokens, dtype=torch.float64).view(1, -1, 1)
    c = torch.arange(channels, dtype=torch.float64).view(1, 1, -1)
    return (r * 1_000_000 + t * 1_000 + c) * scale


# ---------------------------------------------------------------------------
# An independent, loop-by-loop reading of the spec.
# ---------------------------------------------------------------------------


def spec_kept_tokens(phase: int, grid: int, window, mask_ratio, mask_rounding="nearest") -> list[int]:
    """Spec step 1, literally: kept cells ascending, windows row-major."""
    w1, w2 = window
    K = w1 * w2
    m = round(mask_ratio * K) if mask_rounding == "nearest" else int(mask_ratio * K)
    kept = [c for c in range(K) if not ((c - phase) % K < m)]
    tokens = []
    for wr in range(grid // w1):
        for wc in range(grid // w2):
            for c in kept:
                row = wr * w1 + c // w2
                col = wc * w2 + c % w2
                tokens.append(1 + row * grid + col)
    return tokens


def spec_source_offset(ch: int, D: int, fold: int, s: int, mixing: str) -> int:
    """Spec step 2: which neighbour frame (t + delta) channel ``ch`` reads."""
    I = D // fold
    if mixing == "none" or ch >= 2 * I:
        return 0
    if mixing == "separate":
        return -s if ch < I else s
    width = I // s
    if ch < I:
        q = ch // width
        return -(s - q)
    q = (ch - I) // width
    return q + 1


def spec_official_source(t: int, ch: int, T: int, D: int, fold: int, s: int):
    """Spec section 5, element by element: the frame channel ``ch`` of frame ``t`` reads
    after the release's steps i = 0 .. s-1 (later ones overwrite), or None (zero)."""
    I = D // fold
    if ch >= 2 * I:
        return t
    source = None
    for i in range(s):
        d = I >> i
        if ch < d and t >= i + 1:
            source = t - (i + 1)
        if 2 * I - d <= ch < 2 * I and t <= T - 2 - i:
            source = t + (i + 1)
    return source


def spec_mix_gather(x, T, phase, window, mask_ratio, scales, fold, mixing, mask_rounding="nearest"):
    rows, tokens, D = x.shape
    grid = int(round((tokens - 1) ** 0.5))
    kept = {
        (b, t): spec_kept_tokens(int(phase[b][t]), grid, window, mask_ratio, mask_rounding)
        for b in range(rows // T)
        for t in range(T)
    }
    n_keep = len(kept[(0, 0)])
    out = torch.zeros(len(scales), rows, 1 + n_keep, D, dtype=x.dtype)
    for si, s in enumerate(scales):
        for b, t in kept:
            out[si, b * T + t, 0] = x[b * T + t, 0]
            for ch in range(D):
                if mixing == "official":
                    src = spec_official_source(t, ch, T, D, fold, s)
                    if src is None:
                        continue  # stays 0
                else:
                    src = t + spec_source_offset(ch, D, fold, s, mixing)
                if not 0 <= src < T:
                    continue  # stays 0
                for j in range(n_keep):
                    out[si, b * T + t, 1 + j, ch] = x[b * T + src, kept[(b, src)][j], ch]
    return out


def spec_pad_scatter(full, mixed, T, phase, window, mask_ratio, residual=None, mask_rounding="nearest"):
    rows, tokens, D = full.shape
    grid = int(round((tokens - 1) ** 0.5))
    avg = mixed.mean(0)
    out = full.clone()
    for r in range(rows):
        b, t = divmod(r, T)
        out[r, 0] = avg[r, 0]
        for j, token in enumerate(spec_kept_tokens(int(phase[b][t]), grid, window, mask_ratio, mask_rounding)):
            out[r, token] = avg[r, 1 + j]
    if residual is not None:
        out = out + residual
    return out


# ---------------------------------------------------------------------------
# Literal cases from the spec's text.
# ---------------------------------------------------------------------------


def test_kept_cells_match_the_spec_table():
    # "t%4=0 keeps cells {2,3}; 1 keeps {0,3}; 2 keeps {0,1}; 3 keeps {1,2}"
    assert [reference.kept_cells(o, 4, 2) for o in range(4)] == [[2, 3], [0, 3], [0, 1], [1, 2]]
    # mask_ratio 0 keeps everything; window (2,1): K=2, m=1
    assert reference.kept_cells(3, 4, 0) == [0, 1, 2, 3]
    assert [reference.kept_cells(o, 2, 1) for o in range(2)] == [[1], [0]]


def test_kept_token_positions_by_hand_4x4_grid():
    geometry = stdd_kernels.geometry.make_geometry(
        num_tokens=17, channels=8, rows=4, num_frames=4, window=(2, 2), mask_ratio=0.5,
        scales=(1,), channel_fold=4, mixing="continual", tensor_name="x",
    )
    index = reference.kept_token_index(torch.tensor([[0, 1, 2, 3]]), geometry)
    # Tokens 1..16 are the 4x4 grid row-major; windows: (rows 0-1, cols 0-1), (0-1, 2-3), (2-3, 0-1), (2-3, 2-3).
    assert index[0].tolist() == [5, 6, 7, 8, 13, 14, 15, 16]  # phase 0 keeps cells 2, 3 (bottom row of each window)
    assert index[1].tolist() == [1, 6, 3, 8, 9, 14, 11, 16]  # phase 1 keeps cells 0, 3 (diagonal)
    assert index[2].tolist() == [1, 2, 3, 4, 9, 10, 11, 12]  # phase 2 keeps cells 0, 1 (top row)
    assert index[3].tolist() == [2, 5, 4, 7, 10, 13, 12, 15]  # phase 3 keeps cells 1, 2 (anti-diagonal)


def test_continual_and_separate_channel_blocks_by_hand():
    # D=64, channel_fold=8 -> I=8. Scale 1: [0,8) from t-1, [8,16) from t+1.
    segs = reference.channel_segments(64, 8, 1, "continual")
    assert segs == [(0, 8, -1), (8, 16, 1), (16, 64, 0)]
    # Scale 2, h=4: [0,4) t-2, [4,8) t-1, [8,12) t+1, [12,16) t+2.
    segs = reference.channel_segments(64, 8, 2, "continual")
    assert segs == [(0, 4, -2), (4, 8, -1), (8, 12, 1), (12, 16, 2), (16, 64, 0)]
    assert reference.channel_segments(64, 8, 2, "separate") == [(0, 8, -2), (8, 16, 2), (16, 64, 0)]
    assert reference.channel_segments(64, 8, 2, "none") == [(0, 64, 0)]


def test_mix_gather_default_config_literal_elements():
    T, D = 4, 64  # one clip, 4x4 grid, I = 64 // 8 = 8
    x = encoded(T, 17, D)
    mixed = stdd_kernels.mix_gather(x, T, channel_fold=8, backend="reference")
    assert mixed.shape == (2, T, 9, D)
    # CLS is each frame's own, every channel, every scale.
    assert torch.equal(mixed[:, :, 0], x[:, 0].expand(2, T, D))
    # Scale 1 (index 0), frame 1, kept token 0, channel 0 reads frame 0's kept token 0 (token 5).
    assert mixed[0, 1, 1, 0].item() == code(0, 5, 0)
    # ... channel 8 reads frame 2's kept token 0 (phase 2: token 1).
    assert mixed[0, 1, 1, 8].item() == code(2, 1, 8)
    # ... channel 16 (beyond 2I) is frame 1's own kept token 0 (phase 1: token 1).
    assert mixed[0, 1, 1, 16].item() == code(1, 1, 16)
    # Scale 2, frame 2, kept token 1: ch 0 <- frame 0 (token 6), ch 4 <- frame 1 (token 6),
    # ch 8 <- frame 3 (phase 3, kept token 1 = token 5), ch 12 <- frame 4: outside the clip -> 0.
    assert mixed[1, 2, 2, 0].item() == code(0, 6, 0)
    assert mixed[1, 2, 2, 4].item() == code(1, 6, 4)
    assert mixed[1, 2, 2, 8].item() == code(3, 5, 8)
    assert mixed[1, 2, 2, 12].item() == 0.0
    # Frame 0 has no past: scale 1 channels [0, 8) are zero.
    assert torch.all(mixed[0, 0, 1:, :8] == 0)


def test_pad_scatter_literal_elements():
    T, D = 4, 8
    full = encoded(T, 17, D)
    mixed = torch.stack([-encoded(T, 9, D), -3 * encoded(T, 9, D)])  # mean = -2 * code
    pad = stdd_kernels.pad_scatter(full, mixed, T, backend="reference")
    assert pad[0, 0, 3].item() == -2 * code(0, 0, 3)  # CLS from the mixed path
    assert pad[0, 5, 3].item() == -2 * code(0, 1, 3)  # frame 0 (phase 0) kept token 0 sits at token 5
    assert pad[0, 1, 3].item() == code(0, 1, 3)  # token 1 is masked in frame 0: the full path's
    assert pad[1, 1, 3].item() == -2 * code(1, 1, 3)  # ... but kept (token 0) in frame 1
    residual = torch.ones_like(full)
    with_residual = stdd_kernels.pad_scatter(full, mixed, T, residual=residual, backend="reference")
    assert torch.equal(with_residual, pad + 1)


# ---------------------------------------------------------------------------
# Every element, many configurations, against the loop-by-loop spec.
# ---------------------------------------------------------------------------

CASES = [
    # (B, T, grid, D, window, mask_ratio, scales, fold, mixing, phase_mode)
    (1, 4, 4, 64, (2, 2), 0.5, (1, 2), 8, "continual", "eval"),  # default config, small grid
    (2, 8, 4, 32, (2, 2), 0.5, (1, 2), 4, "continual", "eval"),
    (2, 3, 4, 16, (2, 1), 0.5, (1, 2), 4, "continual", "train"),  # window (2,1)
    (2, 3, 6, 12, (2, 2), 0.5, (1,), 4, "continual", "train"),  # scales (1,), grid 6
    (1, 5, 4, 24, (2, 2), 0.5, (2,), 6, "continual", "eval"),  # scales (2,)
    (1, 8, 4, 16, (2, 2), 0.5, (1, 2, 4), 2, "continual", "train"),  # scales (1,2,4): I=8
    (2, 3, 4, 20, (2, 2), 0.5, (1, 2), 4, "separate", "train"),  # separate mixing; I=5 (odd)
    (3, 1, 4, 16, (2, 2), 0.5, (1, 2), 4, "continual", "eval"),  # T=1: every neighbour outside
    (2, 2, 4, 16, (2, 2), 0.5, (1, 2), 4, "continual", "train"),  # T=2
    (1, 3, 4, 16, (2, 2), 0.0, (1, 2), 4, "continual", "eval"),  # mask_ratio 0: all kept
    (2, 3, 4, 16, (2, 2), 0.25, (1,), 4, "none", "train"),  # no mixing, m=1
    (1, 4, 6, 18, (3, 3), 0.5, (1, 3), 3, "continual", "train"),  # window 3x3: K=9, m=4 (round(4.5)=4)
    # The release's rule (spec section 5): T = 1, 2, 3, 4, 8; I not divisible by the scales.
    (2, 1, 4, 16, (2, 2), 0.5, (1, 2), 4, "official", "train"),  # T=1: all mixed channels zero
    (1, 2, 4, 24, (2, 1), 0.5, (1, 2, 3), 3, "official", "train"),  # T=2, I=8: d = 8, 4, 2
    (2, 3, 4, 20, (2, 2), 0.5, (2,), 4, "official", "train"),  # T=3, I=5: d = 5, 2
    (1, 4, 6, 26, (2, 2), 0.5, (1, 3), 2, "official", "eval"),  # T=4, I=13: d = 13, 6, 3
    (2, 8, 4, 18, (2, 1), 0.5, (3,), 2, "official", "train"),  # T=8, I=9: d = 9, 4, 2
    (1, 5, 4, 16, (2, 2), 0.5, (1,), 4, "official", "train"),  # scale 1: continual's table
]
# (B, T, grid, D, window, mask_ratio, mask_rounding, scales, fold, mixing): the release's floor.
FLOOR_CASES = [
    (2, 4, 4, 16, (2, 2), 0.4, "floor", (1, 2), 4, "official"),  # K=4: floor(1.6) = 1 masked, 3 kept
    (1, 3, 6, 12, (3, 3), 0.4, "floor", (1,), 3, "continual"),  # K=9: floor(3.6) = 3 masked, 6 kept
    (1, 3, 6, 12, (3, 3), 0.4, "nearest", (1,), 3, "continual"),  # ... round(3.6) = 4
]


def _phase(B, T, window, mode, seed):
    generator = torch.Generator().manual_seed(seed)
    return stdd_kernels.mask_phase(B, T, window=window, mode=mode, generator=generator, shuffle=(mode == "train"))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}P{}D{}w{}r{}s{}F{}{}{}".format(*c))
def test_mix_gather_and_pad_scatter_match_spec_everywhere(case):
    B, T, grid, D, window, ratio, scales, fold, mixing, mode = case
    x = encoded(B * T, 1 + grid * grid, D)
    phase = _phase(B, T, window, mode, seed=sum(map(ord, str(case))))
    kwargs = dict(window=window, mask_ratio=ratio, phase=phase)
    mixed = stdd_kernels.mix_gather(
        x, T, scales=scales, channel_fold=fold, mixing=mixing, backend="reference", **kwargs
    )
    expected = spec_mix_gather(x, T, phase.tolist(), window, ratio, scales, fold, mixing)
    assert mixed.shape == expected.shape
    assert torch.equal(mixed, expected)

    full = encoded(B * T, 1 + grid * grid, D, scale=-1.0)
    mixed_in = torch.randn(mixed.shape, dtype=torch.float64)
    residual = torch.randn(full.shape, dtype=torch.float64)
    for res in (None, residual):
        pad = stdd_kernels.pad_scatter(full, mixed_in, T, residual=res, backend="reference", **kwargs)
        want = spec_pad_scatter(full, mixed_in, T, phase.tolist(), window, ratio, res)
        torch.testing.assert_close(pad, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", FLOOR_CASES, ids=lambda c: "B{}T{}P{}D{}w{}r{}{}s{}F{}{}".format(*c))
def test_mask_rounding_matches_spec_everywhere(case):
    B, T, grid, D, window, ratio, rounding, scales, fold, mixing = case
    x = encoded(B * T, 1 + grid * grid, D)
    phase = _phase(B, T, window, "train", seed=sum(map(ord, str(case))))
    kwargs = dict(window=window, mask_ratio=ratio, mask_rounding=rounding, phase=phase, backend="reference")
    mixed = stdd_kernels.mix_gather(x, T, scales=scales, channel_fold=fold, mixing=mixing, **kwargs)
    K = window[0] * window[1]
    kept_per_window = K - {("floor", 4): 1, ("floor", 9): 3, ("nearest", 9): 4}[(rounding, K)]
    assert mixed.shape[2] == 1 + (grid // window[0]) * (grid // window[1]) * kept_per_window
    expected = spec_mix_gather(x, T, phase.tolist(), window, ratio, scales, fold, mixing, rounding)
    assert torch.equal(mixed, expected)
    full = encoded(B * T, 1 + grid * grid, D, scale=-1.0)
    pad = stdd_kernels.pad_scatter(full, mixed, T, **kwargs)
    torch.testing.assert_close(
        pad, spec_pad_scatter(full, mixed, T, phase.tolist(), window, ratio, None, rounding), rtol=0, atol=0
    )


def test_masked_cells_rounding_by_hand():
    masked_cells = stdd_kernels.geometry.masked_cells
    # Equal where mask_ratio * K is whole or its fraction is below one half ...
    assert masked_cells((2, 2), 0.5) == masked_cells((2, 2), 0.5, "floor") == 2
    assert masked_cells((2, 2), 0.6) == masked_cells((2, 2), 0.6, "floor") == 2  # 2.4
    assert masked_cells((3, 3), 0.5) == masked_cells((3, 3), 0.5, "floor") == 4  # 4.5: half to even
    # ... different above.
    assert (masked_cells((2, 2), 0.4), masked_cells((2, 2), 0.4, "floor")) == (2, 1)  # 1.6
    assert (masked_cells((2, 2), 0.7), masked_cells((2, 2), 0.7, "floor")) == (3, 2)  # 2.8
    assert (masked_cells((3, 3), 0.4), masked_cells((3, 3), 0.4, "floor")) == (4, 3)  # 3.6
    assert masked_cells((2, 1), 0.25, "floor") == 0 and masked_cells((2, 2), 0.0, "floor") == 0
    # Floor keeps a cell where round-to-nearest would mask them all.
    assert masked_cells((2, 2), 0.9, "floor") == 3
    with pytest.raises(ValueError, match="masks all 4 cells"):
        masked_cells((2, 2), 0.9)
    with pytest.raises(ValueError, match="mask_rounding must be one of"):
        masked_cells((2, 2), 0.5, "ceil")


# ---------------------------------------------------------------------------
# The release's mixing rule (spec section 5): hand-worked tables, closed form.
# ---------------------------------------------------------------------------

# Worked out by hand from the rule for I = 4 (d_i = 4, 2, 1 for i = 0, 1, 2), channels 0..7:
# for each T and scale, one line per frame t, "left half | right half", each digit the frame
# that channel reads, "-" where no step writes it (zero).
HAND_TABLES = {
    (1, 1): ["---- ----"],
    (1, 2): ["---- ----"],
    (1, 3): ["---- ----"],
    (2, 1): ["---- 1111", "0000 ----"],
    (2, 2): ["---- 1111", "0000 ----"],
    (2, 3): ["---- 1111", "0000 ----"],
    (3, 1): ["---- 1111", "0000 2222", "1111 ----"],
    (3, 2): ["---- 1122", "0000 2222", "0011 ----"],
    (3, 3): ["---- 1122", "0000 2222", "0011 ----"],
    (4, 1): ["---- 1111", "0000 2222", "1111 3333", "2222 ----"],
    (4, 2): ["---- 1122", "0000 2233", "0011 3333", "1122 ----"],
    (4, 3): ["---- 1123", "0000 2233", "0011 3333", "0122 ----"],
    (8, 1): ["---- 1111", "0000 2222", "1111 3333", "2222 4444",
             "3333 5555", "4444 6666", "5555 7777", "6666 ----"],
    (8, 2): ["---- 1122", "0000 2233", "0011 3344", "1122 4455",
             "2233 5566", "3344 6677", "4455 7777", "5566 ----"],
    (8, 3): ["---- 1123", "0000 2234", "0011 3345", "0122 4456",
             "1233 5567", "2344 6677", "3455 7777", "4566 ----"],
}


def _parse_hand_table(lines):
    return [[None if c == "-" else int(c) for c in line.replace(" ", "")] for line in lines]


@pytest.mark.parametrize("frames,scale", sorted(HAND_TABLES), ids=lambda v: str(v))
def test_official_source_frames_hand_tables(frames, scale):
    expected = _parse_hand_table(HAND_TABLES[(frames, scale)])
    assert reference.official_source_frames(frames, 4, scale) == expected
    # The public op reads exactly those frames: one clip, eval phases, every kept token.
    D = 12  # I = 12 // 3 = 4; channels [8, 12) the frame's own
    x = encoded(frames, 17, D)
    mixed = stdd_kernels.mix_gather(x, frames, scales=(scale,), channel_fold=3, mixing="official", backend="reference")
    phase = reference.mask_phase(1, frames, 4)[0].tolist()
    for t in range(frames):
        for ch in range(D):
            source = expected[t][ch] if ch < 8 else t
            for j in range(8):
                want = 0.0 if source is None else code(source, spec_kept_tokens(phase[source], 4, (2, 2), 0.5)[j], ch)
                assert mixed[0, t, 1 + j, ch].item() == want, (t, ch, j)


def test_official_scale_one_is_continual_and_scale_two_differs_only_at_the_clip_edges():
    """Spec section 5's own summary, on a random input with I = 8 (h = I/2 = 4)."""
    D, fold, B = 40, 5, 2
    for T in (1, 2, 3, 4, 5, 8):
        x = torch.randn(B * T, 17, D, dtype=torch.float64)
        phase = _phase(B, T, (2, 2), "train", seed=T)
        kwargs = dict(scales=(1, 2), channel_fold=fold, phase=phase, backend="reference")
        official = stdd_kernels.mix_gather(x, T, mixing="official", **kwargs)
        continual = stdd_kernels.mix_gather(x, T, mixing="continual", **kwargs)
        assert torch.equal(official[0], continual[0])
        differs = (official[1] != continual[1]).view(B, T, -1, D)
        frames = differs.any(dim=(0, 2, 3)).nonzero().view(-1).tolist()
        channels = differs.any(dim=(0, 1, 2)).nonzero().view(-1).tolist()
        assert frames == sorted({1, T - 2} & set(range(T))), T  # T=2: both edges are frames 1 and 0
        assert set(channels) <= set(range(4)) | set(range(12, 16)), T
        if T >= 2:
            first, last = torch.arange(B) * T + 1, torch.arange(B) * T + T - 2
            # t = 1: channels [0, I/2) read frame 0 (continual: zero), as scale 1's [0, I) do;
            assert torch.all(continual[1][first, 1:, :4] == 0)
            assert torch.equal(official[1][first, 1:, :4], official[0][first, 1:, :4])
            # t = T-2: channels [3I/2, 2I) read frame T-1 (continual: zero).
            assert torch.all(continual[1][last, 1:, 12:16] == 0)
            assert torch.equal(official[1][last, 1:, 12:16], official[0][last, 1:, 12:16])


def closed_form_source(t: int, ch: int, T: int, I: int, s: int):
    """The closed form the Triton and C++/CUDA kernels evaluate (docs/stca.md): the channel's
    block depth, the number of the release's steps i < s whose block covers it, clamped at
    the clip edge; None (zero) at the first frame for [0, I) and the last for [I, 2I)."""
    c = ch if ch < I else 2 * I - 1 - ch
    depth = sum(1 for i in range(s) if c < I >> i)
    assert depth == min(s, (I // (c + 1)).bit_length())  # the same count, by a formula
    if ch < I:
        return t - min(depth, t) if t >= 1 else None
    return t + min(depth, T - 1 - t) if t <= T - 2 else None


def closed_form_readers(t: int, ch: int, T: int, I: int, s: int) -> list[int]:
    """The frames whose channel ``ch`` reads frame ``t`` (the kernels' backward): one,
    ``t - delta``, and at the clip edges the frames whose clamped reads land there."""
    c = ch if ch < I else 2 * I - 1 - ch
    depth = sum(1 for i in range(s) if c < I >> i)
    if ch < I:
        if t == 0:
            return list(range(1, min(depth, T - 1) + 1))
        return [t + depth] if t + depth < T else []
    if t == T - 1:
        return list(range(max(0, T - 1 - depth), T - 1))
    return [t - depth] if t - depth >= 0 else []


def test_official_closed_form_equals_the_literal_rule():
    """Exhaustive over I <= 40, every valid scale, T <= 10: forward sources and backward readers."""
    for I in range(1, 41):
        for s in range(1, I.bit_length() + 1):
            for T in range(1, 11):
                table = reference.official_source_frames(T, I, s)
                for t in range(T):
                    for ch in range(2 * I):
                        assert closed_form_source(t, ch, T, I, s) == table[t][ch], (I, s, T, t, ch)
                        readers = [r for r in range(T) if table[r][ch] == t]
                        assert closed_form_readers(t, ch, T, I, s) == readers, (I, s, T, t, ch)


def test_official_mixing_validation():
    x = torch.zeros(4, 17, 64)  # I = 64 // 8 = 8: blocks 8, 4, 2, 1 for scales up to 4
    mixed = stdd_kernels.mix_gather(x, 4, scales=(1, 3, 4), channel_fold=8, mixing="official")
    assert mixed.shape == (3, 4, 9, 64)  # I need not be divisible by the scales
    with pytest.raises(ValueError, match=re.escape("scale 5 in scales=(1, 5)")) as error:
        stdd_kernels.mix_gather(x, 4, scales=(1, 5), channel_fold=8, mixing="official")
    assert "would equal scale 4" in str(error.value)
    with pytest.raises(ValueError, match="channel_fold"):
        stdd_kernels.mix_gather(x, 4, channel_fold=128, mixing="official")  # I = 0
    with pytest.raises(ValueError, match="channel_fold"):
        stdd_kernels.mix_gather(x, 4, channel_fold=1, mixing="official")  # 2I > D
    with pytest.raises(ValueError, match="mask_rounding"):
        stdd_kernels.mix_gather(x, 4, channel_fold=8, mask_rounding="up")
    with pytest.raises(ValueError, match="mask_rounding"):
        stdd_kernels.pad_scatter(x, torch.zeros(2, 4, 9, 64), 4, mask_rounding=None)


def test_mask_ratio_zero_and_no_mixing_is_a_permutation_that_pad_scatter_undoes():
    """With every cell kept and no mixing, gather then scatter returns the input exactly."""
    B, T = 2, 3
    x = torch.randn(B * T, 1 + 36, 10, dtype=torch.float64)
    phase = _phase(B, T, (2, 2), "train", seed=1)
    kwargs = dict(window=(2, 2), mask_ratio=0.0, phase=phase, backend="reference")
    mixed = stdd_kernels.mix_gather(x, T, scales=(1, 2), mixing="none", **kwargs)
    assert torch.equal(mixed[0], mixed[1])
    assert torch.equal(torch.sort(mixed[0], dim=1).values, torch.sort(x, dim=1).values)
    assert torch.equal(stdd_kernels.pad_scatter(torch.zeros_like(x), mixed, T, **kwargs), x)


def test_every_patch_is_kept_by_exactly_k_minus_m_phases():
    """Over the K phases each cell is kept K - m times: the masking shifts uniformly."""
    geometry = stdd_kernels.geometry.make_geometry(
        num_tokens=37, channels=4, rows=9, num_frames=9, window=(3, 3), mask_ratio=0.5,
        scales=(1,), channel_fold=4, mixing="none", tensor_name="x",
    )
    index = reference.kept_token_index(torch.arange(9).view(1, 9), geometry)
    counts = torch.bincount(index.flatten(), minlength=37)
    assert counts[0] == 0 and torch.all(counts[1:] == geometry.kept_per_window)
    for row in index:  # within a frame no token is taken twice
        assert len(set(row.tolist())) == geometry.num_kept


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mixing", ["continual", "separate", "official"])
def test_gradcheck_mix_gather(mixing):
    B, T, D = 2, 3, 8
    x = torch.randn(B * T, 17, D, dtype=torch.float64, requires_grad=True)
    phase = _phase(B, T, (2, 2), "train", seed=3)
    assert torch.autograd.gradcheck(
        lambda t: stdd_kernels.mix_gather(
            t, T, scales=(1, 2), channel_fold=4, phase=phase, mixing=mixing, backend="reference"
        ),
        (x,),
    )


def test_gradcheck_pad_scatter_all_inputs():
    B, T, D = 2, 3, 5
    full = torch.randn(B * T, 17, D, dtype=torch.float64, requires_grad=True)
    mixed = torch.randn(2, B * T, 9, D, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(B * T, 17, D, dtype=torch.float64, requires_grad=True)
    phase = _phase(B, T, (2, 2), "train", seed=4)
    assert torch.autograd.gradcheck(
        lambda f, m, r: stdd_kernels.pad_scatter(f, m, T, phase=phase, residual=r, backend="reference"),
        (full, mixed, residual),
    )


# ---------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------


def test_mask_phase_eval_and_train():
    assert stdd_kernels.mask_phase(2, 6).tolist() == [[0, 1, 2, 3, 0, 1]] * 2
    assert stdd_kernels.mask_phase(1, 3, window=(2, 1)).tolist() == [[0, 1, 0]]
    a = stdd_kernels.mask_phase(64, 8, mode="train", generator=torch.Generator().manual_seed(7))
    b = stdd_kernels.mask_phase(64, 8, mode="train", generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.dtype == torch.int64 and a.shape == (64, 8)
    # (t + i_b) mod K: consecutive frames step by one; the offsets differ between clips.
    assert torch.all((a[:, 1:] - a[:, :-1]) % 4 == 1)
    assert len(set(a[:, 0].tolist())) > 1
    shuffled = stdd_kernels.mask_phase(
        64, 8, mode="train", generator=torch.Generator().manual_seed(7), shuffle=True
    )
    assert torch.equal(torch.sort(shuffled, 1).values, torch.sort(a, 1).values)
    assert not torch.equal(shuffled, a)


def test_mask_phase_release_training_and_evaluation_phases():
    """The release's phases (spec section 5): per-clip offset or t mod K, then a random
    per-clip permutation; reproducible from a seeded generator, fresh with every draw."""
    B, T, K = 64, 8, 4
    train = stdd_kernels.mask_phase(B, T, mode="train", generator=torch.Generator().manual_seed(3), shuffle=True)
    frames = torch.arange(T)
    for clip in train:
        offsets = [o for o in range(K) if sorted(((frames + o) % K).tolist()) == sorted(clip.tolist())]
        assert offsets, clip  # a permutation of (t + o) mod K for some offset o
    generator = torch.Generator().manual_seed(3)
    evaluation = stdd_kernels.mask_phase(B, T, mode="eval", generator=generator, shuffle=True)
    assert torch.equal(torch.sort(evaluation, 1).values, torch.sort(frames % K).values.expand(B, T))
    assert len({tuple(clip.tolist()) for clip in evaluation}) > B // 2  # permuted per clip
    assert not torch.equal(evaluation, stdd_kernels.mask_phase(B, T))
    again = stdd_kernels.mask_phase(B, T, mode="eval", generator=torch.Generator().manual_seed(3), shuffle=True)
    assert torch.equal(again, evaluation)
    # A second draw from the same generator (another block, another forward) is a new one.
    assert not torch.equal(stdd_kernels.mask_phase(B, T, mode="eval", generator=generator, shuffle=True), evaluation)
    assert stdd_kernels.mask_phase(B, T, mode="eval", generator=generator, shuffle=True, device="meta").device.type == "meta"


def test_gradcheck_official_mixing_deep_scales_at_the_clip_edges():
    """Scales (2, 3) over T = 4: edge frames are read by several frames through the clamp."""
    B, T, D = 1, 4, 12  # I = 4: blocks 4, 2, 1
    x = torch.randn(B * T, 5, D, dtype=torch.float64, requires_grad=True)
    phase = _phase(B, T, (2, 2), "train", seed=5)
    assert torch.autograd.gradcheck(
        lambda t: stdd_kernels.mix_gather(
            t, T, scales=(2, 3), channel_fold=3, phase=phase, mixing="official", backend="reference"
        ),
        (x,),
    )


def test_official_gradient_counts_the_readers_by_hand():
    """sum(mixed).backward(): each x element's gradient is the number of reads of it."""
    T = 4
    x = torch.zeros(T, 5, 12, dtype=torch.float64, requires_grad=True)  # 2x2 grid, window (2, 1)
    phase = torch.zeros(1, T, dtype=torch.int64)  # every frame keeps cell 1: tokens 3, 4
    mixed = stdd_kernels.mix_gather(
        x, T, scales=(3,), channel_fold=3, window=(2, 1), phase=phase, mixing="official", backend="reference"
    )
    mixed.sum().backward()
    grad = x.grad[:, 3]  # (T, D) at a kept token
    # From the T=4, s=3 hand table: channel 0 of frame 0 is read by frames 1, 2 and 3 (and
    # no other frame is read); channel 1: frames 1, 2 read frame 0, frame 3 reads frame 1;
    # channel 7 of frame 3 is read by frames 0, 1, 2.
    assert grad[:, 0].tolist() == [3, 0, 0, 0]
    assert grad[:, 1].tolist() == [2, 1, 0, 0]
    assert grad[:, 7].tolist() == [0, 0, 0, 3]
    assert grad[:, 8:].eq(1).all()  # own channels
    assert torch.all(x.grad[:, 1:3] == 0)  # masked tokens: read by nobody


# ---------------------------------------------------------------------------
# Invalid arguments: ValueError naming the argument
# ---------------------------------------------------------------------------


def _x(rows=4, tokens=17, channels=64, dtype=torch.float32):
    return torch.zeros(rows, tokens, channels, dtype=dtype)


INVALID_MIX = [
    (dict(x=_x(tokens=16)), "1 + P*P"),  # no square grid
    (dict(x=_x(tokens=37), window=(4, 4)), "window"),  # 6 not divisible by 4
    (dict(x=_x(), window=(2,)), "window"),
    (dict(x=_x(), window=(0, 2)), "window"),
    (dict(x=_x(), scales=(1, 3), channel_fold=8), "scale 3"),  # I=8 not divisible by 3
    (dict(x=_x(), scales=()), "scales"),
    (dict(x=_x(), scales=(1, 1)), "scales"),
    (dict(x=_x(), scales=(0,)), "scales"),
    (dict(x=_x(), channel_fold=0), "channel_fold"),
    (dict(x=_x(), channel_fold=128), "channel_fold"),  # I = 0
    (dict(x=_x(), channel_fold=1), "channel_fold"),  # 2I > D
    (dict(x=_x(), mixing="shift"), "mixing"),
    (dict(x=_x(), mask_ratio=1.0), "mask_ratio"),
    (dict(x=_x(), mask_ratio=-0.1), "mask_ratio"),
    (dict(x=_x(), mask_ratio=0.9), "mask_ratio"),  # round(3.6) = 4 = K: nothing kept
    (dict(x=_x(rows=6)), "num_frames"),  # 6 rows, 4 frames
    (dict(x=_x(), num_frames=0), "num_frames"),
    (dict(x=_x(dtype=torch.int32)), "x must be float"),
    (dict(x=_x()[0]), "x must have 3 dimensions"),
    (dict(x=_x(), phase=torch.full((1, 4), 4)), "phase values"),
    (dict(x=_x(), phase=torch.full((1, 4), -1)), "phase values"),
    (dict(x=_x(), phase=torch.zeros(2, 4, dtype=torch.int64)), "phase must have shape"),
    (dict(x=_x(), phase=torch.zeros(1, 4)), "phase must have an integer dtype"),
    (dict(x=_x(), phase=[[0, 1, 2, 3]]), "phase must be an integer torch.Tensor"),
    (dict(x=_x(), phase=torch.zeros(1, 4, dtype=torch.int64, device="meta")), "phase is on meta"),
    (dict(x=_x(), backend="no-such-backend"), "backend='no-such-backend'"),
]


@pytest.mark.parametrize("kwargs,message", INVALID_MIX)
def test_mix_gather_rejects_invalid_arguments(kwargs, message):
    kwargs = dict(kwargs)
    x = kwargs.pop("x")
    num_frames = kwargs.pop("num_frames", 4)
    kwargs.setdefault("channel_fold", 8)
    with pytest.raises(ValueError, match=re.escape(message)):
        stdd_kernels.mix_gather(x, num_frames, **kwargs)


def test_pad_scatter_rejects_invalid_arguments():
    full, mixed = _x(), torch.zeros(2, 4, 9, 64)
    cases = [
        (dict(mixed=torch.zeros(2, 4, 10, 64)), "mixed must have shape"),
        (dict(mixed=torch.zeros(0, 4, 9, 64)), "at least one scale"),
        (dict(mixed=torch.zeros(2, 4, 9, 64, dtype=torch.float64)), "mixed has dtype"),
        (dict(mixed=torch.zeros(4, 9, 64)), "mixed must have 4 dimensions"),
        (dict(residual=torch.zeros(4, 17, 32)), "residual must have the shape"),
        (dict(residual=torch.zeros(4, 17, 64, dtype=torch.float16)), "residual has dtype"),
        (dict(residual=torch.zeros(4, 17, 64, device="meta")), "residual is on meta"),
        (dict(full=_x(dtype=torch.int64)), "full must be float"),
        (dict(phase=torch.full((1, 4), 9)), "phase values"),
        (dict(window=(3, 3)), "window"),
        (dict(num_frames=3), "num_frames"),
        (dict(mask_ratio=0.0), "mixed must have shape"),  # N_keep differs
    ]
    for overrides, message in cases:
        args = dict(full=full, mixed=mixed, num_frames=4)
        args.update(overrides)
        with pytest.raises(ValueError, match=re.escape(message)):
            stdd_kernels.pad_scatter(args.pop("full"), args.pop("mixed"), args.pop("num_frames"), **args)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(batch=0, num_frames=4), "batch"),
        (dict(batch=2, num_frames=-1), "num_frames"),
        (dict(batch=2, num_frames=4, mode="random"), "mode"),
        (dict(batch=2, num_frames=4, window=(2, 0)), "window"),
        (dict(batch=2, num_frames=4, generator=123), "generator"),
        (dict(batch=2, num_frames=4, shuffle=True), "shuffle"),
        (dict(batch=2.0, num_frames=4), "batch"),
    ],
)
def test_mask_phase_rejects_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        stdd_kernels.mask_phase(**kwargs)


def test_float_dtypes_accepted_and_preserved():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        x = torch.randn(4, 17, 16).to(dtype)
        mixed = stdd_kernels.mix_gather(x, 4, channel_fold=4, backend="reference")
        pad = stdd_kernels.pad_scatter(x, mixed, 4, residual=x, backend="reference")
        assert mixed.dtype == dtype and pad.dtype == dtype


def test_all_cases_cover_the_required_grid():
    """Guard: the parametrized cases above keep covering the windows, scales, frame counts,
    mixing modes, ratios and phase modes the fast paths must be checked on."""
    windows = {c[4] for c in CASES}
    scales = {c[6] for c in CASES}
    assert {(2, 2), (2, 1)} <= windows
    assert {(1,), (2,), (1, 2), (1, 2, 4)} <= scales
    assert {1, 2, 3} <= {c[1] for c in CASES}
    assert {"continual", "separate", "none", "official"} <= {c[8] for c in CASES}
    official = [c for c in CASES if c[8] == "official"]
    assert {1, 2, 3, 4, 8} <= {c[1] for c in official}
    assert {(1,), (2,), (3,), (1, 2), (1, 2, 3)} <= {c[6] for c in official}
    assert 0.0 in {c[5] for c in CASES} and "train" in {c[9] for c in CASES}


def test_out_of_range_phase_is_reduced_mod_K_like_every_backend():
    """docs/stca.md: with validate=False an unchecked phase value, negative ones too, gives the
    result of its residue mod K in every backend, the reference included (it indexed out of
    range before)."""
    batch, frames, grid, width = 2, 3, 4, 16
    x = encoded(batch * frames, 1 + grid * grid, width)
    phase = torch.tensor([[0, 1, 2], [3, 1, 0]])
    wild = phase + 4 * torch.tensor([[5, -1, -7], [2, 9, -3]])
    settings = dict(scales=(1, 2), channel_fold=4, backend="reference")
    expected = stdd_kernels.mix_gather(x, frames, phase=phase, **settings)
    assert torch.equal(stdd_kernels.mix_gather(x, frames, phase=wild, validate=False, **settings), expected)
    full, residual = encoded(batch * frames, 1 + grid * grid, width, 2.0), encoded(batch * frames, 17, width, 3.0)
    padded = stdd_kernels.pad_scatter(full, expected, frames, phase=phase, residual=residual, backend="reference")
    assert torch.equal(
        stdd_kernels.pad_scatter(full, expected, frames, phase=wild, residual=residual, backend="reference",
                                 validate=False),
        padded,
    )
    with pytest.raises(ValueError, match="phase values"):  # validated by default
        stdd_kernels.mix_gather(x, frames, phase=wild, **settings)
