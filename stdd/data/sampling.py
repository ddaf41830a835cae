"""Frame sampling: which frame indices of a video make up a clip. Pure functions of integers.

Two schemes, both returning int64 arrays of frame indices into a video of `num_video_frames` frames:

- dense (`dense_clip_indices`): `clip_length` frames `stride` apart, one contiguous window of
  span (clip_length - 1) * stride + 1 frames. Training draws the window start uniformly; evaluation
  takes `n_views` evenly spaced windows (centre of each of n equal bins of the possible starts, as in
  mmaction2's SampleFrames test mode). The paper's configs use 8 x 16.
- uniform segments (`segment_indices`, TSN): the video is cut into `clip_length` equal segments and one
  frame is taken from each (random in training, at fraction (v + 0.5) / n_views of the segment for
  evaluation view v), so a clip always covers the whole video.

Short videos (fewer frames than a dense span): `short_video="loop"` wraps indices around
(index mod num_video_frames), `"pad"` repeats the last frame. Segment sampling needs no policy: with
fewer frames than segments, neighbouring segments share frames.

`sample_clip_indices(num_video_frames, sampling, training=..., rng=...)` applies a `ClipSampling`
config and returns (n_views, clip_length): training always gives one view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHORT_VIDEO_POLICIES = ("loop", "pad")
SAMPLING_MODES = ("dense", "segments")
SPATIAL_CROPS = (1, 3)  # evaluation crops per view: the centre one, or three along the longer side


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def clip_span(clip_length: int, stride: int) -> int:
    """Frames covered by a dense clip: (clip_length - 1) * stride + 1."""
    return (clip_length - 1) * stride + 1


def _wrap_short(indices: np.ndarray, num_video_frames: int, short_video: str) -> np.ndarray:
    if short_video == "loop":
        return indices % num_video_frames
    if short_video == "pad":
        return np.minimum(indices, num_video_frames - 1)
    raise ValueError(f"short_video: expected one of {SHORT_VIDEO_POLICIES}, got {short_video!r}")


def dense_clip_indices(
    num_video_frames: int,
    clip_length: int = 8,
    stride: int = 16,
    *,
    training: bool = False,
    n_views: int = 1,
    short_video: str = "loop",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Dense clips: (n_views, clip_length) int64 frame indices (training: n_views must be 1).

    Training: start uniform in [0, num_video_frames - span] (for a short video, uniform in
    [0, num_video_frames - 1] before looping/padding). Evaluation: view v starts at
    floor((v + 0.5) * (num_video_frames - span + 1) / n_views); one view is the centred clip.
    """
    _check_positive("num_video_frames", num_video_frames)
    _check_positive("clip_length", clip_length)
    _check_positive("stride", stride)
    _check_positive("n_views", n_views)
    if short_video not in SHORT_VIDEO_POLICIES:
        raise ValueError(f"short_video: expected one of {SHORT_VIDEO_POLICIES}, got {short_video!r}")
    span = clip_span(clip_length, stride)
    offsets = np.arange(clip_length, dtype=np.int64) * stride  # (clip_length,)
    if training:
        if n_views != 1:
            raise ValueError(f"n_views: training samples one clip per video, got n_views={n_views}")
        if rng is None:
            raise ValueError("rng: training sampling needs a numpy Generator")
        # A short video also gets a random start: with looping, different starts are different clips.
        last_start = num_video_frames - span if num_video_frames >= span else num_video_frames - 1
        starts = np.array([rng.integers(0, last_start + 1)], dtype=np.int64)
    elif num_video_frames >= span:
        possible_starts = num_video_frames - span + 1
        starts = np.floor((np.arange(n_views) + 0.5) * possible_starts / n_views).astype(np.int64)
    else:
        # Short video: spread the views' starts over the video (they differ only with looping).
        starts = np.floor(np.arange(n_views) * num_video_frames / n_views).astype(np.int64)
    indices = starts[:, None] + offsets[None, :]  # (n_views, clip_length)
    if num_video_frames < span:
        indices = _wrap_short(indices, num_video_frames, short_video)
    return indices


def segment_indices(
    num_video_frames: int,
    clip_length: int = 8,
    *,
    training: bool = False,
    n_views: int = 1,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """TSN uniform segments: (n_views, clip_length) int64 frame indices, non-decreasing in each view.

    Segment k covers frames [floor(k * N / L), floor((k + 1) * N / L)) for N video frames and
    L = clip_length. Training picks a uniform frame inside each segment; evaluation view v picks
    the frame at fraction (v + 0.5) / n_views of each segment.
    """
    _check_positive("num_video_frames", num_video_frames)
    _check_positive("clip_length", clip_length)
    _check_positive("n_views", n_views)
    boundaries = np.floor(np.arange(clip_length + 1) * num_video_frames / clip_length).astype(np.int64)
    segment_starts = boundaries[:-1]  # (clip_length,)
    # A video shorter than clip_length has empty segments: they take their start frame.
    segment_lengths = np.maximum(boundaries[1:] - segment_starts, 1)
    if training:
        if n_views != 1:
            raise ValueError(f"n_views: training samples one clip per video, got n_views={n_views}")
        if rng is None:
            raise ValueError("rng: training sampling needs a numpy Generator")
        fractions = rng.uniform(0.0, 1.0, size=(1, clip_length))
    else:
        fractions = np.broadcast_to(((np.arange(n_views) + 0.5) / n_views)[:, None], (n_views, clip_length))
    offsets = np.minimum(np.floor(fractions * segment_lengths[None, :]).astype(np.int64), segment_lengths - 1)
    indices = segment_starts[None, :] + offsets
    return np.clip(indices, 0, num_video_frames - 1)


@dataclass(frozen=True)
class ClipSampling:
    """How clips are drawn from a video.

    mode: "dense" (clip_length frames, `stride` apart) or "segments" (TSN, `stride` unused).
    n_temporal_views / n_spatial_crops: evaluation views per video (training always uses 1 x 1);
    the paper evaluates with 3 temporal x 1 spatial. n_spatial_crops is 1 (centre) or 3.
    """

    mode: str = "dense"
    clip_length: int = 8
    stride: int = 16
    short_video: str = "loop"
    n_temporal_views: int = 1
    n_spatial_crops: int = 1

    def __post_init__(self) -> None:
        if self.mode not in SAMPLING_MODES:
            raise ValueError(f"mode: expected one of {SAMPLING_MODES}, got {self.mode!r}")
        _check_positive("clip_length", self.clip_length)
        _check_positive("stride", self.stride)
        _check_positive("n_temporal_views", self.n_temporal_views)
        if self.short_video not in SHORT_VIDEO_POLICIES:
            raise ValueError(f"short_video: expected one of {SHORT_VIDEO_POLICIES}, got {self.short_video!r}")
        if self.n_spatial_crops not in SPATIAL_CROPS:
            raise ValueError(f"n_spatial_crops: expected one of {', '.join(map(str, SPATIAL_CROPS))}, "
                             f"got {self.n_spatial_crops!r}")

    def num_views(self, training: bool) -> int:
        return 1 if training else self.n_temporal_views * self.n_spatial_crops


def sample_clip_indices(
    num_video_frames: int,
    sampling: ClipSampling,
    *,
    training: bool,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Frame indices (n_temporal_views, clip_length) for one video under `sampling` (1 view in training)."""
    n_views = 1 if training else sampling.n_temporal_views
    if sampling.mode == "dense":
        return dense_clip_indices(
            num_video_frames,
            sampling.clip_length,
            sampling.stride,
            training=training,
            n_views=n_views,
            short_video=sampling.short_video,
            rng=rng,
        )
    return segment_indices(num_video_frames, sampling.clip_length, training=training, n_views=n_views, rng=rng)
