"""Clip transforms on torch tensors (CPU or GPU): resize, crops, flip, normalisation (CLIP's or ImageNet's).

Frames travel as (T, 3, H, W) tensors (uint8 or float); every function keeps the leading time axis
and applies the SAME geometry to all frames of a clip (a clip is one view of one moment of the video).

Training: `random_resized_crop` (+ `horizontal_flip` with probability 0.5) then `normalize`.
Evaluation: `short_side_resize` then `center_crop` (or `three_crops`), then `normalize`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# OpenAI CLIP's pixel statistics (open_clip.constants.OPENAI_DATASET_MEAN / _STD), for 0..1 pixels.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ImageNet's (mmaction2's img_norm_cfg 123.675, 116.28, 103.53 / 58.395, 57.12, 57.375 on 0..255 pixels):
# what ViFi-CLIP feeds its CLIP, trained and evaluated.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The pixel normalisations a clip can get (config: data.normalization): name -> (mean, std) for 0..1 pixels.
NORMALIZATIONS = {"clip": (CLIP_MEAN, CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def normalization_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of normalisation ``name`` (one of :data:`NORMALIZATIONS`), for 0..1 pixels."""
    if name not in NORMALIZATIONS:
        raise ValueError(f"normalization: expected one of {', '.join(NORMALIZATIONS)}, got {name!r}")
    return NORMALIZATIONS[name]


def _check_clip(frames: torch.Tensor, name: str = "frames") -> None:
    if frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"{name}: expected a clip (T, 3, H, W), got shape {tuple(frames.shape)}")


def resize(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize (antialiased when shrinking) of (T, 3, H, W) to (T, 3, height, width).

    uint8 frames on the CPU stay uint8: PyTorch's uint8 bilinear kernel is about 3x faster than the
    float one (measured on this project's CPU machine) and the rounding (< 1 grey level) is far below
    the video codec's own error. Anything else is resized as float32.
    """
    _check_clip(frames)
    if frames.shape[-2:] == (height, width):
        return frames
    if not (frames.dtype == torch.uint8 and frames.device.type == "cpu"):
        frames = frames.float()
    shrinking = height < frames.shape[-2] or width < frames.shape[-1]
    return F.interpolate(frames, size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking)


def short_side_resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the shorter side is `size`, keeping the aspect ratio (rounded); dtype as `resize`."""
    _check_clip(frames)
    height, width = frames.shape[-2:]
    if height <= width:
        new_height, new_width = size, max(1, round(width * size / height))
    else:
        new_height, new_width = max(1, round(height * size / width)), size
    return resize(frames, new_height, new_width)


def crop(frames: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    _check_clip(frames)
    if top < 0 or left < 0 or top + height > frames.shape[-2] or left + width > frames.shape[-1]:
        raise ValueError(
            f"crop: box top={top} left={left} {height}x{width} does not fit frames of {tuple(frames.shape[-2:])}"
        )
    return frames[..., top : top + height, left : left + width]


def center_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Centre square crop of side `size` (frames must be at least that large)."""
    height, width = frames.shape[-2:]
    return crop(frames, (height - size) // 2, (width - size) // 2, size, size)


def three_crop_boxes(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """(top, left) of three square crops along the longer side: start, centre, end (mmaction2 ThreeCrop)."""
    if size > height or size > width:
        raise ValueError(f"size: crop {size} larger than frames {height}x{width}")
    if width >= height:
        top = (height - size) // 2
        return [(top, 0), (top, (width - size) // 2), (top, width - size)]
    left = (width - size) // 2
    return [(0, left), ((height - size) // 2, left), (height - size, left)]


def three_crops(frames: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [crop(frames, top, left, size, size) for top, left in three_crop_boxes(*frames.shape[-2:], size)]


def random_resized_crop_box(
    height: int,
    width: int,
    *,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) as torchvision's RandomResizedCrop.get_params draws it.

    The default minimum area is 0.25 rather than torchvision's 0.08: action clips lose the actor in
    tiny crops. 10 tries, then a centre crop clamped to `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(torch.randint(0, height - crop_height + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - crop_width + 1, (1,), generator=generator).item())
            return top, left, crop_height, crop_width
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_width, crop_height = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        crop_height, crop_width = height, round(height * max(ratio))
    else:
        crop_height, crop_width = height, width
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def random_resized_crop(
    frames: torch.Tensor,
    size: int,
    *,
    scale: tuple[float, float] = (0.25, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One random box for the whole clip, resized to (T, 3, size, size); dtype as `resize`."""
    _check_clip(frames)
    top, left, crop_height, crop_width = random_resized_crop_box(
        *frames.shape[-2:], scale=scale, ratio=ratio, generator=generator
    )
    return resize(crop(frames, top, left, crop_height, crop_width), size, size)


def horizontal_flip(frames: torch.Tensor) -> torch.Tensor:
    return frames.flip(-1)


def normalize(frames: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD, *, max_value: float = 255.0) -> torch.Tensor:
    """(frames / max_value - mean) / std per channel; channel axis is -3. Returns float32."""
    if frames.ndim < 3 or frames.shape[-3] != 3:
        raise ValueError(f"frames: expected channels at dim -3 of size 3, got shape {tuple(frames.shape)}")
    std_tensor = torch.tensor(std, dtype=torch.float32, device=frames.device).view(3, 1, 1)
    mean_tensor = torch.tensor(mean, dtype=torch.float32, device=frames.device).view(3, 1, 1)
    # One multiply-add per pixel: x * 1 / (max * std) - mean / std
    return torch.addcmul(-mean_tensor / std_tensor, frames.float(), 1.0 / (max_value * std_tensor))


def train_transform(
    frames: torch.Tensor,
    crop_size: int,
    *,
    flip: bool = True,
    scale: tuple[float, float] = (0.25, 1.0),
    generator: torch.Generator | None = None,
    normalization: str = "clip",
) -> torch.Tensor:
    """uint8/float (T, 3, H, W) -> normalised float32 (T, 3, crop_size, crop_size).

    normalization: a name of `NORMALIZATIONS` ("clip" or "imagenet")."""
    mean, std = normalization_stats(normalization)
    frames = random_resized_crop(frames, crop_size, scale=scale, generator=generator)
    if flip and torch.rand(1, generator=generator).item() < 0.5:
        frames = horizontal_flip(frames)
    return normalize(frames, mean, std)


def eval_transform(frames: torch.Tensor, crop_size: int, *, short_side: int | None = None, n_spatial_crops: int = 1,
                   normalization: str = "clip") -> torch.Tensor:
    """uint8/float (T, 3, H, W) -> normalised float32 (n_spatial_crops, T, 3, crop_size, crop_size).

    Short side resized to `short_side` (default crop_size), then 1 centre crop or 3 crops; normalised as
    `normalization` (a name of `NORMALIZATIONS`) says.
    """
    mean, std = normalization_stats(normalization)
    frames = short_side_resize(frames, short_side or crop_size)
    if n_spatial_crops == 1:
        crops = [center_crop(frames, crop_size)]
    elif n_spatial_crops == 3:
        crops = three_crops(frames, crop_size)
    else:
        raise ValueError(f"n_spatial_crops: expected 1 or 3, got {n_spatial_crops}")
    return normalize(torch.stack(crops), mean, std)
