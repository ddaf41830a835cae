"""Scoring videos against class prompt features: every view of every video, once.

``score_dataset`` returns the raw per-view scores ``(V, N, C)`` so that any
number of zero-shot splits (EP1's 10 draws, K600's 3 splits) can be scored from
one pass of the model (see ``stdd.engine.metrics.evaluate_split``). Under
torch.distributed each rank scores every world_size-th video and the results
are gathered on every rank. With STCA settings that shuffle the evaluation
phases (``eval_shuffle_phases``, the authors' release) the phases of every view
are drawn here by :meth:`stdd.model.phases.PhaseSampler.evaluation` from
``seed`` (the run seed), keyed by the video's dataset index and the view, so
the scores do not depend on the batch size or the number of processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..data.dataset import video_dataloader
from ..model.phases import PhaseSampler
from .distributed import DistributedContext, all_gather_objects
from .runlog import Progress


@dataclass
class ScoredVideos:
    view_scores: torch.Tensor  # (V, N, C) float32, N = videos that decoded
    labels: torch.Tensor  # (N,) int64, position in the class list (-1 = unlabelled)
    indices: torch.Tensor  # (N,) int64, position in dataset.records
    failures: list = field(default_factory=list)  # DecodeFailure of videos that were skipped


@torch.no_grad()
def score_dataset(
    model,
    dataset,
    text_features: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    batch_size: int = 8,
    num_workers: int = 0,
    device=None,
    context: Optional[DistributedContext] = None,
    progress: bool = False,
    autocast_dtype: Optional[torch.dtype] = None,
    seed: int = 0,
) -> ScoredVideos:
    """Alignment scores of every view: ``model.encode_video`` per view, ``model.scores`` vs all classes.

    ``dataset``: an evaluation ``stdd.data.VideoDataset`` (items ``(V, T, 3, S, S)``).
    Videos that fail to decode are dropped and listed in ``failures``. ``seed``: the run
    seed the shuffled evaluation phases derive from (used only with ``eval_shuffle_phases``).
    """
    device = torch.device(device) if device is not None else text_features.device
    rank, world = (context.rank, context.world_size) if context is not None else (0, 1)
    subset = list(range(rank, len(dataset), world))
    loader = video_dataloader(dataset, batch_size=batch_size, sampler=subset, num_workers=num_workers,
                              pin_memory=device.type == "cuda")
    encoder = getattr(model, "video_encoder", None)
    settings = getattr(encoder, "stca", None)
    phases = (PhaseSampler(settings, seed=seed, num_blocks=len(encoder.blocks))
              if settings is not None and settings.eval_shuffle_phases else None)
    was_training = model.training
    model.eval()
    text_features = text_features.to(device)
    text_mask = text_mask.to(device)
    scores, labels, indices, failures = [], [], [], []
    iterator = loader
    if progress and rank == 0:  # a bar on a terminal; in a log file a plain line every tenth of the batches
        iterator = Progress(len(loader), desc="eval", unit="batch", every=math.ceil(len(loader) / 10)).over(loader)
    for batch in iterator:
        failures.extend(batch["failures"])
        video = batch["video"]
        if video.shape[0] == 0:
            continue
        b, v = video.shape[:2]
        flat = video.reshape(b * v, *video.shape[2:]).to(device, non_blocking=True)  # views as extra clips
        with torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            phase = None if phases is None else phases.evaluation(
                batch["index"], num_frames=flat.shape[1], views=v, device=device)
            frames = model.encode_video(flat, phase)
            batch_scores = model.scores(frames, text_features, text_mask)  # (B*V, C)
        scores.append(batch_scores.float().reshape(b, v, -1).cpu())
        labels.append(batch["label"])
        indices.append(batch["index"])
    model.train(was_training)
    classes = text_features.shape[0]
    views = dataset.sample_shape[0]
    local = ScoredVideos(
        torch.cat(scores, 0).permute(1, 0, 2).contiguous() if scores else torch.empty(views, 0, classes),
        torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64),
        torch.cat(indices) if indices else torch.empty(0, dtype=torch.int64),
        failures,
    )
    if world == 1:
        return local
    gathered = all_gather_objects(local, context)
    order = torch.cat([g.indices for g in gathered]).argsort()
    return ScoredVideos(
        torch.cat([g.view_scores for g in gathered], 1)[:, order],
        torch.cat([g.labels for g in gathered])[order],
        torch.cat([g.indices for g in gathered])[order],
        [f for g in gathered for f in g.failures],
    )
