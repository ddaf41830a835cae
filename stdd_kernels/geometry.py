"""Argument validation and derived sizes for the STCA operators.

Every backend receives an already validated :class:`STCAGeometry`, so the
checks below live in exactly one place. The names follow ``docs/stca.md``:
``P`` grid side, ``K`` cells per window, ``m`` masked cells per window,
``N_keep`` kept patch tokens per frame, ``I`` mixed channels per direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
import torch

MIXING_MODES = ("continual", "separate", "none", "official")
# How m = mask_ratio * K becomes a whole number of masked cells per window:
# "nearest" rounds (Python's round, half to even; the default), "floor" truncates
# as the authors' release does (int(mask_ratio * K)). See docs/stca.md.
MASK_ROUNDINGS = ("nearest", "floor")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class STCAGeometry:
    """Everything an STCA gather/scatter needs besides the tensors.

    Shapes for ``B`` clips of ``T = num_frames`` frames, ``D`` channels:
    ``x``/``full``: ``(B*T, 1 + grid**2, D)``;
    ``mixed``: ``(len(scales), B*T, 1 + num_kept, D)``; ``phase``: ``(B, T)``.
    """

    num_frames: int  # T
    grid: int  # P: patches per side, N = P * P
    window: tuple[int, int]  # (w1, w2)
    masked: int  # m: masked cells per window (mask_ratio * K rounded by mask_rounding, see masked_cells)
    scales: tuple[int, ...] | None  # S; None for pad_scatter, which takes S from mixed.shape[0]
    channel_fold: int  # F
    mixing: str  # "continual" | "separate" | "none" | "official" (the authors' release)
    channels: int  # D

    @property
    def cells(self) -> int:  # K = w1 * w2
        return self.window[0] * self.window[1]

    @property
    def kept_per_window(self) -> int:  # K - m
        return self.cells - self.masked

    @property
    def windows_per_row(self) -> int:  # P / w2
        return self.grid // self.window[1]

    @property
    def num_windows(self) -> int:  # (P / w1) * (P / w2)
        return (self.grid // self.window[0]) * self.windows_per_row

    @property
    def num_kept(self) -> int:  # N_keep
        return self.num_windows * self.kept_per_window

    @property
    def mix_channels(self) -> int:  # I = D // F
        return self.channels // self.channel_fold

    @property
    def borrowed_channels(self) -> int:  # 2I: channels a mixed token may take from other frames (0 without mixing)
        return borrowed_channel_count(self.channels, self.channel_fold, self.mixing)


def borrowed_channel_count(channels: int, channel_fold: int, mixing: str) -> int:
    """``2I = 2 * (D // F)``: the channels ``[0, 2I)`` a mixed token may take from other frames; 0 without mixing."""
    return 0 if mixing == "none" else 2 * (channels // channel_fold)


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_window(window) -> tuple[int, int]:
    if (
        not isinstance(window, (tuple, list))
        or len(window) != 2
        or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in window)
    ):
        raise ValueError(f"window must be a pair of positive ints (w1, w2), got {window!r}")
    return int(window[0]), int(window[1])


def masked_cells(window: tuple[int, int], mask_ratio, mask_rounding: str = "nearest") -> int:
    """``m`` masked cells per window of ``K = w1 * w2``, at least one cell of each window kept.

    ``mask_rounding="nearest"``: ``m = round(mask_ratio * K)`` (Python's round,
    half to even); ``"floor"``: ``m = int(mask_ratio * K)``, the authors'
    release. They agree when ``mask_ratio * K`` is whole (0.5 of K=4: 2) or its
    fraction is below one half (0.6 of K=4 = 2.4: 2; 0.5 of K=9 = 4.5: 4, half
    to even) and differ above (0.4 of K=4 = 1.6: 2 vs 1; 0.4 of K=9 = 3.6: 4 vs 3).
    """
    if mask_rounding not in MASK_ROUNDINGS:
        raise ValueError(f"mask_rounding must be one of {MASK_ROUNDINGS}, got {mask_rounding!r}")
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)):
        raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio!r}")
    cells = window[0] * window[1]
    product = float(mask_ratio) * cells
    masked = round(product) if mask_rounding == "nearest" else math.floor(product)
    if masked >= cells:
        raise ValueError(
            f"mask_ratio={mask_ratio!r} masks all {cells} cells of a window {window}; "
            "at least one cell must be kept"
        )
    return masked


def check_scales(scales) -> tuple[int, ...]:
    if not isinstance(scales, (tuple, list)) or len(scales) == 0:
        raise ValueError(f"scales must be a non-empty tuple of positive ints, got {scales!r}")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"scales must hold positive ints, got {scales!r}")
    if len(set(scales)) != len(scales):
        raise ValueError(f"scales must be distinct, got {scales!r}")
    return tuple(int(s) for s in scales)


def check_mixing(channels: int, scales: tuple[int, ...], channel_fold, mixing) -> int:
    """Check the channel-mixing settings for ``D = channels``; returns ``channel_fold``.

    Needs ``1 <= I = D // F`` and ``2I <= D`` unless ``mixing="none"``; for
    continual mixing ``I`` divisible by every scale; for the release's rule
    (``"official"``, block widths ``d_i = I >> i`` for ``i < s``) a non-empty
    last block, ``I >> (s - 1) >= 1``, for every scale ``s``: a scale past that
    adds steps that write no channel and would silently equal a smaller scale.
    """
    channel_fold = positive_int(channel_fold, "channel_fold")
    if mixing not in MIXING_MODES:
        raise ValueError(f"mixing must be one of {MIXING_MODES}, got {mixing!r}")
    mix = channels // channel_fold
    if mixing != "none":
        if mix < 1:
            raise ValueError(
                f"channel_fold={channel_fold} leaves I = D // F = 0 mixed channels for D={channels}; "
                "use channel_fold <= D (or mixing='none')"
            )
        if 2 * mix > channels:
            raise ValueError(
                f"channel_fold={channel_fold} gives I={mix}, but 2*I must fit in D={channels}"
            )
        if mixing == "continual":
            for s in scales:
                if mix % s != 0:
                    raise ValueError(
                        f"continual mixing needs I = D // channel_fold = {mix} divisible by every "
                        f"scale; scale {s} in scales={scales} does not divide it"
                    )
        if mixing == "official":
            for s in scales:
                if mix >> (s - 1) < 1:
                    deepest = mix.bit_length()
                    raise ValueError(
                        f"official mixing halves the channel blocks (d_i = I >> i for i < s): scale {s} in "
                        f"scales={scales} with I = D // channel_fold = {mix} has empty blocks "
                        f"(I >> {s - 1} = 0) and would equal scale {deepest}; use scales <= {deepest} "
                        "or a smaller channel_fold"
                    )
    return channel_fold


def grid_side(num_tokens: int, name: str) -> int:
    """``P`` from the token count ``1 + P*P`` (CLS first)."""
    patches = num_tokens - 1
    side = math.isqrt(max(patches, 0))
    if patches < 1 or side * side != patches:
        raise ValueError(
            f"{name}.shape[1] must be 1 + P*P tokens (CLS then a square P x P patch grid), "
            f"got {num_tokens}"
        )
    return side


def check_float_tensor(t, name: str, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}"
        )
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def make_geometry(
    *,
    num_tokens: int,
    channels: int,
    rows: int,
    num_frames,
    window,
    mask_ratio,
    scales,
    channel_fold,
    mixing: str,
    tensor_name: str,
    mask_rounding: str = "nearest",
) -> STCAGeometry:
    """Validate the operator arguments; raises ``ValueError`` naming the culprit.

    ``mask_rounding`` decides ``masked`` (:func:`masked_cells`); the geometry
    carries only the resulting count, which is all a backend needs.

    Every op call validates its arguments, so the result is remembered per
    argument set (a model calls the ops with the same few sets in every block
    and forward pass). Lists are accepted wherever tuples are and are remembered
    as tuples; arguments that cannot be hashed are validated anew (and refused).
    """
    arguments = dict(num_tokens=num_tokens, channels=channels, rows=rows, num_frames=num_frames, window=window,
                     mask_ratio=mask_ratio, scales=scales, channel_fold=channel_fold, mixing=mixing,
                     tensor_name=tensor_name, mask_rounding=mask_rounding)
    if torch.compiler.is_compiling():  # dynamo traces through caches; validate as written
        return _validate_geometry(**arguments)
    try:
        key = tuple((name, _typed(value)) for name, value in arguments.items())
    except TypeError:  # an unhashable argument (e.g. a tensor): validated (and refused) without the memory
        return _validate_geometry(**arguments)
    try:
        return _remembered_geometry(key)
    except ValueError:  # raise it again from the arguments as given (a list is named as the list it was)
        return _validate_geometry(**arguments)


def _typed(value):
    """A hashable key for an argument that tells apart what validates differently: 2, 2.0 and True
    hash alike; tuples and lists (accepted alike) become tuples of typed items."""
    if isinstance(value, (tuple, list)):
        return (tuple, tuple(_typed(item) for item in value))
    hash(value)  # TypeError for the unhashable
    return (type(value), value)


def _untyped(key):
    kind, value = key
    return tuple(_untyped(item) for item in value) if kind is tuple else value


@lru_cache(maxsize=256)
def _remembered_geometry(key: tuple) -> STCAGeometry:
    return _validate_geometry(**{name: _untyped(value) for name, value in key})


def _validate_geometry(
    *,
    num_tokens,
    channels,
    rows,
    num_frames,
    window,
    mask_ratio,
    scales,
    channel_fold,
    mixing,
    tensor_name,
    mask_rounding,
) -> STCAGeometry:
    num_frames = positive_int(num_frames, "num_frames")
    if rows % num_frames != 0:
        raise ValueError(
            f"{tensor_name}.shape[0] (B*T = {rows}) must be divisible by num_frames={num_frames}"
        )
    window = check_window(window)
    grid = grid_side(num_tokens, tensor_name)
    if grid % window[0] != 0 or grid % window[1] != 0:
        raise ValueError(
            f"window {window} must tile the {grid}x{grid} patch grid: "
            f"{grid} is not divisible by both window sides"
        )
    masked = masked_cells(window, mask_ratio, mask_rounding)
    scales = None if scales is None else check_scales(scales)
    channel_fold = check_mixing(channels, scales or (), channel_fold, mixing)
    return STCAGeometry(
        num_frames=num_frames,
        grid=grid,
        window=window,
        masked=masked,
        scales=scales,
        channel_fold=channel_fold,
        mixing=mixing,
        channels=channels,
    )


def same_device(actual: torch.device, wanted) -> bool:
    """Whether a tensor on ``actual`` is on ``wanted``; ``"cuda"`` (no index) is the current CUDA device."""
    wanted = torch.device(wanted)
    if wanted.index is None and actual.type == wanted.type and actual.type == "cuda":
        return actual.index == torch.cuda.current_device()
    return actual == wanted


def check_phase_tensor(
    phase, *, batch: int, num_frames: int, window: tuple[int, int], device, validate: bool = True
) -> torch.Tensor:
    """Validate a ``(B, T)`` integer phase tensor with values in ``[0, K)``, ``K = w1 * w2``.

    The value-range check reads the tensor back to the host (a device sync on
    GPU); ``validate=False`` skips it for callers that validated the phase
    already, e.g. once per forward pass of a whole STCA stack. It is also
    skipped while ``torch.compile`` traces (a data-dependent host read).
    """
    if not isinstance(phase, torch.Tensor):
        raise ValueError(f"phase must be an integer torch.Tensor of shape (B, T), got {type(phase).__name__}")
    if phase.dtype.is_floating_point or phase.dtype.is_complex or phase.dtype == torch.bool:
        raise ValueError(f"phase must have an integer dtype, got {phase.dtype}")
    expected = (batch, num_frames)
    if tuple(phase.shape) != expected:
        raise ValueError(f"phase must have shape (B, T) = {expected}, got {tuple(phase.shape)}")
    if not same_device(phase.device, device):
        raise ValueError(f"phase is on {phase.device} but the tokens are on {device}")
    if validate and phase.numel() > 0 and not torch.compiler.is_compiling():
        cells = window[0] * window[1]
        low, high = int(phase.min()), int(phase.max())
        if low < 0 or high >= cells:
            raise ValueError(
                f"phase values must be in [0, K) = [0, {cells}) for window "
                f"{window}, got values in [{low}, {high}]"
            )
    return phase


def check_phase(
    phase, batch: int, geometry: STCAGeometry, device: torch.device, validate: bool = True
) -> torch.Tensor:
    """:func:`check_phase_tensor` for the frames and window of ``geometry``."""
    return check_phase_tensor(
        phase,
        batch=batch,
        num_frames=geometry.num_frames,
        window=geometry.window,
        device=device,
        validate=validate,
    )
