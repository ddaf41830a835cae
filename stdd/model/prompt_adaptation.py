"""Prompt-based adaptation (the paper's Table 4): the CLIP tower frozen, STCA kept, a small MLP per block.

The paper describes it in one sentence: the backbone is frozen and "only a MLP is tuned to transform
tokens after Space-time Cross Attention into prompts prepended with visual tokens within each block".
It does not give the MLP's input, width or the number of prompts; what stdd computes (each choice
below is a setting or said here, and ``docs/stca.md`` section 7 gives the reasons):

- Between block ``l`` and block ``l + 1`` a :class:`PromptGenerator` reads block ``l``'s output
  tokens (its STCA output after padding and short-cut) and gives ``PromptSettings.tokens`` prompt
  tokens of the model's width per frame: every token through ``LayerNorm(D) -> Linear(D, hidden) ->
  GELU``; then each prompt is its own learnt weighted sum of those over the frame's ``1 + N`` token
  positions, through one ``Linear(hidden, D)``. The non-linearity comes before the pooling, so what a
  token's mixed channels say about motion at its place survives it, and the weights per position let
  a prompt say *where* (a shape moving left and one moving right differ in where the neighbour frames'
  channels disagree with the token's own). Measured on the demo task, a generator of a pooled CLS +
  mean token learnt no direction at all. A ViT of ``L`` blocks has ``L - 1`` generators; the first
  block reads the embeddings without prompts.
- Block ``l + 1`` prepends them to its visual tokens in *both* of its attention paths (the full path
  and every mixed path): its frozen ``ln_1`` and in-projection make their keys and values, every
  visual token attends to them, and their own outputs are dropped at the end of the block (as deep
  visual prompt tuning does), so the block returns its ``1 + N`` visual tokens and the next block
  gets new prompts. The last block's output, the one pooled, holds no prompt.
- Only the generators train (and the distillation projector, a part of the loss); the CLIP tower,
  STCA's reuse of its weights, ``ln_post``, ``proj`` and the logit scale stay as loaded. A checkpoint
  holds the generators, the projector and :func:`frozen_digest` of the frozen tower, which loading
  compares with the tower ``model.pretrained`` gives (weights trained on one CLIP are refused on
  another).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

# How the video encoder adapts to video (config: model.adaptation): every weight of the CLIP tower
# trains (the paper's STDD, "fully-tuned" in Table 4), or the tower is frozen and only prompt
# generators train ("prompt-based" in Table 4).
ADAPTATIONS = ("full", "prompt")


@dataclass(frozen=True)
class PromptSettings:
    """The prompt generators of prompt-based adaptation (the paper is silent on both numbers).

    ``tokens``: prompt tokens per frame and block, 8 (the prompt lengths of deep visual prompt tuning
    and of video prompt methods are of this order; the tokens add ``P / (1 + N)`` to a block's
    attention length, 4% for ViT-B/16). ``hidden``: the MLP's hidden width; ``None`` is a quarter of the
    model width (192 for ViT-B/16: ~0.30M trainable weights per block gap, ~3.3M for ViT-B/16's 11,
    under 4% of the tower's 86M; an adapter-sized bottleneck).
    """

    tokens: int = 8
    hidden: Optional[int] = None

    def __post_init__(self):
        for name in ("tokens", "hidden"):
            value = getattr(self, name)
            if value is None and name == "hidden":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"prompt {name} must be an int >= 1{' or None' if name == 'hidden' else ''}, "
                                 f"got {value!r}")

    def hidden_width(self, width: int) -> int:
        """The generators' hidden width for a model of width ``width``."""
        return self.hidden if self.hidden is not None else max(1, width // 4)


class PromptGenerator(nn.Module):
    """Block ``l``'s output tokens ``(R, 1+N, D)`` -> ``tokens`` prompt tokens ``(R, P, D)`` for block ``l + 1``.

    ``positions``: ``1 + N``, the token count of the model's frames (the pooling weights are per position).
    """

    def __init__(self, width: int, positions: int, settings: PromptSettings = PromptSettings()):
        super().__init__()
        self.width, self.positions, self.tokens = int(width), int(positions), settings.tokens
        hidden = settings.hidden_width(width)
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        # (P, 1+N): each prompt's weights over the token positions; a mean plus a little noise, so that the
        # prompts start apart (equal ones would get equal gradients and stay equal)
        self.pool = nn.Parameter(torch.full((settings.tokens, positions), 1.0 / positions)
                                 + 0.02 * torch.randn(settings.tokens, positions))
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (self.positions, self.width):
            raise ValueError(f"tokens must have shape (R, {self.positions}, {self.width}), got {tuple(tokens.shape)}")
        hidden = self.act(self.fc1(self.norm(tokens.to(self.fc1.weight.dtype))))  # (R, 1+N, hidden), per token
        pooled = torch.einsum("pn,rnh->rph", self.pool.to(hidden.dtype), hidden)  # (R, P, hidden)
        return self.fc2(pooled).to(tokens.dtype)

    def extra_repr(self) -> str:
        return f"width={self.width}, positions={self.positions}, tokens={self.tokens}"


def frozen_digest(module: nn.Module) -> torch.Tensor:
    """SHA-256 of ``module``'s parameters (their order, shapes, dtypes and values, on the CPU) as 32 uint8.

    Names are left out, so the digest of an open_clip tower is the same before and after its blocks
    are wrapped into STCA blocks.
    """
    digest = hashlib.sha256()
    for parameter in module.parameters():
        tensor = parameter.detach().to("cpu").contiguous()
        digest.update(f"{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return torch.tensor(list(digest.digest()), dtype=torch.uint8)
