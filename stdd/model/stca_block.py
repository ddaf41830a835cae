"""Space-time Cross Attention block: an open_clip ViT block made temporal (paper Eq. 1-7).

:class:`STCABlock` wraps an ``open_clip.transformer.ResidualAttentionBlock`` and
reuses its parameters as they are (no new parameters), following
``docs/stca.md`` steps 1-4::

    mixed = mix_gather(x)                               # WSM + MCM, (S, B*T, 1+N_keep, D)
    full  = x + ls_1(attn(ln_1(x)))                     # Eq. 1, all 1+N tokens
    mixed = mixed + ls_1(attn(ln_1(mixed)))             # Eq. 7, every scale in ONE attention call
    y     = pad_scatter(full, mixed, residual=ls_2(mlp(ln_2(full))))   # Eq. 2, padding + short-cut

The gather/scatter always go through the dispatching ops
(``stdd_kernels.mix_gather`` / ``stdd_kernels.pad_scatter``), so the same block
runs on the reference, Triton or C++/CUDA backend.

The forward pass has no data-dependent Python control flow, no ``.item()`` and
no printing, so a stack of these blocks traces with
``torch.compile(fullgraph=True)``; the one host-syncing check (the phase value
range) is skipped while compiling.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import stdd_kernels
from stdd_kernels.geometry import (
    check_mixing,
    check_phase_tensor,
    check_scales,
    check_window,
    masked_cells,
    positive_int,
)

ATTENTION_KINDS = ("sdpa", "xformers")


def check_block_supported(block: nn.Module, name: str = "block") -> None:
    """Raise ``ValueError`` unless ``block`` is a plain open_clip ``ResidualAttentionBlock``.

    The STCA block recomputes the block's attention from ``attn.in_proj_weight``
    / ``in_proj_bias`` / ``out_proj``, so it needs a standard
    ``nn.MultiheadAttention`` with packed q/k/v weights and no extras.
    """
    from open_clip.transformer import ResidualAttentionBlock

    if not isinstance(block, ResidualAttentionBlock):
        raise ValueError(
            f"{name} must be an open_clip.transformer.ResidualAttentionBlock, got "
            f"{type(block).__module__}.{type(block).__name__} (custom blocks with qk-norm, "
            "scaled-cosine or head-scaled attention are not supported)"
        )
    if hasattr(block, "ln_1_kv"):
        raise ValueError(f"{name} is a cross-attention block (has ln_1_kv); STCA needs self-attention")
    attn = block.attn
    if not isinstance(attn, nn.MultiheadAttention):
        raise ValueError(f"{name}.attn must be torch.nn.MultiheadAttention, got {type(attn).__name__}")
    if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
        raise ValueError(f"{name}.attn must use one packed in_proj_weight (kdim == vdim == embed_dim)")
    if attn.bias_k is not None or attn.bias_v is not None or attn.add_zero_attn:
        raise ValueError(f"{name}.attn uses add_bias_kv/add_zero_attn, which STCA does not support")


def multi_head_self_attention(
    attn: nn.MultiheadAttention, x: torch.Tensor, *, kind: str = "sdpa", training: bool = False
) -> torch.Tensor:
    """``attn(x, x, x)`` of a batch-first ``nn.MultiheadAttention``, computed by SDPA.

    ``x``: ``(R, L, D)`` -> ``(R, L, D)``. Uses the module's own weights, so the
    result equals ``attn(x, x, x, need_weights=False)[0]`` up to float rounding.
    ``kind="xformers"`` uses ``xformers.ops.memory_efficient_attention``
    (CUDA only; xformers has no CPU kernel).
    """
    rows, length, channels = x.shape
    heads = attn.num_heads
    head_dim = channels // heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (R, L, 3D)
    dropout = attn.dropout if training else 0.0
    if kind == "xformers":
        import xformers.ops as xops  # checked at construction

        # xformers layout: (R, L, H, head_dim)
        q, k, v = qkv.view(rows, length, 3, heads, head_dim).unbind(2)
        out = xops.memory_efficient_attention(q, k, v, p=dropout)
        out = out.reshape(rows, length, channels)
    else:
        # SDPA layout: (R, H, L, head_dim)
        q, k, v = qkv.view(rows, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(rows, length, channels)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


class STCABlock(nn.Module):
    """An open_clip ``ResidualAttentionBlock`` turned into a Space-time Cross Attention block.

    Args:
        block: the open_clip block. It is registered as the submodule ``block``
            (state_dict keys ``block.ln_1.weight``, ``block.attn.in_proj_weight``,
            ...), and its parameters are used for the full path and every mixed path.
        num_frames: ``T``, frames per clip; inputs hold ``B*T`` frames, a clip's
            frames contiguous.
        window, mask_ratio, scales, channel_fold, mixing: STCA settings
            (``docs/stca.md``); ``mask_ratio=0`` with ``mixing="none"`` makes the
            block compute exactly the plain block.
        backend: STCA op backend (``None`` = automatic / ``STDD_BACKEND``).
        attention: ``"sdpa"`` (torch SDPA, any device) or ``"xformers"`` (CUDA only).
        shuffle_phases: in training, also permute each clip's frame phases.
        seed: seed of the block's own phase generator (training phases).

    ``forward(x, phase=None)``: ``x`` ``(B*T, 1+N, D)`` -> ``(B*T, 1+N, D)``.
    ``phase`` ``(B, T)`` ints in ``[0, K)`` on ``x``'s device; ``None`` means
    ``t mod K`` in eval mode and random per-clip phases from the block's
    generator in training mode (:meth:`sample_phase`).
    """

    def __init__(
        self,
        block: nn.Module,
        *,
        num_frames: int,
        window: Sequence[int] = (2, 2),
        mask_ratio: float = 0.5,
        scales: Sequence[int] = (1, 2),
        channel_fold: int = 32,
        mixing: str = "continual",
        backend: Optional[str] = None,
        attention: str = "sdpa",
        shuffle_phases: bool = False,
        seed: Optional[int] = None,
    ):
        super().__init__()
        check_block_supported(block)
        self.block = block
        self.num_frames = positive_int(num_frames, "num_frames")
        self.window = check_window(window)
        masked_cells(self.window, mask_ratio)  # validates mask_ratio
        self.mask_ratio = float(mask_ratio)
        self.scales = check_scales(scales)
        # Same rules as the ops (I = width // channel_fold), checked now rather than at the first forward.
        self.channel_fold = check_mixing(block.attn.embed_dim, self.scales, channel_fold, mixing)
        self.mixing = mixing
        if backend is not None and not isinstance(backend, str):
            raise ValueError(f"backend must be a backend name or None, got {backend!r}")
        self.backend = backend
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        if attention == "xformers":
            try:
                import xformers.ops  # noqa: F401
            except ImportError as error:
                raise ValueError(
                    "attention='xformers' needs the xformers package (pip install 'stdd[xformers]'); "
                    "use attention='sdpa' otherwise"
                ) from error
        self.attention = attention
        if not isinstance(shuffle_phases, bool):
            raise ValueError(f"shuffle_phases must be a bool, got {shuffle_phases!r}")
        self.shuffle_phases = shuffle_phases
        self.generator = torch.Generator()  # CPU: the same seed gives the same phases on any device
        if seed is not None:
            self.generator.manual_seed(int(seed))
        else:
            self.generator.seed()

    # ---------------------------------------------------------------- phases
    @property
    def cells(self) -> int:
        """``K = w1 * w2``: the number of distinct phases."""
        return self.window[0] * self.window[1]

    def manual_seed(self, seed: int) -> None:
        """Reseed the generator that draws training phases."""
        self.generator.manual_seed(int(seed))

    def sample_phase(self, batch: int, device=None, num_frames: Optional[int] = None) -> torch.Tensor:
        """Random training phases ``(B, T)``: a per-clip offset (+ shuffle if enabled)."""
        return stdd_kernels.mask_phase(
            batch,
            self.num_frames if num_frames is None else num_frames,
            window=self.window,
            mode="train",
            generator=self.generator,
            shuffle=self.shuffle_phases,
            device=device,
        )

    def check_phase(
        self, phase: torch.Tensor, batch: int, device, num_frames: Optional[int] = None
    ) -> torch.Tensor:
        """Shape/dtype/device check of an explicit phase and, outside torch.compile, its value range.

        The value check reads the tensor back (a device sync): callers running a
        stack of blocks (:class:`~stdd.model.VideoEncoder`) check once and call the
        blocks with ``check_phase=False``.
        """
        return check_phase_tensor(
            phase,
            batch=batch,
            num_frames=self.num_frames if num_frames is None else num_frames,
            window=self.window,
            device=device,
        )

    # --------------------------------------------------------------- forward
    def _attend(self, tokens: torch.Tensor) -> torch.Tensor:
        """``ls_1(attn(ln_1(tokens)))`` with the wrapped block's weights; ``(R, L, D)``."""
        block = self.block
        return block.ls_1(
            multi_head_self_attention(
                block.attn, block.ln_1(tokens), kind=self.attention, training=self.training
            )
        )

    def forward(
        self,
        x: torch.Tensor,
        phase: Optional[torch.Tensor] = None,
        *,
        check_phase: bool = True,
        num_frames: Optional[int] = None,
    ) -> torch.Tensor:
        """``x`` ``(B*T, 1+N, D)`` -> ``(B*T, 1+N, D)``; see the class docstring for ``phase``.

        ``num_frames`` overrides the constructor's ``T`` for this call (the video
        encoder passes the clip length of its input). ``check_phase=False`` skips
        the checks of an explicit ``phase`` (the caller did them).
        """
        frames = self.num_frames if num_frames is None else num_frames
        if x.dim() != 3:
            raise ValueError(f"x must have shape (B*T, 1+N, D), got {tuple(x.shape)}")
        if x.shape[0] % frames:
            raise ValueError(f"x.shape[0] (B*T = {x.shape[0]}) must be divisible by num_frames={frames}")
        batch = x.shape[0] // frames
        if phase is None:
            if self.training:
                phase = self.sample_phase(batch, x.device, frames)
            # else: the ops use the evaluation phases t mod K
        elif check_phase:
            phase = self.check_phase(phase, batch, x.device, frames)
        settings = dict(window=self.window, mask_ratio=self.mask_ratio, phase=phase, backend=self.backend)

        # Steps 1-2: (S, B*T, 1+N_keep, D), every scale from the same input tokens.
        mixed = stdd_kernels.mix_gather(
            x,
            frames,
            scales=self.scales,
            channel_fold=self.channel_fold,
            mixing=self.mixing,
            validate=False,
            **settings,
        )
        # Step 3: full path on all 1+N tokens; all scales' mixed tokens as one
        # (S*B*T, 1+N_keep, D) batch through the same ln_1/attention weights.
        full = x + self._attend(x)
        n_scales, rows, kept, width = mixed.shape
        flat = mixed.reshape(n_scales * rows, kept, width)
        mixed = (flat + self._attend(flat)).reshape(n_scales, rows, kept, width)
        # Step 4: padding + short-cut; the MLP reads the full path (Eq. 2).
        block = self.block
        residual = block.ls_2(block.mlp(block.ln_2(full)))
        # Under autocast the attention/MLP outputs can be in a lower precision than the
        # stream: keep the tensors the op sees in one dtype (no-ops otherwise).
        mixed = mixed.to(full.dtype)
        residual = residual.to(full.dtype)
        return stdd_kernels.pad_scatter(
            full, mixed, frames, residual=residual, validate=False, **settings
        )

    def extra_repr(self) -> str:
        return (
            f"num_frames={self.num_frames}, window={self.window}, mask_ratio={self.mask_ratio}, "
            f"scales={self.scales}, channel_fold={self.channel_fold}, mixing={self.mixing!r}, "
            f"backend={self.backend!r}, attention={self.attention!r}, shuffle_phases={self.shuffle_phases}"
        )
