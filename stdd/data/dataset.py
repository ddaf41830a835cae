"""PyAV-backed video dataset and its DataLoader.

Batch format (the same for the PyAV and DALI loaders) -- a dict:

    "video":    float32, CLIP-normalised RGB.
                training:   (B, T, 3, S, S)
                evaluation: (B, V, T, 3, S, S), V = n_temporal_views * n_spatial_crops, view
                            v = temporal_view * n_spatial_crops + spatial_crop (V may be 1)
    "label":    int64 (B,)   (-1 for unlabelled videos)
    "index":    int64 (B,)   position of the video in `dataset.records`
    "failures": list of `DecodeFailure` for videos of this batch that could not be decoded

T = sampling.clip_length, S = crop_size. Typical use:

    loader = build_dataloader("data/train.txt", training=True, batch_size=8, num_workers=2,
                              sampling=ClipSampling(clip_length=8, stride=4), crop_size=224,
                              horizontal_flip=False)  # synthetic motion classes: no flips
    for epoch in range(epochs):
        for batch in loader:          # each `for` is one epoch; seeds advance automatically
            logits = model(batch["video"].cuda()); ...
        print(loader.last_epoch_report.summary())

Bad files: with on_error="skip" (default) a video that fails to decode is listed in its batch's
"failures", logged once by the loader (the first time that file fails: one line, path and reason) and
counted in `loader.last_epoch_report` every epoch; in training the sample is replaced by another video (so every
batch keeps its size and distributed ranks stay in step), in evaluation it is dropped (the batch is
smaller, possibly empty, but still yielded). on_error="fail" raises `UnusableVideosError` (a
`VideoDecodeError`) instead, naming the file; so does training when a failed video and every video
drawn to replace it fail. Both are bad input (`stdd.errors.UsageError`: one line, exit status 2 at
the command line), also when a decoding worker process raised them.

Randomness (clip start, crop, flip, shuffling) is derived from (seed, epoch, index), so results do not
depend on the number of workers.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ..errors import InputError, UsageError, one_line
from .annotations import VideoRecord, load_annotations, resolve_videos
from .decoders import PyAVDecoder, VideoDecodeError
from .sampling import ClipSampling, sample_clip_indices
from .transforms import eval_transform, normalization_stats, train_transform

logger = logging.getLogger(__name__)

ON_ERROR_POLICIES = ("skip", "fail")

# How a DataLoader worker's exception reaches the main process: type(error)(this text + its traceback).
_WORKER_WRAPPED = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\s*\nOriginal Traceback")


class UnusableVideosError(UsageError, VideoDecodeError):
    """The videos stop the job: under on_error="fail" a video that does not decode, or in training a
    failed video whose replacements all failed too. The one-line message names the file(s).

    Raised in a DataLoader worker, it reaches the main process rebuilt from the worker's text (its
    traceback included); the message is then the original one again, so the command line still
    prints one line naming the file.
    """

    def __init__(self, path, reason=None):
        if reason is None:  # one argument: a message, possibly the worker's wrapping of one
            super().__init__(self._original_message(str(path)))
        else:
            super().__init__(path, reason)

    @classmethod
    def _original_message(cls, text: str) -> str:
        if not _WORKER_WRAPPED.match(text):
            return text
        last = [line for line in text.splitlines() if line.strip()][-1]  # "module.Class: message"
        prefix = f"{cls.__module__}.{cls.__qualname__}: "
        return last[len(prefix):] if last.startswith(prefix) else last


@dataclass(frozen=True)
class DecodeFailure:
    index: int
    path: str
    reason: str


@dataclass
class EpochReport:
    """What one pass over a loader delivered."""

    epoch: int
    batches: int = 0
    samples: int = 0
    failures: list[DecodeFailure] = field(default_factory=list)

    @property
    def failed_videos(self) -> int:
        return len({failure.index for failure in self.failures})

    def summary(self) -> str:
        text = f"epoch {self.epoch}: {self.samples} clips in {self.batches} batches, {self.failed_videos} videos failed to decode"
        if self.failures:
            text += " (first: " + "; ".join(f"{failure.path}: {failure.reason}" for failure in self.failures[:3]) + ")"
        return text


def log_new_failures(failures: Sequence[DecodeFailure], reported_paths: set[str]) -> None:
    """Log each failed file once (one line: path and reason), in the process that owns the loader."""
    for failure in failures:
        if failure.path not in reported_paths:
            reported_paths.add(failure.path)
            logger.warning("skipping undecodable video %s: %s", failure.path, failure.reason)


class VideoDataset(Dataset):
    """Clips from video files decoded with PyAV; item = dict as one row of the batch format above.

    records: `VideoRecord`s (see stdd.data.annotations). training: random clip start / crop / flip and
    one view; otherwise evenly spaced temporal views and centre (or 3) crops. short_side: frames are
    decoded with their shorter side resized to this (default crop_size); training then takes a
    random-resized crop of it, evaluation centre/three crops. scale: area range of the random crop.
    frame_cache_mb: keep whole decoded videos in memory, at most this many MiB per process (0: off; see
    `stdd.data.decoders`); the clips are the same with and without it. normalization: the pixel
    statistics clips are normalised with (`stdd.data.transforms.NORMALIZATIONS`: "clip" or "imagenet").
    """

    def __init__(
        self,
        records: Sequence[VideoRecord],
        *,
        training: bool,
        sampling: ClipSampling | None = None,
        crop_size: int = 224,
        short_side: int | None = None,
        horizontal_flip: bool = True,
        scale: tuple[float, float] = (0.25, 1.0),
        on_error: str = "skip",
        replace_failed: bool | None = None,
        max_replacements: int = 10,
        seed: int = 0,
        decoder: PyAVDecoder | None = None,
        frame_cache_mb: float = 0,
        normalization: str = "clip",
    ):
        normalization_stats(normalization)  # a bad name fails here, not in a worker
        if on_error not in ON_ERROR_POLICIES:
            raise ValueError(f"on_error: expected one of {ON_ERROR_POLICIES}, got {on_error!r}")
        if crop_size < 1:
            raise ValueError(f"crop_size: expected a positive size, got {crop_size}")
        self.records = list(records)
        if not self.records:
            raise ValueError("records: expected at least one video")
        self.training = training
        self.sampling = sampling if sampling is not None else ClipSampling()
        self.crop_size = crop_size
        self.short_side = short_side if short_side is not None else crop_size
        if self.short_side < crop_size:
            raise ValueError(f"short_side: expected >= crop_size {crop_size}, got {self.short_side}")
        self.horizontal_flip = horizontal_flip
        self.scale = scale
        self.on_error = on_error
        self.replace_failed = training if replace_failed is None else replace_failed
        self.max_replacements = max_replacements
        self.seed = seed
        self.normalization = normalization
        self.epoch = 0
        if decoder is not None and frame_cache_mb:
            raise ValueError("frame_cache_mb: give it to the decoder you pass (PyAVDecoder(frame_cache_mb=...))")
        self.decoder = decoder if decoder is not None else PyAVDecoder(short_side=self.short_side,
                                                                       frame_cache_mb=frame_cache_mb)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sample_shape(self) -> tuple[int, ...]:
        clip = (self.sampling.clip_length, 3, self.crop_size, self.crop_size)
        return clip if self.training else (self.sampling.num_views(False), *clip)

    def _load(self, index: int, attempt: int) -> torch.Tensor:
        record = self.records[index]
        # Per-(seed, epoch, index, attempt) streams: independent of worker count and order.
        rng = np.random.default_rng([self.seed, self.epoch, index, attempt])
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        clip = self.decoder.decode(
            record.path, lambda num_frames: sample_clip_indices(num_frames, self.sampling, training=self.training, rng=rng)
        )
        frames = torch.from_numpy(clip.frames).permute(0, 1, 4, 2, 3)  # (Vt, T, H, W, 3) -> (Vt, T, 3, H, W)
        if self.training:
            return train_transform(frames[0], self.crop_size, flip=self.horizontal_flip, scale=self.scale,
                                   generator=generator, normalization=self.normalization)
        views = [
            eval_transform(view, self.crop_size, short_side=self.short_side,
                           n_spatial_crops=self.sampling.n_spatial_crops, normalization=self.normalization)
            for view in frames
        ]  # each (n_spatial, T, 3, S, S)
        return torch.cat(views)  # (Vt * n_spatial, T, 3, S, S), temporal-major

    def __getitem__(self, index: int) -> dict:
        failures = []
        candidate = index
        for attempt in range(self.max_replacements + 1):
            try:
                video = self._load(candidate, attempt)
                return {"video": video, "label": self.records[candidate].label, "index": candidate, "failures": failures}
            except VideoDecodeError as error:
                if self.on_error == "fail":
                    raise UnusableVideosError(error.path, one_line(
                        f"{error.reason} (on_error=fail stops at the first video that does not decode; "
                        f"on_error=skip leaves such videos out)")) from error
                # reported by the loader in the main process (VideoLoader), not here in a worker
                failures.append(DecodeFailure(candidate, error.path, error.reason))
                if not self.replace_failed:
                    break
                # Replacement: a pseudo-random other video, reproducible from (seed, epoch, index, attempt).
                candidate = int(np.random.default_rng([self.seed, self.epoch, index, attempt, 1]).integers(len(self.records)))
        if self.replace_failed:
            first, others = failures[0], failures[1:]
            distinct = {failure.path: failure.reason for failure in others if failure.path != first.path}
            listed = "; ".join(f"{path}: {reason}" for path, reason in list(distinct.items())[:3])
            listed += "; ..." if len(distinct) > 3 else ""
            raise UnusableVideosError(first.path, one_line(
                f"{first.reason}; the {len(others)} videos drawn to replace it did not decode either "
                f"({listed or 'the same file again'}): the videos look unusable (check the files and the video "
                f"root)"))
        return {"video": None, "label": self.records[index].label, "index": index, "failures": failures}


class VideoBatchCollate:
    """Stacks dataset items into the batch dict; drops items without a video (failed, not replaced)."""

    def __init__(self, sample_shape: tuple[int, ...]):
        self.sample_shape = tuple(sample_shape)

    def __call__(self, items: list[dict]) -> dict:
        failures = [failure for item in items for failure in item["failures"]]
        kept = [item for item in items if item["video"] is not None]
        if kept:
            video = torch.stack([item["video"] for item in kept])
        else:
            video = torch.empty((0, *self.sample_shape), dtype=torch.float32)
        return {
            "video": video,
            "label": torch.tensor([item["label"] for item in kept], dtype=torch.int64),
            "index": torch.tensor([item["index"] for item in kept], dtype=torch.int64),
            "failures": failures,
        }


def _worker_init(_worker_id: int) -> None:
    # Workers are the parallelism; intra-op threads in each would oversubscribe the cores.
    torch.set_num_threads(1)


def video_dataloader(
    dataset: VideoDataset,
    *,
    batch_size: int,
    sampler,
    num_workers: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """The one ``DataLoader`` over a `VideoDataset` (training, evaluation and `build_dataloader` use it).

    Batches are the dicts of this module's docstring (`VideoBatchCollate`); worker processes run one
    intra-op thread each and are created per pass, so they see the epoch set in the main process.
    ``generator``: the source of the workers' base seed (a run passes a stream derived from its seed,
    so the global torch stream is not drawn from).
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=VideoBatchCollate(dataset.sample_shape),
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=generator,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        persistent_workers=False,
    )


class VideoLoader:
    """Iterable of batch dicts; one `for` loop over it is one epoch.

    The epoch number (seeding clip sampling, crops and shuffling) advances by one per pass unless
    `set_epoch` is called before the pass. A file that fails to decode is logged (warning) the first
    time it fails; after each pass, `last_epoch_report` holds the counts and decode failures, and a
    summary is logged (warning level when videos failed).
    """

    def __init__(self, dataloader: DataLoader, dataset: VideoDataset, sampler: DistributedSampler):
        self.dataloader = dataloader
        self.dataset = dataset
        self.sampler = sampler
        self.next_epoch = 0
        self.last_epoch_report: EpochReport | None = None
        self.reports: list[EpochReport] = []
        self.reported_paths: set[str] = set()  # failed files already logged (each is logged once)

    def set_epoch(self, epoch: int) -> None:
        self.next_epoch = epoch

    def __len__(self) -> int:
        return len(self.dataloader)


    def __iter__(self):
        epoch = self.next_epoch
        self.next_epoch += 1
        self.dataset.set_epoch(epoch)  # copied to the workers, which are created per pass
        self.sampler.set_epoch(epoch)
        report = EpochReport(epoch=epoch)
        batches = iter(self.dataloader)
        try:
            for batch in batches:
                report.batches += 1
                report.samples += batch["video"].shape[0]
                report.failures.extend(batch["failures"])
                log_new_failures(batch["failures"], self.reported_paths)
                yield batch
        except BaseException:
            # An error (on_error="fail") or an abandoned loop: stop the workers now. Left to the garbage
            # collector, their shutdown was measured at ~5 s per worker, stalling whatever runs next.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            raise
        self.last_epoch_report = report
        self.reports.append(report)
        logger.log(logging.WARNING if report.failures else logging.INFO, "%s", report.summary())


def distributed_rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised torch.distributed group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def build_dataset(
    annotation_file: str | os.PathLike | None = None,
    *,
    records: Sequence[VideoRecord] | None = None,
    format: str = "list",
    root: str | os.PathLike | None = None,
    class_names=None,
    on_missing: str = "fail",
    annotation_options: dict | None = None,
    **dataset_options,
) -> VideoDataset:
    """Read annotations (or take `records`), check the videos exist, build a `VideoDataset`."""
    if (annotation_file is None) == (records is None):
        raise ValueError("build_dataset: pass exactly one of annotation_file or records")
    source = "records"
    if records is None:
        records, _ = load_annotations(annotation_file, format=format, root=root, class_names=class_names, **(annotation_options or {}))
        source = str(annotation_file)
    records, report = resolve_videos(records, on_missing=on_missing, source=source)
    logger.info("%s", report.summary(source))
    if not records:
        raise InputError(f"{source}: " + (f"none of its {report.total} listed videos exists" if report.total
                                          else "lists no video"))
    return VideoDataset(records, **dataset_options)
