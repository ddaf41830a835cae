"""Weight averaging: uniform SWA over chosen epoch checkpoints, and EMA.

STDD (following Open-VCLIP, Weng et al. 2023) averages the weights the model
had at the end of several epochs; optionally the raw CLIP weights count as
"epoch 0" (the trainer writes an epoch-0 checkpoint before the first step
when ``averaging.include_raw_clip`` is set), which pulls the average towards
the pre-trained model and helps zero-shot transfer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch

from .checkpoint import CheckpointError, checkpoint_for_epoch, load_checkpoint


def uniform_average(state_dicts: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors across state dicts.

    Accumulates in float64 and casts back to each tensor's dtype, so the
    result does not depend on the order of the inputs beyond rounding of the
    final cast. Non-float tensors (integer buffers) must be equal in every
    input and are copied. Every input must have the same keys and shapes.
    """
    sums: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    count = 0
    for index, state in enumerate(state_dicts):
        if count == 0:
            reference = {k: v for k, v in state.items()}
            sums = {k: v.detach().to(torch.float64).clone() for k, v in state.items() if v.is_floating_point()}
        else:
            if set(state) != set(reference):
                diff = sorted(set(state) ^ set(reference))[:5]
                raise ValueError(f"uniform_average: input {index} has different keys (e.g. {diff})")
            for key, value in state.items():
                if value.shape != reference[key].shape:
                    raise ValueError(
                        f"uniform_average: input {index} key {key!r} has shape {tuple(value.shape)}, "
                        f"expected {tuple(reference[key].shape)}"
                    )
                if key in sums:
                    sums[key] += value.detach().to(torch.float64)
                elif not torch.equal(value, reference[key]):
                    raise ValueError(f"uniform_average: non-float tensor {key!r} differs in input {index}")
        count += 1
    if count == 0:
        raise ValueError("uniform_average: no state dicts given")
    return {
        key: (sums[key] / count).to(value.dtype) if key in sums else value.clone()
        for key, value in reference.items()
    }


def average_epoch_checkpoints(
    run_directory: Union[str, Path], epochs: Sequence[int], key: str = "model"
) -> dict[str, torch.Tensor]:
    """Uniform average of ``state[key]`` over the end-of-epoch checkpoints of ``epochs``
    (epoch 0 = the raw CLIP weights, if the run saved them)."""
    if not epochs:
        raise ValueError("average_epoch_checkpoints: epochs is empty")
    paths = []
    for epoch in epochs:
        try:
            paths.append(checkpoint_for_epoch(run_directory, int(epoch)))
        except CheckpointError as error:
            hint = " (epoch 0 exists only when averaging.include_raw_clip was set)" if int(epoch) == 0 else ""
            raise CheckpointError(f"weight averaging: {error}{hint}") from error

    def states():
        for path in paths:
            state = load_checkpoint(path)
            if key not in state or state[key] is None:
                raise CheckpointError(f"checkpoint {path}: no {key!r} weights to average")
            yield state[key]

    return uniform_average(states())


def parse_epoch_selection(selection, last_epoch: int) -> list[int]:
    """Epochs to average: a list of ints, ``"all"`` (1..last), ``"last:N"`` or ``"A-B"``
    (inclusive); ``last_epoch`` is the number of epochs trained."""
    if selection is None:
        return []
    if isinstance(selection, (list, tuple)) or hasattr(selection, "__iter__") and not isinstance(selection, str):
        epochs = [int(e) for e in selection]
    else:
        text = str(selection).strip()
        if text == "all":
            epochs = list(range(1, last_epoch + 1))
        elif text.startswith("last:"):
            count = int(text.split(":", 1)[1])
            epochs = list(range(max(last_epoch - count + 1, 1), last_epoch + 1))
        elif "-" in text:
            first, last = (int(part) for part in text.split("-", 1))
            epochs = list(range(first, last + 1))
        else:
            raise ValueError(
                f"averaging.epochs {selection!r}: expected a list of epochs, 'all', 'last:N' or 'A-B'"
            )
    bad = [e for e in epochs if not 0 <= e <= last_epoch]
    if bad:
        raise ValueError(f"averaging.epochs {selection!r}: epochs {bad} are outside 0..{last_epoch}")
    return sorted(set(epochs))


class ExponentialMovingAverage:
    """EMA of a module's floating-point parameters and buffers:
    ``shadow = decay * shadow + (1 - decay) * current`` after each optimizer step.

    The shadow lives in float32 on the module's device (bf16 weights would
    lose the small updates). Integer buffers are copied.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ExponentialMovingAverage: decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow = {
            key: value.detach().to(torch.float32).clone() if value.is_floating_point() else value.detach().clone()
            for key, value in module.state_dict().items()
        }

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.num_updates += 1
        for key, value in module.state_dict().items():
            shadow = self.shadow[key]
            if value.is_floating_point():
                shadow.mul_(self.decay).add_(value.detach().to(torch.float32), alpha=1.0 - self.decay)
            else:
                shadow.copy_(value)

    def averaged_state_dict(self, like: Optional[torch.nn.Module] = None) -> dict[str, torch.Tensor]:
        """Shadow weights cast to the dtypes of ``like``'s state dict (if given)."""
        if like is None:
            return {k: v.clone() for k, v in self.shadow.items()}
        target = like.state_dict()
        return {k: v.to(target[k].dtype) for k, v in self.shadow.items()}

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping) -> None:
        if set(state["shadow"]) != set(self.shadow):
            raise ValueError("ExponentialMovingAverage.load_state_dict: the saved EMA belongs to another model")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for key, value in state["shadow"].items():
            self.shadow[key].copy_(value)
