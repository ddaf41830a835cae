"""Random streams derived from the run seed: one helper, named streams, integer keys.

Every random stream of a run that is not the model's initialisation comes from
:func:`seed_sequence`: ``numpy.random.SeedSequence(entropy=run_seed,
spawn_key=(stream, *keys))``, where ``stream`` is the stream's name (its UTF-8
bytes read as one integer, so a name, not a number to remember, tells streams
apart) and ``keys`` say which draw it is (rank, epoch, clip index, block, ...).
SeedSequence mixes them so that any two different (seed, stream, keys) give
independent streams, and the same ones give the same stream on any machine and
in any process, which is what makes a resumed or a distributed run draw what an
uninterrupted single-process run draws.

Streams of a training run (see ``stdd.engine``): ``"process"`` (rank): the
global Python/NumPy/torch generators of each process; ``"loader"`` (epoch): the
DataLoader's worker base seed; ``"phases"`` (epoch, clip index[, block]): the
STCA training phases and ``"eval_phases"`` (video index, view[, block]): the
shuffled evaluation phases (:class:`stdd.model.phases.PhaseSampler`).
"""

from __future__ import annotations

import numpy as np
import torch


def _stream_key(stream: str) -> int:
    if not isinstance(stream, str) or not stream:
        raise ValueError(f"stream must be a non-empty name, got {stream!r}")
    return int.from_bytes(stream.encode("utf-8"), "little")


def seed_sequence(run_seed: int, stream: str, *keys: int) -> np.random.SeedSequence:
    """The ``SeedSequence`` of draw ``keys`` of the named ``stream`` of a run seeded ``run_seed``."""
    if isinstance(run_seed, bool) or not isinstance(run_seed, (int, np.integer)) or run_seed < 0:
        raise ValueError(f"run seed must be an integer >= 0, got {run_seed!r}")
    for key in keys:
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or key < 0:
            raise ValueError(f"stream {stream!r}: keys must be integers >= 0, got {keys!r}")
    return np.random.SeedSequence(entropy=int(run_seed), spawn_key=(_stream_key(stream), *map(int, keys)))


def derive_seed(run_seed: int, stream: str, *keys: int) -> int:
    """A 63-bit integer seed for the stream (``torch.manual_seed`` / ``random.seed`` take it)."""
    high, low = seed_sequence(run_seed, stream, *keys).generate_state(2, dtype=np.uint32)
    return (int(high) << 32 | int(low)) >> 1


def torch_generator(run_seed: int, stream: str, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded for the stream (the same draws on any device)."""
    return torch.Generator().manual_seed(derive_seed(run_seed, stream, *keys))
