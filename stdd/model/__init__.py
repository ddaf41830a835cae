"""The STDD model on open_clip.

- :class:`STCASettings` (``stca_settings.py``): every STCA setting, one frozen dataclass.
- :class:`PhaseSampler` (``phases.py``): the random window phases from the run seed: training
  (per clip, shared by the blocks, or per block) and the optional shuffled evaluation phases.
- :class:`STCABlock` (``stca_block.py``): an open_clip ViT block made space-time (Eq. 1-7).
- :class:`VideoEncoder` / :class:`FrozenImageEncoder` (``video_encoder.py``): the STCA
  student ``(B, T, 3, H, W) -> (B, T, E)`` (``stca=None``: open_clip's own blocks, the
  frame-only baseline; ``temporal="expand_view"``: Open-VCLIP's widened-time attention,
  ``expand_view.py``) and the frozen per-frame CLIP teacher.
- :class:`TextEncoder` (``text_encoder.py``): prompts -> frozen text features ``(K, N_max, E)``
  + mask, cached; :func:`template_prompts` / ``DEFAULT_TEMPLATES`` are re-exported from
  :mod:`stdd.knowledge`, where the prompt sources live.
- :func:`alignment_scores`, :func:`frame_prompt_scores` (``alignment.py``): Eq. 8.
- :func:`classification_loss`, :class:`ResidualProjector`,
  :func:`feature_distillation_loss` (``losses.py``): Eq. 9 + distillation.
- :class:`PromptSettings`, :class:`PromptGenerator` (``prompt_adaptation.py``): prompt-based
  adaptation (Table 4): the tower frozen, STCA outputs turned into the next block's prompts.
- :class:`STDDModel`, :func:`build_stdd` (``stdd_model.py``): all of it assembled.
- :func:`load_clip` (``clip_loading.py``): open_clip name + tag / checkpoint file;
  registers the tiny configs in ``configs/`` (``STDD-Tiny-ViT``, ``STDD-Tiny-ViT-64``).

Where the paper's equations live, and the test that pins each:

==========  ==========================================================  =========================================
Eq.         code                                                        test
==========  ==========================================================  =========================================
1           ``STCABlock.forward``: ``full = x + ls_1(attn(ln_1(x)))``    tests/test_stca_block.py (literal spec,
2           ``STCABlock.forward``: ``pad_scatter(full, mixed,            plain-block parity)
            residual=ls_2(mlp(ln_2(full))))``
3-4 (WSM)   ``stdd_kernels.mix_gather`` (phases: an input, ``t mod K``    tests/test_reference.py (ops);
            by default; training draws: ``phases.PhaseSampler``)       test_phases.py (phases)
5-6 (MCM)   ``stdd_kernels.mix_gather`` (``mixing="separate"`` /          tests/test_reference.py;
            ``"continual"``), called by ``STCABlock.forward``           test_stca_block.py (both mixings)
7           ``STCABlock.forward``: ``mixed + ls_1(attn(ln_1(mixed)))``,   test_stca_block.py (literal spec)
            all scales in one attention call; average + padding in
            ``stdd_kernels.pad_scatter``. By default (``projection=         test_shared_projection.py (equal
            "shared"``) the mixed q, k, v come from the full path's:       to the written-out block, float64)
            ``stdd_kernels.mix_project`` (docs/stca.md section 6)
8           ``alignment.frame_prompt_scores`` / ``alignment_scores``     tests/test_model_alignment.py
9           ``losses.classification_loss``                              tests/test_model_losses.py
distill.    ``losses.ResidualProjector``, ``feature_distillation_loss``;  tests/test_model_losses.py
            teacher ``video_encoder.FrozenImageEncoder``
==========  ==========================================================  =========================================
"""

from ..knowledge.prompts import DEFAULT_TEMPLATES, template_prompts  # (their home: stdd.knowledge)
from .alignment import SCORE_MODES, alignment_scores, frame_prompt_scores
from .clip_loading import TINY_MODEL_NAMES, ClipSource, load_clip, register_model_configs, vision_tower
from .losses import ResidualProjector, classification_loss, feature_distillation_loss
from .phases import PhaseSampler
from .prompt_adaptation import ADAPTATIONS, PromptGenerator, PromptSettings
from .stca_block import STCABlock, multi_head_self_attention
from .stca_settings import STCASettings
from .stdd_model import STDDModel, STDDOutput, build_stdd
from .text_encoder import (
    TEXT_FEATURE_SOURCES,
    ClassTextFeatures,
    TextEncoder,
    orthogonal_class_features,
    word_class_features,
)
from .video_encoder import TEMPORAL_KINDS, FrozenImageEncoder, VideoEncoder

__all__ = [
    "ADAPTATIONS",
    "DEFAULT_TEMPLATES",
    "SCORE_MODES",
    "TEMPORAL_KINDS",
    "TEXT_FEATURE_SOURCES",
    "TINY_MODEL_NAMES",
    "ClassTextFeatures",
    "ClipSource",
    "FrozenImageEncoder",
    "PhaseSampler",
    "PromptGenerator",
    "PromptSettings",
    "ResidualProjector",
    "STCABlock",
    "STCASettings",
    "STDDModel",
    "STDDOutput",
    "TextEncoder",
    "VideoEncoder",
    "orthogonal_class_features",
    "word_class_features",
    "alignment_scores",
    "build_stdd",
    "classification_loss",
    "feature_distillation_loss",
    "frame_prompt_scores",
    "load_clip",
    "multi_head_self_attention",
    "register_model_configs",
    "template_prompts",
    "vision_tower",
]
