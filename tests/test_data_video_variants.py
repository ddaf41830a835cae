"""PyAV decoding of the videos people have in bulk: every container's frames found by timestamp.

Each case is written here with PyAV (variable frame rate by dropping frames, a Matroska file with a
start time, MPEG-TS, a 30 fps GIF, AVI with B-frames, AV1, display rotation, truncated files), and the
frames the decoder gives for any start are compared bit for bit with a plain sequential decode at the
same presentation index.
"""

import os
import re

import numpy as np
import pytest

pytest.importorskip("av")

from stdd.data import PyAVDecoder, VideoDecodeError  # noqa: E402
from stdd.data.decoders import DecodedFrameCache, FrameIndexCache, build_frame_index, shared_frame_cache  # noqa: E402

from coded_video import decode_all, index_coded_frames, read_codes, write_video  # noqa: E402

FRAMES = 250  # > a few GOPs of 16, so seeking matters and the last GOP is far from the start
KEPT = np.sort(np.random.default_rng(3).choice(FRAMES, 170, replace=False))  # variable frame rate: 80 dropped


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """name -> (path, the code shown by each frame in presentation order)."""
    root = tmp_path_factory.mktemp("variants")
    coded = index_coded_frames(FRAMES, width=48, offset=1)  # codes 1..250: no frame is all black
    codes = np.arange(FRAMES) + 1
    made = {
        # H.264 with B-frames (pts order != dts order), the mp4 default
        "mp4": (dict(), codes),
        # phone/screen recordings: frames dropped, the others keep their timestamps (pts = index at 25 fps)
        "vfr.mp4": (dict(pts=KEPT, frames=coded[KEPT]), codes[KEPT]),
        # trimmed Matroska: the first frame at 3.04 s, no frame count in the container
        "start.mkv": (dict(pts=np.arange(FRAMES) + 76), codes),
        "start_vfr.webm": (dict(encoder="libvpx-vp9", pts=KEPT + 76, frames=coded[KEPT]), codes[KEPT]),
        # MPEG-TS (start time 1.4 s by default, no index: seeking near the end used to find nothing)
        "ts": (dict(), codes),
        # GIF at 30 fps: centisecond delays 3, 3, 4, ... (FFmpeg's average rate says 33.3)
        "gif": (dict(encoder="gif", rate=30, pix_fmt="rgb8", keyframe_interval=None), codes),
        # UCF101 / HMDB51 style: MPEG-4 part 2 with B-frames in AVI (timestamps start at 1)
        "avi": (dict(encoder="mpeg4", keyframe_interval=12, max_b_frames=2, options={"qscale": "2"}), codes),
    }
    paths = {}
    for name, (options, expected_codes) in made.items():
        suffix = name if "." in name else f"x.{name}"
        path = root / suffix
        options = dict(options)
        frames = options.pop("frames", coded)
        write_video(path, frames, **options)
        paths[name] = (path, expected_codes)
    return paths


def clip_requests(count):
    """8-frame clips (stride 4, clamped to the last frame) from every start, plus unsorted multi-view asks."""
    starts = [np.minimum(start + 4 * np.arange(8), count - 1) for start in range(count)]
    rng = np.random.default_rng(0)
    return starts + [rng.integers(0, count, size=(3, 8)) for _ in range(5)] + [np.array([count - 1, 0, count // 2, count - 1])]


@pytest.mark.parametrize("name", ["mp4", "vfr.mp4", "start.mkv", "start_vfr.webm", "ts", "gif", "avi"])
# uncached: each decode indexes the file in the container it then seeks in; cached: a fresh open;
# with the frame cache: every clip cut from one decode of the whole file
@pytest.mark.parametrize("seek_gap_frames,index_cache_size,frame_cache_mb", [(4, 0, 0), (48, 1024, 0), (48, 0, 64)])
def test_any_start_gives_the_sequential_decode_frames(variants, name, seek_gap_frames, index_cache_size, frame_cache_mb):
    path, expected_codes = variants[name]
    reference = decode_all(path)
    assert np.array_equal(read_codes(reference), expected_codes)  # the reference is what was encoded
    decoder = PyAVDecoder(seek_gap_frames=seek_gap_frames, index_cache_size=index_cache_size,
                          frame_cache_mb=frame_cache_mb)
    info = decoder.probe(path)
    assert info.num_frames == len(reference) == len(expected_codes)
    for indices in clip_requests(info.num_frames):
        clip = decoder.decode(path, indices)
        assert clip.frames.shape == (*indices.shape, 32, 48, 3)
        assert np.array_equal(clip.frames, reference[indices]), (name, indices)


def test_frame_rate_and_codec_are_what_the_files_hold(variants, tmp_path):
    decoder = PyAVDecoder()
    # 250 frames in 833 centiseconds: 30 fps to the precision GIF timestamps have (one centisecond)
    assert decoder.probe(variants["gif"][0]).fps == pytest.approx(30.0, rel=1 / 833)
    assert decoder.probe(variants["start.mkv"][0]).fps == pytest.approx(25.0)
    # variable frame rate: frames over the time they span, 170 frames in (249 + 1) / 25 s
    assert decoder.probe(variants["vfr.mp4"][0]).fps == pytest.approx(170 / (250 / 25))
    assert decoder.probe(variants["ts"][0]).codec == "h264"
    write_video(tmp_path / "av1.mp4", index_coded_frames(8, width=48), encoder="libsvtav1")
    # the codec, not the decoder PyAV picked for it (libdav1d)
    assert decoder.probe(tmp_path / "av1.mp4").codec == "av1"


def test_the_last_frames_of_a_transport_stream(variants):
    path, _ = variants["ts"]
    decoder = PyAVDecoder()
    reference = decode_all(path)
    for indices in ([249], [248, 249], [200, 249], [0, 249]):
        assert np.array_equal(decoder.decode(path, np.array(indices)).frames, reference[indices])


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
@pytest.mark.parametrize("mirrored", [False, True])
def test_display_rotation_is_applied_and_reported(tmp_path, rotation, mirrored):
    frames = index_coded_frames(40, width=48)
    frames[:, :4, -6:] = (255, 0, 0)  # a red mark in the top-right corner as stored
    path = tmp_path / "portrait.mp4"
    write_video(path, frames, rotation=rotation, mirrored=mirrored)
    stored = decode_all(path)
    decoder = PyAVDecoder()
    info = decoder.probe(path)
    assert (info.rotation, info.mirrored) == (rotation, mirrored)
    assert (info.height, info.width) == ((48, 32) if rotation in (90, 270) else (32, 48))
    clip = decoder.decode(path, np.array([0, 17, 39]))
    # counter-clockwise quarter turns, then a left-right mirror (FFmpeg's display matrix semantics)
    expected = np.rot90(stored[[0, 17, 39]], rotation // 90, axes=(1, 2))
    if mirrored:
        expected = expected[:, :, ::-1]
    assert np.array_equal(clip.frames, expected)
    if (rotation, mirrored) == (90, False):
        # turned a quarter counter-clockwise, the top-right corner is the top-left one
        corner = clip.frames[0, :6, :4].astype(np.int64)
        assert (corner[..., 0] - corner[..., 1]).mean() > 100  # red (after lossy 4:2:0 coding)
    resized = PyAVDecoder(short_side=16).decode(path, np.array([5])).frames
    assert resized.shape == ((1, 24, 16, 3) if rotation in (90, 270) else (1, 16, 24, 3))


def test_a_display_matrix_that_is_not_a_quarter_turn_is_refused(tmp_path):
    path = tmp_path / "tilted.mp4"
    write_video(path, index_coded_frames(4, width=48), rotation=30)
    with pytest.raises(VideoDecodeError, match=r"tilted\.mp4: display matrix rotates by -?30\.0 degrees; only multiples of 90"):
        PyAVDecoder().probe(path)


def test_a_scaled_quarter_turn_is_a_quarter_turn(tmp_path):
    path = tmp_path / "scaled.mp4"
    # a quarter turn counter-clockwise that also stretches one axis 2x (16.16 fixed point)
    write_video(path, index_coded_frames(5, width=48), display_matrix=[0, -2 << 16, 0, 1 << 16, 0, 0, 0, 0, 1 << 30])
    info = PyAVDecoder().probe(path)
    assert (info.rotation, info.mirrored, info.height, info.width) == (90, False, 48, 32)


def test_truncated_files_say_where_their_frames_end(tmp_path):
    frames = index_coded_frames(200, width=48, offset=1)
    full_mp4, full_webm, full_ts = tmp_path / "full.mp4", tmp_path / "full.webm", tmp_path / "full.ts"
    write_video(full_mp4, frames, container_options={"movflags": "+faststart"})  # index first, as streamed files
    write_video(full_webm, frames, encoder="libvpx-vp9")
    write_video(full_ts, frames)
    decoder = PyAVDecoder()
    cut_mp4, cut_webm, cut_ts = tmp_path / "cut.mp4", tmp_path / "cut.webm", tmp_path / "cut.ts"
    for full, cut in ((full_mp4, cut_mp4), (full_webm, cut_webm), (full_ts, cut_ts)):
        data = full.read_bytes()
        cut.write_bytes(data[: int(len(data) * 0.6)])
    for cut, declared in ((cut_mp4, "the header declares 200 frames"), (cut_webm, r"\(\d\.\d\d s\), the header declares 8\.00 s")):
        with pytest.raises(VideoDecodeError, match=rf"{cut.name}: truncated: frames end at index (\d+),? {declared}") as caught:
            decoder.decode(cut, np.array([0]))
        end = int(re.search(r"index (\d+)", caught.value.reason).group(1))
        # where the file's frames end: about where a sequential decode of the cut file stops (at its
        # partial last packet, with the frames the decoder still held for reordering)
        decodable = len(decode_all(cut, until_error=True))
        assert decodable - 1 <= end < decodable + 4 < 200
    # MPEG-TS declares no length: a cut one is a shorter video, its partial last packet left out
    info = decoder.probe(cut_ts)
    assert 100 < info.num_frames < 200
    reference = decode_all(full_ts)[: info.num_frames]
    indices = np.array([0, info.num_frames // 2, info.num_frames - 1])
    assert np.array_equal(decoder.decode(cut_ts, indices).frames, reference[indices])


def test_misuse_is_named(variants, tmp_path):
    path, _ = variants["mp4"]
    decoder = PyAVDecoder()
    with pytest.raises(ValueError, match=rf"frame index 250 out of range, .*{path.name} has 250 frames"):
        decoder.decode(path, np.array([3, 250]))
    with pytest.raises(VideoDecodeError, match="is a directory, not a video file"):
        decoder.probe(tmp_path)


def test_the_index_is_cached_until_the_file_changes(tmp_path, monkeypatch):
    import stdd.data.decoders as decoders

    built = []  # the files a packet pass ran on
    real_pass = decoders._index_container
    monkeypatch.setattr(decoders, "_index_container", lambda path, container: built.append(str(path)) or real_pass(path, container))
    paths = [tmp_path / f"{count}.mp4" for count in (20, 30, 40)]
    for path, count in zip(paths, (20, 30, 40)):
        write_video(path, index_coded_frames(count, width=48))
    decoder = PyAVDecoder(index_cache_size=2)
    for _ in range(3):
        assert decoder.decode(paths[0], np.array([19])).info.num_frames == 20
    assert built == [str(paths[0])]  # one packet pass for three opens
    write_video(paths[0], index_coded_frames(25, width=48))  # the file changes: indexed again
    os.utime(paths[0], ns=(os.stat(paths[0]).st_atime_ns, os.stat(paths[0]).st_mtime_ns + 10**9))
    assert decoder.probe(paths[0]).num_frames == 25 and len(built) == 2
    for path in paths[1:]:
        decoder.probe(path)
    assert len(decoder.index_cache) == 2  # bounded: the least recently used index went
    assert isinstance(decoder.index_cache, FrameIndexCache)
    # the cached index is the one a fresh pass builds
    assert decoder.index(paths[2]).info == build_frame_index(paths[2]).info


def test_the_frame_cache_decodes_a_file_once_and_stays_within_its_budget(tmp_path, monkeypatch, caplog):
    decoded = []  # the files a decoding pass ran on
    real = PyAVDecoder._decode
    monkeypatch.setattr(PyAVDecoder, "_decode", lambda self, path, wanted: decoded.append(path) or real(self, path, wanted))
    paths = [tmp_path / f"{count}.mp4" for count in (20, 30, 40)]
    for path, count in zip(paths, (20, 30, 40)):
        write_video(path, index_coded_frames(count, width=48))
    one_video = 30 * 32 * 48 * 3  # bytes of the 30-frame file's frames
    decoder = PyAVDecoder(frame_cache=DecodedFrameCache(int(2.5 * one_video)))  # room for two of the three
    reference = decode_all(paths[1])
    for indices in (np.array([0, 5, 29]), np.array([[3, 3], [1, 0]]), np.array([29])):
        clip = decoder.decode(paths[1], indices)
        assert np.array_equal(clip.frames, reference[indices]) and clip.indices.shape == indices.shape
        clip.frames[...] = 0  # the caller's copy: the cached frames are not touched
    assert decoded == [paths[1]]  # three clips, one decoding pass
    assert np.array_equal(decoder.decode(paths[1], np.arange(30)).frames, reference)
    decoder.decode(paths[0], np.array([0]))
    decoder.decode(paths[2], np.array([0]))  # over budget: the least recently used video goes
    assert len(decoder.frame_cache) == 2 and decoder.frame_cache.bytes <= decoder.frame_cache.max_bytes
    assert decoder.frame_cache.evicted == 1 and "decoded-frame cache full" in caplog.text
    decoder.decode(paths[1], np.array([0]))
    assert decoded == [paths[1], paths[0], paths[2], paths[1]]
    write_video(paths[1], index_coded_frames(25, width=48))  # a changed file is decoded again
    os.utime(paths[1], ns=(os.stat(paths[1]).st_atime_ns, os.stat(paths[1]).st_mtime_ns + 10**9))
    assert decoder.decode(paths[1], np.array([24])).info.num_frames == 25 and len(decoded) == 5
    with pytest.raises(ValueError, match=r"frame index 25 out of range"):
        decoder.decode(paths[1], np.array([25]))
    with pytest.raises(ValueError, match=r"frame_cache_mb: expected a size in MiB >= 0"):
        PyAVDecoder(frame_cache_mb=-1)
    # frame_cache_mb: one cache for the whole process, keyed by output size too
    first, second, smaller = (PyAVDecoder(frame_cache_mb=1), PyAVDecoder(frame_cache_mb=2),
                              PyAVDecoder(frame_cache_mb=1, short_side=16))
    assert first.frame_cache is second.frame_cache is smaller.frame_cache is shared_frame_cache(0)
    assert first.frame_cache.max_bytes >= 2 * 2**20
    decoded.clear()
    first.decode(paths[0], np.array([3]))
    assert np.array_equal(second.decode(paths[0], np.array([3])).frames, first.decode(paths[0], np.array([3])).frames)
    assert smaller.decode(paths[0], np.array([3])).frames.shape == (1, 16, 24, 3)
    assert decoded == [paths[0], paths[0]]  # once per output size


def test_with_the_frame_cache_broken_files_fail_as_without_it(tmp_path):
    plain, cached = PyAVDecoder(), PyAVDecoder(frame_cache=DecodedFrameCache(64 * 2**20))
    frames = index_coded_frames(200, width=48, offset=1)
    full_mp4, full_ts = tmp_path / "full.mp4", tmp_path / "full.ts"
    write_video(full_mp4, frames, container_options={"movflags": "+faststart"})
    write_video(full_ts, frames)
    cut_mp4, cut_ts = tmp_path / "cut.mp4", tmp_path / "cut.ts"
    for full, cut in ((full_mp4, cut_mp4), (full_ts, cut_ts)):
        cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.6)])
    (tmp_path / "garbage.mp4").write_bytes(b"not a video" * 100)
    for name in ("cut.mp4", "garbage.mp4", "missing.mp4"):
        reasons = []
        for decoder in (plain, cached):
            with pytest.raises(VideoDecodeError, match=name) as caught:
                decoder.decode(tmp_path / name, np.array([0]))
            reasons.append(caught.value.reason)
        assert reasons[0] == reasons[1], name
    assert len(cached.frame_cache) == 0
    count = plain.probe(cut_ts).num_frames  # a cut transport stream is a shorter video: it is cached
    indices = np.array([0, count // 2, count - 1])
    assert np.array_equal(cached.decode(cut_ts, indices).frames, plain.decode(cut_ts, indices).frames)
    assert len(cached.frame_cache) == 1


def test_a_longer_audio_track_is_not_truncation(tmp_path):
    import av

    path = tmp_path / "with_audio.mkv"
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 48, 32, "yuv420p"
        audio = container.add_stream("flac", rate=8000)
        audio.layout = "mono"
        for t, array in enumerate(index_coded_frames(50, width=48)):  # 2 s of video
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = t
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        for k in range(32):  # 4 s of audio: the file's duration
            samples = av.AudioFrame.from_ndarray(np.zeros((1, 1000), np.int16), format="s16", layout="mono")
            samples.sample_rate, samples.pts = 8000, k * 1000
            for packet in audio.encode(samples):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    decoder = PyAVDecoder()
    assert decoder.probe(path).num_frames == 50
    assert np.array_equal(read_codes(decoder.decode(path, np.array([0, 49])).frames), [0, 49])
