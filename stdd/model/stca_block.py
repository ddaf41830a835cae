"""Space-time Cross Attention block: an open_clip ViT block made temporal (paper Eq. 1-7).

:class:`STCABlock` wraps an open_clip ``ResidualAttentionBlock`` and reuses its
parameters as they are (no new parameters), following the operator contract
(``docs/stca.md``) steps 1-4::

    mixed = mix_gather(x)                               # WSM + MCM, (S, B*T, 1+N_keep, D)
    full  = x + ls_1(attn(ln_1(x)))                     # Eq. 1, all 1+N tokens
    mixed = mixed + ls_1(attn(ln_1(mixed)))             # Eq. 7, every scale in ONE attention call
    y     = pad_scatter(full, mixed, residual=ls_2(mlp(ln_2(full))))   # Eq. 2, padding + short-cut

With ``projection="shared"`` (the default; docs/stca.md section 6) the mixed
paths' q, k, v come from the full path's instead of their own LN1 + projection,
and the scales share one ``out_proj``::

    qkv         = in_proj(ln_1(x))                                # the full path's, all 1+N tokens
    qkv_m, m    = mix_project(x, qkv)                             # (S, B*T, 1+N_keep, 3D), mean_s(mixed_s)
    full        = x + ls_1(out_proj(attn(qkv)))
    mixed       = m + ls_1(out_proj(mean_s attn(qkv_m_s)))        # every scale in ONE attention call
    y           = pad_scatter(full, mixed, residual=ls_2(mlp(ln_2(full))))

the same numbers up to float rounding, at about 1.08x a plain block's work instead
of 1.34x (ViT-B/16); ``projection="per_path"`` computes the steps as written above.

The STCA ops always go through the dispatching ops
(``stdd_kernels.mix_gather`` / ``mix_project`` / ``pad_scatter``), so the same block
runs on the reference, Triton or C++/CUDA backend; their keyword arguments come
from the block's :class:`~stdd.model.stca_settings.STCASettings` in one place
(:meth:`STCABlock.forward`).

The window phases are an input (``phase``): the block draws nothing itself.
The forward pass has no data-dependent Python control flow, no ``.item()`` and
no printing, so a stack of these blocks traces with
``torch.compile(fullgraph=True)``; the one host-syncing check (the phase value
range) is skipped while compiling, and by ``validate=False``.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import stdd_kernels
from stdd_kernels.geometry import borrowed_channel_count, check_phase_tensor, positive_int
from stdd_kernels.reference import factor_dtype

from .stca_settings import STCASettings

# Parts of a block or attention module that would change its output but that STCA does not
# apply; a block that has one (not None / not nn.Identity) is refused rather than computed
# wrongly. The names are open_clip's (its own ``Attention``: ln_q / ln_k when qk-norm is on,
# logit_scale for scaled-cosine attention, head_scale, ln_inner for the inner norm), torch's
# (``nn.MultiheadAttention``'s add_bias_kv) and those of other attention modules (q_norm, k_norm).
_UNSUPPORTED_BLOCK_PARTS = {
    "ln_1_kv": "is a cross-attention block (ln_1_kv); STCA needs self-attention",
    "ln_attn": "has a post-attention norm ln_attn (open_clip's CustomResidualAttentionBlock)",
}
_UNSUPPORTED_ATTENTION_PARTS = {
    "bias_k": "add_bias_kv", "bias_v": "add_bias_kv",
    "ln_q": "qk-norm", "ln_k": "qk-norm", "q_norm": "qk-norm", "k_norm": "qk-norm",
    "logit_scale": "scaled-cosine attention", "head_scale": "head scaling",
    "ln_inner": "an inner attention norm",
}


def _shape(value) -> Optional[tuple]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def check_block_supported(block: nn.Module, name: str = "block") -> int:
    """Raise ``ValueError`` unless STCA can compute ``block``; returns its width ``D``.

    Duck-typed on what STCA uses, so it holds for ``torch.nn.MultiheadAttention``
    blocks and for attention modules of the same layout (open_clip's own
    ``Attention``): a block ``ln_1 -> attn -> ls_1``, ``ln_2 -> mlp -> ls_2`` whose
    ``attn`` is batch-first self-attention with one packed ``in_proj_weight``
    ``(3D, D)``, an optional ``in_proj_bias`` ``(3D,)``, an ``out_proj`` linear
    ``(D, D)`` and ``num_heads`` dividing ``D``, and nothing STCA would skip
    (:data:`_UNSUPPORTED_ATTENTION_PARTS`, an ``out_drop`` that drops). An attention
    module without a ``batch_first`` attribute is batch-first by construction
    (open_clip's ``Attention`` has no such setting); one with it needs ``True``.
    """
    missing = [part for part in ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2") if not hasattr(block, part)]
    if missing:
        raise ValueError(
            f"{name} must be a block like open_clip's ResidualAttentionBlock (ln_1, attn, ls_1, ln_2, mlp, ls_2); "
            f"{type(block).__module__}.{type(block).__name__} has no {missing}"
        )
    for part, why in _UNSUPPORTED_BLOCK_PARTS.items():
        if hasattr(block, part):
            raise ValueError(
                f"{name} {why}, which STCA would not apply: use open_clip's ResidualAttentionBlock "
                "(custom blocks with qk-norm, scaled-cosine or head-scaled attention are not supported)"
            )
    attn = block.attn
    where = f"{name}.attn ({type(attn).__name__})"
    weight = getattr(attn, "in_proj_weight", None)
    shape = _shape(weight)
    if shape is None or len(shape) != 2 or shape[0] != 3 * shape[1]:
        raise ValueError(
            f"{where} must hold one packed in_proj_weight of shape (3D, D) (q, k, v of the same width), "
            f"got {shape if shape is not None else type(weight).__name__}"
        )
    width = shape[1]
    bias = getattr(attn, "in_proj_bias", None)
    if bias is not None and _shape(bias) != (3 * width,):
        raise ValueError(f"{where}.in_proj_bias must have shape ({3 * width},) or be None, got {_shape(bias)}")
    out_proj = getattr(attn, "out_proj", None)
    if _shape(getattr(out_proj, "weight", None)) != (width, width):
        raise ValueError(f"{where} must have an out_proj linear layer of weight ({width}, {width})")
    if getattr(out_proj, "bias", None) is not None and _shape(out_proj.bias) != (width,):
        raise ValueError(f"{where}.out_proj.bias must have shape ({width},) or be None")
    heads = getattr(attn, "num_heads", None)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or width % heads:
        raise ValueError(f"{where}.num_heads must be a positive int dividing the width {width}, got {heads!r}")
    if hasattr(attn, "batch_first") and attn.batch_first is not True:
        raise ValueError(
            f"{where} must be batch-first (batch_first=True, tokens (N, L, D)), got batch_first={attn.batch_first!r}"
        )
    if getattr(attn, "add_zero_attn", False):
        raise ValueError(f"{where} uses add_zero_attn, which STCA does not support")
    for part, what in _UNSUPPORTED_ATTENTION_PARTS.items():
        value = getattr(attn, part, None)
        if value is not None and not isinstance(value, nn.Identity):
            raise ValueError(f"{where} uses {what} ({part}), which STCA does not support")
    out_drop = getattr(attn, "out_drop", None)
    if out_drop is not None and not (isinstance(out_drop, nn.Dropout) and out_drop.p == 0):
        raise ValueError(f"{where} drops out its output (out_drop: {out_drop}), which STCA does not support")
    scale = getattr(attn, "scale", None)
    head_dim = width // heads
    if scale is not None and (not isinstance(scale, (int, float)) or abs(scale * head_dim**0.5 - 1) > 1e-6):
        raise ValueError(f"{where} scales its attention logits by {scale!r}; STCA computes the usual "
                         f"1/sqrt(head_dim) = {head_dim ** -0.5:g}")
    return width


def attention_dropout(attn: nn.Module) -> float:
    """The attention-probability dropout of ``attn``: ``nn.MultiheadAttention.dropout`` (a float)
    or an ``attn_drop`` ``nn.Dropout`` (open_clip's ``Attention``)."""
    dropout = getattr(attn, "dropout", None)
    if isinstance(dropout, (int, float)) and not isinstance(dropout, bool):
        return float(dropout)
    return float(getattr(getattr(attn, "attn_drop", None), "p", 0.0))


def attention_heads(
    attn: nn.Module, qkv: torch.Tensor, *, kind: str = STCASettings.attention, training: bool = False
) -> torch.Tensor:
    """Multi-head attention of packed projections, before ``out_proj``: ``(R, L, 3D)`` -> ``(R, L, D)``.

    ``qkv`` holds q, k, v side by side (the layout of ``F.linear(x, attn.in_proj_weight,
    attn.in_proj_bias)``); heads from ``attn.num_heads``, attention dropout from ``attn``
    when ``training``. ``kind="xformers"`` uses ``xformers.ops.memory_efficient_attention``
    (CUDA only; xformers has no CPU kernel), else torch SDPA.
    """
    rows, length, packed = qkv.shape
    channels = packed // 3
    heads = attn.num_heads
    head_dim = channels // heads
    dropout = attention_dropout(attn) if training else 0.0
    if kind == "xformers":
        import xformers.ops as xops  # optional package, checked at construction

        # xformers layout: (R, L, H, head_dim)
        q, k, v = qkv.view(rows, length, 3, heads, head_dim).unbind(2)
        out = xops.memory_efficient_attention(q, k, v, p=dropout)
        return out.reshape(rows, length, channels)
    # SDPA layout: (R, H, L, head_dim)
    q, k, v = qkv.view(rows, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    return out.transpose(1, 2).reshape(rows, length, channels)


def multi_head_self_attention(
    attn: nn.Module, x: torch.Tensor, *, kind: str = STCASettings.attention, training: bool = False
) -> torch.Tensor:
    """Batch-first self-attention ``attn(x, x, x)`` of a block's attention module, computed by SDPA.

    ``x``: ``(R, L, D)`` -> ``(R, L, D)``. Uses the module's own weights
    (``in_proj_weight``, ``in_proj_bias``, ``out_proj``, ``num_heads``; see
    :func:`check_block_supported`), so for an ``nn.MultiheadAttention`` the result
    equals ``attn(x, x, x, need_weights=False)[0]`` up to float rounding.
    ``kind``: see :func:`attention_heads`.
    """
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (R, L, 3D)
    return output_projection(attn, attention_heads(attn, qkv, kind=kind, training=training))


def output_projection(attn: nn.Module, heads: torch.Tensor) -> torch.Tensor:
    """``attn``'s ``out_proj`` applied to the heads' output ``(R, L, D)`` (its weight and bias, as checked)."""
    return F.linear(heads, attn.out_proj.weight, attn.out_proj.bias)


# LayerNorm classes whose forward is F.layer_norm over the last dimension (open_clip's casts the
# result back to the input dtype, LayerNormFp32 computes in float32): the norm the shared
# projections' identity is written for. A subclass with its own forward could compute anything.
# open_clip defines its LayerNorm / LayerNormFp32 in transformer.py (3.x) or layers.py (main branch).
_LAYER_NORM_MODULES = ("torch.nn.modules.normalization", "open_clip.transformer", "open_clip.layers",
                       "open_clip.model")


def check_shared_projection_norm(block: nn.Module, width: int, name: str = "block") -> None:
    """Raise ``ValueError`` unless ``block.ln_1`` is a LayerNorm the shared projections can use.

    ``projection="shared"`` (docs/stca.md section 6) rewrites ``W LN1(m) + c`` through the
    statistics of ``LN1``: it must be a LayerNorm over the last ``width`` channels (torch's or
    open_clip's, optional affine). Other norms work with ``projection="per_path"``.
    """
    norm = block.ln_1
    if (
        not isinstance(norm, nn.LayerNorm)
        or type(norm).__module__ not in _LAYER_NORM_MODULES
        or tuple(norm.normalized_shape) != (width,)
    ):
        raise ValueError(
            f"{name}.ln_1 is {type(norm).__module__}.{type(norm).__name__}"
            f"{'' if not isinstance(norm, nn.LayerNorm) else f' over {tuple(norm.normalized_shape)}'}; "
            f"projection='shared' needs a torch or open_clip LayerNorm over the last {width} channels: "
            "use projection='per_path' for this block"
        )


class STCABlock(nn.Module):
    """An open_clip ``ResidualAttentionBlock`` turned into a Space-time Cross Attention block.

    Args:
        block: the open_clip block. It is registered as the submodule ``block``
            (state_dict keys ``block.ln_1.weight``, ``block.attn.in_proj_weight``,
            ...), and its parameters are used for the full path and every mixed path.
        settings: the :class:`~stdd.model.stca_settings.STCASettings` (checked
            against the block's width); ``mask_ratio=0`` with ``mixing="none"``
            makes the block compute exactly the plain block.
        num_frames: ``T``, frames per clip; inputs hold ``B*T`` frames, a clip's
            frames contiguous.

    ``forward(x, phase=None)``: ``x`` ``(B*T, 1+N, D)`` -> ``(B*T, 1+N, D)``.
    ``phase`` ``(B, T)`` ints in ``[0, K)`` on ``x``'s device; ``None`` means
    the evaluation phases ``t mod K`` (in training mode too: random training
    phases come from :class:`~stdd.model.phases.PhaseSampler`, passed in).
    """

    def __init__(self, block: nn.Module, settings: STCASettings = STCASettings(), *, num_frames: int):
        super().__init__()
        if not isinstance(settings, STCASettings):
            raise ValueError(f"settings must be an STCASettings, got {type(settings).__name__}")
        width = check_block_supported(block)
        settings.check_model(width)
        if settings.projection == "shared":
            check_shared_projection_norm(block, width)
        self.block = block
        self.settings = settings
        self.num_frames = positive_int(num_frames, "num_frames")

    def check_phase(
        self, phase: torch.Tensor, batch: int, device, num_frames: Optional[int] = None
    ) -> torch.Tensor:
        """Shape/dtype/device check of an explicit ``(B, T)`` phase and, outside torch.compile, its values.

        The value check reads the tensor back (a device sync): callers running a
        stack of blocks (:class:`~stdd.model.VideoEncoder`) check once and call the
        blocks with ``validate=False``.
        """
        return check_phase_tensor(
            phase,
            batch=batch,
            num_frames=self.num_frames if num_frames is None else num_frames,
            window=self.settings.window,
            device=device,
        )

    def _attend(self, tokens: torch.Tensor, prompts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``ls_1(attn(ln_1(tokens)))`` with the wrapped block's weights; ``(R, L, D)``. With ``prompts``
        ``(R, P, D)``: the same on ``[prompts; tokens]``, the prompt rows dropped."""
        block = self.block
        if prompts is not None:
            tokens = torch.cat([prompts, tokens], dim=1)
        out = block.ls_1(
            multi_head_self_attention(
                block.attn, block.ln_1(tokens), kind=self.settings.attention, training=self.training
            )
        )
        return out if prompts is None else out[:, prompts.shape[1]:]

    def forward(
        self,
        x: torch.Tensor,
        phase: Optional[torch.Tensor] = None,
        *,
        num_frames: Optional[int] = None,
        validate: bool = True,
        prompts: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``x`` ``(B*T, 1+N, D)`` -> ``(B*T, 1+N, D)``; see the class docstring for ``phase``.

        ``num_frames`` overrides the constructor's ``T`` for this call (the video
        encoder passes the clip length of its input). ``validate=False`` skips
        the checks of an explicit ``phase`` (the caller did them). ``prompts``
        ``(B*T, P, D)`` (prompt-based adaptation, :mod:`stdd.model.prompt_adaptation`):
        tokens prepended to the visual tokens in the attention of the full path and of
        every mixed path (keys and values through the block's own ``ln_1`` and
        in-projection), whose own outputs are dropped: the result is what the block
        computes on ``[prompts; tokens]`` without the prompt rows.
        """
        frames = self.num_frames if num_frames is None else num_frames
        if x.dim() != 3:
            raise ValueError(f"x must have shape (B*T, 1+N, D), got {tuple(x.shape)}")
        if x.shape[0] % frames:
            raise ValueError(f"x.shape[0] (B*T = {x.shape[0]}) must be divisible by num_frames={frames}")
        if prompts is not None and (prompts.dim() != 3 or prompts.shape[0] != x.shape[0]
                                    or prompts.shape[2] != x.shape[2]):
            raise ValueError(f"prompts must have shape (B*T, P, D) = ({x.shape[0]}, P, {x.shape[2]}), "
                             f"got {tuple(prompts.shape)}")
        if phase is not None and validate:
            phase = self.check_phase(phase, x.shape[0] // frames, x.device, frames)
        # The ops' keyword arguments, from the settings (the one place they are fed).
        s = self.settings
        common = dict(window=s.window, mask_ratio=s.mask_ratio, mask_rounding=s.mask_rounding, phase=phase,
                      backend=s.backend, validate=False)
        mixing = dict(scales=s.scales, channel_fold=s.channel_fold, mixing=s.mixing)
        if prompts is not None:
            prompts = prompts.to(x.dtype)
        if s.projection == "shared":
            full, mixed = self._paths_shared(x, frames, common, mixing, prompts)
        else:
            full, mixed = self._paths_per_path(x, frames, common, mixing, prompts)
        # Step 4: padding + short-cut; the MLP reads the full path (Eq. 2).
        block = self.block
        residual = block.ls_2(block.mlp(block.ln_2(full)))
        # Under autocast the attention/MLP outputs can be in a lower precision than the
        # stream: keep the tensors the op sees in one dtype (no-ops otherwise).
        mixed = mixed.to(full.dtype)
        residual = residual.to(full.dtype)
        return stdd_kernels.pad_scatter(full, mixed, frames, residual=residual, **common)

    def _paths_per_path(self, x, frames, common, mixing, prompts=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-3 as written: ``(full (B*T, 1+N, D), mixed (S, B*T, 1+N_keep, D))``."""
        # Steps 1-2: (S, B*T, 1+N_keep, D), every scale from the same input tokens.
        mixed = stdd_kernels.mix_gather(x, frames, **mixing, **common)
        # Step 3: full path on all 1+N tokens; all scales' mixed tokens as one
        # (S*B*T, 1+N_keep, D) batch through the same ln_1/attention weights.
        full = x + self._attend(x, prompts)
        n_scales, rows, kept, width = mixed.shape
        flat = mixed.reshape(n_scales * rows, kept, width)
        flat_prompts = None if prompts is None else prompts.repeat(n_scales, 1, 1)  # each scale's rows
        return full, (flat + self._attend(flat, flat_prompts)).reshape(n_scales, rows, kept, width)

    def _paths_shared(self, x, frames, common, mixing, prompts=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1-3 with shared projections (docs/stca.md section 6): ``(full, mixed (1, B*T, 1+N_keep, D))``.

        The mixed paths' q, k, v come from the full path's (``stdd_kernels.mix_project``);
        the scales' attention outputs are averaged before one ``out_proj``, which is what
        ``pad_scatter`` would average after it (``out_proj`` and ``ls_1`` are affine).
        """
        block = self.block
        attn, norm = block.attn, block.ln_1
        attend = dict(kind=self.settings.attention, training=self.training)
        qkv = F.linear(norm(x), attn.in_proj_weight, attn.in_proj_bias)  # (B*T, 1+N, 3D): the full path's
        qkv_mixed, mixed_mean = stdd_kernels.mix_project(
            x, qkv, frames, ln_weight=norm.weight, ln_bias=norm.bias, ln_eps=norm.eps,
            in_proj_weight=attn.in_proj_weight, in_proj_bias=attn.in_proj_bias,
            basis=self._kept_basis(factor_dtype(x.dtype)), **mixing, **common,
        )  # (S, B*T, 1+N_keep, 3D), (B*T, 1+N_keep, D)
        n_scales, rows, kept, _ = qkv_mixed.shape
        flat = qkv_mixed.reshape(n_scales * rows, kept, -1)
        if prompts is None:
            full = x + block.ls_1(output_projection(attn, attention_heads(attn, qkv, **attend)))
            heads = attention_heads(attn, flat, **attend)
        else:  # the prompts' own q, k, v prepended to every path; their output rows dropped
            count = prompts.shape[1]
            qkv_prompts = F.linear(norm(prompts), attn.in_proj_weight, attn.in_proj_bias).to(qkv.dtype)
            heads = attention_heads(attn, torch.cat([qkv_prompts, qkv], dim=1), **attend)[:, count:]
            full = x + block.ls_1(output_projection(attn, heads))
            flat_prompts = qkv_prompts.to(flat.dtype).repeat(n_scales, 1, 1)
            heads = attention_heads(attn, torch.cat([flat_prompts, flat], dim=1), **attend)[:, count:]
        heads = heads.reshape(n_scales, rows, kept, -1).mean(dim=0)  # (B*T, 1+N_keep, D)
        mixed = mixed_mean + block.ls_1(output_projection(attn, heads))
        return full, mixed.unsqueeze(0)

    def _kept_basis(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The block's ``projection_basis`` in ``dtype``, computed once while its weights stay as they are.

        ``W [b, g]`` and ``W[:, :2I]`` (docs/stca.md section 6) depend on the weights only,
        so a model that is not training (no gradient flows into them) reuses them in every
        forward pass; a weight changed in place (optimizer step, ``load_state_dict``) or moved
        (``.to()``) has another version or address and makes a new one. ``None`` (let
        ``mix_project`` build it, with its gradient) when one could flow into those weights,
        and while ``torch.compile`` traces.
        """
        block = self.block
        weights = (block.ln_1.weight, block.ln_1.bias, block.attn.in_proj_weight, block.attn.in_proj_bias)
        present = [w for w in weights if w is not None]
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(w.requires_grad for w in present)):
            return None
        # The very tensors (weak references: a freed weight's address may be reused) at their versions.
        kept = self._basis_made_of
        if not (kept is not None and kept[0] == dtype and len(kept[1]) == len(weights) and all(
            (ref is None and w is None) or (ref is not None and ref[0]() is w and ref[1] == w._version)
            for ref, w in zip(kept[1], weights)
        )):
            width = block.attn.in_proj_weight.shape[1]
            s = self.settings
            self._basis = stdd_kernels.projection_basis(
                *weights, borrowed_channel_count(width, s.channel_fold, s.mixing), dtype
            )
            self._basis_made_of = (dtype, [None if w is None else (weakref.ref(w), w._version) for w in weights])
        return self._basis

    _basis_made_of: Optional[tuple] = None  # (dtype, [(weak reference, version) of each weight])
    _basis: Optional[torch.Tensor] = None

    def __getstate__(self):
        # The kept basis is derived (and weak references do not pickle): a pickled block makes its own.
        state = super().__getstate__()
        state.pop("_basis_made_of", None)
        state.pop("_basis", None)
        return state

    def extra_repr(self) -> str:
        return f"num_frames={self.num_frames}, settings={self.settings}"
