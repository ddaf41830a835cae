"""Test videos whose pixels spell their frame number, written with PyAV, and a plain sequential decode.

Shared by the tests/test_data_*.py files (pytest puts tests/ on sys.path).
"""

import av
import numpy as np

CODE_BITS = 8


def index_coded_frames(count, size=32, *, width=None, offset=0):
    """Frame t shows t + offset in binary: 8 vertical stripes of 4 pixels, white = 1 (survives lossy
    coding). (count, size, width or size, 3) uint8; width >= 32."""
    frames = np.zeros((count, size, width or size, 3), dtype=np.uint8)
    for t in range(count):
        for bit in range(CODE_BITS):
            if ((t + offset) >> bit) & 1:
                frames[t, :, bit * 4 : bit * 4 + 4] = 255
    return frames


def read_codes(frames):
    """The numbers index_coded_frames wrote, read back from (..., H, W, 3) frames."""
    stripes = frames[..., 8:24, :32, :].astype(np.float32).mean(axis=(-3, -1)).reshape(*frames.shape[:-3], CODE_BITS, 4).mean(-1)
    return ((stripes > 128).astype(np.int64) * (1 << np.arange(CODE_BITS))).sum(-1)


def write_video(path, frames, *, encoder="libx264", rate=25, pts=None, keyframe_interval=16, max_b_frames=None,
                rotation=None, mirrored=False, display_matrix=None, format=None, pix_fmt="yuv420p", options=None,
                container_options=None):
    """Encode RGB frames (T, H, W, 3); frame t gets timestamp pts[t] (default t) in 1/rate units.

    rotation/mirrored: a display matrix (counter-clockwise degrees, then a left-right mirror) written
    as stream side data (the mp4 tkhd matrix, the Matroska projection); display_matrix: 9 raw integers
    in FFmpeg's layout instead."""
    with av.open(str(path), "w", format=format, options=container_options or {}) as container:
        stream = container.add_stream(encoder, rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        if keyframe_interval is not None:
            stream.codec_context.gop_size = keyframe_interval
        if max_b_frames is not None:
            stream.codec_context.max_b_frames = max_b_frames
        if options:
            stream.options = dict(options)
        if rotation is not None or mirrored:
            stream.set_display_rotation(rotation or 0, hflip=mirrored)
        if display_matrix is not None:
            stream.set_display_matrix(display_matrix)
        for t, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if pix_fmt not in ("yuv420p", "rgb24"):
                frame = frame.reformat(format=pix_fmt)
            frame.pts = t if pts is None else int(pts[t])
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decode_all(path, *, until_error=False):
    """Every frame in the order the decoder gives them (presentation order), as stored (no rotation).
    until_error: the frames decoded before the first decoding error (a cut file) instead of raising."""
    frames = []
    with av.open(str(path)) as container:
        try:
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
        except av.error.FFmpegError:
            if not until_error:
                raise
    return np.stack(frames)
