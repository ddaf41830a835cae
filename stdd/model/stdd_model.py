"""The STDD model assembled: STCA video encoder + frozen teacher + projector + scores + losses.

Typical use (the training/eval code builds on this)::

    model, text = build_stdd("ViT-B-16", "openai", device="cuda")      # or a checkpoint file
    classes = text.class_features(stdd.knowledge.load_prompts("k400_prompts.json", names), cache_dir="cache/")
    out = model(video, classes.features.cuda(), classes.mask.cuda(), labels=labels)  # training
    out.loss.backward()
    scores = model(video, features, mask).scores                       # (B, K) zero-shot scores

Only the video encoder (and the distillation projector) train; the text
tower, the teacher and CLIP's logit scale are frozen (paper: "we only optimize
the parameters of E_V"); with prompt-based adaptation only the encoder's prompt
generators (:mod:`stdd.model.prompt_adaptation`) and the projector do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .alignment import SCORE_MODES, alignment_scores
from .clip_loading import ClipSource, load_clip, vision_tower
from .losses import PROJECTOR_ALPHA, ResidualProjector, classification_loss, feature_distillation_loss
from .prompt_adaptation import PromptSettings
from .stca_settings import STCASettings
from .text_encoder import TextEncoder
from .video_encoder import FrozenImageEncoder, VideoEncoder


DISTILL_WEIGHT = 2.0  # weight of the distillation term (the paper / FROSTER: 2.0)


@dataclass
class STDDOutput:
    """``scores`` ``(B, K)`` (Eq. 8); ``frame_features`` ``(B, T, E)``; losses when labels were given:
    ``loss = ce_loss + distill_weight * distill_loss`` (``distill_loss`` is ``None`` without a
    teacher, in eval mode, or with weight 0)."""

    scores: torch.Tensor
    frame_features: torch.Tensor
    loss: Optional[torch.Tensor] = None
    ce_loss: Optional[torch.Tensor] = None
    distill_loss: Optional[torch.Tensor] = None


class STDDModel(nn.Module):
    """Student video encoder with the STDD scores and training losses.

    Args:
        video_encoder: the STCA :class:`VideoEncoder` (trainable).
        logit_scale: CLIP's ``logit_scale.exp()`` (kept frozen, a buffer).
        teacher: frozen :class:`FrozenImageEncoder` for distillation, or ``None``.
        distill_weight: weight of the distillation term (``DISTILL_WEIGHT``).
        projector_alpha: residual projector scale (``PROJECTOR_ALPHA``).
        score_mode: ``"frame_prompt"`` (Eq. 8) or ``"mean_pool"`` (mean-pooled ablation).

    ``forward(video, text_features, text_mask, labels=None, phase=None)`` ->
    :class:`STDDOutput`. The distillation term is computed in training mode only.
    """

    def __init__(
        self,
        video_encoder: VideoEncoder,
        *,
        logit_scale: float,
        teacher: Optional[FrozenImageEncoder] = None,
        distill_weight: float = DISTILL_WEIGHT,
        projector_alpha: float = PROJECTOR_ALPHA,
        score_mode: str = SCORE_MODES[0],
    ):
        super().__init__()
        if not isinstance(video_encoder, VideoEncoder):
            raise ValueError(f"video_encoder must be a VideoEncoder, got {type(video_encoder).__name__}")
        if score_mode not in SCORE_MODES:
            raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
        if not (isinstance(distill_weight, (int, float)) and distill_weight >= 0):
            raise ValueError(f"distill_weight must be a number >= 0, got {distill_weight!r}")
        if distill_weight > 0 and teacher is None:
            raise ValueError("distill_weight > 0 needs a teacher (FrozenImageEncoder); pass distill_weight=0 without")
        if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
            raise ValueError(f"logit_scale must be a positive number (CLIP's logit_scale.exp()), got {logit_scale!r}")
        self.video_encoder = video_encoder
        self.teacher = teacher
        self.projector = ResidualProjector(video_encoder.output_dim, projector_alpha) if teacher is not None else None
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        self.distill_weight = float(distill_weight)
        self.score_mode = score_mode
        self._checked_mask = None

    def encode_video(self, video: torch.Tensor, phase: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-frame features ``(B, T, E)``."""
        return self.video_encoder(video, phase)

    def scores(self, frame_features: torch.Tensor, text_features: torch.Tensor, text_mask: torch.Tensor):
        """Class scores ``(B, K)`` from frame features ``(B, T, E)`` and prompt features ``(K, N_max, E)``."""
        # The mask's "every class has a prompt" check reads it back from the device: do it
        # once per mask tensor (same storage, shape and version), not once per training step.
        signature = (text_mask.data_ptr(), tuple(text_mask.shape), text_mask._version, text_mask.device)
        check = signature != self._checked_mask
        scores = alignment_scores(
            frame_features, text_features, text_mask, self.logit_scale, mode=self.score_mode, validate=check
        )
        self._checked_mask = signature
        return scores

    def forward(
        self,
        video: torch.Tensor,
        text_features: torch.Tensor,
        text_mask: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        phase: Optional[torch.Tensor] = None,
    ) -> STDDOutput:
        frame_features = self.encode_video(video, phase)
        scores = self.scores(frame_features, text_features, text_mask)
        out = STDDOutput(scores=scores, frame_features=frame_features)
        if labels is None:
            return out
        out.ce_loss = classification_loss(scores, labels)
        out.loss = out.ce_loss
        if self.training and self.teacher is not None and self.distill_weight > 0:
            teacher_features = self.teacher(video)
            out.distill_loss = feature_distillation_loss(frame_features, teacher_features, self.projector)
            out.loss = out.loss + self.distill_weight * out.distill_loss
        return out


def build_stdd(
    model_name: str,
    pretrained: Optional[str],
    *,
    stca: Optional[STCASettings] = STCASettings(),
    temporal: Optional[str] = None,
    prompts: Optional[PromptSettings] = None,
    allow_random_init: bool = False,
    device="cpu",
    precision: str = "fp32",
    cache_dir: Optional[str] = None,
    distill_weight: float = DISTILL_WEIGHT,
    projector_alpha: float = PROJECTOR_ALPHA,
    score_mode: str = SCORE_MODES[0],
    teacher_gpu_dtype: Optional[torch.dtype] = torch.bfloat16,
    text_batch_size: int = 256,
) -> tuple[STDDModel, TextEncoder]:
    """Load CLIP once and build ``(STDDModel, TextEncoder)`` from it.

    The teacher (when ``distill_weight > 0``) is a frozen copy of the original
    image tower, taken before the STCA conversion. See :func:`load_clip` for
    ``model_name`` / ``pretrained``; ``stca``, ``temporal`` and ``prompts`` are :class:`VideoEncoder`'s
    (``stca=None``: the frame-only baseline, open_clip's own blocks; ``temporal="expand_view"``
    with ``stca=None``: Open-VCLIP's widened-time attention; ``prompts``: prompt-based adaptation,
    the tower frozen and only prompt generators trained).
    """
    clip_model, source = load_clip(
        model_name, pretrained, allow_random_init=allow_random_init, device=device,
        precision=precision, cache_dir=cache_dir,
    )
    visual = vision_tower(clip_model)
    teacher = FrozenImageEncoder(visual, gpu_dtype=teacher_gpu_dtype) if distill_weight > 0 else None
    encoder = VideoEncoder(visual, stca, temporal=temporal, prompts=prompts)
    encoder.source = source
    logit_scale = float(clip_model.logit_scale.detach().float().exp())
    model = STDDModel(
        encoder, logit_scale=logit_scale, teacher=teacher, distill_weight=distill_weight,
        projector_alpha=projector_alpha, score_mode=score_mode,
    ).to(device)
    text = TextEncoder(clip_model, source, batch_size=text_batch_size)  # drops clip_model.visual
    return model, text
