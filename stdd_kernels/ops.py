"""Public, validating entry points of the STCA operators (see ``docs/stca.md``).

These check every argument once (``ValueError`` naming the argument), resolve
the backend (:mod:`stdd_kernels.dispatch`) and call it with a validated
:class:`~stdd_kernels.geometry.STCAGeometry`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import reference
from .dispatch import Backend, register_backend, resolve_backend
from .geometry import (
    FLOAT_DTYPES,
    STCAGeometry,
    check_float_tensor,
    check_phase,
    check_window,
    make_geometry,
    positive_int,
)

register_backend(
    Backend(
        name="reference",
        mix_gather=reference.mix_gather,
        pad_scatter=reference.pad_scatter,
        supports=lambda device, dtype: None if dtype in FLOAT_DTYPES else f"dtype {dtype}",
        auto_priority={"cpu": 0, "cuda": 0},
        description="plain PyTorch indexing (stdd_kernels/reference.py), any device",
        mix_factors=reference.mix_factors,
        project_mixed=reference.project_mixed,
    )
)


def _phase_for(phase, batch: int, geometry: STCAGeometry, device, validate: bool) -> torch.Tensor:
    if phase is None:
        return reference.mask_phase(batch, geometry.num_frames, geometry.cells, device=device)
    return check_phase(phase, batch, geometry, device, validate=validate)


def mix_gather(
    x: torch.Tensor,
    num_frames: int,
    *,
    scales: Sequence[int] = (1, 2),
    channel_fold: int = 32,
    window: Sequence[int] = (2, 2),
    mask_ratio: float = 0.5,
    mask_rounding: str = "nearest",
    phase: Optional[torch.Tensor] = None,
    mixing: str = "continual",
    backend: Optional[str] = None,
    validate: bool = True,
) -> torch.Tensor:
    """Window-shift masking + multi-scale channel mixing (docs/stca.md, steps 1-2).

    ``x``: ``(B*T, 1 + P*P, D)`` tokens, frames of a clip contiguous, CLS first.
    Returns ``mixed``: ``(len(scales), B*T, 1 + N_keep, D)``.
    ``phase``: ``(B, T)`` ints in ``[0, K)``; ``None`` = evaluation phases
    ``t mod K``. ``validate=False`` skips only the phase value-range check,
    which syncs with the device (shapes, dtypes and devices are always checked).
    ``mixing``: ``"continual"`` (default), ``"separate"``, ``"none"``, or
    ``"official"``, the authors' release (``docs/stca.md``);
    ``mask_rounding``: ``"nearest"`` (default) or ``"floor"`` (the release's
    count of masked cells per window, see :func:`~stdd_kernels.geometry.masked_cells`).
    """
    check_float_tensor(x, "x", 3)
    geometry = make_geometry(
        num_tokens=x.shape[1],
        channels=x.shape[2],
        rows=x.shape[0],
        num_frames=num_frames,
        window=window,
        mask_ratio=mask_ratio,
        scales=scales,
        channel_fold=channel_fold,
        mixing=mixing,
        tensor_name="x",
        mask_rounding=mask_rounding,
    )
    batch = x.shape[0] // geometry.num_frames
    phase = _phase_for(phase, batch, geometry, x.device, validate)
    return resolve_backend(backend, x.device, x.dtype).mix_gather(x, phase, geometry)


def pad_scatter(
    full: torch.Tensor,
    mixed: torch.Tensor,
    num_frames: int,
    *,
    window: Sequence[int] = (2, 2),
    mask_ratio: float = 0.5,
    mask_rounding: str = "nearest",
    phase: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
    validate: bool = True,
) -> torch.Tensor:
    """Padding (+ the block's short-cut add when ``residual`` is given), docs/stca.md step 4.

    ``full``: ``(B*T, 1 + P*P, D)``; ``mixed``: ``(S, B*T, 1 + N_keep, D)``;
    ``residual``: like ``full`` or ``None``. Returns ``(B*T, 1 + P*P, D)``:
    ``full`` with CLS and the kept patch tokens replaced by the mean of
    ``mixed`` over its first dimension, plus ``residual``. ``window``,
    ``mask_ratio``, ``mask_rounding`` and ``phase`` must be those ``mixed`` was
    gathered with.
    """
    check_float_tensor(full, "full", 3)
    check_float_tensor(mixed, "mixed", 4)
    if mixed.shape[0] < 1:
        raise ValueError(f"mixed must hold at least one scale, got shape {tuple(mixed.shape)}")
    # The scatter reads only the number of scales (mixed.shape[0]); no mixing settings.
    geometry = make_geometry(
        num_tokens=full.shape[1],
        channels=full.shape[2],
        rows=full.shape[0],
        num_frames=num_frames,
        window=window,
        mask_ratio=mask_ratio,
        scales=None,
        channel_fold=1,
        mixing="none",
        tensor_name="full",
        mask_rounding=mask_rounding,
    )
    expected = (mixed.shape[0], full.shape[0], 1 + geometry.num_kept, full.shape[2])
    if tuple(mixed.shape) != expected:
        raise ValueError(
            f"mixed must have shape (S, B*T, 1 + N_keep, D) = (S, {expected[1]}, {expected[2]}, "
            f"{expected[3]}) for full {tuple(full.shape)}, window {geometry.window} and "
            f"mask_ratio {mask_ratio}, got {tuple(mixed.shape)}"
        )
    for name, other in (("mixed", mixed), ("residual", residual)):
        if other is None:
            continue
        if name == "residual":
            check_float_tensor(other, "residual", 3)
            if other.shape != full.shape:
                raise ValueError(
                    f"residual must have the shape of full {tuple(full.shape)}, got {tuple(other.shape)}"
                )
        if other.dtype != full.dtype:
            raise ValueError(f"{name} has dtype {other.dtype} but full has {full.dtype}")
        if other.device != full.device:
            raise ValueError(f"{name} is on {other.device} but full is on {full.device}")
    batch = full.shape[0] // geometry.num_frames
    phase = _phase_for(phase, batch, geometry, full.device, validate)
    return resolve_backend(backend, full.device, full.dtype).pad_scatter(
        full, mixed, phase, geometry, residual
    )


def _check_optional_vector(value, name: str, length: int, like: torch.Tensor) -> None:
    """``value`` is ``None`` or a float tensor ``(length,)`` on ``like``'s device."""
    if value is None:
        return
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        raise ValueError(f"{name} must be a float tensor of shape ({length},) or None, "
                         f"got {type(value).__name__ if not isinstance(value, torch.Tensor) else value.dtype}")
    if tuple(value.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(value.shape)}")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but x is on {like.device}")


def projection_basis(
    ln_weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor],
    in_proj_weight: torch.Tensor,
    in_proj_bias: Optional[torch.Tensor],
    borrowed_channels: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`stdd_kernels.reference.projection_basis` in ``dtype`` with autocast off; ``ln_*`` ``None``:
    the LayerNorm without affine parameters (1 and 0)."""
    width = in_proj_weight.shape[1]
    with torch.autocast(device_type=in_proj_weight.device.type, enabled=False):
        weight = in_proj_weight.to(dtype)
        ln_weight = weight.new_ones(width) if ln_weight is None else ln_weight.to(dtype)
        ln_bias = weight.new_zeros(width) if ln_bias is None else ln_bias.to(dtype)
        bias = None if in_proj_bias is None else in_proj_bias.to(dtype)
        return reference.projection_basis(ln_weight, ln_bias, weight, bias, borrowed_channels)


def mix_project(
    x: torch.Tensor,
    qkv: torch.Tensor,
    num_frames: int,
    *,
    ln_weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor],
    ln_eps: float,
    in_proj_weight: torch.Tensor,
    in_proj_bias: Optional[torch.Tensor],
    scales: Sequence[int] = (1, 2),
    channel_fold: int = 32,
    window: Sequence[int] = (2, 2),
    mask_ratio: float = 0.5,
    mask_rounding: str = "nearest",
    phase: Optional[torch.Tensor] = None,
    mixing: str = "continual",
    backend: Optional[str] = None,
    validate: bool = True,
    basis: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixed paths' projections from the full path's (docs/stca.md, section 6).

    ``x``: ``(B*T, 1 + P*P, D)`` the block's input tokens; ``qkv``: ``(B*T, 1 + P*P, 3D)``
    their projections ``F.linear(layer_norm(x), in_proj_weight, in_proj_bias)`` (the full
    path's, in any float dtype, e.g. bf16 under autocast). ``ln_*`` are that LayerNorm's
    weight ``g``, bias ``b`` (``None``: 1 and 0) and ``eps``. Returns
    ``(qkv_mixed, mixed_mean)``:

    - ``qkv_mixed`` ``(S, B*T, 1 + N_keep, 3D)`` in ``qkv``'s dtype: what
      ``F.linear(layer_norm(mix_gather(x, ...)), in_proj_weight, in_proj_bias)`` would give,
      computed from ``qkv``'s rows at the kept positions, a per-token rescale and a
      rank-``(2I + 2)`` correction, without projecting the mixed tokens;
    - ``mixed_mean`` ``(B*T, 1 + N_keep, D)`` in ``x``'s dtype: ``mix_gather(x, ...).mean(0)``.

    The other keyword arguments are :func:`mix_gather`'s. The result equals the
    projection of the mixed tokens when ``qkv`` is the projection of ``x``; it is
    differentiable in ``x``, ``qkv`` and every weight. Runs with autocast off (the
    statistics and factors in float32, float64 for float64 tokens).

    ``basis``: :func:`~stdd_kernels.reference.projection_basis` of exactly these
    weights in that dtype, for a caller that keeps it while the weights do not
    change (``STCABlock`` does, outside training); ``None`` computes it.
    """
    check_float_tensor(x, "x", 3)
    check_float_tensor(qkv, "qkv", 3)
    geometry = make_geometry(
        num_tokens=x.shape[1], channels=x.shape[2], rows=x.shape[0], num_frames=num_frames, window=window,
        mask_ratio=mask_ratio, scales=scales, channel_fold=channel_fold, mixing=mixing, tensor_name="x",
        mask_rounding=mask_rounding,
    )
    rows, tokens, width = x.shape
    if tuple(qkv.shape) != (rows, tokens, 3 * width):
        raise ValueError(f"qkv must have shape (B*T, 1 + N, 3D) = {(rows, tokens, 3 * width)}, got {tuple(qkv.shape)}")
    if qkv.device != x.device:
        raise ValueError(f"qkv is on {qkv.device} but x is on {x.device}")
    check_float_tensor(in_proj_weight, "in_proj_weight", 2)
    if tuple(in_proj_weight.shape) != (3 * width, width):
        raise ValueError(f"in_proj_weight must have shape (3D, D) = {(3 * width, width)}, "
                         f"got {tuple(in_proj_weight.shape)}")
    if in_proj_weight.device != x.device:
        raise ValueError(f"in_proj_weight is on {in_proj_weight.device} but x is on {x.device}")
    _check_optional_vector(in_proj_bias, "in_proj_bias", 3 * width, x)
    _check_optional_vector(ln_weight, "ln_weight", width, x)
    _check_optional_vector(ln_bias, "ln_bias", width, x)
    if isinstance(ln_eps, bool) or not isinstance(ln_eps, (int, float)) or not ln_eps >= 0:
        raise ValueError(f"ln_eps must be a number >= 0, got {ln_eps!r}")
    chosen = resolve_backend(backend, x.device, x.dtype)
    if chosen.mix_factors is None or chosen.project_mixed is None:
        raise ValueError(f"backend {chosen.name!r} has no shared-projection ops (mix_factors, project_mixed); "
                         "use another backend or projection='per_path'")
    phase = _phase_for(phase, rows // geometry.num_frames, geometry, x.device, validate)
    dtype = reference.factor_dtype(x.dtype)
    expected_basis = (3 * width, geometry.borrowed_channels + 2)
    if basis is not None and (not isinstance(basis, torch.Tensor) or tuple(basis.shape) != expected_basis
                              or basis.dtype != dtype or basis.device != x.device):
        got = (tuple(basis.shape), basis.dtype, basis.device) if isinstance(basis, torch.Tensor) else type(basis)
        raise ValueError(f"basis must be projection_basis(...) of shape {expected_basis}, {dtype} on {x.device} "
                         f"(or None), got {got}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        ln_weight = x.new_ones(width, dtype=dtype) if ln_weight is None else ln_weight.to(dtype)
        if basis is None:
            basis = projection_basis(ln_weight, ln_bias, in_proj_weight, in_proj_bias, geometry.borrowed_channels, dtype)
        gain, coefficients, mixed_mean = chosen.mix_factors(x, ln_weight, phase, geometry, float(ln_eps))
        qkv_mixed = chosen.project_mixed(qkv, gain, coefficients, basis, phase, geometry)
    return qkv_mixed, mixed_mean


def mask_phase(
    batch: int,
    num_frames: int,
    *,
    window: Sequence[int] = (2, 2),
    mode: str = "eval",
    generator: Optional[torch.Generator] = None,
    shuffle: bool = False,
    device=None,
) -> torch.Tensor:
    """Window-shift phases ``(B, T)`` (int64) in ``[0, K)``, ``K = w1 * w2``.

    ``mode="eval"``: ``t mod K`` (deterministic). ``mode="train"``: a random
    offset per clip, ``(t + i_b) mod K``. ``shuffle=True`` then permutes each
    clip's phases at random (the frames keep their phases as a set, in a new
    order per clip): with ``mode="train"`` these are the authors' release's
    training phases, with ``mode="eval"`` its evaluation phases; an evaluation
    shuffle needs a ``generator``, so that evaluation stays reproducible.
    Draws come from ``generator`` (a CPU ``torch.Generator``; ``None`` in
    training: torch's global one), so seeding it reproduces the phases on any
    ``device``. One call draws one set for all clips; a caller wanting
    independent draws per block calls it once per block.
    """
    batch = positive_int(batch, "batch")
    num_frames = positive_int(num_frames, "num_frames")
    w1, w2 = check_window(window)
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    if not isinstance(shuffle, bool):
        raise ValueError(f"shuffle must be a bool, got {shuffle!r}")
    if shuffle and mode == "eval" and generator is None:
        raise ValueError(
            "shuffle=True with mode='eval' (the release's evaluation phases) needs a seeded generator: "
            "evaluation phases must be reproducible"
        )
    return reference.mask_phase(
        batch, num_frames, w1 * w2, mode=mode, generator=generator, shuffle=shuffle, device=device
    )
