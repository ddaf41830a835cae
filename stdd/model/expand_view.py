"""Widened-time attention ("expand view", Open-VCLIP / FROSTER): every frame also attends to its neighbours.

The temporal modelling of Open-VCLIP (ICML 2023) and FROSTER (ICLR 2024), which
both evaluate and train an OpenAI CLIP ViT whose every block computes its
self-attention with keys and values widened in time. For frame ``t`` of a clip
of ``T`` frames, in every block and every head:

- the queries are frame ``t``'s own tokens (CLS included), projected as usual;
- the keys (and values) are three blocks of the same block's projected tokens,
  in this order: frame ``t+1``, frame ``t-1``, frame ``t`` (CLS included), so
  ``3 (1+N)`` keys per query;
- where a neighbour does not exist (the first frame has no ``t-1``, the last no
  ``t+1``) its block holds zeros, and it is *not* masked: those keys give logits
  of exactly 0, which take their share of the softmax, and their values are 0;
- nothing else is masked, and the projections, the MLP and the norms are the
  block's own: no parameter is added, so the weights keep OpenAI CLIP's names.

The attention runs on torch's fused path (``F.scaled_dot_product_attention``
over the 3x-long keys) and is differentiable, so a model with these blocks
trains as well as it evaluates. A clip's frames must be contiguous in the batch
(``(B*T, 1+N, D)``, frame index fastest), as everywhere in stdd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .stca_block import attention_dropout, output_projection


def neighbour_keys(tokens: torch.Tensor, num_frames: int) -> torch.Tensor:
    """``(B*T, H, L, d)`` per-frame heads -> ``(B*T, H, 3L, d)``: frame ``t+1``, frame ``t-1``, frame ``t``.

    The missing neighbour of a clip's first and last frame is a block of zeros (not a mask).
    """
    rows, heads, length, dim = tokens.shape
    if rows % num_frames:
        raise ValueError(f"tokens hold {rows} frames, not a whole number of clips of {num_frames} frames")
    clips = tokens.reshape(rows // num_frames, num_frames, heads, length, dim)
    zeros = clips.new_zeros(clips.shape[0], 1, heads, length, dim)
    following = torch.cat([clips[:, 1:], zeros], dim=1)  # frame t+1; zeros at the last frame
    preceding = torch.cat([zeros, clips[:, :-1]], dim=1)  # frame t-1; zeros at the first frame
    return torch.cat([following, preceding, clips], dim=3).reshape(rows, heads, 3 * length, dim)


def expand_view_attention(attn: nn.Module, x: torch.Tensor, num_frames: int, *, training: bool = False) -> torch.Tensor:
    """The widened-time self-attention of a block's attention module: ``(B*T, L, D)`` -> ``(B*T, L, D)``.

    ``x``: the normalised tokens (``ln_1`` applied), a clip's ``num_frames`` frames contiguous.
    The module's own ``in_proj_weight`` / ``in_proj_bias`` / ``out_proj`` / ``num_heads`` are used
    (``stdd.model.stca_block.check_block_supported`` says which modules qualify); attention dropout
    only when ``training``.
    """
    rows, length, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (B*T, L, 3D)
    q, k, v = qkv.view(rows, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)  # (B*T, H, L, d)
    keys, values = neighbour_keys(k, num_frames), neighbour_keys(v, num_frames)  # (B*T, H, 3L, d)
    dropout = attention_dropout(attn) if training else 0.0
    out = F.scaled_dot_product_attention(q, keys, values, dropout_p=dropout)  # (B*T, H, L, d)
    return output_projection(attn, out.transpose(1, 2).reshape(rows, length, width))


def expand_view_block(block: nn.Module, x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """One open_clip ``ResidualAttentionBlock`` with widened-time attention: ``(B*T, 1+N, D)`` -> same.

    ``x + ls_1(attention(ln_1(x)))``, then ``+ ls_2(mlp(ln_2(.)))``: the block's forward with
    :func:`expand_view_attention` in place of its self-attention.
    """
    x = x + block.ls_1(expand_view_attention(block.attn, block.ln_1(x), num_frames, training=block.training))
    return x + block.ls_2(block.mlp(block.ln_2(x)))
