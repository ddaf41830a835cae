"""Video encoders on an open_clip ``VisionTransformer``.

- :class:`VideoEncoder`: the STDD student. Every transformer block of the ViT
  becomes an :class:`~stdd.model.stca_block.STCABlock` (same parameters, no new
  ones); a clip ``(B, T, 3, H, W)`` gives per-frame embeddings ``(B, T, E)``
  after ``ln_post`` and ``proj`` (``z_{t,cls}^L`` of the paper, projected into
  the joint space).
- :class:`FrozenImageEncoder`: the distillation teacher, a frozen copy of the
  original CLIP image encoder applied frame by frame (eval mode, no grad,
  bf16 autocast on GPU).
"""

from __future__ import annotations

import copy
import re
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import stdd_kernels
from stdd_kernels.geometry import make_geometry

from .clip_loading import ClipSource, load_clip, vision_tower
from .stca_block import STCABlock, check_block_supported


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


class VideoEncoder(nn.Module):
    """An open_clip ``VisionTransformer`` whose blocks are all STCA blocks.

    Build it with :meth:`from_pretrained` (weights by open_clip name + tag or
    checkpoint file) or directly from a ``VisionTransformer`` (``clip.visual``),
    which is converted in place: its ``transformer.resblocks[i]`` become
    ``STCABlock`` wrappers of the original blocks, so state_dict keys are the
    open_clip ones with ``.block`` inserted
    (``visual.transformer.resblocks.3.block.attn.in_proj_weight``).

    Input ``video``: ``(B, T, 3, H, W)`` normalised frames (open_clip's
    preprocessing per frame). Output: ``(B, T, E)`` per-frame embeddings (not
    normalised). ``phase``: optional ``(B, T)`` window phases; ``None`` gives
    ``t mod K`` in eval mode and random per-clip phases from the encoder's
    seedable generator in training mode (one draw per forward, shared by all
    blocks). Any ``T >= 1`` works; the STCA settings are the ``docs/stca.md``
    ones and are checked against the model's patch grid at construction.

    The phase generator is a CPU ``torch.Generator`` (``encoder.generator``):
    it is not in the state dict, so a resumable run saves
    ``encoder.generator.get_state()`` next to it, and distributed ranks seed
    it differently (``manual_seed(seed + rank)``) to draw different phases.
    """

    def __init__(
        self,
        visual: nn.Module,
        *,
        window: Sequence[int] = (2, 2),
        mask_ratio: float = 0.5,
        scales: Sequence[int] = (1, 2),
        channel_fold: int = 32,
        mixing: str = "continual",
        backend: Optional[str] = None,
        attention: str = "sdpa",
        shuffle_phases: bool = False,
        seed: Optional[int] = None,
        num_frames: int = 8,
    ):
        super().__init__()
        import open_clip
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                "visual must be an open_clip VisionTransformer (clip_model.visual of a ViT model), "
                f"got {type(visual).__name__}"
            )
        if not (hasattr(visual, "_embeds") and hasattr(visual, "_pool")):
            raise ValueError(
                f"this open_clip ({open_clip.__version__}) VisionTransformer lacks _embeds/_pool; "
                "stdd needs open_clip_torch >= 3.0"
            )
        if visual.attn_pool is not None:
            raise ValueError("visual uses attentional pooling (CoCa-style); STDD needs the CLS/avg-pooled ViT")
        if not isinstance(visual.patch_dropout, nn.Identity):
            raise ValueError(
                "visual has patch dropout enabled, which drops patch tokens and breaks the STCA window "
                "grid; create the model with force_patch_dropout=0"
            )
        grid = tuple(visual.grid_size)
        if grid[0] != grid[1]:
            raise ValueError(f"visual has a {grid[0]}x{grid[1]} patch grid; STCA needs a square grid")
        blocks = visual.transformer.resblocks
        for index, block in enumerate(blocks):
            if isinstance(block, STCABlock):
                raise ValueError("visual is already converted to STCA blocks")
            check_block_supported(block, f"visual.transformer.resblocks[{index}]")
        width = visual.transformer.width
        try:  # the settings against this model's grid and width, once, with the ops' own rules
            make_geometry(
                num_tokens=1 + grid[0] * grid[1], channels=width, rows=num_frames, num_frames=num_frames,
                window=window, mask_ratio=mask_ratio, scales=scales, channel_fold=channel_fold,
                mixing=mixing, tensor_name="tokens",
            )
        except ValueError as error:
            sides = [d for d in range(1, grid[0] + 1) if grid[0] % d == 0]
            raise ValueError(
                f"STCA settings do not fit this ViT ({grid[0]}x{grid[0]} patch grid, width {width}): {error}. "
                f"Window sides that tile this grid: {sides} (e.g. ViT-B/32 at 224 px has a 7x7 grid)"
            ) from error
        settings = dict(
            num_frames=num_frames, window=window, mask_ratio=mask_ratio, scales=scales,
            channel_fold=channel_fold, mixing=mixing, backend=backend, attention=attention,
            shuffle_phases=shuffle_phases,
        )
        for index in range(len(blocks)):
            blocks[index] = STCABlock(blocks[index], seed=0, **settings)
        self.visual = visual
        self.settings = {k: v for k, v in settings.items() if k != "num_frames"}
        self.grad_checkpointing = False
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(int(seed))
        else:
            self.generator.seed()

    # ----------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        pretrained: Optional[str],
        *,
        allow_random_init: bool = False,
        device="cpu",
        precision: str = "fp32",
        cache_dir: Optional[str] = None,
        **stca_settings,
    ) -> "VideoEncoder":
        """Load CLIP ``model_name`` with weights ``pretrained`` (tag or file) and convert its ViT.

        The text tower is dropped. ``stca_settings``: the constructor's keyword
        arguments. ``encoder.source`` says which weights were loaded.
        """
        clip_model, source = load_clip(
            model_name, pretrained, allow_random_init=allow_random_init, device=device,
            precision=precision, cache_dir=cache_dir,
        )
        encoder = cls(vision_tower(clip_model), **stca_settings)
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

    def manual_seed(self, seed: int) -> None:
        """Reseed the generator of the training phases."""
        self.generator.manual_seed(int(seed))

    def sample_phase(self, batch: int, num_frames: int, device=None) -> torch.Tensor:
        """Random training phases ``(B, T)`` from the encoder's generator."""
        return stdd_kernels.mask_phase(
            batch, num_frames, window=self.settings["window"], mode="train", generator=self.generator,
            shuffle=self.settings["shuffle_phases"], device=device,
        )

    def load_clip_visual_state_dict(self, state_dict: dict, strict: bool = True):
        """Load an open_clip ``VisionTransformer`` state dict (keys without ``.block``).

        Accepts keys of ``clip.visual.state_dict()`` or of a whole CLIP state dict
        (``visual.`` prefix; other towers ignored).
        """
        visual_keys = {k[len("visual."):]: v for k, v in state_dict.items() if k.startswith("visual.")}
        source = visual_keys or dict(state_dict)
        renamed = {
            re.sub(r"^transformer\.resblocks\.(\d+)\.", r"transformer.resblocks.\1.block.", key): value
            for key, value in source.items()
        }
        return self.visual.load_state_dict(renamed, strict=strict)

    # ---------------------------------------------------------------- forward
    def forward(self, video: torch.Tensor, phase: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``video`` ``(B, T, 3, H, W)`` -> per-frame embeddings ``(B, T, E)``."""
        _check_video(video, self.image_size)
        batch, frames = video.shape[:2]
        visual = self.visual
        frames_flat = video.reshape(batch * frames, *video.shape[2:]).to(visual.conv1.weight.dtype)
        tokens = visual._embeds(frames_flat)  # (B*T, 1+N, D): conv1, CLS, positions, ln_pre
        if phase is None:
            if self.training:
                phase = self.sample_phase(batch, frames, tokens.device)
        else:  # checked once here, not once per block
            phase = self.blocks[0].check_phase(phase, batch, tokens.device, frames)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(
                    block, tokens, phase, check_phase=False, num_frames=frames, use_reentrant=False
                )
            else:
                tokens = block(tokens, phase, check_phase=False, num_frames=frames)
        pooled, _ = visual._pool(tokens)  # ln_post + CLS (or average) pooling
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled.reshape(batch, frames, -1)


class FrozenImageEncoder(nn.Module):
    """A frozen copy of a CLIP image tower, applied to every frame: the distillation teacher.

    ``visual``: an open_clip image tower (copied; the original is not touched).
    Always in eval mode, parameters without grad, forward under ``no_grad``;
    on CUDA inputs the forward runs under ``autocast(gpu_dtype)`` (bf16 by
    default). ``forward(video (B, T, 3, H, W)) -> (B, T, E)`` float32.
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
        return features.float().reshape(batch, frames, -1)
