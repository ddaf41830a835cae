"""torch.distributed setup for torchrun (DDP): NCCL on GPU, gloo on CPU.

``torchrun --nproc_per_node=N -m stdd.train ...`` sets RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain ``python -m stdd.train`` runs
as a single process without initialising a process group. Only rank 0 logs
and saves (``DistributedContext.is_main``).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

DEVICES = ("auto", "cpu", "cuda")  # run.device: auto (the local GPU when there is one, else CPU) | cpu | cuda


@dataclass
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]  # None when not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as error:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from error


def resolve_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: the local rank's GPU when CUDA is available, else CPU."""
    if preference not in DEVICES:
        raise ValueError(f"run.device {preference!r}: expected one of {', '.join(DEVICES)}")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("run.device 'cuda' was requested but torch sees no CUDA device")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device_preference: str = "auto", timeout_minutes: float = 30.0) -> DistributedContext:
    """Join the process group torchrun describes in the environment (if any)."""
    world_size = _env_int("WORLD_SIZE", 1)
    _env_int("RANK", 0)  # checked here; the process group reports the rank
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_preference, local_rank)
    if world_size <= 1:
        return DistributedContext(0, 1, 0, device, None)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.is_distributed:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Mean over ranks (a copy; the input is untouched)."""
    value = value.detach().clone()
    if context.is_distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= context.world_size
    return value


def all_gather_objects(obj, context: DistributedContext) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` without a process group)."""
    if not context.is_distributed:
        return [obj]
    gathered = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` that can start part-way through an epoch.

    The order of an epoch depends only on ``(seed, epoch)`` (as in the parent
    class), so a run resumed at ``(epoch, start_index)`` visits exactly the
    samples the uninterrupted run would have visited next, without decoding
    the ones already seen. ``start_index`` counts this rank's samples.
    With one process (``num_replicas=1``) it is a seeded shuffling sampler.
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start_index = 0

    def set_start_index(self, start_index: int) -> None:
        """Skip this rank's first ``start_index`` samples of the current epoch (call after set_epoch)."""
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"set_start_index: {start_index} is outside 0..{self.num_samples}")
        self.start_index = int(start_index)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start_index = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


def parameters_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes (names, shapes, values), computed on the CPU."""
    digest = hashlib.sha256()
    for name, parameter in module.named_parameters():
        tensor = parameter.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def parameters_in_sync(module: torch.nn.Module, context: DistributedContext) -> bool:
    """True when every rank holds bitwise the same parameters (DDP's invariant)."""
    if not context.is_distributed:
        return True
    digests = [None] * context.world_size
    dist.all_gather_object(digests, parameters_digest(module))
    return len(set(digests)) == 1
