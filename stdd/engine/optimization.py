"""What updates the weights: AdamW with the warm-up + cosine schedule, the fp16 grad scaler, clipping, EMA.

:func:`build_optimization` reads ``cfg.optim`` (and ``run.precision``,
``averaging.ema_decay``); the :class:`Optimization` it returns does the backward
pass of a micro-batch and the optimizer step, and saves / restores its state
(the checkpoint keys ``optimizer``, ``scheduler``, ``scaler``, ``ema``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import DictConfig

from .averaging import ExponentialMovingAverage
from .precision import autocast_dtype
from .schedule import build_scheduler, scaled_lr

# optim.on_nonfinite_loss, what a step whose loss is NaN/inf does: stop the run (naming the step) |
# skip it (``Optimization.skip_step``: no update, counted)
NONFINITE_POLICIES = ("stop", "skip")


def optimizer_param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on 1-D parameters (biases, norms, the
    class/positional embeddings' scalars) as in Open-VCLIP's ZERO_WD_1D_PARAM."""
    decay, no_decay = [], []
    for parameter in module.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@dataclass
class Optimization:
    """The optimizer, its schedule and what goes with them, for one trained ``module``."""

    module: torch.nn.Module  # the training module; ``module.model`` is what the EMA follows
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    lr: float  # the base lr after linear scaling
    autocast_dtype: Optional[torch.dtype]
    scaler: Optional[torch.amp.GradScaler] = None  # fp16 only
    ema: Optional[ExponentialMovingAverage] = None
    grad_clip: Optional[float] = None

    @property
    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> float:
        """One optimizer step (clip, step, zero grads, schedule, EMA); the gradient norm or NaN."""
        grad_norm = float("nan")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                [p for p in self.module.parameters() if p.requires_grad], float(self.grad_clip)
            ))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.module.model)
        return grad_norm

    def skip_step(self) -> float:
        """An optimizer step that does not update (its loss was NaN/inf): the gradients are dropped, the
        schedule still advances (the step's data was consumed), the EMA is not updated. Returns NaN."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float("nan")

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])


def build_optimization(cfg: DictConfig, module: torch.nn.Module, *, global_batch: int, steps_per_epoch: int,
                       device: torch.device) -> Optimization:
    """AdamW over ``module``'s trainable parameters, lr scaled to ``global_batch``, warm-up + cosine
    over ``optim.epochs * steps_per_epoch`` optimizer steps."""
    optim = cfg.optim
    lr = scaled_lr(float(optim.lr), global_batch, int(optim.reference_batch)) if optim.scale_lr else float(optim.lr)
    optimizer = torch.optim.AdamW(optimizer_param_groups(module, float(optim.weight_decay)), lr=lr,
                                  betas=tuple(optim.betas), eps=float(optim.eps))
    total_steps = steps_per_epoch * int(optim.epochs)
    scheduler = build_scheduler(
        optimizer, total_steps=total_steps,
        # never more than total_steps: the config refuses a warm-up longer than the run (it is not cut here)
        warmup_steps=round(float(optim.warmup_epochs) * steps_per_epoch),
        warmup_start_factor=float(optim.warmup_start_factor), end_factor=float(optim.end_factor),
    )
    dtype = autocast_dtype(cfg.run.precision, device)
    ema_decay = cfg.averaging.ema_decay
    return Optimization(
        module=module, optimizer=optimizer, scheduler=scheduler, lr=lr, autocast_dtype=dtype,
        scaler=torch.amp.GradScaler("cuda") if dtype == torch.float16 else None,
        ema=ExponentialMovingAverage(module.model, float(ema_decay)) if ema_decay else None,
        grad_clip=optim.grad_clip_norm,
    )
