"""The STDD model on open_clip.

- :class:`STCABlock` (``stca_block.py``): an open_clip ViT block made space-time (Eq. 1-7).
- :class:`VideoEncoder` / :class:`FrozenImageEncoder` (``video_encoder.py``): the STCA
  student ``(B, T, 3, H, W) -> (B, T, E)`` and the frozen per-frame CLIP teacher.
- :class:`TextEncoder`, :func:`template_prompts`, :func:`load_prompt_file`
  (``text.py``): prompts -> frozen text features ``(K, N_max, E)`` + mask, cached.
- :func:`alignment_scores`, :func:`frame_prompt_scores` (``alignment.py``): Eq. 8.
- :func:`classification_loss`, :class:`ResidualProjector`,
  :func:`feature_distillation_loss` (``losses.py``): Eq. 9 + distillation.
- :class:`STDDModel`, :func:`build_stdd` (``stdd_model.py``): all of it assembled.
- :func:`load_clip` (``clip_loading.py``): open_clip name + tag / checkpoint file;
  registers the tiny configs in ``configs/`` (``STDD-Tiny-ViT``, ``STDD-Tiny-ViT-64``).
"""

from .alignment import SCORE_MODES, alignment_scores, frame_prompt_scores
from .clip_loading import TINY_MODEL_NAMES, ClipSource, load_clip, register_model_configs, vision_tower
from .losses import ResidualProjector, classification_loss, feature_distillation_loss
from .stca_block import STCABlock, multi_head_self_attention
from .stdd_model import STDDModel, STDDOutput, build_stdd
from .text import (
    DEFAULT_TEMPLATES,
    ClassTextFeatures,
    TextEncoder,
    check_prompts,
    load_prompt_file,
    template_prompts,
)
from .video_encoder import FrozenImageEncoder, VideoEncoder

__all__ = [
    "DEFAULT_TEMPLATES",
    "SCORE_MODES",
    "TINY_MODEL_NAMES",
    "ClassTextFeatures",
    "ClipSource",
    "FrozenImageEncoder",
    "ResidualProjector",
    "STCABlock",
    "STDDModel",
    "STDDOutput",
    "TextEncoder",
    "VideoEncoder",
    "alignment_scores",
    "build_stdd",
    "check_prompts",
    "classification_loss",
    "feature_distillation_loss",
    "frame_prompt_scores",
    "load_clip",
    "load_prompt_file",
    "multi_head_self_attention",
    "register_model_configs",
    "template_prompts",
    "vision_tower",
]
