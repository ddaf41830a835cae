"""Training window phases: the one sampler of the random STCA phases.

The encoder takes phases as an input (``None``: the evaluation phases
``t mod K``, ``docs/stca.md``); training draws them with a
:class:`PhaseSampler`, which the training task owns. A clip's phases come from
the stream ``seeding.torch_generator(run seed, "phases", epoch, clip index)``:
a random per-clip offset ``(t + i) mod K`` and, with ``shuffle_phases``, a
random permutation of the clip's frame phases (``stdd_kernels.mask_phase``).
Keyed by the clip's index in the dataset rather than by the batch or process
it lands in, the draw of a clip is the same on one process or N, and a resumed
run draws what the uninterrupted one drew.

Two ways to share a draw among the blocks:

- one draw per clip, shared by every block (``per_block=False``, the default):
  phases ``(B, T)``;
- one independent draw per block (``per_block=True``, key
  ``(epoch, clip index, block)``): phases ``(n_blocks, B, T)``, which
  :class:`~stdd.model.VideoEncoder` gives row ``i`` to block ``i``.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

import stdd_kernels

from ..seeding import torch_generator
from .stca_settings import STCASettings

STREAM = "phases"


class PhaseSampler:
    """Random training phases for clips, by (epoch, clip index); see the module docstring.

    Args:
        settings: the encoder's STCA settings (window, ``shuffle_phases``).
        seed: the run seed the phase stream derives from.
        num_blocks: the encoder's block count (the leading size of per-block phases).
        per_block: draw every block's phases independently.

    ``sampler(indices, epoch=e, num_frames=T)`` -> int64 ``(B, T)`` or
    ``(num_blocks, B, T)`` on ``device``, for the clips at dataset positions ``indices``.
    """

    def __init__(self, settings: STCASettings, *, seed: int, num_blocks: int, per_block: bool = False):
        if not isinstance(settings, STCASettings):
            raise ValueError(f"settings must be an STCASettings, got {type(settings).__name__}")
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        if not isinstance(per_block, bool):
            raise ValueError(f"per_block must be a bool, got {per_block!r}")
        torch_generator(seed, STREAM)  # checks the seed now
        self.settings = settings
        self.seed = int(seed)
        self.num_blocks = num_blocks
        self.per_block = per_block

    def _draw(self, num_frames: int, *keys: int) -> torch.Tensor:
        return stdd_kernels.mask_phase(
            1, num_frames, window=self.settings.window, mode="train",
            generator=torch_generator(self.seed, STREAM, *keys), shuffle=self.settings.shuffle_phases,
        )[0]

    def __call__(
        self, indices: Union[torch.Tensor, Sequence[int]], *, epoch: int, num_frames: int, device=None
    ) -> torch.Tensor:
        indices = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        if self.per_block:
            phase = torch.stack([
                torch.stack([self._draw(num_frames, epoch, index, block) for index in indices])
                for block in range(self.num_blocks)
            ]) if indices else torch.empty(self.num_blocks, 0, num_frames, dtype=torch.int64)
        else:
            phase = torch.stack([self._draw(num_frames, epoch, index) for index in indices]) if indices \
                else torch.empty(0, num_frames, dtype=torch.int64)
        return phase.to(device) if device is not None else phase

    def state_dict(self) -> dict:
        """What reproduces the draws: the seed and the settings the phases depend on."""
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
