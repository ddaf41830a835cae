"""Video encoders on an open_clip ``VisionTransformer``.

- :class:`VideoEncoder`: the STDD student. Its temporal modelling is one of
  :data:`TEMPORAL_KINDS`: ``"stca"`` (with STCA settings, every transformer block
  of the ViT becomes an :class:`~stdd.model.stca_block.STCABlock`; same
  parameters, no new ones), ``"expand_view"`` (every block's self-attention
  widened in time as Open-VCLIP and FROSTER do it, :mod:`stdd.model.expand_view`;
  open_clip's blocks and parameter names, nothing added) or ``"none"``
  (``stca=None``: open_clip's own blocks, the frame-only baseline: open_clip's
  forward on every frame, at plain-CLIP cost). A clip
  ``(B, T, 3, H, W)`` gives per-frame embeddings ``(B, T, E)`` after ``ln_post``
  and ``proj`` (``z_{t,cls}^L`` of the paper, projected into the joint space).
- :class:`FrozenImageEncoder`: the distillation teacher, a frozen copy of the
  original CLIP image encoder applied frame by frame (eval mode, no grad,
  bf16 autocast on GPU).
"""

from __future__ import annotations

import copy
import re
from typing import Optional

import open_clip
import torch
from open_clip.transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from .clip_loading import ClipSource, load_clip, vision_tower
from .expand_view import expand_view_block
from .losses import at_least_float32
from .prompt_adaptation import PromptGenerator, PromptSettings, frozen_digest
from .stca_block import STCABlock, check_block_supported
from .stca_settings import STCASettings


def _check_video(video: torch.Tensor, image_size: tuple[int, int], name: str = "video") -> None:
    if not isinstance(video, torch.Tensor):
        raise ValueError(f"{name} must be a tensor (B, T, 3, H, W), got {type(video).__name__}")
    if video.dim() != 5 or video.shape[2] != 3:
        raise ValueError(f"{name} must have shape (B, T, 3, H, W), got {tuple(video.shape)}")
    if tuple(video.shape[3:]) != tuple(image_size):
        raise ValueError(
            f"{name} frames are {tuple(video.shape[3:])} pixels but the model takes {tuple(image_size)}"
        )
    if not video.dtype.is_floating_point:
        raise ValueError(f"{name} must be a float tensor (normalised pixels), got {video.dtype}")


# How the video encoder relates a clip's frames (config: model.temporal): STCA blocks (the paper), every
# block's attention widened to the neighbour frames (Open-VCLIP / FROSTER), or nothing (frame-only).
TEMPORAL_KINDS = ("stca", "expand_view", "none")


class VideoEncoder(nn.Module):
    """An open_clip ``VisionTransformer`` whose blocks are all STCA blocks (or, ``stca=None``, its own).

    ``temporal`` (one of :data:`TEMPORAL_KINDS`; default: ``"stca"`` with settings, ``"none"``
    without): ``"expand_view"`` keeps open_clip's blocks and their parameter names but runs every
    block with widened-time attention (:mod:`stdd.model.expand_view`); it takes no STCA settings.

    Build it with :meth:`from_pretrained` (weights by open_clip name + tag or
    checkpoint file) or directly from a ``VisionTransformer`` (``clip.visual``),
    which is converted in place: with STCA its ``transformer.resblocks[i]``
    become ``STCABlock`` wrappers of the original blocks, so state_dict keys are
    the open_clip ones with ``.block`` inserted
    (``visual.transformer.resblocks.3.block.attn.in_proj_weight``); with
    ``stca=None`` nothing is converted and the keys are open_clip's.

    Input ``video``: ``(B, T, 3, H, W)`` normalised frames (open_clip's
    preprocessing per frame). Output: ``(B, T, E)`` per-frame embeddings (not
    normalised). ``phase``: the window phases, ``(B, T)`` shared by all blocks or
    ``(n_blocks, B, T)`` one per block, ints in ``[0, K)``; ``None`` gives the
    evaluation phases ``t mod K`` (random phases are drawn by
    :class:`~stdd.model.phases.PhaseSampler` and passed in; with
    ``eval_shuffle_phases`` an evaluation-mode forward needs them). Any ``T >= 1``
    works; the settings are checked against the model's patch grid and width at
    construction.

    ``prompts`` (:class:`~stdd.model.prompt_adaptation.PromptSettings`, STCA only): prompt-based
    adaptation. The tower is frozen (``requires_grad=False``) as it is when converted, one
    ``PromptGenerator`` between each two blocks (``prompt_generators``) turns a block's output into
    the next block's prompt tokens, and the buffer ``frozen_digest`` records which tower it was
    (:func:`~stdd.model.prompt_adaptation.frozen_digest`, taken before conversion).
    """

    def __init__(self, visual: nn.Module, stca: Optional[STCASettings] = STCASettings(), *,
                 temporal: Optional[str] = None, prompts: Optional[PromptSettings] = None):
        super().__init__()
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                "visual must be an open_clip VisionTransformer (clip_model.visual of a ViT model), "
                f"got {type(visual).__name__}"
            )
        if stca is not None and not isinstance(stca, STCASettings):
            raise ValueError(f"stca must be an STCASettings or None (frame-only), got {type(stca).__name__}")
        if temporal is None:
            temporal = "stca" if stca is not None else "none"
        if temporal not in TEMPORAL_KINDS:
            raise ValueError(f"temporal must be one of {TEMPORAL_KINDS}, got {temporal!r}")
        if (temporal == "stca") != (stca is not None):
            raise ValueError(f"temporal={temporal!r} " + ("needs STCA settings (stca=STCASettings(...))"
                             if stca is None else "takes no STCA settings: pass stca=None"))
        if prompts is not None and not isinstance(prompts, PromptSettings):
            raise ValueError(f"prompts must be a PromptSettings or None (full adaptation), got {type(prompts).__name__}")
        if prompts is not None and temporal != "stca":
            raise ValueError(f"prompt-based adaptation turns STCA blocks' tokens into prompts: it needs "
                             f"temporal='stca', got {temporal!r}")
        self.visual = visual
        self.stca = stca
        self.temporal = temporal
        self.prompts = prompts
        self.grad_checkpointing = False
        if temporal == "none":
            return  # the frame-only baseline: open_clip's own blocks and forward
        what = "STCA" if temporal == "stca" else "widened-time attention"
        if not (hasattr(visual, "_embeds") and hasattr(visual, "_pool")):
            raise ValueError(
                f"this open_clip ({open_clip.__version__}) VisionTransformer lacks _embeds/_pool; "
                "stdd needs open_clip_torch >= 3.0"
            )
        if visual.attn_pool is not None:
            raise ValueError("visual uses attentional pooling (CoCa-style); STDD needs the CLS/avg-pooled ViT")
        if not isinstance(visual.patch_dropout, nn.Identity):
            raise ValueError(
                f"visual has patch dropout enabled, which drops patch tokens and breaks {what} (its tokens must "
                "stay in place from frame to frame); create the model with force_patch_dropout=0"
            )
        blocks = visual.transformer.resblocks
        for index, block in enumerate(blocks):
            if isinstance(block, STCABlock):
                raise ValueError("visual is already converted to STCA blocks")
            check_block_supported(block, f"visual.transformer.resblocks[{index}]")
        if temporal == "expand_view":
            return  # open_clip's blocks, run by forward() with widened-time attention
        grid = tuple(visual.grid_size)
        if grid[0] != grid[1]:
            raise ValueError(f"visual has a {grid[0]}x{grid[1]} patch grid; STCA needs a square grid")
        stca.check_model(visual.transformer.width, grid[0])
        if prompts is not None:  # the tower is frozen as loaded; only the prompt generators train
            self.register_buffer("frozen_digest", frozen_digest(visual))
            visual.requires_grad_(False)
        for index in range(len(blocks)):
            # num_frames is only the blocks' default clip length: forward passes the input's
            blocks[index] = STCABlock(blocks[index], stca, num_frames=1)
        if prompts is not None:  # one generator between each two blocks (stdd.model.prompt_adaptation)
            self.prompt_generators = nn.ModuleList(
                PromptGenerator(visual.transformer.width, 1 + grid[0] * grid[1], prompts)
                for _ in range(len(blocks) - 1))

    # ----------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
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
    ) -> "VideoEncoder":
        """Load CLIP ``model_name`` with weights ``pretrained`` (tag or file) and convert its ViT.

        The text tower is dropped. ``stca`` / ``temporal`` / ``prompts``: as in the constructor.
        ``encoder.source`` says which weights were loaded.
        """
        clip_model, source = load_clip(
            model_name, pretrained, allow_random_init=allow_random_init, device=device,
            precision=precision, cache_dir=cache_dir,
        )
        encoder = cls(vision_tower(clip_model), stca, temporal=temporal, prompts=prompts)
        encoder.source = source
        return encoder

    source: Optional[ClipSource] = None

    @property
    def blocks(self) -> nn.ModuleList:
        return self.visual.transformer.resblocks

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.visual.image_size)

    @property
    def output_dim(self) -> int:
        return int(self.visual.output_dim)

    @property
    def preprocess_cfg(self) -> dict:
        """open_clip's preprocessing for these weights (``size``, ``mean``, ``std``, ``interpolation``, ...)."""
        return dict(getattr(self.visual, "preprocess_cfg", {}) or {})

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (activation memory ~ one block)."""
        self.grad_checkpointing = bool(enable)
        if self.temporal == "none":
            self.visual.set_grad_checkpointing(self.grad_checkpointing)

    def load_clip_visual_state_dict(self, state_dict: dict, strict: bool = True):
        """Load an open_clip ``VisionTransformer`` state dict (keys without ``.block``).

        Accepts keys of ``clip.visual.state_dict()`` or of a whole CLIP state dict
        (``visual.`` prefix; other towers ignored).
        """
        visual_keys = {k[len("visual."):]: v for k, v in state_dict.items() if k.startswith("visual.")}
        source = visual_keys or dict(state_dict)
        if self.stca is not None:
            source = {
                re.sub(r"^transformer\.resblocks\.(\d+)\.", r"transformer.resblocks.\1.block.", key): value
                for key, value in source.items()
            }
        return self.visual.load_state_dict(source, strict=strict)

    def check_phase(self, phase: torch.Tensor, batch: int, num_frames: int, device) -> torch.Tensor:
        """Check an explicit phase once for the whole stack: ``(B, T)`` or ``(n_blocks, B, T)``."""
        if isinstance(phase, torch.Tensor) and phase.dim() == 3:
            expected = (len(self.blocks), batch, num_frames)
            if tuple(phase.shape) != expected:
                raise ValueError(
                    f"phase must have shape (B, T) = {expected[1:]} (shared by all blocks) or "
                    f"(n_blocks, B, T) = {expected} (one per block), got {tuple(phase.shape)}"
                )
            self.blocks[0].check_phase(phase.flatten(0, 1), len(self.blocks) * batch, device, num_frames)
            return phase
        return self.blocks[0].check_phase(phase, batch, device, num_frames)

    # ---------------------------------------------------------------- forward
    def forward(self, video: torch.Tensor, phase: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``video`` ``(B, T, 3, H, W)`` -> per-frame embeddings ``(B, T, E)``."""
        _check_video(video, self.image_size)
        batch, frames = video.shape[:2]
        visual = self.visual
        frames_flat = video.reshape(batch * frames, *video.shape[2:]).to(visual.conv1.weight.dtype)
        if self.stca is None and phase is not None:
            raise ValueError(f"phase was given but this encoder has no STCA blocks (temporal={self.temporal!r})")
        if self.temporal == "none":
            features = visual(frames_flat)  # open_clip's own forward, frame by frame
            if isinstance(features, tuple):  # output_tokens=True towers
                features = features[0]
            return features.reshape(batch, frames, -1)
        if self.temporal == "expand_view":
            tokens = visual._embeds(frames_flat)  # (B*T, 1+N, D): conv1, CLS, positions, ln_pre
            for block in self.blocks:
                if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                    tokens = checkpoint(expand_view_block, block, tokens, frames, use_reentrant=False)
                else:
                    tokens = expand_view_block(block, tokens, frames)
            return self._project(tokens).reshape(batch, frames, -1)
        if phase is None and not self.training and self.stca.eval_shuffle_phases:
            raise ValueError(
                "these STCA settings shuffle the evaluation phases (eval_shuffle_phases=True), and the encoder "
                "draws nothing itself: pass phase=PhaseSampler(settings, seed=..., num_blocks=...).evaluation(...) "
                "(stdd.engine.evaluation.score_dataset does), or set eval_shuffle_phases=False for t mod K"
            )
        tokens = visual._embeds(frames_flat)  # (B*T, 1+N, D): conv1, CLS, positions, ln_pre
        if phase is not None:  # checked once here, not once per block
            phase = self.check_phase(phase, batch, frames, tokens.device)
        prompts = None
        for index, block in enumerate(self.blocks):
            block_phase = phase[index] if phase is not None and phase.dim() == 3 else phase
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(
                    block, tokens, block_phase, validate=False, num_frames=frames, prompts=prompts,
                    use_reentrant=False,
                )
            else:
                tokens = block(tokens, block_phase, validate=False, num_frames=frames, prompts=prompts)
            if self.prompts is not None and index + 1 < len(self.blocks):
                prompts = self.prompt_generators[index](tokens)  # for the next block; dropped by it
        return self._project(tokens).reshape(batch, frames, -1)

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        """The frames' embeddings ``(B*T, E)`` from the last block's tokens: ``ln_post``, CLS pooling, ``proj``."""
        pooled, _ = self.visual._pool(tokens)  # ln_post + CLS (or average) pooling
        if self.visual.proj is not None:
            pooled = pooled @ self.visual.proj
        return pooled


class FrozenImageEncoder(nn.Module):
    """A frozen copy of a CLIP image tower, applied to every frame: the distillation teacher.

    ``visual``: an open_clip image tower (copied; the original is not touched).
    Always in eval mode, parameters without grad, forward under ``no_grad``;
    on CUDA inputs the forward runs under ``autocast(gpu_dtype)`` (bf16 by
    default). ``forward(video (B, T, 3, H, W)) -> (B, T, E)`` float32 (float64 for a float64 tower,
    so that a float64 model distils in float64).
    """

    def __init__(self, visual: nn.Module, *, gpu_dtype: Optional[torch.dtype] = torch.bfloat16):
        super().__init__()
        if any(isinstance(m, STCABlock) for m in visual.modules()):
            raise ValueError("the teacher must be the original CLIP image encoder, not an STCA-converted one")
        self.visual = copy.deepcopy(visual)
        self.visual.requires_grad_(False)
        self.visual.eval()
        self.gpu_dtype = gpu_dtype

    def train(self, mode: bool = True) -> "FrozenImageEncoder":
        return super().train(False)  # the teacher stays in eval mode

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.visual.image_size)

    @torch.no_grad()
    def forward(self, video: torch.Tensor) -> torch.Tensor:
        _check_video(video, self.image_size)
        batch, frames = video.shape[:2]
        flat = video.reshape(batch * frames, *video.shape[2:])
        use_autocast = video.is_cuda and self.gpu_dtype is not None
        with torch.autocast(device_type="cuda", dtype=self.gpu_dtype or torch.bfloat16, enabled=use_autocast):
            features = self.visual(flat.to(self.visual.conv1.weight.dtype))
        if isinstance(features, tuple):  # output_tokens=True towers
            features = features[0]
        return at_least_float32(features).reshape(batch, frames, -1)
