"""The clip loaders' front door: `build_dataloader(..., backend="pyav" | "dali")`.

Both backends deliver the batch dicts of stdd/data/dataset.py; the PyAV loader is
`stdd.data.dataset.VideoLoader`, the DALI one `stdd.data.dali.DALIVideoLoader` (DALI itself is
imported only when a DALI loader is built).
"""

from __future__ import annotations

import os
from typing import Sequence

from torch.utils.data.distributed import DistributedSampler

from .annotations import VideoRecord
from .dali import build_dali_loader  # imports DALI itself only when a loader is built
from .dataset import VideoLoader, build_dataset, distributed_rank_world, video_dataloader
from .sampling import ClipSampling

DECODERS = ("pyav", "dali")  # how clips are decoded (``backend=`` here, ``data.decoder`` in a run config)


def build_dataloader(
    annotation_file: str | os.PathLike | None = None,
    *,
    training: bool,
    records: Sequence[VideoRecord] | None = None,
    format: str = "list",
    root: str | os.PathLike | None = None,
    class_names=None,
    batch_size: int = 8,
    num_workers: int = 2,
    sampling: ClipSampling | None = None,
    crop_size: int = 224,
    short_side: int | None = None,
    horizontal_flip: bool = True,
    on_missing: str = "fail",
    on_error: str = "skip",
    seed: int = 0,
    distributed: bool | None = None,
    drop_last: bool | None = None,
    pin_memory: bool = False,
    backend: str = "pyav",
    annotation_options: dict | None = None,
    **backend_options,
):
    """Build a clip loader; returns an iterable of batch dicts (format in stdd/data/dataset.py).

    annotation_file + format ("list" | "csv" | "ucf101" | "hmdb51" | "kinetics", see
    stdd.data.annotations) and root (video root; default the annotation file's directory), or ready
    `records`. training: shuffled, random clips/crops, drop_last by default. distributed (default: when
    torch.distributed is initialised): each rank reads its shard (DistributedSampler; in evaluation the
    last shard is padded with repeated videos, as DistributedSampler does). on_missing: "fail" | "skip"
    for videos listed but absent. on_error: "skip" | "fail" for videos that do not decode.
    backend: "pyav" (CPU decoding in `num_workers` processes) or "dali" (see stdd.data.dali).
    """
    if backend == "dali":
        return build_dali_loader(
            annotation_file, training=training, records=records, format=format, root=root, class_names=class_names,
            batch_size=batch_size, sampling=sampling, crop_size=crop_size, short_side=short_side,
            horizontal_flip=horizontal_flip, on_missing=on_missing, on_error=on_error, seed=seed, distributed=distributed,
            num_threads=max(1, num_workers), annotation_options=annotation_options, **backend_options,
        )
    if backend not in DECODERS:
        raise ValueError(f"backend: expected one of {', '.join(DECODERS)}, got {backend!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    dataset = build_dataset(
        annotation_file, records=records, format=format, root=root, class_names=class_names, on_missing=on_missing,
        annotation_options=annotation_options, training=training, sampling=sampling, crop_size=crop_size,
        short_side=short_side, horizontal_flip=horizontal_flip, on_error=on_error, seed=seed, **backend_options,
    )
    rank, world_size = distributed_rank_world()
    if distributed is False:
        rank, world_size = 0, 1
    # DistributedSampler with one replica is also our seeded, set_epoch-able shuffler.
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=training, seed=seed)
    dataloader = video_dataloader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        drop_last=training if drop_last is None else drop_last, pin_memory=pin_memory,
    )
    return VideoLoader(dataloader, dataset, sampler)
