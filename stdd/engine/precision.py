"""Which autocast a run uses: the one reading of ``run.precision`` (training, evaluation, prediction)."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ..errors import InputError

PRECISIONS = {"auto": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``run.precision`` on ``device``; ``None``: no autocast (fp32).

    ``auto``: bf16 autocast on CUDA, none on CPU. ``fp16`` needs CUDA.
    """
    if precision not in PRECISIONS:
        raise InputError(f"run.precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp16" and device.type != "cuda":
        raise InputError("run.precision fp16 needs a CUDA device (use fp32 or bf16 on CPU)")
    return PRECISIONS[precision]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` on ``device`` in ``dtype``, or nothing when ``dtype`` is ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
