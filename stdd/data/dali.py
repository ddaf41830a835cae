"""NVIDIA DALI video loading: GPU decoding (NVDEC) and DALI's CPU video decoder behind one pipeline.

Two ways to pick frames, the same augmentation/normalisation code after the decoder:

mode="reader" (training default): DALI's video reader walks every video in clips of
    `clip_length` frames `stride` apart, one clip every `step` frames (default: the clip span, so the
    clips of a video do not overlap), shuffles them (`random_shuffle`, buffer `initial_fill`) and
    shards them (`shard_id`/`num_shards` = rank/world size of torch.distributed). An epoch is every
    clip of every video, not one clip per video. On the GPU this is `fn.readers.video` (NVDEC: H.264,
    HEVC, ...; reader="experimental" picks `fn.experimental.readers.video`); on the CPU it is
    `fn.experimental.readers.video(device="cpu")`, which in DALI 2.x decodes VP8/VP9/MJPEG only (H.264
    is GPU-only). The experimental reader starts a clip at every multiple of `step` inside the video
    and pads a clip that runs past the end with the last frame (so short videos give one clip); the
    GPU `fn.readers.video` only takes whole clips, so videos shorter than a span are reported and
    left out. Reader mode's "index" is per clip, labels come from the video.
mode="indexed" (evaluation default): frame indices come from stdd.data.sampling (exactly as the PyAV
    dataset draws them for the same seed/epoch/video: dense or TSN segments, n_temporal_views x
    n_spatial_crops evaluation views), encoded bytes and indices enter through `fn.external_source`,
    and `fn.decoders.video(frames=...)` decodes them on the GPU (device "mixed") or the CPU.

After decoding (on the decoder's device, so on the GPU for GPU decoding): training takes one
random-resized crop per clip (+ horizontal flip, probability 0.5) and CLIP-normalises; evaluation
resizes the shorter side to `short_side`, takes a centre crop (or 3 crops along the longer side) and
normalises. Batches are the dicts of stdd/data/dataset.py ("video", "label", "index", "failures";
reader mode adds "frame_start", the first frame index of each clip, indexed mode "frame_indices"),
torch tensors on the pipeline's device, delivered through `DALIGenericIterator`. "failures" lists the
clips of that batch the run-time check below dropped; the videos left out at build are listed in each
epoch's report.

Bad files. DALI cannot report a bad file per sample: its decoder fills frames it cannot find with a
constant colour (fn.decoders.video, frames past the end; black by default) and stops the whole
pipeline on corrupt data. So every
video is checked with PyAV at build (what each check costs is in the README):
- verify_videos="open" (default): the container is opened and its packets indexed (one pass, no
  decoding but the first frame; see stdd.data.decoders): exact frame counts, so indexed mode asks DALI
  only for frames the file holds, and truncated files (packets that stop before the header's frame
  count or duration) are found.
- verify_videos="decode": also decodes every frame once, which finds corrupt data inside a file.
`probe_cache` remembers the results across runs. Bad videos are left out (on_error="skip") and listed
in every epoch's report, or raise (on_error="fail"). At run time a clip with frames DALI padded is
dropped from its batch (in training its row is filled with a copy of another clip of the batch, so
the batch keeps its size) and counted as a failure (in the batch's "failures" and the epoch report):
indexed mode has `fn.decoders.video` fill the frames it cannot give with PAD_FILL and finds frames
uniformly of that colour (per-frame min/max, computed before the transforms); reader mode checks the
frame numbers the reader reports for every clip against the index (a reader counting a file's frames
differently from it). Not caught: a file replaced by another after the pipeline was built, which
gives the reader stale frames under plausible numbers.

Display rotation (portrait phone video): DALI's decoders ignore the display matrix, so the loader turns
each clip after the transforms by the rotation the PyAV probe found (the crops are square; the three
evaluation crops are put in the order PyAV gives for the upright video). apply_transforms=False turns
the raw frames.

GPU decoding has not been run yet (no GPU was available); the CPU path is tested.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..files import atomic_write
from .annotations import VideoRecord, load_annotations, resolve_videos
from .dataset import DecodeFailure, EpochReport, ON_ERROR_POLICIES, distributed_rank_world, log_new_failures
from .decoders import PyAVDecoder, VideoDecodeError, VideoInfo, upright_frame
from .sampling import ClipSampling, clip_span, sample_clip_indices
from .transforms import normalization_stats

logger = logging.getLogger(__name__)

# Codecs DALI's CPU video decoder handles (DALI 2.x operator docs); everything else needs the GPU.
CPU_DECODABLE_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DALI_MODES = ("reader", "indexed")
# Fill colour of the frames fn.decoders.video pads (asked for frames it cannot give) in indexed mode: a
# frame exactly uniform in it is counted as padded. Decoded video is practically never exactly
# uniform in this colour, unlike black (0, 0, 0), DALI's default fill and a common real frame.
PAD_FILL = (7, 251, 3)
DALI_READERS = ("legacy", "experimental")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401  (optional package: this module imports DALI only in functions)
    except ImportError:
        return False
    return True


def _require_dali() -> None:
    if not dali_available():
        raise ImportError(
            "backend='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130 (or `pip install stdd[dali]`)"
        )


def _clip_transforms(video, *, training: bool, crop_size: int, short_side: int, horizontal_flip: bool,
                     scale: tuple[float, float], n_spatial_crops: int, is_wide=None, normalization: str = "clip"):
    """video: DataNode (F, H, W, 3) uint8 -> (F, 3, S, S) float32, or in evaluation with 3 crops
    (3, F, 3, S, S). One crop window (and flip) per sample, shared by all its frames.

    is_wide: CPU DataNode, 1.0 where width >= height (needed for 3 crops only; it comes from the
    PyAV probe, so no GPU -> CPU shape transfer is needed)."""
    from nvidia.dali import fn, types  # optional package (see dali_available)

    pixel_mean, pixel_std = normalization_stats(normalization)
    mean = [value * 255.0 for value in pixel_mean]
    std = [value * 255.0 for value in pixel_std]
    normalise = dict(dtype=types.FLOAT, output_layout="FCHW", mean=mean, std=std)
    if training:
        video = fn.random_resized_crop(
            video, size=(crop_size, crop_size), random_area=list(scale), random_aspect_ratio=[3 / 4, 4 / 3], antialias=True
        )
        mirror = fn.random.coin_flip(probability=0.5) if horizontal_flip else 0
        return fn.crop_mirror_normalize(video, mirror=mirror, **normalise)
    video = fn.resize(video, resize_shorter=short_side, antialias=True)
    if n_spatial_crops == 1:
        return fn.crop_mirror_normalize(video, crop=(crop_size, crop_size), crop_pos_x=0.5, crop_pos_y=0.5, **normalise)
    # Three crops along the longer side (start, centre, end), centred on the shorter one, as
    # stdd.data.transforms.three_crop_boxes.
    if is_wide is None:
        raise ValueError("n_spatial_crops=3 needs the per-video orientation (indexed mode)")
    crops = []
    for position in (0.0, 0.5, 1.0):
        crop_pos_x = is_wide * position + (1.0 - is_wide) * 0.5
        crop_pos_y = is_wide * 0.5 + (1.0 - is_wide) * position
        crops.append(
            fn.crop_mirror_normalize(video, crop=(crop_size, crop_size), crop_pos_x=crop_pos_x, crop_pos_y=crop_pos_y, **normalise)
        )
    return fn.stack(*crops, axis=0)


def _reader_pipeline(*, filenames, positions, device, reader, training, clip_length, stride, step, shard_id, num_shards,
                     initial_fill, apply_transforms, transform_options):
    from nvidia.dali import fn  # optional package (see dali_available)

    options = dict(
        device=device,
        filenames=list(filenames),
        # The "label" DALI carries is the video's position in our record list: class label and index
        # are looked up from it after the iterator.
        labels=list(positions),
        sequence_length=clip_length,
        stride=stride,
        step=step,
        random_shuffle=training,
        initial_fill=initial_fill,
        shard_id=shard_id,
        num_shards=num_shards,
        # Every shard padded to the same length: ranks must run the same number of steps (DDP).
        pad_last_batch=True,
        name="Reader",
    )
    if reader == "legacy":  # the first frame's number only (this reader never pads)
        video, position, frame_numbers = fn.readers.video(enable_frame_num=True, **options)
    else:  # every frame's number, checked against the index (DALIVideoLoader._check_reader_clips)
        video, position, frame_numbers = fn.experimental.readers.video(enable_frame_num="sequence", pad_mode="edge", **options)
    if apply_transforms:
        video = _clip_transforms(video, training=training, **transform_options)
    return video, position, frame_numbers


def _indexed_pipeline(*, source, decoder_device, training, apply_transforms, transform_options):
    from nvidia.dali import fn, types  # optional package (see dali_available)

    outputs = fn.external_source(
        source=source, num_outputs=4 if source.with_orientation else 3, batch=True, batch_info=True,
        dtype=[types.UINT8, types.INT32, types.INT64, types.FLOAT][: 4 if source.with_orientation else 3],
    )
    encoded, frame_indices, position = outputs[:3]
    is_wide = outputs[3] if source.with_orientation else None
    # frames the decoder cannot give are filled with PAD_FILL: per frame and channel min == max == fill
    # marks them (DALIVideoLoader._check_padded_frames), whatever the transforms do afterwards
    video = fn.decoders.video(encoded, frames=frame_indices, device=decoder_device, fill_value=list(PAD_FILL))
    frame_min = fn.reductions.min(video, axis_names="HW")  # (F, 3)
    frame_max = fn.reductions.max(video, axis_names="HW")
    if apply_transforms:
        video = _clip_transforms(video, training=training, is_wide=is_wide, **transform_options)
    return video, position, frame_indices, frame_min, frame_max


class _IndexedSource:
    """External-source callback: one batch of (encoded bytes, flattened frame indices, record position).

    The order of videos per epoch is DistributedSampler's (seeded shuffle in training, rank's shard),
    and frame indices use the PyAV dataset's seeds, so both backends pick the same frames.
    """

    def __init__(self, records, infos, positions, sampling, *, training, batch_size, seed, rank, world_size, drop_last,
                 with_orientation):
        # records/infos: the decodable videos; positions: their places in the loader's full record list
        self.records, self.infos, self.positions, self.sampling = records, infos, positions, sampling
        self.with_orientation = with_orientation  # 4th output: 1.0 for landscape videos (3-crop evaluation)
        self.training, self.batch_size, self.seed = training, batch_size, seed
        self.drop_last = drop_last
        self.sampler = torch.utils.data.distributed.DistributedSampler(
            range(len(records)), num_replicas=world_size, rank=rank, shuffle=training, seed=seed
        )
        self.epoch_offset = 0
        self._order_epoch, self._order = None, []

    def order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            self.sampler.set_epoch(epoch)
            self._order, self._order_epoch = list(self.sampler), epoch
        return self._order

    def num_batches(self) -> int:
        count = len(self.sampler)
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def __call__(self, batch_info):
        epoch = self.epoch_offset + batch_info.epoch_idx  # DALI counts its passes from 0
        if batch_info.iteration >= self.num_batches():
            raise StopIteration
        order = self.order(epoch)
        positions = order[batch_info.iteration * self.batch_size : (batch_info.iteration + 1) * self.batch_size]
        encoded, frame_indices, position_arrays, orientations = [], [], [], []
        for kept in positions:
            position, info = self.positions[kept], self.infos[kept]
            encoded.append(np.fromfile(self.records[kept].path, dtype=np.uint8))
            rng = np.random.default_rng([self.seed, epoch, position, 0])  # = VideoDataset._load(position, attempt 0)
            indices = sample_clip_indices(info.num_frames, self.sampling, training=self.training, rng=rng)
            frame_indices.append(indices.reshape(-1).astype(np.int32))  # (Vt * T,), view-major
            position_arrays.append(np.array([position], dtype=np.int64))
            stored_height, stored_width = _stored_size(info)  # DALI crops the frames as stored
            orientations.append(np.array(1.0 if stored_width >= stored_height else 0.0, dtype=np.float32))
        if self.with_orientation:
            return encoded, frame_indices, position_arrays, orientations
        return encoded, frame_indices, position_arrays


def _stored_size(info: VideoInfo) -> tuple[int, int]:
    """(height, width) of the frames as stored: VideoInfo gives them as displayed."""
    return (info.width, info.height) if info.rotation in (90, 270) else (info.height, info.width)


def _upright_crop_order(info: VideoInfo) -> list[int]:
    """The three crops DALI takes along the stored frame's longer side (start, centre, end), reordered
    as start, centre, end along the upright frame's longer side (stdd.data.transforms.three_crop_boxes)."""
    stored_height, stored_width = _stored_size(info)
    labels = np.arange(3).reshape(1, 3) if stored_width >= stored_height else np.arange(3).reshape(3, 1)
    upright = upright_frame(labels, info.rotation, info.mirrored)
    return [int(label) for label in upright.reshape(-1)]


@dataclass
class _LoaderSettings:
    training: bool
    mode: str
    sampling: ClipSampling
    crop_size: int
    batch_size: int
    apply_transforms: bool


class DALIVideoLoader:
    """Iterable of batch dicts (see module docstring); one `for` loop is one epoch.

    `last_epoch_report` after each pass lists the videos left out at build (unreadable, too short for
    the GPU reader) -- they are skipped in every epoch. A batch's "index" is the video's position in
    `records` (all videos found, as `VideoDataset.records` of the PyAV loader), left-out ones included.
    """

    def __init__(self, pipeline, iterator, records: list[VideoRecord], settings: _LoaderSettings,
                 skipped: list[DecodeFailure], source: _IndexedSource | None, device: torch.device,
                 infos: dict[int, VideoInfo]):
        self.pipeline, self.iterator, self.records = pipeline, iterator, records
        self.settings, self.skipped, self.source, self.device = settings, skipped, source, device
        self.infos = infos  # position -> VideoInfo of the videos the pipeline reads
        self.reported_paths: set[str] = set()
        self.label_table = torch.tensor([record.label for record in records], dtype=torch.int64, device=device)
        self.next_epoch = 0
        self._passes_started = False
        self.last_epoch_report: EpochReport | None = None
        self.reports: list[EpochReport] = []

    def set_epoch(self, epoch: int) -> None:
        """Number the next pass. Before the first pass any epoch (resuming a run); afterwards the epochs
        advance one per pass and only that next number is accepted: DALI prefetches the next epoch's
        first batches as soon as a pass ends, with the seeds of the next number."""
        if self._passes_started:
            if epoch != self.next_epoch:
                raise ValueError(
                    f"epoch: the DALI loader's next pass is epoch {self.next_epoch}; set_epoch can only choose the "
                    f"starting epoch before the first pass, got {epoch}"
                )
            return
        self.next_epoch = epoch
        if self.source is not None:
            self.source.epoch_offset = epoch  # DALI's pass k is our epoch `epoch + k`

    def __len__(self) -> int:
        if self.source is not None:
            return self.source.num_batches()
        return len(self.iterator)

    def _check_reader_clips(self, positions: list[int], frame_numbers: torch.Tensor):
        """(rows to keep, DecodeFailure of the others): a clip passes if the reader's frame numbers are
        the clip's frames start + stride * k, the last frame repeated past the end (pad_mode="edge"),
        for the frame count of the index; the legacy reader reports the start only and never pads."""
        sampling = self.settings.sampling
        numbers = frame_numbers.cpu().numpy().astype(np.int64)
        keep, failures = [], []
        for row, position in enumerate(positions):
            count = self.infos[position].num_frames
            start = int(numbers[row, 0])
            offsets = sampling.stride * np.arange(sampling.clip_length)
            if numbers.shape[1] == 1:
                passed = 0 <= start and start + offsets[-1] < count
            else:
                passed = 0 <= start < count and np.array_equal(numbers[row], np.minimum(start + offsets, count - 1))
            if passed:
                keep.append(row)
            else:
                failures.append(DecodeFailure(position, str(self.records[position].path),
                                              f"DALI's reader gave frames {numbers[row].tolist()} for a clip from frame "
                                              f"{start} of a video with {count} frames (padded or missing frames)"))
        return keep, failures

    def _check_padded_frames(self, positions: list[int], frame_indices: torch.Tensor, frame_min: torch.Tensor,
                             frame_max: torch.Tensor):
        """(rows to keep, DecodeFailure of the others): indexed mode, a clip with a frame the decoder
        padded (uniformly PAD_FILL) fails."""
        fill = torch.tensor(PAD_FILL, dtype=frame_min.dtype, device=frame_min.device)
        padded = ((frame_min == fill) & (frame_max == fill)).all(-1).reshape(len(positions), -1).cpu()  # (B, F)
        indices = frame_indices.cpu()
        keep, failures = [], []
        for row, position in enumerate(positions):
            if not padded[row].any():
                keep.append(row)
                continue
            missing = sorted(set(indices[row][padded[row]].tolist()))
            failures.append(DecodeFailure(position, str(self.records[position].path),
                                          f"DALI's decoder padded frames {missing[:5]} it could not give (the index "
                                          f"counts {self.infos[position].num_frames} frames; changed since the check?)"))
        return keep, failures

    def _turn_upright(self, video: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """Turn the clips of rotated videos as their display matrix says (see the module docstring)."""
        settings = self.settings
        turned = [row for row, position in enumerate(positions)
                  if self.infos[position].rotation or self.infos[position].mirrored]
        if not turned:
            return video
        # a clip's (height, width) dims: (..., S, S) after the transforms, (F, H, W, 3) raw
        spatial = (-2, -1) if settings.apply_transforms else (1, 2)
        clips = list(video.unbind(0))
        for row in turned:
            info = self.infos[positions[row]]
            clip = clips[row]
            if settings.apply_transforms and not settings.training and settings.sampling.n_spatial_crops == 3:
                clip = clip[_upright_crop_order(info)]  # (3, F, 3, S, S)
            clip = torch.rot90(clip, info.rotation // 90, dims=spatial)  # counter-clockwise, as np.rot90
            if info.mirrored:
                clip = torch.flip(clip, dims=(spatial[1],))
            clips[row] = clip
        if len({tuple(clip.shape) for clip in clips}) > 1:
            raise ValueError("apply_transforms=False: a batch mixes rotated and unrotated videos of different frame "
                             "sizes, so their upright frames cannot be stacked; use batch_size=1 for such raw checks")
        return torch.stack(clips)

    def _to_batch(self, outputs: dict) -> dict:
        settings = self.settings
        position = outputs["position"].reshape(-1).to(torch.int64)
        video = outputs["video"]
        positions = position.tolist()
        # (B, F) frame numbers the reader reports (F = 1 for the legacy reader), or (B, F) indices asked
        frame_numbers, frame_indices = (outputs[name].reshape(len(positions), -1) if name in outputs else None
                                        for name in ("frame_numbers", "frame_indices"))
        if frame_numbers is not None:
            keep, failures = self._check_reader_clips(positions, frame_numbers)
        else:
            keep, failures = self._check_padded_frames(positions, frame_indices, outputs["frame_min"], outputs["frame_max"])
        if failures:
            # evaluation drops the failed clips; training fills their rows with copies of the batch's good
            # clips, so the batch keeps its size (as the PyAV loader replaces a failed video)
            if settings.training and keep:
                keep = [keep[row % len(keep)] for row in range(len(positions))]

            def rows_of(tensor):
                return tensor[torch.tensor(keep, dtype=torch.int64, device=tensor.device)]

            video, position = rows_of(video), rows_of(position)
            frame_numbers = rows_of(frame_numbers) if frame_numbers is not None else None
            frame_indices = rows_of(frame_indices) if frame_indices is not None else None
            positions = position.tolist()
        video = self._turn_upright(video, positions) if positions else video
        if not settings.training and settings.apply_transforms:
            # (B, F, 3, S, S) or (B, n_spatial, F, 3, S, S) with F = Vt * T, view-major
            n_temporal = video.shape[-4] // settings.sampling.clip_length
            if video.ndim == 5:
                video = video.unsqueeze(1)
            batch, n_spatial = video.shape[:2]
            video = video.reshape(batch, n_spatial, n_temporal, settings.sampling.clip_length, *video.shape[-3:])
            video = video.transpose(1, 2).reshape(batch, n_temporal * n_spatial, settings.sampling.clip_length, *video.shape[-3:])
        batch = {
            "video": video,
            "label": self.label_table[position.to(self.label_table.device)],
            "index": position,
            "failures": failures,
        }
        if frame_numbers is not None:
            batch["frame_start"] = frame_numbers[:, 0].to(torch.int64)
        if frame_indices is not None:
            batch["frame_indices"] = frame_indices
        return batch

    def __iter__(self):
        epoch = self.next_epoch
        self.next_epoch += 1
        self._passes_started = True
        report = EpochReport(epoch=epoch, failures=list(self.skipped))
        for outputs in self.iterator:
            batch = self._to_batch(outputs[0])
            report.batches += 1
            report.samples += batch["video"].shape[0]
            report.failures.extend(batch["failures"])
            log_new_failures(batch["failures"], self.reported_paths)
            yield batch
        self.last_epoch_report = report
        self.reports.append(report)
        logger.log(logging.WARNING if report.failures else logging.INFO, "%s", report.summary())


def _load_probe_cache(path: Path | None) -> dict:
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        logger.warning("probe_cache %s unreadable (%s); probing every video again", path, error)
        return {}
    return data.get("entries", {}) if data.get("version") == _PROBE_CACHE_VERSION else {}


def _save_probe_cache(path: Path, entries: dict) -> None:
    atomic_write(path, json.dumps({"version": _PROBE_CACHE_VERSION, "entries": entries}))


_PROBE_CACHE_VERSION = 2  # 2: exact frame counts from the packet index, truncation, rotation
_VERIFY_LEVEL = {"open": 1, "decode": 2}


def _probe_videos(records: Sequence[VideoRecord], *, verify_videos: str, on_error: str, cache_file=None):
    """(positions of the readable videos, their VideoInfo, DecodeFailure of the others).

    cache_file: JSON of earlier results keyed by path and checked against size and mtime, so a large
    dataset is probed once (Kinetics: ~240k files); rewritten atomically after probing.
    """
    cache_path = Path(cache_file) if cache_file is not None else None
    cache = _load_probe_cache(cache_path)
    decoder = PyAVDecoder()
    kept, infos, failures = [], [], []
    changed = False
    for position, record in enumerate(records):
        key = str(Path(record.path).resolve())
        try:
            status = os.stat(record.path)
            stamp = [status.st_size, status.st_mtime_ns]
        except OSError:
            stamp = None
        entry = cache.get(key)
        if entry is None or entry.get("stamp") != stamp or _VERIFY_LEVEL[entry.get("verified", "open")] < _VERIFY_LEVEL[verify_videos]:
            try:
                info = decoder.verify(record.path) if verify_videos == "decode" else decoder.probe(record.path)
                entry = {"stamp": stamp, "verified": verify_videos, "info": asdict(info)}
            except VideoDecodeError as error:
                entry = {"stamp": stamp, "verified": verify_videos, "error": error.reason, "path": error.path}
            cache[key] = entry
            changed = True
        if "error" in entry:
            if on_error == "fail":
                raise VideoDecodeError(entry.get("path", str(record.path)), entry["error"])
            failures.append(DecodeFailure(position, str(record.path), entry["error"]))
            continue
        kept.append(position)
        infos.append(VideoInfo(**entry["info"]))
    if cache_path is not None and changed:
        _save_probe_cache(cache_path, cache)
    return kept, infos, failures


def build_dali_loader(
    annotation_file: str | os.PathLike | None = None,
    *,
    training: bool,
    records: Sequence[VideoRecord] | None = None,
    format: str = "list",
    root: str | os.PathLike | None = None,
    class_names=None,
    batch_size: int = 8,
    sampling: ClipSampling | None = None,
    crop_size: int = 224,
    short_side: int | None = None,
    horizontal_flip: bool = True,
    scale: tuple[float, float] = (0.25, 1.0),
    on_missing: str = "fail",
    on_error: str = "skip",
    seed: int = 0,
    distributed: bool | None = None,
    num_threads: int = 2,
    annotation_options: dict | None = None,
    device: str | None = None,
    device_id: int | None = None,
    mode: str | None = None,
    reader: str | None = None,
    step: int | None = None,
    initial_fill: int = 256,
    prefetch_queue_depth: int = 2,
    verify_videos: str = "open",
    probe_cache: str | os.PathLike | None = None,
    apply_transforms: bool = True,
    normalization: str = "clip",
) -> DALIVideoLoader:
    """Build a DALI loader (arguments as `stdd.data.build_dataloader`, plus):

    device: "gpu" (default when CUDA is available) or "cpu" (DALI's CPU decoder: VP8/VP9/MJPEG only).
    device_id: the GPU (default torch.cuda.current_device()). mode: "reader" | "indexed" (default:
    reader for training, indexed for evaluation). reader: "legacy" (fn.readers.video, GPU only, the
    default on GPU) | "experimental" (fn.experimental.readers.video, the only one on CPU). step: frames
    between clip starts in reader mode (default the clip span). verify_videos: "open" | "decode" (see
    the module docstring).
    probe_cache: a JSON file remembering the build-time probe per video (size + mtime checked).
    apply_transforms=False returns the decoded uint8 frames (B, F, H, W, 3) untouched (for checks).
    normalization: the pixel statistics (`stdd.data.transforms.NORMALIZATIONS`: "clip" or "imagenet").
    """
    normalization_stats(normalization)  # a bad name fails before DALI is needed
    _require_dali()  # DALI is an optional package: imported once a loader is built, after this check
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    sampling = sampling if sampling is not None else ClipSampling()
    short_side = short_side if short_side is not None else crop_size
    if on_error not in ON_ERROR_POLICIES:
        raise ValueError(f"on_error: expected one of {ON_ERROR_POLICIES}, got {on_error!r}")
    if verify_videos not in ("open", "decode"):
        raise ValueError(f"verify_videos: expected 'open' or 'decode', got {verify_videos!r}")
    if device is None:
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device: expected 'gpu' or 'cpu', got {device!r}")
    if device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("device='gpu': no CUDA device visible; use device='cpu' (VP8/VP9/MJPEG) or backend='pyav'")
    mode = mode if mode is not None else ("reader" if training else "indexed")
    if mode not in DALI_MODES:
        raise ValueError(f"mode: expected one of {DALI_MODES}, got {mode!r}")
    reader = reader if reader is not None else ("legacy" if device == "gpu" else "experimental")
    if reader not in DALI_READERS:
        raise ValueError(f"reader: expected one of {DALI_READERS}, got {reader!r}")
    if reader == "legacy" and device == "cpu":
        raise ValueError("reader='legacy': fn.readers.video decodes on the GPU only; use reader='experimental' on the CPU")
    if mode == "reader":
        if sampling.mode != "dense":
            raise ValueError(f"sampling.mode={sampling.mode!r}: DALI's reader takes dense clips only; use mode='indexed'")
        if not training and sampling.num_views(False) != 1:
            raise ValueError("mode='reader' gives one view per clip; use mode='indexed' for multi-view evaluation")
    if (annotation_file is None) == (records is None):
        raise ValueError("build_dali_loader: pass exactly one of annotation_file or records")
    source_name = "records"
    if records is None:
        records, _ = load_annotations(annotation_file, format=format, root=root, class_names=class_names, **(annotation_options or {}))
        source_name = str(annotation_file)
    records, missing_report = resolve_videos(records, on_missing=on_missing, source=source_name)
    logger.info("%s", missing_report.summary(source_name))

    records = list(records)  # all videos found; batch "index" is a position in this list
    positions, infos, skipped = _probe_videos(records, verify_videos=verify_videos, on_error=on_error,
                                              cache_file=probe_cache)
    if device == "cpu":
        unsupported = [(records[position].path, info.codec) for position, info in zip(positions, infos)
                       if info.codec not in CPU_DECODABLE_CODECS]
        if unsupported:
            raise ValueError(
                f"device='cpu': DALI's CPU video decoder handles {sorted(CPU_DECODABLE_CODECS)} only; "
                f"{len(unsupported)} videos use other codecs (first: {unsupported[0][0]} is {unsupported[0][1]}); "
                "decode them on the GPU or with backend='pyav'"
            )
    if mode == "reader" and reader == "legacy":
        span = clip_span(sampling.clip_length, sampling.stride)
        for position, info in zip(positions, infos):
            if info.num_frames < span:
                skipped.append(DecodeFailure(position, str(records[position].path),
                                             f"{info.num_frames} frames, shorter than a clip span of {span} (fn.readers.video cannot pad)"))
        kept = [(position, info) for position, info in zip(positions, infos) if info.num_frames >= span]
        positions, infos = [position for position, _ in kept], [info for _, info in kept]
    for failure in skipped:
        logger.warning("DALI loader: leaving out %s: %s", failure.path, failure.reason)
    if not positions:
        raise ValueError(f"{source_name}: no usable videos left for DALI ({len(skipped)} left out)")

    rank, world_size = distributed_rank_world()
    if distributed is False:
        rank, world_size = 0, 1
    if device == "gpu":
        device_id = device_id if device_id is not None else torch.cuda.current_device()
        torch_device = torch.device("cuda", device_id)
    else:
        device_id, torch_device = None, torch.device("cpu")
    transform_options = dict(
        crop_size=crop_size, short_side=short_side, horizontal_flip=horizontal_flip, scale=tuple(scale),
        n_spatial_crops=sampling.n_spatial_crops, normalization=normalization,
    )
    pipeline_options = dict(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                            prefetch_queue_depth=prefetch_queue_depth)
    source = None
    if mode == "reader":
        pipeline = pipeline_def(_reader_pipeline)(
            filenames=[str(records[position].path) for position in positions], positions=positions, device=device,
            reader=reader, training=training,
            clip_length=sampling.clip_length, stride=sampling.stride,
            step=step if step is not None else clip_span(sampling.clip_length, sampling.stride),
            shard_id=rank, num_shards=world_size, initial_fill=initial_fill,
            apply_transforms=apply_transforms, transform_options=transform_options, **pipeline_options,
        )
        output_map = ["video", "position", "frame_numbers"]
        # with reader_name the iterator reads shard sizes and padding (pad_last_batch) from the reader
        iterator_options = dict(reader_name="Reader")
    else:
        source = _IndexedSource([records[position] for position in positions], infos, positions, sampling,
                                training=training, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                                drop_last=training,
                                with_orientation=apply_transforms and not training and sampling.n_spatial_crops == 3)
        pipeline = pipeline_def(_indexed_pipeline)(
            source=source, decoder_device="mixed" if device == "gpu" else "cpu", training=training,
            apply_transforms=apply_transforms, transform_options=transform_options, **pipeline_options,
        )
        output_map = ["video", "position", "frame_indices", "frame_min", "frame_max"]
        iterator_options = dict(size=-1)
    pipeline.build()
    iterator = DALIGenericIterator(
        pipeline, output_map, auto_reset=True,
        # No batch before the first pass: set_epoch may still change the seeds of the first epoch.
        prepare_first_batch=False,
        last_batch_policy=LastBatchPolicy.DROP if training else LastBatchPolicy.PARTIAL,
        **iterator_options,
    )
    settings = _LoaderSettings(training=training, mode=mode, sampling=sampling, crop_size=crop_size, batch_size=batch_size,
                              apply_transforms=apply_transforms)
    return DALIVideoLoader(pipeline, iterator, records, settings, skipped, source, torch_device,
                           infos=dict(zip(positions, infos)))
