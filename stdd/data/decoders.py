"""PyAV (CPU) video decoding: index a file's frames by their timestamps, decode only the frames a clip needs.

Frame numbering. Frame i of a video is its i-th frame in presentation order, i.e. the frame with the i-th
smallest presentation timestamp (pts). `PyAVDecoder.index(path)` learns every frame's pts from one pass
over the packets (demuxing, no decoding), plus the first frame, which is decoded to fix the origin and
the display rotation (cost: bench/video_checks.py). So the frame count is exact and frame i is found
by its pts in every container: mp4, mkv/webm (with or without a start time), MPEG-TS, GIF, AVI, variable
frame rate. Details that matter:
- Frames are numbered from the FIRST DECODED frame: packets that display before it never come out of
  the decoder (e.g. the leading pictures of an open GOP cut at the file start). AVI files with B-frames,
  for one, start their frames at pts 1 while declaring start_time 0.
- Empty packets (flush packets, AVI's dropped-frame slots) and packets the container marks as discarded
  (outside an mp4 edit list) are not frames; a corrupt packet at the very end (a file cut inside it) is
  dropped.
- Without usable timestamps (a packet without pts, two packets with the same pts, e.g. a raw .h264
  elementary stream) frames are counted in decode order and decoded from the start, without seeking.
  The same happens if the decoder gives a frame a timestamp the packets did not have.
- A file whose packets stop before its header says (mp4/AVI frame count, Matroska duration) is
  truncated: `VideoDecodeError("...: truncated: frames end at index N, the header declares M frames")`.

Seeking. To reach frame i the decoder seeks to the keyframe at or before frame i's pts (from the index)
and decodes forward, trusting frames only from that keyframe on. If the container's seek lands after the
target or yields nothing (MPEG-TS near its end), it tries the keyframe before, then decodes from the
start of a freshly opened file: only the frames asked for are ever returned.

Display rotation. A display matrix (portrait phone video) is applied: the frames come out as a player
shows them; `VideoInfo.rotation` / `.mirrored` say what was done and height/width are the displayed size.

Indexes are cached per decoder (bounded LRU, keyed by path + size + mtime, so a changed file is indexed
again): a process that opens a file again (num_workers=0 loaders, DALI's build-time probe, repeated
predictions) skips the packet pass. The PyAV DataLoader's worker processes are re-created every epoch,
so there each worker's cache lasts one epoch; an uncached `decode` indexes the file in the same open
it then decodes from (one open, one decoder set-up).

Decoded frames can be cached too (`PyAVDecoder(frame_cache_mb=N)`, `data.frame_cache_mb`): the first
clip asked of a file decodes ALL its frames once and keeps them (uint8, LRU, at most N MiB per process,
one cache shared by every decoder of the process, keyed by file and output size); later clips of that
file are cut from memory. Only for sets that fit in memory and are read many times
(the demo's 1,296 synthetic videos of 16 frames at 32 px are about 60 MB; a cache smaller than the set
makes clips decode whole videos again and again, and says so once), and only in a process that lives
long enough (num_workers=0, or one epoch of a worker). Whether a file can be cached is decided from its
index, before anything is decoded: a file whose frames (frames x H x W x 3 bytes at the output size)
exceed the whole budget is never decoded whole; its clips are decoded as without the cache (only the
frames they need), and the first such file is logged once per cache, i.e. once per process. A file
whose frames do not all decode is not cached either: its clips are decoded as without the cache, so
the errors are the same. `PyAVDecoder.frames_decoded` counts the frames a decoder turned into RGB
arrays (a whole-file decode for the cache counts every frame of the file).

Any failure (unreadable container, no video stream, corrupt packets, truncation) raises `VideoDecodeError`
naming the file, so a dataset can skip it and count it. The DALI decoders live in `stdd/data/dali.py`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import numpy as np


logger = logging.getLogger(__name__)

# File suffixes taken as videos where a folder is given (``stdd.predict``); compared in lower case.
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mts", ".m2ts", ".mpg", ".mpeg",
                  ".gif", ".flv", ".wmv", ".3gp", ".ogv")


class VideoDecodeError(RuntimeError):
    """A video that cannot be decoded (corrupt, truncated, empty, no video stream)."""

    def __init__(self, path: str | os.PathLike, reason: str | None = None):
        # One-argument form: DataLoader workers re-raise exceptions by calling type(error)(message).
        super().__init__(f"{path}: {reason}" if reason is not None else str(path))
        self.path = str(path)
        self.reason = reason if reason is not None else str(path)


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int  # exact: the frames the packets hold (see the module docstring)
    fps: float  # frames per second over the time they span (the average rate of a variable-rate video)
    height: int  # as displayed, i.e. after `rotation`
    width: int
    codec: str = ""  # FFmpeg codec name ("h264", "vp9", "av1"), not the decoder's name ("libdav1d")
    rotation: int = 0  # 0/90/180/270: degrees counter-clockwise the stored frames are turned for display
    mirrored: bool = False  # the display matrix also mirrors left-right (after the rotation)


@dataclass
class DecodedClip:
    frames: np.ndarray  # uint8 (*indices.shape, H, W, 3) RGB, upright (display rotation applied)
    indices: np.ndarray  # int64, the frame indices that were asked for
    info: VideoInfo


@dataclass(frozen=True)
class FrameIndex:
    """What one pass over a video's packets learns (see the module docstring)."""

    info: VideoInfo
    pts: np.ndarray | None  # (num_frames,) int64 ascending, frame i = pts[i]; None: counted in decode order
    keyframes: np.ndarray  # ascending frame numbers of keyframes: where decoding can start after a seek

    def keyframe_at_or_before(self, frame: int) -> int:
        position = int(np.searchsorted(self.keyframes, frame, side="right")) - 1
        return int(self.keyframes[position]) if position >= 0 else 0


class _LockedLRU:
    """What both caches below share: an ordered dict (least recently used first) behind a lock; ``get``
    of a key (None: not cacheable) marks it used. Each cache bounds it in its own ``put``."""

    def __init__(self):
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple | None):
        if key is None:
            return None
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value


class DecodedFrameCache(_LockedLRU):
    """Bounded LRU of a video's decoded frames ``(num_frames, H, W, 3)`` uint8, keyed like `FrameIndexCache`;
    at most ``max_bytes`` in all (a video larger than that is not kept)."""

    def __init__(self, max_bytes: int = 0):
        if max_bytes < 0:
            raise ValueError(f"max_bytes: expected >= 0, got {max_bytes}")
        super().__init__()
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.evicted = 0  # videos dropped to stay within max_bytes
        self.refused = 0  # clips decoded without the cache: their video's frames exceed max_bytes

    def admits(self, nbytes: int, path) -> bool:
        """Whether a video whose decoded frames take ``nbytes`` can be kept at all (before decoding it).
        The first video that cannot is logged, once per cache (the process's shared cache: once per process)."""
        if nbytes <= self.max_bytes:
            return True
        with self._lock:
            self.refused += 1
            first = self.refused == 1
        if first:
            logger.warning("%s: its decoded frames (%.2f MiB) exceed the whole decoded-frame cache (%.2f MiB, "
                           "data.frame_cache_mb): its clips are decoded one by one, not the whole video; so are "
                           "those of any other video too large for the cache (not said again)",
                           path, nbytes / 2**20, self.max_bytes / 2**20)
        return False

    def put(self, key: tuple | None, frames: np.ndarray) -> None:
        if key is None or frames.nbytes > self.max_bytes:
            return
        frames.setflags(write=False)  # shared by every clip cut from it
        with self._lock:
            previous = self._entries.pop(key, None)
            self.bytes -= previous.nbytes if previous is not None else 0
            self._entries[key] = frames
            self.bytes += frames.nbytes
            while self.bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.bytes -= dropped.nbytes
                self.evicted += 1
                if self.evicted == 1:  # from now on clips may decode whole videos again and again: say so once
                    logger.warning("decoded-frame cache full (%.0f MiB): videos are dropped and decoded whole again "
                                   "when asked for; give data.frame_cache_mb more than the set's frames or 0",
                                   self.max_bytes / 2**20)

    def __getstate__(self):  # a worker process starts with an empty cache (frames are not shipped to it)
        return {"max_bytes": self.max_bytes}

    def __setstate__(self, state):
        self.__init__(state["max_bytes"])


_SHARED_FRAME_CACHE: DecodedFrameCache | None = None
_SHARED_FRAME_CACHE_LOCK = threading.Lock()


def shared_frame_cache(max_bytes: int) -> DecodedFrameCache:
    """The process's one decoded-frame cache, at least ``max_bytes`` large: every decoder asking for a frame
    cache uses it, so the datasets of one process (training and validation, one run after another, as in
    the demo) decode each file once."""
    global _SHARED_FRAME_CACHE
    with _SHARED_FRAME_CACHE_LOCK:
        if _SHARED_FRAME_CACHE is None:
            _SHARED_FRAME_CACHE = DecodedFrameCache(max_bytes)
        elif _SHARED_FRAME_CACHE.max_bytes < max_bytes:
            _SHARED_FRAME_CACHE.max_bytes = int(max_bytes)
        return _SHARED_FRAME_CACHE


class FrameIndexCache(_LockedLRU):
    """Bounded LRU of `FrameIndex` keyed by (real path, size, mtime_ns): a changed file is indexed again."""

    def __init__(self, max_entries: int = 1024):
        if max_entries < 0:
            raise ValueError(f"max_entries: expected >= 0, got {max_entries}")
        super().__init__()
        self.max_entries = max_entries

    @staticmethod
    def key(path: str | os.PathLike) -> tuple | None:
        """The cache key of the file as it is now (None: it cannot be stat-ed; nothing is cached)."""
        try:
            status = os.stat(path)
        except OSError:
            return None
        return os.path.realpath(path), status.st_size, status.st_mtime_ns

    def put(self, key: tuple | None, index: FrameIndex) -> None:
        if key is None or self.max_entries == 0:
            return
        with self._lock:
            self._entries[key] = index
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __getstate__(self):  # picklable for spawned DataLoader workers (locks are not)
        return {"max_entries": self.max_entries, "entries": list(self._entries.items())}

    def __setstate__(self, state):
        self.__init__(state["max_entries"])
        self._entries.update(state["entries"])


def _output_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    if short_side is None:
        return height, width
    if height <= width:
        return short_side, max(1, round(width * short_side / height))
    return max(1, round(height * short_side / width)), short_side


def _stored_output_size(info: VideoInfo, short_side: int | None) -> tuple[int, int]:
    """(height, width) a frame is converted to, as stored (before the display rotation turns it)."""
    stored_height, stored_width = (info.width, info.height) if info.rotation in (90, 270) else (info.height, info.width)
    return _output_size(stored_height, stored_width, short_side)


# ------------------------------------------------------------------ display matrix

# Linear part of the pixel mapping (x = column, y = row, y down) of the upright-making operations, as
# 2x2 matrices acting on (x, y): np.rot90(frame, 1) sends (x, y) to (y, -x) (plus a shift), np.fliplr to (-x, y).
_QUARTER_TURN = np.array([[0, 1], [-1, 0]])
_MIRROR = np.array([[-1, 0], [0, 1]])


def _display_matrix(frame) -> np.ndarray | None:
    """The frame's display matrix side data as 9 floats (16.16 fixed point decoded), or None."""
    try:
        items = list(frame.side_data)
    except (AttributeError, TypeError):
        return None
    for item in items:
        kind = getattr(item, "type", None)
        if getattr(kind, "name", str(kind)).upper().endswith("DISPLAYMATRIX"):
            values = np.frombuffer(bytes(item), dtype=np.int32)
            if values.size >= 9:
                return values[:9].astype(np.float64) / 65536.0
    return None


def _orientation(path, matrix: np.ndarray | None) -> tuple[int, bool]:
    """(rotation, mirrored) that make frames upright: np.rot90(frame, rotation // 90), then np.fliplr.

    FFmpeg's display matrix maps a source pixel (x, y) to x' = a x + c y, y' = b x + d y with
    (a, b, _, c, d, ...) = matrix (tested against PyAV's writer for all eight quarter-turn/mirror
    combinations); only quarter turns (optionally mirrored) are supported.
    """
    if matrix is None:
        return 0, False
    a, b, c, d = matrix[0], matrix[1], matrix[3], matrix[4]
    scale = max(abs(a), abs(b), abs(c), abs(d))
    if scale == 0:
        return 0, False  # a degenerate matrix shows nothing sensible; ignore it like players do
    mapping = np.array([[a, c], [b, d]]) / scale
    signs = np.where(np.abs(mapping) < 1e-3, 0, np.sign(mapping)).astype(np.int64)
    for turns in range(4):
        for mirrored in (False, True):
            candidate = np.linalg.matrix_power(_QUARTER_TURN, turns)
            if mirrored:
                candidate = _MIRROR @ candidate
            if np.array_equal(candidate, signs):  # (a scaling in the matrix is ignored, like the aspect ratio)
                return 90 * turns, mirrored
    angle = float(np.degrees(np.arctan2(-b, a)))
    raise VideoDecodeError(path, f"display matrix rotates by {angle:.1f} degrees; only multiples of 90 are supported")


def upright_frame(frame: np.ndarray, rotation: int, mirrored: bool) -> np.ndarray:
    """(H, W, ...) as stored -> as displayed, for VideoInfo.rotation / .mirrored."""
    if rotation:
        frame = np.rot90(frame, rotation // 90)
    if mirrored:
        frame = frame[:, ::-1]
    return frame


# ------------------------------------------------------------------ the packet pass

_MATROSKA_TRUNCATION_TOLERANCE_S = 0.5  # declared duration may exceed the last frame's end by this much


def _parse_duration_tag(text: str | None) -> float | None:
    """Matroska's per-track DURATION tag, "HH:MM:SS.nnnnnnnnn" -> seconds."""
    if not text:
        return None
    try:
        hours, minutes, seconds = text.strip().split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None


def _codec_name(stream) -> str:
    codec = stream.codec_context.codec
    return getattr(codec, "canonical_name", None) or codec.name or ""


@dataclass
class _Packet:
    pts: int | None
    duration: int
    keyframe: bool
    corrupt: bool


def build_frame_index(path: str | os.PathLike, *, threads: int = 1) -> FrameIndex:
    """One pass over the video packets of `path` (see the module docstring); no caching."""
    container = _open(path)
    try:
        container.streams.video[0].thread_count = threads
        return _index_container(path, container)
    finally:
        container.close()


def _index_container(path, container) -> FrameIndex:
    """Index the first video stream of an open `container` (read to its end; seek before decoding)."""
    import av  # optional package: only decoding needs PyAV, not the rest of stdd.data

    errors = (av.error.FFmpegError, OSError, ValueError, RuntimeError)
    stream = container.streams.video[0]
    packets: list[_Packet] = []
    slots = 0  # packets the header's frame count covers: real ones, discarded ones, empty slots
    first_frame, first_error, demux_error = None, None, None
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                if packet.dts is not None:
                    slots += 1  # an AVI dropped-frame slot; (the flush packet at the end has no dts)
                continue
            slots += 1
            if first_frame is None and first_error is None:
                try:  # every packet feeds the decoder (discarded ones too: later frames refer to them)
                    decoded = stream.decode(packet)
                except errors as error:
                    first_error = error
                else:
                    first_frame = decoded[0] if decoded else None
            if packet.is_discard:
                continue
            packets.append(_Packet(packet.pts, int(packet.duration or 0), bool(packet.is_keyframe), bool(packet.is_corrupt)))
    except errors as error:
        demux_error = error
    if first_frame is None and first_error is None and packets:
        try:
            decoded = stream.decode(None)  # drain: decoders with reordering delay hold the first frame back
            first_frame = decoded[0] if decoded else None
        except errors as error:
            first_error = error
    while packets and packets[-1].corrupt:
        packets.pop()  # the file ends inside this packet

    declared = int(stream.frames or 0)
    if declared > 0 and slots < declared:
        where = f"frames end at index {len(packets) - 1}" if packets else "the file ends before its first frame"
        raise VideoDecodeError(path, f"truncated: {where}, the header declares {declared} frames")
    if not packets:
        reason = f": {demux_error}" if demux_error is not None else ""
        raise VideoDecodeError(path, f"no video packets{reason}")
    if first_frame is None:
        reason = f": {type(first_error).__name__}: {first_error}" if first_error is not None else ""
        raise VideoDecodeError(path, f"no frame could be decoded{reason}")

    time_base = stream.time_base or Fraction(1, 1)
    timestamps = [packet.pts for packet in packets]
    pts = None
    if first_frame.pts is not None and None not in timestamps and len(set(timestamps)) == len(timestamps):
        ordered = np.array(sorted(timestamps), dtype=np.int64)
        ordered = ordered[ordered >= first_frame.pts]  # frames before the first decoded one never appear
        if ordered.size and ordered[0] == first_frame.pts:
            pts = ordered
    if pts is not None:
        num_frames = int(pts.size)
        keyframes = np.unique(np.searchsorted(pts, [p.pts for p in packets if p.keyframe and p.pts >= pts[0]]))
        durations = {packet.pts: packet.duration for packet in packets}
        last_duration = durations.get(int(pts[-1]), 0) or (int(np.median(np.diff(pts))) if num_frames > 1 else 0)
        span = Fraction(int(pts[-1] - pts[0]) + last_duration) * time_base
        if "matroska" in container.format.name:
            end_seconds = float((int(pts[-1]) + last_duration) * time_base)
            _check_matroska_duration(path, container, stream, end_seconds, float(span) / num_frames, num_frames)
    else:
        num_frames, keyframes, span = len(packets), np.zeros(0, dtype=np.int64), Fraction(0)
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if span > 0:
        fps = float(num_frames / span)
    elif rate:
        fps = float(rate)
    else:
        raise VideoDecodeError(path, "unknown frame rate")
    rotation, mirrored = _orientation(path, _display_matrix(first_frame))
    height, width = first_frame.height, first_frame.width
    if rotation in (90, 270):
        height, width = width, height
    info = VideoInfo(num_frames, fps, height, width, _codec_name(stream), rotation, mirrored)
    return FrameIndex(info, pts, keyframes.astype(np.int64))


def _check_matroska_duration(path, container, stream, end_seconds: float, frame_seconds: float, num_frames: int) -> None:
    """Matroska declares durations (segment, per-track DURATION tag), not frame counts: the last frame
    must end near the declared end. The segment duration covers every track, so it is used only when
    the video is the file's only stream."""
    declared = _parse_duration_tag(stream.metadata.get("DURATION"))
    if declared is None and len(container.streams) == 1 and container.duration is not None:
        declared = container.duration / 1_000_000  # av.time_base: microseconds
    if declared is None:
        return
    if declared - end_seconds > max(_MATROSKA_TRUNCATION_TOLERANCE_S, 2 * frame_seconds):
        raise VideoDecodeError(
            path, f"truncated: frames end at index {num_frames - 1} ({end_seconds:.2f} s), the header declares {declared:.2f} s"
        )


def _open(path: str | os.PathLike):
    import av  # optional package: only decoding needs PyAV, not the rest of stdd.data

    if not os.path.isfile(path):
        raise VideoDecodeError(path, "file not found" if not os.path.isdir(path) else "is a directory, not a video file")
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


# ------------------------------------------------------------------ decoding


class _TimestampMismatch(Exception):
    """The decoder gave a frame a timestamp the packets did not have: number frames in decode order."""


_REACHED, _LANDED_AFTER, _ENDED, _NOTHING = range(4)


def _checked_indices(path, info: VideoInfo, choose_indices) -> np.ndarray:
    indices = np.asarray(choose_indices(info.num_frames) if callable(choose_indices) else choose_indices, dtype=np.int64)
    if indices.size == 0:
        raise ValueError("choose_indices: expected at least one frame index")
    if indices.min() < 0:
        raise ValueError(f"choose_indices: negative frame index {indices.min()}")
    if indices.max() >= info.num_frames:
        raise ValueError(f"choose_indices: frame index {indices.max()} out of range, {path} has {info.num_frames} frames")
    return indices


class PyAVDecoder:
    """Decode selected frames with PyAV on the CPU.

    short_side: if set, frames are resized (bilinear, during the YUV -> RGB conversion, which is cheaper
    than resizing RGB afterwards) so their shorter side is `short_side`.
    seek_gap_frames: seek instead of decoding through when the next wanted frame is further ahead (and
    a keyframe lies between). threads: decoder threads per file (1 suits multi-worker DataLoaders: the
    workers are the parallelism). index_cache_size: frame indexes kept (0: index on every open).
    frame_cache_mb: keep whole decoded videos in memory, in the process's shared cache of at least this
    many MiB (0: off; see the module docstring); frame_cache: a `DecodedFrameCache` of its own instead.
    """

    def __init__(self, *, short_side: int | None = None, seek_gap_frames: int = 48, threads: int = 1,
                 index_cache_size: int = 1024, frame_cache_mb: float = 0,
                 frame_cache: DecodedFrameCache | None = None):
        if short_side is not None and short_side < 1:
            raise ValueError(f"short_side: expected a positive size or None, got {short_side}")
        if not frame_cache_mb >= 0:
            raise ValueError(f"frame_cache_mb: expected a size in MiB >= 0, got {frame_cache_mb}")
        self.short_side = short_side
        self.seek_gap_frames = seek_gap_frames
        self.threads = threads
        self.index_cache = FrameIndexCache(index_cache_size)
        if frame_cache is None:
            frame_cache = shared_frame_cache(int(frame_cache_mb * 2**20)) if frame_cache_mb else DecodedFrameCache(0)
        elif frame_cache_mb:
            raise ValueError("frame_cache_mb: give either frame_cache_mb (the shared cache) or frame_cache, not both")
        self.frame_cache = frame_cache
        self.frames_decoded = 0  # frames converted to RGB arrays so far (see the module docstring)

    def decoded_bytes(self, info: VideoInfo) -> int:
        """Bytes of all of a video's frames as this decoder returns them (uint8 RGB at the output size)."""
        height, width = _stored_output_size(info, self.short_side)
        return info.num_frames * height * width * 3

    def index(self, path: str | os.PathLike) -> FrameIndex:
        key = self.index_cache.key(path)
        index = self.index_cache.get(key)
        if index is None:
            index = build_frame_index(path, threads=self.threads)
            self.index_cache.put(key, index)
        return index

    def probe(self, path: str | os.PathLike) -> VideoInfo:
        return self.index(path).info

    def verify(self, path: str | os.PathLike) -> VideoInfo:
        """Decode every frame (without converting it to RGB); VideoDecodeError unless all frames the
        index counts come out. Catches corrupt data inside a file, which indexing cannot see."""
        import av  # optional package: only decoding needs PyAV, not the rest of stdd.data

        info = self.index(path).info
        container, stream = self._open_stream(path)
        count = 0
        try:
            for _ in container.decode(stream):
                count += 1
        except (av.error.FFmpegError, OSError, ValueError, RuntimeError) as error:
            raise VideoDecodeError(path, f"decoding failed after {count} frames: {type(error).__name__}: {error}") from None
        finally:
            container.close()
        if count < info.num_frames:
            raise VideoDecodeError(path, f"frames end at index {count - 1}: only {count} of its {info.num_frames} frames decode")
        return info

    def decode(self, path: str | os.PathLike, choose_indices: Callable[[int], np.ndarray] | np.ndarray) -> DecodedClip:
        """Decode frames; `choose_indices` is an index array or a function num_frames -> index array."""
        if self.frame_cache.max_bytes:
            return self._decode_cached(path, choose_indices)
        return self._decode(path, choose_indices)

    def _decode_cached(self, path, choose_indices) -> DecodedClip:
        key = self.index_cache.key(path)
        key = None if key is None else (*key, self.short_side)  # the cache is shared: frames differ by size
        frames = self.frame_cache.get(key)
        if frames is not None:
            info = self.index(path).info  # (with index_cache_size=0: indexed again here)
        else:
            if key is None:  # nothing can be cached (the file cannot be stat-ed): fail as without the cache
                return self._decode(path, choose_indices)
            info = self.index(path).info  # the frame count and size, known before anything is decoded
            if not self.frame_cache.admits(self.decoded_bytes(info), path):
                return self._decode(path, choose_indices)  # never decode whole what can never be kept
            try:
                whole = self._decode(path, np.arange(info.num_frames))
            except VideoDecodeError:  # not all frames decode: this clip may still (or fail as without the cache)
                return self._decode(path, choose_indices)
            self.frame_cache.put(key, whole.frames)
            frames = whole.frames
        indices = _checked_indices(path, info, choose_indices)
        return DecodedClip(frames=frames[indices.reshape(-1)].reshape(*indices.shape, *frames.shape[1:]),
                           indices=indices, info=info)

    def _decode(self, path, choose_indices) -> DecodedClip:
        import av  # optional package: only decoding needs PyAV, not the rest of stdd.data

        key = self.index_cache.key(path)
        index = self.index_cache.get(key)
        container = None
        if index is None:  # index it in the container that then decodes (one open, one decoder set-up)
            container, _ = self._open_stream(path)
            try:
                index = _index_container(path, container)
            except BaseException:
                container.close()
                raise
            self.index_cache.put(key, index)
        try:
            info = index.info
            indices = _checked_indices(path, info, choose_indices)
            wanted = np.unique(indices)  # sorted
            try:
                try:
                    decoded, last_seen, ended = self._decode_by_timestamp(path, index, wanted, container)
                    container = None  # closed there
                except _TimestampMismatch:
                    container = None
                    decoded, last_seen, ended = self._decode_in_order(path, index, wanted)
            except VideoDecodeError:
                raise
            except (av.error.FFmpegError, OSError, ValueError, RuntimeError) as error:
                # FFmpeg errors, but also PyAV's ValueError/RuntimeError for frames it cannot convert
                # (e.g. an unsupported pixel format): either way this file cannot give the clip.
                raise VideoDecodeError(path, f"decoding failed: {type(error).__name__}: {error}") from None
        finally:
            if container is not None:
                container.close()
        missing = [int(number) for number in wanted if int(number) not in decoded]
        if missing:
            if not decoded and last_seen < 0:
                raise VideoDecodeError(path, "no frame could be decoded")
            if ended and missing[0] > last_seen:
                raise VideoDecodeError(
                    path, f"truncated: frames end at index {last_seen}, needed index {missing[-1]} of {info.num_frames}"
                )
            raise VideoDecodeError(path, f"frames {missing[:5]} could not be decoded (corrupt data)")
        frames = np.stack([decoded[int(number)] for number in indices.reshape(-1)])
        frames = frames.reshape(*indices.shape, *frames.shape[1:])
        return DecodedClip(frames=frames, indices=indices, info=info)

    # -- helpers

    def _open_stream(self, path):
        container = _open(path)
        stream = container.streams.video[0]
        stream.thread_count = self.threads
        return container, stream

    def _converter(self, info: VideoInfo) -> Callable:
        out_height, out_width = _stored_output_size(info, self.short_side)

        def convert(frame) -> np.ndarray:
            self.frames_decoded += 1
            if (out_height, out_width) != (frame.height, frame.width):
                array = frame.reformat(width=out_width, height=out_height, format="rgb24", interpolation="BILINEAR").to_ndarray()
            else:
                array = frame.to_ndarray(format="rgb24")
            return upright_frame(array, info.rotation, info.mirrored)

        return convert

    def _decode_in_order(self, path, index: FrameIndex, wanted: np.ndarray):
        """Frames numbered by their order out of the decoder, from the start of a fresh open; no seeking."""
        convert = self._converter(index.info)
        wanted_set = {int(number) for number in wanted}
        last_wanted = int(wanted[-1])
        decoded: dict[int, np.ndarray] = {}
        container, stream = self._open_stream(path)
        try:
            number = -1
            for number, frame in enumerate(container.decode(stream)):
                if number in wanted_set:
                    decoded[number] = convert(frame)
                if number >= last_wanted:
                    return decoded, number, False
            return decoded, number, True
        finally:
            container.close()

    def _decode_by_timestamp(self, path, index: FrameIndex, wanted: np.ndarray, container=None):
        """({frame number: frame}, last frame number seen, whether the stream ended) for `wanted`.

        container: an open container already read (the index pass) to reuse, or None; closed here."""
        if index.pts is None:
            if container is not None:
                container.close()
            return self._decode_in_order(path, index, wanted)
        import av  # optional package: only decoding needs PyAV, not the rest of stdd.data

        convert = self._converter(index.info)
        number_of = {int(pts): number for number, pts in enumerate(index.pts.tolist())}
        origin = int(index.pts[0])
        wanted_set = {int(number) for number in wanted}
        decoded: dict[int, np.ndarray] = {}
        state = {"container": container, "read": container is not None, "frames": None, "position": -1, "last_seen": -1}

        def start(keyframe: int, fresh: bool) -> tuple:
            """Begin decoding at `keyframe` by seeking, or (fresh) at the start of a newly opened file:
            (frames, floor, seeked)."""
            if state["container"] is None or (fresh and state["read"]):
                if state["container"] is not None:
                    state["container"].close()
                state["container"], _ = self._open_stream(path)
                state["read"] = False
            container = state["container"]
            stream = container.streams.video[0]
            state["position"], state["read"] = -1, True
            if fresh:
                return container.decode(stream), 0, False
            container.seek(int(index.pts[keyframe]), stream=stream, backward=True, any_frame=False)
            return container.decode(stream), keyframe, True

        def run_to(frames, floor: int, seeked: bool, target: int) -> int:
            trusted = not seeked
            for frame in frames:
                number = number_of.get(frame.pts) if frame.pts is not None else None
                if number is None:
                    if frame.pts is not None and frame.pts < origin:
                        continue
                    raise _TimestampMismatch
                if not trusted:
                    # after a seek: from the keyframe sought on (not leading pictures, not a non-key landing)
                    if number < floor or not (frame.key_frame or number == floor):
                        continue
                    if number > target:
                        return _LANDED_AFTER
                    trusted = True
                if number <= state["position"]:
                    continue
                state["position"] = number
                state["last_seen"] = max(state["last_seen"], number)
                if number in wanted_set and number not in decoded:
                    decoded[number] = convert(frame)
                if number >= target:
                    return _REACHED
            return _ENDED if trusted else _NOTHING

        try:
            for target in (int(number) for number in wanted):
                if target <= state["position"] and state["frames"] is not None:
                    continue
                keyframe = index.keyframe_at_or_before(target)
                position = state["position"] if state["frames"] is not None else -1
                if state["frames"] is not None and not (keyframe > position and target - position > self.seek_gap_frames):
                    status = run_to(state["frames"], 0, False, target)  # decode through
                else:
                    if state["frames"] is None and target < self.seek_gap_frames:
                        keyframe = 0
                    # the keyframe wanted, two earlier ones if the container's seek misses, then the start
                    # (by a seek in a container already read, else, or if that misses, a fresh open)
                    earlier = index.keyframes[index.keyframes < keyframe][::-1][:2].tolist()
                    attempts = [(int(frame), False) for frame in dict.fromkeys([keyframe, *earlier, 0])
                                if frame > 0 or state["container"] is not None]
                    attempts.append((0, True))
                    for attempt, fresh in attempts:
                        try:
                            frames, floor, seeked = start(attempt, fresh)
                        except av.error.FFmpegError:
                            continue  # this container cannot seek there: try an earlier point
                        state["frames"] = frames
                        status = run_to(frames, floor, seeked, target)
                        if status not in (_LANDED_AFTER, _NOTHING) or fresh:
                            break
                if status in (_ENDED, _NOTHING):
                    return decoded, state["last_seen"], True  # later targets do not exist either
            return decoded, state["last_seen"], False
        finally:
            if state["container"] is not None:
                state["container"].close()
