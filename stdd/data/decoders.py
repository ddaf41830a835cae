"""PyAV (CPU) video decoding: open a file, learn its frame count, decode only the frames a clip needs.

`PyAVDecoder.decode(path, choose_indices)` opens the file once, calls `choose_indices(num_frames)` with
the video's frame count (so sampling can depend on it), then decodes the requested frames, seeking to
the nearest preceding keyframe whenever the next wanted frame lies more than `seek_gap_frames` ahead.
Any failure (unreadable container, no video stream, corrupt packets, a file that ends before the frames
its header promises) raises `VideoDecodeError` naming the file, so a dataset can skip it and count it.

The DALI decoders (GPU, and DALI's CPU video decoder) live in `stdd/data/dali.py` and produce the same
batch format as the PyAV DataLoader (see `stdd/data/dataset.py`).
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import numpy as np


class VideoDecodeError(RuntimeError):
    """A video that cannot be decoded (corrupt, truncated, empty, no video stream)."""

    def __init__(self, path: str | os.PathLike, reason: str | None = None):
        # One-argument form: DataLoader workers re-raise exceptions by calling type(error)(message).
        super().__init__(f"{path}: {reason}" if reason is not None else str(path))
        self.path = str(path)
        self.reason = reason if reason is not None else str(path)


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int
    frame_count_exact: bool  # False: estimated from the duration (e.g. webm has no frame count)
    codec: str = ""  # FFmpeg codec name, e.g. "h264", "vp9"


@dataclass
class DecodedClip:
    frames: np.ndarray  # uint8 (*indices.shape, H, W, 3) RGB
    indices: np.ndarray  # int64, the frame indices that were asked for
    info: VideoInfo


def _output_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    if short_side is None:
        return height, width
    if height <= width:
        return short_side, max(1, round(width * short_side / height))
    return max(1, round(height * short_side / width)), short_side


class PyAVDecoder:
    """Decode selected frames with PyAV on the CPU.

    short_side: if set, frames are resized (bilinear, during the YUV -> RGB conversion, which is cheaper
    than resizing RGB afterwards) so their shorter side is `short_side`.
    seek_gap_frames: seek instead of decoding through when the next wanted frame is further ahead.
    threads: decoder threads per file (1 suits multi-worker DataLoaders: the workers are the parallelism).
    """

    def __init__(self, *, short_side: int | None = None, seek_gap_frames: int = 48, threads: int = 1):
        if short_side is not None and short_side < 1:
            raise ValueError(f"short_side: expected a positive size or None, got {short_side}")
        self.short_side = short_side
        self.seek_gap_frames = seek_gap_frames
        self.threads = threads

    @staticmethod
    def _open(path: str | os.PathLike):
        import av

        if not os.path.isfile(path):
            raise VideoDecodeError(path, "file not found")
        if os.path.getsize(path) == 0:
            raise VideoDecodeError(path, "empty file (0 bytes)")
        try:
            container = av.open(str(path), mode="r")
        except (av.error.FFmpegError, OSError, ValueError) as error:
            raise VideoDecodeError(path, f"cannot open container: {error}") from None
        if not container.streams.video:
            container.close()
            raise VideoDecodeError(path, "no video stream")
        return container

    @staticmethod
    def _info(path, container) -> tuple[VideoInfo, object]:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate:
            raise VideoDecodeError(path, "unknown frame rate")
        fps = float(rate)
        num_frames, exact = int(stream.frames or 0), True
        if num_frames <= 0:
            exact = False
            if stream.duration is not None and stream.time_base is not None:
                num_frames = int(round(float(stream.duration * stream.time_base) * fps))
            elif container.duration is not None:
                num_frames = int(round(container.duration / 1_000_000 * fps))  # av.time_base: microseconds
            else:
                # No count and no duration (e.g. a raw .h264 elementary stream): count the packets, a
                # demux pass without decoding, in a container of its own so `container` stays at the start.
                num_frames, exact = PyAVDecoder._count_packets(path), True
        if num_frames <= 0:
            raise VideoDecodeError(path, "container reports no frames")
        height, width = stream.codec_context.height, stream.codec_context.width
        if not height or not width:
            raise VideoDecodeError(path, "unknown frame size")
        return VideoInfo(num_frames, fps, height, width, exact, stream.codec_context.name or ""), stream

    @staticmethod
    def _count_packets(path) -> int:
        import av

        try:
            with av.open(str(path), mode="r") as container:
                return sum(1 for packet in container.demux(video=0) if packet.size > 0)
        except (av.error.FFmpegError, OSError) as error:
            raise VideoDecodeError(path, f"cannot count frames: {error}") from None

    def probe(self, path: str | os.PathLike) -> VideoInfo:
        container = self._open(path)
        try:
            return self._info(path, container)[0]
        finally:
            container.close()

    def decode(self, path: str | os.PathLike, choose_indices: Callable[[int], np.ndarray] | np.ndarray) -> DecodedClip:
        """Decode frames; `choose_indices` is an index array or a function num_frames -> index array."""
        import av

        container = self._open(path)
        try:
            info, stream = self._info(path, container)
            indices = np.asarray(choose_indices(info.num_frames) if callable(choose_indices) else choose_indices, dtype=np.int64)
            if indices.size == 0:
                raise ValueError("choose_indices: expected at least one frame index")
            if indices.min() < 0:
                raise ValueError(f"choose_indices: negative frame index {indices.min()}")
            stream.thread_count = self.threads
            wanted = np.unique(indices)  # sorted
            try:
                decoded = self._decode_frames(container, stream, info, wanted)
            except (av.error.FFmpegError, OSError, ValueError, RuntimeError) as error:
                # FFmpeg errors, but also PyAV's ValueError/RuntimeError for frames it cannot convert
                # (e.g. an unsupported pixel format): either way this file cannot give the clip.
                raise VideoDecodeError(path, f"decoding failed: {type(error).__name__}: {error}") from None
            if not decoded:
                raise VideoDecodeError(path, "no frame could be decoded")
            last_decoded = max(decoded)
            missing = wanted[wanted > last_decoded]
            # Frame counts estimated from the duration may overshoot by a frame or two: those indices
            # are served by the last frame. Beyond that (or with an exact count) the file is truncated.
            tolerance = 0 if info.frame_count_exact else 2
            if missing.size and (missing.max() - last_decoded > tolerance or missing.max() >= info.num_frames + tolerance):
                raise VideoDecodeError(
                    path, f"truncated: frames end at index {last_decoded}, needed index {int(missing.max())} of {info.num_frames}"
                )
            holes = [int(index) for index in wanted if index <= last_decoded and int(index) not in decoded]
            if holes:
                raise VideoDecodeError(path, f"frames {holes[:5]} could not be decoded (corrupt data)")
            lookup = {int(index): decoded[min(int(index), last_decoded)] for index in wanted}
            frames = np.stack([lookup[int(index)] for index in indices.reshape(-1)])
            frames = frames.reshape(*indices.shape, *frames.shape[1:])
            return DecodedClip(frames=frames, indices=indices, info=info)
        finally:
            container.close()

    def _decode_frames(self, container, stream, info: VideoInfo, wanted: np.ndarray) -> dict[int, np.ndarray]:
        """{frame index: (H, W, 3) uint8} for the wanted indices (sorted, unique) that exist.

        Frame i is the i-th frame in presentation order. Its number is read from the timestamp relative
        to the FIRST DECODED frame, not to the stream's start_time: AVI files with B-frames, for one,
        start their frames at pts 1 while declaring start_time 0.
        """
        time_base = stream.time_base or Fraction(1, 1)
        out_height, out_width = _output_size(info.height, info.width, self.short_side)
        wanted_set = {int(index) for index in wanted}
        decoded: dict[int, np.ndarray] = {}

        frames_from_start = container.decode(stream)
        first = next(frames_from_start, None)
        if first is None:
            return decoded
        # Without timestamps (raw elementary streams) frames are numbered by counting from the start,
        # and seeking would lose the count.
        can_seek = first.pts is not None and stream.start_time is not None
        first_pts = first.pts if first.pts is not None else 0
        frame_iterator = itertools.chain([first], frames_from_start)
        position = -1  # index of the last frame decoded so far
        sequential_count = 0

        def frame_index(frame) -> int:
            nonlocal sequential_count
            if not can_seek or frame.pts is None:
                sequential_count += 1
                return sequential_count - 1
            return int(round(float((frame.pts - first_pts) * time_base) * info.fps))

        def convert(frame) -> np.ndarray:
            if (out_height, out_width) != (frame.height, frame.width):
                frame = frame.reformat(width=out_width, height=out_height, format="rgb24", interpolation="BILINEAR")
                return frame.to_ndarray()
            return frame.to_ndarray(format="rgb24")

        def restart_from_the_beginning():
            nonlocal frame_iterator, position, sequential_count
            container.seek(first_pts, stream=stream, backward=True, any_frame=False)
            frame_iterator, position, sequential_count = container.decode(stream), -1, 0

        for target in (int(index) for index in wanted):
            if target in decoded or target <= position:
                continue
            just_seeked = False
            if can_seek and target - position > self.seek_gap_frames and target > self.seek_gap_frames // 2:
                # Seek to the keyframe at or before the target's timestamp (half a frame early so
                # rounding cannot land us after it).
                seconds = max(0.0, (target - 0.5) / info.fps)
                container.seek(first_pts + int(math.floor(seconds / time_base)), stream=stream, backward=True, any_frame=False)
                frame_iterator, position, just_seeked = container.decode(stream), -1, True
            reached = False
            while True:
                restarted = False
                for frame in frame_iterator:
                    index = frame_index(frame)
                    if just_seeked and index > target:
                        # Landed after the target (no usable keyframe before it): decode from the
                        # beginning instead -- once, so this cannot loop.
                        restart_from_the_beginning()
                        just_seeked, restarted = False, True
                        break
                    just_seeked = False
                    position = index
                    if index in wanted_set and index not in decoded:
                        decoded[index] = convert(frame)
                    if index >= target:
                        reached = True
                        break
                if not restarted:
                    break
            if not reached:
                break  # end of stream: later targets do not exist either
        return decoded
