"""Window phases: the one sampler of the random STCA phases, in training and (optionally) evaluation.

The encoder takes phases as an input (``None``: the evaluation phases
``t mod K``, ``docs/stca.md``); random phases are drawn by a
:class:`PhaseSampler`, which the training task (and, for a shuffled
evaluation, :func:`stdd.engine.evaluation.score_dataset`) owns. What it draws
follows the encoder's :class:`~stdd.model.stca_settings.STCASettings`:

- training (``sampler(indices, epoch=e, num_frames=T)``): a random per-clip
  offset ``(t + i) mod K`` and, with ``shuffle_phases``, a random permutation
  of the clip's frame phases (``stdd_kernels.mask_phase(mode="train")``), from
  the stream ``seeding.torch_generator(run seed, "phases", epoch, clip index)``;
- evaluation (``sampler.evaluation(indices, views=V, num_frames=T)``): with
  ``eval_shuffle_phases``, ``t mod K`` randomly permuted per clip
  (``mask_phase(mode="eval", shuffle=True)``), from the stream
  ``(run seed, "eval_phases", video index, view)``; without it ``None``
  (deterministic ``t mod K``, the paper's evaluation).

Keyed by the clip's index in the dataset rather than by the batch or process
it lands in, the draw of a clip is the same on one process or N and with any
batch size, and a resumed run draws what the uninterrupted one drew. Training
draws are new in every epoch (every forward pass of a clip); evaluation draws
are the same in every evaluation of a video, so validation rounds during
training compare like with like.

Two ways to share a draw among the blocks (``per_block_phases``):

- one draw per clip, shared by every block (``False``, the paper default):
  phases ``(B, T)``;
- one independent draw per block (``True``, the release; the block index is
  the last key): phases ``(n_blocks, B, T)``, which
  :class:`~stdd.model.VideoEncoder` gives row ``i`` to block ``i``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

import stdd_kernels
from stdd_kernels.geometry import positive_int

from ..seeding import torch_generator
from .stca_settings import STCASettings

STREAM = "phases"
EVAL_STREAM = "eval_phases"


def _index_list(indices: Union[torch.Tensor, Sequence[int]]) -> list[int]:
    return indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)


class PhaseSampler:
    """Random window phases for clips, by their dataset index; see the module docstring.

    Args:
        settings: the encoder's STCA settings (``window``, ``shuffle_phases``,
            ``per_block_phases``, ``eval_shuffle_phases``).
        seed: the run seed the phase streams derive from.
        num_blocks: the encoder's block count (the leading size of per-block phases).

    ``sampler(indices, epoch=e, num_frames=T)`` -> training phases, int64 ``(B, T)``
    or ``(num_blocks, B, T)``, for the clips at dataset positions ``indices``;
    :meth:`evaluation` -> evaluation phases or ``None``.
    """

    def __init__(self, settings: STCASettings, *, seed: int, num_blocks: int):
        if not isinstance(settings, STCASettings):
            raise ValueError(f"settings must be an STCASettings, got {type(settings).__name__}")
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        torch_generator(seed, STREAM)  # checks the seed now
        self.settings = settings
        self.seed = int(seed)
        self.num_blocks = num_blocks

    @property
    def per_block(self) -> bool:
        return self.settings.per_block_phases

    def _draw(self, mode: str, num_frames: int, keys: Sequence[tuple[int, ...]], device) -> torch.Tensor:
        """One ``mask_phase`` draw per key tuple (a clip, and its block when per block) -> ``(len(keys), T)``."""
        stream, shuffle = (STREAM, self.settings.shuffle_phases) if mode == "train" else (EVAL_STREAM, True)
        rows = [
            stdd_kernels.mask_phase(
                1, num_frames, window=self.settings.window, mode=mode,
                generator=torch_generator(self.seed, stream, *key), shuffle=shuffle,
            )[0]
            for key in keys
        ]
        phase = torch.stack(rows) if rows else torch.empty(0, num_frames, dtype=torch.int64)
        return phase.to(device) if device is not None else phase

    def _blocks(self, mode: str, num_frames: int, clip_keys: list[tuple[int, ...]], device) -> torch.Tensor:
        if not self.per_block:
            return self._draw(mode, num_frames, clip_keys, device)
        return torch.stack([
            self._draw(mode, num_frames, [(*key, block) for key in clip_keys], device)
            for block in range(self.num_blocks)
        ])

    def __call__(
        self, indices: Union[torch.Tensor, Sequence[int]], *, epoch: int, num_frames: int, device=None
    ) -> torch.Tensor:
        """Training phases of the clips at dataset positions ``indices`` in ``epoch``."""
        return self._blocks("train", num_frames, [(epoch, index) for index in _index_list(indices)], device)

    def evaluation(
        self, indices: Union[torch.Tensor, Sequence[int]], *, num_frames: int, views: int = 1, device=None
    ) -> Optional[torch.Tensor]:
        """Evaluation phases of ``views`` clips of each video at dataset positions ``indices``.

        ``None`` without ``eval_shuffle_phases`` (the encoder then uses ``t mod K``).
        Otherwise ``(B*V, T)`` or ``(num_blocks, B*V, T)``, rows video-major (row
        ``b * V + v`` is view ``v`` of video ``b``, the order of
        ``video.reshape(B * V, ...)``), each row ``t mod K`` permuted by its own
        stream ``(seed, "eval_phases", video index, view[, block])``.
        """
        if not self.settings.eval_shuffle_phases:
            return None
        views = positive_int(views, "views")
        keys = [(index, view) for index in _index_list(indices) for view in range(views)]
        return self._blocks("eval", num_frames, keys, device)

    def state_dict(self) -> dict:
        """What reproduces the training draws: the seed and the settings the phases depend on."""
        return {"stream": STREAM, "seed": self.seed, "window": list(self.settings.window),
                "shuffle_phases": self.settings.shuffle_phases, "num_blocks": self.num_blocks,
                "per_block": self.per_block}

    def load_state_dict(self, state: dict) -> None:
        """Continue a saved run's phase stream (its seed); the phase settings must be the same."""
        mine = self.state_dict()
        different = [key for key in mine if key != "seed" and state.get(key) != mine[key]]
        if different:
            raise ValueError(
                f"the checkpoint's phases were drawn with other settings ({', '.join(different)}: "
                f"{[state.get(k) for k in different]} vs {[mine[k] for k in different]} now)"
            )
        self.seed = int(state["seed"])
