"""Model loading for inference: the config to rebuild a model from weights, and the model in eval mode.

Used by ``stdd.eval`` and ``stdd.predict`` (and :func:`stdd.predict.predict`).

A checkpoint's stored config is split in two: what the model is and computes (the model and STCA
settings, text and data settings, the views of evaluation) is taken from it; the run-time settings of
:data:`~stdd.engine.config.RUNTIME_KEYS` (device, precision, op backends, workers, decoder, frame
cache, batch sizes, failure policies, cache paths) are those of the training machine and are not:
they get the schema's defaults, and the command line's overrides as usual.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from ..model.clip_loading import is_pretrained_tag
from .checkpoint import load_weights
from .config import (RUNTIME_KEYS, ConfigError, STDDConfig, apply_overrides, check_value_ranges, load_config,
                     typed_config)
from .task import build_model, load_student_state_dict


logger = logging.getLogger(__name__)

TRUST_FLAG = "--trust-checkpoint-pretrained"


def without_run_time_settings(stored: DictConfig, source: str = "the stored config") -> DictConfig:
    """A copy of ``stored`` whose :data:`RUNTIME_KEYS` hold the schema's defaults (what this process
    would use without a checkpoint); the values that were dropped are logged at info level."""
    defaults = OmegaConf.structured(STDDConfig)
    cfg = stored.copy()
    dropped = []
    for key in RUNTIME_KEYS:
        value, default = OmegaConf.select(cfg, key), OmegaConf.select(defaults, key)
        if value != default:
            dropped.append(f"{key}={value!r}")
            OmegaConf.update(cfg, key, default, merge=False)
    if dropped:
        logger.info("%s: run-time settings not taken from it (the defaults and the command line are used "
                    "instead): %s", source, ", ".join(dropped))
    return cfg


def _refuse_stored_weights_path(cfg: DictConfig, checkpoint: str, overrides: Sequence[str]) -> None:
    """A weights file path in a checkpoint's stored ``model.pretrained`` is not followed by default:
    a weights file one was given could point at any file on the machine. open_clip tags and
    ``null`` are fine; ``model.pretrained=...`` given by the user is their own choice."""
    pretrained = cfg.model.pretrained
    given = any(item.lstrip("+").split("=", 1)[0] == "model.pretrained" for item in overrides)
    if given or pretrained is None or str(pretrained).strip().lower() in ("", "none", "null"):
        return
    if not is_pretrained_tag(str(cfg.model.clip_name), str(pretrained)):
        raise ConfigError(
            f"--checkpoint {checkpoint}: its stored config names the CLIP weights file model.pretrained="
            f"{pretrained!r}; a path taken from a checkpoint is not loaded unless asked: give "
            f"model.pretrained=<file> yourself, or pass {TRUST_FLAG} to use that one"
        )


def config_for_weights(checkpoint: Optional[str], config: Optional[str], overrides: Sequence[str], *,
                       trust_checkpoint_pretrained: bool = False) -> tuple[DictConfig, Optional[dict]]:
    """The config to rebuild the model: stored in the checkpoint, without its run-time settings
    (:func:`without_run_time_settings`), else ``config`` (default ``k400_vitb16``); then overrides.
    Returns ``(cfg, student state dict or None)``.

    The stored config's ``model.pretrained`` (the CLIP weights the frozen text tower is built
    from) is used when it is an open_clip tag; a file path there is refused unless
    ``trust_checkpoint_pretrained`` (the CLIs' ``--trust-checkpoint-pretrained``) or a
    ``model.pretrained=`` override is given. The checkpoint's own weights are always loaded.
    """
    state = None
    if checkpoint is not None:
        loaded = load_weights(checkpoint)
        state = loaded["model"]
        if config is None and loaded["config"] is not None:
            source = f"--checkpoint {checkpoint} (its stored config)"
            stored = without_run_time_settings(typed_config(loaded["config"], source), source)
            cfg = check_value_ranges(apply_overrides(stored, overrides), source)
            if not trust_checkpoint_pretrained:
                _refuse_stored_weights_path(cfg, checkpoint, overrides)
            return cfg, state
    return load_config(config or "k400_vitb16", overrides), state


def load_model_for_inference(cfg: DictConfig, state: Optional[dict], device, *, checkpoint_name: str = "--checkpoint"):
    """``(STDDModel without teacher, TextEncoder)`` in eval mode, weights loaded."""
    model, text = build_model(cfg, "cpu", with_teacher=False)
    if state is not None:
        load_student_state_dict(model, state, source=checkpoint_name)
    return model.to(device).eval(), text.to(device)
