"""Model loading for inference: the config to rebuild a model from weights, and the model in eval mode.

Used by ``stdd.eval`` and ``stdd.predict`` (and :func:`stdd.predict.predict`).
"""

from __future__ import annotations

from typing import Optional, Sequence

from omegaconf import DictConfig

from .checkpoint import load_weights
from .config import apply_overrides, check_value_ranges, load_config, typed_config
from .task import build_model, load_student_state_dict


def config_for_weights(checkpoint: Optional[str], config: Optional[str], overrides: Sequence[str]) -> tuple[DictConfig, Optional[dict]]:
    """The config to rebuild the model: stored in the checkpoint, else ``config`` (default
    ``k400_vitb16``); then overrides. Returns ``(cfg, student state dict or None)``."""
    state = None
    if checkpoint is not None:
        loaded = load_weights(checkpoint)
        state = loaded["model"]
        if config is None and loaded["config"] is not None:
            cfg = typed_config(loaded["config"], f"--checkpoint {checkpoint} (its stored config)")  # keys, types
            source = f"--checkpoint {checkpoint} (its stored config)"
            return check_value_ranges(apply_overrides(cfg, overrides), source), state
    return load_config(config or "k400_vitb16", overrides), state


def load_model_for_inference(cfg: DictConfig, state: Optional[dict], device, *, checkpoint_name: str = "--checkpoint"):
    """``(STDDModel without teacher, TextEncoder)`` in eval mode, weights loaded."""
    model, text = build_model(cfg, "cpu", with_teacher=False)
    if state is not None:
        load_student_state_dict(model, state, source=checkpoint_name)
    return model.to(device).eval(), text.to(device)
