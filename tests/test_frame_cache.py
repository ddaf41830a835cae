"""The decoded-frame cache decides from a video's index, before decoding, whether the video can be kept."""

import logging

import numpy as np
import pytest

pytest.importorskip("av")

from stdd.data import PyAVDecoder  # noqa: E402
from stdd.data.decoders import DecodedFrameCache  # noqa: E402

from coded_video import decode_all, index_coded_frames, read_codes, write_video  # noqa: E402

FRAME_BYTES = 32 * 48 * 3  # one decoded frame of the videos below (32 x 48 RGB)
BUDGET = 20 * FRAME_BYTES  # room for a 12-frame video, not for a 60-frame one
CLIPS = (np.array([0, 5, 10, 15]), np.array([40, 45, 50, 55]), np.array([[3, 3], [1, 0]]), np.array([59]))


def _cache_messages(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == "stdd.data.decoders" and "decoded-frame cache" in r.getMessage()]


def test_a_video_larger_than_the_budget_is_decoded_per_clip_and_said_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="stdd.data.decoders")
    large, other = tmp_path / "large.mp4", tmp_path / "other.mp4"
    write_video(large, index_coded_frames(60, width=48, offset=1))
    write_video(other, index_coded_frames(60, width=48, offset=1))
    reference = decode_all(large)
    plain = PyAVDecoder()
    cached = PyAVDecoder(frame_cache=DecodedFrameCache(BUDGET))
    assert cached.decoded_bytes(cached.probe(large)) == 60 * FRAME_BYTES > BUDGET  # known before decoding
    for indices in CLIPS:
        before_plain, before_cached = plain.frames_decoded, cached.frames_decoded
        clip, expected = cached.decode(large, indices), plain.decode(large, indices)
        assert np.array_equal(clip.frames, expected.frames) and np.array_equal(clip.frames, reference[indices])
        assert np.array_equal(read_codes(clip.frames), indices + 1)
        # only the frames the clip needs, as without the cache; never the whole video
        assert cached.frames_decoded - before_cached == plain.frames_decoded - before_plain == np.unique(indices).size
    cached.decode(other, np.array([7]))
    assert cached.frames_decoded == sum(np.unique(c).size for c in CLIPS) + 1 < 60
    assert len(cached.frame_cache) == 0 and cached.frame_cache.bytes == 0
    messages = _cache_messages(caplog)
    assert len(messages) == 1, messages  # five clips of two videos too large: one line
    assert str(large) in messages[0] and "(0.26 MiB)" in messages[0] and "exceed" in messages[0]
    assert "(0.09 MiB, data.frame_cache_mb)" in messages[0]
    assert cached.frame_cache.refused == 5


def test_a_video_within_the_budget_is_still_decoded_once_and_cut_from_memory(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="stdd.data.decoders")
    small = tmp_path / "small.mp4"
    write_video(small, index_coded_frames(12, width=48, offset=1))
    reference = decode_all(small)
    cached = PyAVDecoder(frame_cache=DecodedFrameCache(BUDGET))
    assert cached.decoded_bytes(cached.probe(small)) == 12 * FRAME_BYTES <= BUDGET
    for indices in (np.array([0, 5, 11]), np.array([[3, 3], [1, 0]]), np.array([11])):
        assert np.array_equal(cached.decode(small, indices).frames, reference[indices])
    assert cached.frames_decoded == 12  # the whole video once, every later clip from memory
    assert len(cached.frame_cache) == 1 and cached.frame_cache.bytes == 12 * FRAME_BYTES
    assert cached.frame_cache.refused == 0 and not _cache_messages(caplog)
    # the size decided on is the size decoded: with a smaller output size, so are the frames
    half = PyAVDecoder(short_side=16, frame_cache=DecodedFrameCache(BUDGET))
    assert half.decode(small, np.array([2])).frames.shape == (1, 16, 24, 3)
    assert half.frame_cache.bytes == half.decoded_bytes(half.probe(small)) == 12 * 16 * 24 * 3
