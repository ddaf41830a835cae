"""Training objectives: cross-entropy on the alignment scores (paper Eq. 9) and
FROSTER-style feature distillation from the frozen CLIP image encoder.

Distillation (Huang et al., ICLR 2024, "FROSTER"): the student's per-frame
features, L2-normalised, pass a residual projector
``g(f) = f + alpha * W2 GELU(W1 f)`` (``W2`` zero-initialised, so ``g`` starts as
the identity); the loss is ``1 - cos(g(f_student), f_teacher)`` averaged over
all frames of all clips. The gradient flows into the student and the projector
(the authors' release computes this term under ``no_grad``, so there it never
trains anything; here it does). The teacher side carries no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PROJECTOR_ALPHA = 0.1  # scale of the residual projector's MLP branch (FROSTER: 0.1)


def classification_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 9: mean cross-entropy of softmax over the seen classes' scores ``S`` ``(B, K)``."""
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape (B, K), got {tuple(scores.shape)}")
    if labels.shape != scores.shape[:1] or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"labels must be an int64 class-index tensor of shape ({scores.shape[0]},), "
            f"got {labels.dtype} {tuple(labels.shape)}"
        )
    return F.cross_entropy(at_least_float32(scores), labels.long())


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors in float32 for the losses; float64 ones stay float64 (a float64 model trains in it)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


class ResidualProjector(nn.Module):
    """``g(f) = f + alpha * W2 GELU(W1 f)`` on features ``(..., E)``; identity at initialisation.

    As in FROSTER: two bias-free linear layers, ``W1`` Kaiming-normal,
    ``W2`` zeros, ``alpha = 0.1``.
    """

    def __init__(self, dim: int, alpha: float = PROJECTOR_ALPHA):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.alpha = float(alpha)
        self.mlp = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.GELU(), nn.Linear(dim, dim, bias=False))
        nn.init.kaiming_normal_(self.mlp[0].weight)
        nn.init.zeros_(self.mlp[2].weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.alpha * self.mlp(features)


def feature_distillation_loss(
    student_features: torch.Tensor, teacher_features: torch.Tensor, projector: nn.Module
) -> torch.Tensor:
    """``mean over (B, T) of 1 - cos(projector(normalize(student)), teacher)``.

    ``student_features``, ``teacher_features``: ``(B, T, E)`` (teacher detached
    here as well, whatever the caller passes).
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"student_features {tuple(student_features.shape)} and teacher_features "
            f"{tuple(teacher_features.shape)} must have the same shape (B, T, E)"
        )
    student = projector(F.normalize(at_least_float32(student_features), dim=-1))
    teacher = at_least_float32(teacher_features.detach())
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
