"""Frame sampling (pure index functions) and clip transforms."""

import numpy as np
import pytest
import torch

from stdd.data.sampling import ClipSampling, clip_span, dense_clip_indices, sample_clip_indices, segment_indices
from stdd.data import transforms


def test_dense_eval_single_view_is_centred():
    # 8 x 16 span = 113 frames; 300-frame video -> possible starts 0..187, centred start floor(188 / 2) = 94
    indices = dense_clip_indices(300, 8, 16)
    assert indices.shape == (1, 8)
    assert indices[0].tolist() == [94 + 16 * k for k in range(8)]


def test_dense_eval_views_evenly_spaced_and_in_range():
    indices = dense_clip_indices(300, 8, 16, n_views=3)
    # starts at the centres of 3 equal bins of the 188 possible starts: floor(188 * (v + 0.5) / 3)
    assert indices[:, 0].tolist() == [31, 94, 156]
    assert (np.diff(indices, axis=1) == 16).all()
    assert indices.max() <= 299 and indices.min() >= 0


def test_dense_exact_fit_and_one_frame_video():
    span = clip_span(8, 16)
    assert dense_clip_indices(span, 8, 16)[0].tolist() == list(range(0, span, 16))
    assert dense_clip_indices(1, 8, 16).tolist() == [[0] * 8]
    assert dense_clip_indices(1, 8, 16, short_video="pad").tolist() == [[0] * 8]


def test_dense_training_start_is_uniform_over_all_valid_starts():
    rng = np.random.default_rng(0)
    starts = [dense_clip_indices(120, 8, 16, training=True, rng=rng)[0, 0] for _ in range(2000)]
    # 120 - 113 + 1 = 8 possible starts, each drawn about 250 times
    assert sorted(set(starts)) == list(range(8))
    counts = np.bincount(starts)
    assert counts.min() > 180 and counts.max() < 320


def test_short_video_loop_and_pad():
    looped = dense_clip_indices(20, 8, 4)  # span 29 > 20 frames
    assert looped[0].tolist() == [0, 4, 8, 12, 16, 0, 4, 8]
    padded = dense_clip_indices(20, 8, 4, short_video="pad")
    assert padded[0].tolist() == [0, 4, 8, 12, 16, 19, 19, 19]
    rng = np.random.default_rng(1)
    for _ in range(50):
        training = dense_clip_indices(20, 8, 4, training=True, rng=rng, short_video="loop")
        assert training.min() >= 0 and training.max() < 20
        # looping keeps the stride modulo the video length
        assert ((np.diff(training[0]) % 20) == 4).all()
    views = dense_clip_indices(20, 8, 4, n_views=2)
    assert views[:, 0].tolist() == [0, 10]


def test_segments_eval_and_training():
    # 80 frames, 8 segments of 10: centre frames 5, 15, ..., 75
    assert segment_indices(80, 8)[0].tolist() == list(range(5, 80, 10))
    views = segment_indices(80, 8, n_views=2)  # fractions 0.25 and 0.75 of each segment
    assert views[0].tolist() == list(range(2, 80, 10)) and views[1].tolist() == list(range(7, 80, 10))
    rng = np.random.default_rng(2)
    for _ in range(100):
        training = segment_indices(83, 8, training=True, rng=rng)[0]
        segment_starts = np.floor(np.arange(8) * 83 / 8)
        segment_ends = np.floor((np.arange(9)[1:]) * 83 / 8)
        assert ((training >= segment_starts) & (training < np.maximum(segment_ends, segment_starts + 1))).all()


def test_segments_short_video_repeats_frames_in_order():
    indices = segment_indices(3, 8)[0]
    assert indices.tolist() == sorted(indices.tolist())
    assert set(indices.tolist()) == {0, 1, 2}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: dense_clip_indices(0, 8, 16), "num_video_frames"),
        (lambda: dense_clip_indices(10, 8, 0), "stride"),
        (lambda: dense_clip_indices(10, 8, 2, short_video="wrap"), "short_video"),
        (lambda: dense_clip_indices(10, 8, 2, training=True), "rng"),
        (lambda: dense_clip_indices(10, 8, 2, training=True, n_views=3, rng=np.random.default_rng()), "n_views"),
        (lambda: ClipSampling(n_spatial_crops=2), "n_spatial_crops"),
        (lambda: ClipSampling(mode="random"), "mode"),
    ],
)
def test_bad_arguments_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_sample_clip_indices_views():
    sampling = ClipSampling(clip_length=4, stride=2, n_temporal_views=3, n_spatial_crops=3)
    assert sampling.num_views(training=False) == 9 and sampling.num_views(training=True) == 1
    assert sample_clip_indices(100, sampling, training=False).shape == (3, 4)
    assert sample_clip_indices(100, sampling, training=True, rng=np.random.default_rng(0)).shape == (1, 4)
    segments = ClipSampling(mode="segments", clip_length=4, n_temporal_views=2)
    assert sample_clip_indices(40, segments, training=False).tolist() == [[2, 12, 22, 32], [7, 17, 27, 37]]


def _ramp_clip(frames=2, height=40, width=60):
    # pixel value = column index, so crops and flips can be read off the values
    row = torch.arange(width, dtype=torch.float32)
    return row.expand(frames, 3, height, width).clone()


def test_short_side_resize_keeps_aspect():
    clip = torch.zeros(2, 3, 40, 60)
    assert transforms.short_side_resize(clip, 20).shape == (2, 3, 20, 30)
    assert transforms.short_side_resize(torch.zeros(1, 3, 90, 30), 20).shape == (1, 3, 60, 20)


def test_center_and_three_crops_positions():
    clip = _ramp_clip()
    centre = transforms.center_crop(clip, 40)
    assert centre[0, 0, 0, 0].item() == 10 and centre[0, 0, 0, -1].item() == 49
    crops = transforms.three_crops(clip, 40)
    assert [crop[0, 0, 0, 0].item() for crop in crops] == [0, 10, 20]
    tall = transforms.three_crop_boxes(60, 40, 40)
    assert tall == [(0, 0), (10, 0), (20, 0)]


def test_random_resized_crop_same_box_for_all_frames_and_flip():
    clip = torch.rand(1, 3, 40, 60).expand(4, 3, 40, 60).clone()
    generator = torch.Generator().manual_seed(0)
    out = transforms.random_resized_crop(clip, 24, generator=generator)
    assert out.shape == (4, 3, 24, 24)
    assert torch.equal(out[0], out[3])  # one window per clip
    boxes = {transforms.random_resized_crop_box(40, 60, generator=generator) for _ in range(20)}
    assert len(boxes) > 10
    for top, left, height, width in boxes:
        assert 0 <= top and top + height <= 40 and 0 <= left and left + width <= 60
        assert height * width >= 0.25 * 40 * 60 * 0.9  # scale (0.25, 1) up to rounding
    flipped = transforms.horizontal_flip(_ramp_clip())
    assert flipped[0, 0, 0, 0].item() == 59


def test_normalize_uses_clip_statistics():
    clip = torch.full((2, 3, 4, 4), 255.0)
    out = transforms.normalize(clip)
    expected = [(1 - mean) / std for mean, std in zip(transforms.CLIP_MEAN, transforms.CLIP_STD)]
    assert torch.allclose(out[0, :, 0, 0], torch.tensor(expected))
    eval_out = transforms.eval_transform(torch.zeros(3, 3, 40, 60, dtype=torch.uint8), 32, n_spatial_crops=3)
    assert eval_out.shape == (3, 3, 3, 32, 32)
