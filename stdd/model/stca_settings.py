"""The STCA settings: one frozen dataclass, one field per setting, one default each.

Modelled on open_clip's ``CLIPVisionCfg``: every builder (``STCABlock``,
``VideoEncoder``, ``VideoEncoder.from_pretrained``, ``build_stdd``) takes one
:class:`STCASettings` and passes it on unchanged; the run config's
``model.stca`` section is generated from these fields (``stdd.engine.config``),
so a new setting is added here and nowhere else. The defaults are the paper's
ViT-B/16 settings. The operator contract behind the names is ``docs/stca.md``.

Five fields reproduce the authors' released code instead of the paper
(``docs/stca.md`` section 5; the preset ``k400_vitb16_official`` sets them all):
``mixing="official"``, ``mask_rounding="floor"``, ``shuffle_phases``,
``per_block_phases`` and ``eval_shuffle_phases``. The phase fields are read by
:class:`~stdd.model.phases.PhaseSampler`, the one place phases are drawn.

A field with a fixed set of values is declared with :func:`choice` (its allowed values, from their
one home: ``MIXING_MODES``, ``ATTENTION_KINDS``, ...); :func:`choice_fields` lists them, so the
settings check them here and the run config checks ``model.stca.<field>`` when it is loaded
(``stdd.engine.config``), with nothing else to add for a new one.

A settings object checks itself when it is created (each field on its own) and,
with :meth:`STCASettings.check_model`, against a model's patch grid and width
with the operators' own rules, so a bad setting fails when the model is built,
not at the first forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable, Optional, Sequence, Union

from stdd_kernels import dispatch
from stdd_kernels.geometry import (
    MASK_ROUNDINGS,
    MIXING_MODES,
    check_mixing,
    check_scales,
    check_window,
    make_geometry,
    masked_cells,
    positive_int,
)

ATTENTION_KINDS = ("sdpa", "xformers")
# How the mixed paths get their q, k, v (docs/stca.md section 6): "shared" derives them from the full
# path's projections (exactly, at ~1.08x a plain block's multiply-adds for ViT-B/16); "per_path" runs
# LN1 + the in-projection on every mixed path, as the paper writes step 3 (~1.34x).
PROJECTIONS = ("shared", "per_path")


def backend_names() -> tuple[str, ...]:
    """The STCA op backends the dispatcher knows (``stdd_kernels.dispatch``): ``auto``, the registered
    ones and the optional ones, whether or not they load here (one that does not is an error when
    it is used, naming why)."""
    known = set(dispatch.registered_backends()) | set(dispatch.OPTIONAL_BACKEND_MODULES)
    return ("auto", *sorted(known))


def choice(default, allowed: Union[Sequence, Callable[[], Sequence]]):
    """A settings field whose value is one of ``allowed`` (a sequence, or a function giving one);
    ``None`` is allowed only where the default is ``None``."""
    return field(default=default, metadata={"choices": allowed})


def choice_fields() -> dict[str, Union[Sequence, Callable[[], Sequence]]]:
    """``{field name: allowed values}`` of every :func:`choice` field of :class:`STCASettings`."""
    return {f.name: f.metadata["choices"] for f in fields(STCASettings) if "choices" in f.metadata}


def allowed_values(allowed: Union[Sequence, Callable[[], Sequence]]) -> tuple:
    """The values of a :func:`choice` field (calls ``allowed`` when it is a function)."""
    return tuple(allowed() if callable(allowed) else allowed)


@dataclass(frozen=True)
class STCASettings:
    """How every block of the video encoder does Space-time Cross Attention (paper Eq. 1-7)."""

    window: tuple[int, int] = (2, 2)  # WSM window (w1, w2); must tile the patch grid; K = w1*w2 phases
    mask_ratio: float = 0.5  # share of each window's K cells masked: m = mask_ratio * K rounded by mask_rounding, < K
    # m from mask_ratio * K: "nearest" (round) or "floor" (the authors' release)
    mask_rounding: str = choice("nearest", MASK_ROUNDINGS)
    scales: tuple[int, ...] = (1, 2)  # MCM scales; each one is a mixed path through the block's attention
    channel_fold: int = 32  # F: I = width // F channels are read from the neighbour frames per direction
    # "continual" (Eq. 6), "separate" (Eq. 5), "none", or "official" (the release's rule)
    mixing: str = choice("continual", MIXING_MODES)
    shuffle_phases: bool = False  # training phases: also permute each clip's frame phases (the release: on)
    per_block_phases: bool = False  # draw phases independently for every block, not once per clip for all blocks
    eval_shuffle_phases: bool = False  # evaluation phases: t mod K permuted per clip, seeded (the release); off: t mod K
    # STCA op backend (reference|triton|cpp|cuda, see backend_names); None or "auto": automatic / STDD_BACKEND
    backend: Optional[str] = choice(None, backend_names)
    attention: str = choice("sdpa", ATTENTION_KINDS)  # "sdpa" (torch SDPA, any device) or "xformers" (CUDA only)
    # mixed paths' q, k, v: "shared" (from the full path's, exact; docs/stca.md section 6) or "per_path"
    projection: str = choice("shared", PROJECTIONS)

    def __post_init__(self):
        for setting in fields(self):
            if "choices" not in setting.metadata:
                continue
            value, allowed = getattr(self, setting.name), allowed_values(setting.metadata["choices"])
            if not (value is None and setting.default is None) and value not in allowed:
                also = " (or None)" if setting.default is None else ""
                raise ValueError(f"{setting.name} must be one of {allowed}{also}, got {value!r}")
        # Lists (from YAML) become tuples, so settings compare and hash by value.
        object.__setattr__(self, "window", check_window(self.window))
        # checks mask_rounding, and mask_ratio against the window
        masked_cells(self.window, self.mask_ratio, self.mask_rounding)
        object.__setattr__(self, "mask_ratio", float(self.mask_ratio))
        object.__setattr__(self, "scales", check_scales(self.scales))
        positive_int(self.channel_fold, "channel_fold")
        for name in ("shuffle_phases", "per_block_phases", "eval_shuffle_phases"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def cells(self) -> int:
        """``K = w1 * w2``: cells per window, and the number of distinct phases."""
        return self.window[0] * self.window[1]

    def check_model(self, width: int, grid: Optional[int] = None) -> None:
        """Raise ``ValueError`` unless these settings run on a ViT of this ``width`` (and ``grid``).

        ``width``: the token width ``D``; ``grid``: the patch grid side ``P`` (checked when
        given). The rules are the operators' (``stdd_kernels.geometry``); the message
        names the setting and, for a window that does not tile the grid, the sides that do.
        """
        if grid is None:
            check_mixing(width, self.scales, self.channel_fold, self.mixing)
        else:
            try:
                make_geometry(
                    num_tokens=1 + grid * grid, channels=width, rows=1, num_frames=1, window=self.window,
                    mask_ratio=self.mask_ratio, scales=self.scales, channel_fold=self.channel_fold,
                    mixing=self.mixing, mask_rounding=self.mask_rounding, tensor_name="tokens",
                )
            except ValueError as error:
                sides = [d for d in range(1, grid + 1) if grid % d == 0]
                raise ValueError(
                    f"STCA settings do not fit this ViT ({grid}x{grid} patch grid, width {width}): {error}. "
                    f"Window sides that tile this grid: {sides} (e.g. ViT-B/32 at 224 px has a 7x7 grid)"
                ) from error
        if self.attention == "xformers":
            try:
                import xformers.ops  # noqa: F401  (optional package: is it installed?)
            except ImportError as error:
                raise ValueError(
                    "attention='xformers' needs the xformers package (pip install 'stdd[xformers]'); "
                    "use attention='sdpa' otherwise"
                ) from error
