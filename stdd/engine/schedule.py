"""Learning-rate schedule: linear warm-up then cosine decay, in optimizer steps.

Follows the Open-VCLIP/FROSTER recipe STDD trains with: the lr rises linearly
from ``warmup_start_lr`` to ``base_lr`` over the warm-up, then follows a cosine
from ``base_lr`` down to ``end_lr`` at the last step. ``base_lr`` is given for a
reference global batch and scaled linearly with the actual global batch
(``scaled_lr``), as is the usual rule for AdamW fine-tuning at these batch sizes.
"""

from __future__ import annotations

import math

import torch


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int) -> float:
    """Linear scaling rule: ``base_lr * global_batch / reference_batch``."""
    if global_batch <= 0 or reference_batch <= 0:
        raise ValueError(
            f"scaled_lr: global_batch ({global_batch}) and reference_batch ({reference_batch}) must be positive"
        )
    return base_lr * global_batch / reference_batch


class WarmupCosine:
    """Multiplier of the optimizer's base lr at each optimizer step (a LambdaLR lambda).

    A callable object rather than a closure so ``LambdaLR.state_dict`` stores
    its fields and a resumed run checks it is the same schedule.
    """

    def __init__(self, total_steps: int, warmup_steps: int, start_factor: float, end_factor: float):
        if total_steps <= 0:
            raise ValueError(f"WarmupCosine: total_steps must be positive, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"WarmupCosine: warmup_steps must be in [0, {total_steps}], got {warmup_steps}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.start_factor = float(start_factor)
        self.end_factor = float(end_factor)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            # step 0 runs at start_factor; the lr reaches 1.0 at the first step after warm-up
            return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps <= 1:
            return 1.0 if step < self.total_steps else self.end_factor
        progress = min((step - self.warmup_steps) / (decay_steps - 1), 1.0)
        return self.end_factor + (1.0 - self.end_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int,
    warmup_start_factor: float = 0.01,
    end_factor: float = 0.01,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over ``WarmupCosine``; call ``.step()`` once per optimizer step."""
    schedule = WarmupCosine(total_steps, warmup_steps, warmup_start_factor, end_factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
