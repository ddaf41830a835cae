"""The STDD model on open_clip: STCA block, video encoder, text side, alignment, losses."""

from .stca_block import STCABlock, multi_head_self_attention

__all__ = ["STCABlock", "multi_head_self_attention"]
