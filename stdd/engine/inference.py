"""Model loading for inference: the config to rebuild a model from weights, and the model in eval mode.

Used by ``stdd.eval`` and ``stdd.predict`` (and :func:`stdd.predict.predict`).

A checkpoint's stored config is split in two: what the model is and computes (the model and STCA
settings, text and data settings, the views of evaluation) is taken from it; the run-time settings of
:data:`~stdd.engine.config.RUNTIME_KEYS` (device, precision, op backends, workers, decoder, frame
cache, batch sizes, failure policies, cache paths) are those of the training machine and are not:
they get the schema's defaults, and the command line's overrides as usual.

Checkpoints of Open-VCLIP, FROSTER and ViFi-CLIP (:mod:`stdd.engine.checkpoint_formats`) carry no
config: theirs is their method's recipe preset (``stdd/configs/open_vclip.yaml``, ``froster.yaml``,
``vifi_clip.yaml``), or ``--config``. A recipe (``--recipe``) then replaces the protocol keys
(:data:`~stdd.engine.config.PROTOCOL_KEYS`: frames, pixels, prompts, score, views) with its own, for
any checkpoint; ``key=value`` overrides come last. The model is built from the CLIP of
``model.pretrained`` and the checkpoint's weights are put into it (:func:`load_model_for_inference`):
every image-tower weight and the logit scale, and with ``text.tower: checkpoint`` the text tower's;
``model.weight_interpolation`` r then mixes the original CLIP back in, ``r * w_clip + (1 - r) * w``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from ..model.clip_loading import ClipSource, file_sha256, is_pretrained_tag
from .checkpoint import CheckpointError
from .checkpoint_formats import (AUTO, FILLED_FROM_CLIP, FORMAT_NAMES, FORMAT_RECIPES, RECIPE_PRESETS,
                                 PeerCheckpoint, block_free_name, key_groups, read_checkpoint, split_tower_keys)
from .config import (PROTOCOL_KEYS, RUNTIME_KEYS, ConfigError, STDDConfig, apply_overrides, check_value_ranges,
                     load_config, prompt_settings_of, stca_settings_of, typed_config)
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


def with_recipe(cfg: DictConfig, recipe: Optional[str]) -> DictConfig:
    """``cfg`` with the protocol keys (:data:`PROTOCOL_KEYS`) of ``recipe``'s preset
    (:data:`~stdd.engine.checkpoint_formats.RECIPE_PRESETS`); ``None`` / ``"own"``: ``cfg`` as it is."""
    if recipe in (None, "own"):
        return cfg
    if recipe not in RECIPE_PRESETS:
        raise ConfigError(f"--recipe {recipe!r}: expected one of own, {', '.join(RECIPE_PRESETS)}")
    protocol = load_config(RECIPE_PRESETS[recipe])
    cfg = cfg.copy()
    for key in PROTOCOL_KEYS:
        OmegaConf.update(cfg, key, OmegaConf.select(protocol, key), merge=False)
    return cfg


def _finished(cfg: DictConfig, overrides: Sequence[str], source: Optional[str] = None) -> DictConfig:
    cfg = check_value_ranges(apply_overrides(cfg, overrides), source)
    stca_settings_of(cfg)  # the STCA values are checked now, not when the model is built
    prompt_settings_of(cfg)
    return cfg


def config_for_weights(checkpoint: Optional[str], config: Optional[str], overrides: Sequence[str], *,
                       trust_checkpoint_pretrained: bool = False, checkpoint_format: str = AUTO,
                       recipe: Optional[str] = None) -> tuple[DictConfig, Optional[object]]:
    """The config to rebuild the model, and the checkpoint's weights.

    An stdd checkpoint: its stored config, without its run-time settings
    (:func:`without_run_time_settings`), else ``config`` (default ``k400_vitb16``). An Open-VCLIP /
    FROSTER / ViFi-CLIP checkpoint: ``config``, default its method's recipe preset. Then ``recipe``'s
    protocol keys (:func:`with_recipe`), then ``overrides``. Returns ``(cfg, weights)``: the student
    state dict of an stdd checkpoint, a :class:`~stdd.engine.checkpoint_formats.PeerCheckpoint`, or
    ``None`` without ``checkpoint``. ``checkpoint_format``: ``auto`` (from the keys) or a format.

    The stored config's ``model.pretrained`` (the CLIP weights the frozen text tower is built
    from) is used when it is an open_clip tag; a file path there is refused unless
    ``trust_checkpoint_pretrained`` (the CLIs' ``--trust-checkpoint-pretrained``) or a
    ``model.pretrained=`` override is given. The checkpoint's own weights are always loaded.
    """
    weights = None
    if checkpoint is not None:
        found, contents = read_checkpoint(checkpoint, checkpoint_format)
        if found != "stdd":
            base = config or RECIPE_PRESETS[FORMAT_RECIPES[found]]
            return _finished(with_recipe(load_config(base), recipe), overrides), contents
        weights = contents["model"]
        if config is None and contents["config"] is not None:
            source = f"--checkpoint {checkpoint} (its stored config)"
            stored = without_run_time_settings(typed_config(contents["config"], source), source)
            cfg = _finished(with_recipe(stored, recipe), overrides, source)
            if not trust_checkpoint_pretrained:
                _refuse_stored_weights_path(cfg, checkpoint, overrides)
            return cfg, weights
    return _finished(with_recipe(load_config(config or "k400_vitb16"), recipe), overrides), weights


@dataclass
class WeightsReport:
    """What loading a checkpoint into the model did, for the command lines to show and record."""

    format: str
    unused: list = field(default_factory=list)  # the file's keys nothing read (as the file names them)
    filled_from_clip: list = field(default_factory=list)  # weights the recipe takes from model.pretrained's CLIP
    interpolation: float = 0.0
    text_tower: str = "clip"  # text.tower: whose text tower encoded the prompts

    def summary(self) -> str:
        tower = "the checkpoint's" if self.text_tower == "checkpoint" else "CLIP's (model.pretrained)"
        parts = [f"{FORMAT_NAMES[self.format]} format", f"text tower: {tower}"]
        if self.interpolation:
            parts.append(f"weights interpolated with CLIP's (r = {self.interpolation:g})")
        if self.filled_from_clip:
            parts.append(f"from CLIP: {', '.join(self.filled_from_clip)}")
        parts.append(f"keys not used: {key_groups(self.unused) if self.unused else 'none'}")
        return "; ".join(parts)

    def to_json(self) -> dict:
        return {"format": self.format, "interpolation": self.interpolation, "text_tower": self.text_tower,
                "unused_keys": list(self.unused), "filled_from_clip": list(self.filled_from_clip)}


def _check_shapes(checkpoint: PeerCheckpoint, provided: dict, expected: dict, cfg: DictConfig, prefix: str) -> None:
    for name, tensor in provided.items():
        own = expected.get(name)
        if own is not None and tuple(own.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{checkpoint.describe()}: {checkpoint.file_key(prefix + name)} has shape {tuple(tensor.shape)} but "
                f"model.clip_name={cfg.model.clip_name} has {tuple(own.shape)}: give the checkpoint's architecture "
                f"as model.clip_name (e.g. ViT-L-14 with model.pretrained=openai)"
            )


def _require(checkpoint: PeerCheckpoint, missing, why: str) -> None:
    if missing:
        names = [checkpoint.file_key(name) for name in sorted(missing)]
        raise CheckpointError(f"{checkpoint.describe()}: lacks {len(names)} weight(s) {why}: "
                              f"{', '.join(names[:6])}{' ...' if len(names) > 6 else ''}")


def load_peer_weights(model, text, checkpoint: PeerCheckpoint, cfg: DictConfig) -> WeightsReport:
    """Put an Open-VCLIP / FROSTER / ViFi-CLIP checkpoint's weights into the model built from CLIP: every
    image-tower weight, the logit scale, and with ``text.tower: checkpoint`` the text tower (those of
    :data:`~stdd.engine.checkpoint_formats.FILLED_FROM_CLIP` stay CLIP's). A weight the recipe needs and
    the file lacks is a :class:`CheckpointError` naming it as the file would."""
    visual, text_state, logit_scale = split_tower_keys(checkpoint.state)
    encoder = model.video_encoder
    expected_visual = {block_free_name(name): value for name, value in encoder.visual.state_dict().items()}
    _check_shapes(checkpoint, visual, expected_visual, cfg, "visual.")
    missing, extra = set(expected_visual) - set(visual), set(visual) - set(expected_visual)
    if missing and extra:
        raise CheckpointError(
            f"{checkpoint.describe()}: its image tower is not model.clip_name={cfg.model.clip_name}'s: it has "
            f"{checkpoint.file_key('visual.' + sorted(extra)[0])} ({len(extra)} weights this model lacks) and lacks "
            f"{checkpoint.file_key('visual.' + sorted(missing)[0])} ({len(missing)}): give the checkpoint's "
            f"architecture as model.clip_name (e.g. ViT-L-14 with model.pretrained=openai)")
    _require(checkpoint, {"visual." + name for name in missing}, "of the image tower")
    _require(checkpoint, set() if logit_scale is not None else {"logit_scale"}, "(the logit scale)")
    report = WeightsReport(checkpoint.format, unused=list(checkpoint.unused), text_tower=str(cfg.text.tower))
    report.unused += [checkpoint.file_key("visual." + name) for name in sorted(set(visual) - set(expected_visual))]
    encoder.load_clip_visual_state_dict({name: visual[name] for name in expected_visual}, strict=True)
    with torch.no_grad():
        model.logit_scale.fill_(float(logit_scale.detach().double().reshape(-1)[0].exp()))
    expected_text = {name: value for name, value in text.clip.state_dict().items()
                     if name not in ("logit_scale", "logit_bias")}
    if cfg.text.tower == "checkpoint":
        filled = set(FILLED_FROM_CLIP.get(checkpoint.format, ())) & set(expected_text)
        _require(checkpoint, set(expected_text) - set(text_state) - filled, "of the text tower (text.tower=checkpoint)")
        _check_shapes(checkpoint, text_state, expected_text, cfg, "")
        report.filled_from_clip = sorted(filled - set(text_state))
        text.clip.load_state_dict({name: text_state[name] for name in expected_text if name in text_state},
                                  strict=False)
        ratio = float(cfg.model.weight_interpolation)
        # the text features' cache is keyed by the weights: these are the checkpoint's, not CLIP's
        text.source = ClipSource(text.source.model_name, str(checkpoint.path),
                                 f"{checkpoint.format}:sha256:{file_sha256(checkpoint.path)}:r={ratio:g}")
        report.unused += [checkpoint.file_key(name) for name in sorted(set(text_state) - set(expected_text))]
    else:
        report.unused += [checkpoint.file_key(name) for name in sorted(text_state)]  # text.tower=clip reads CLIP's
    return report


def _snapshot(module) -> dict:
    return {name: value.detach().clone() for name, value in module.state_dict().items()
            if value.is_floating_point()}


def _interpolate(module, original: dict, ratio: float) -> None:
    """Every floating-point weight of ``module``: ``ratio * original + (1 - ratio) * current``."""
    with torch.no_grad():
        for name, value in module.state_dict().items():
            if name in original:
                value.copy_(ratio * original[name] + (1.0 - ratio) * value)


def load_model_for_inference(cfg: DictConfig, state, device, *, checkpoint_name: str = "--checkpoint"):
    """``(STDDModel without teacher, TextEncoder, WeightsReport or None)``: the model in eval mode with
    its weights, and what loading ``state`` (an stdd student state dict, a
    :class:`~stdd.engine.checkpoint_formats.PeerCheckpoint`, or ``None``: CLIP's weights as they are) did.

    ``model.weight_interpolation`` r > 0 mixes the CLIP weights the model was built from back into the
    loaded ones (the image tower, the logit scale in log space, and a checkpoint's text tower)."""
    if prompt_settings_of(cfg) is not None and (state is None or isinstance(state, PeerCheckpoint)):
        what = "no checkpoint" if state is None else f"a {FORMAT_NAMES[state.format]} checkpoint"
        raise ConfigError(f"model.adaptation=prompt: {checkpoint_name} gives {what}, and the prompt generators would "
                          f"be untrained: give an stdd checkpoint trained with model.adaptation=prompt, or "
                          f"model.adaptation=full")
    model, text = build_model(cfg, "cpu", with_teacher=False)
    ratio = float(cfg.model.weight_interpolation)
    clip_visual = _snapshot(model.video_encoder) if ratio else None
    clip_text = _snapshot(text.clip) if ratio and cfg.text.tower == "checkpoint" else None
    clip_log_scale = math.log(float(model.logit_scale))
    report = None
    if isinstance(state, PeerCheckpoint):
        report = load_peer_weights(model, text, state, cfg)
    elif state is not None:
        if cfg.text.tower == "checkpoint":
            raise ConfigError(f"text.tower=checkpoint: {checkpoint_name} is an stdd checkpoint, which holds no text "
                              f"tower (stdd's text tower is the frozen CLIP of model.pretrained): use text.tower=clip")
        load_student_state_dict(model, state, source=checkpoint_name)
        report = WeightsReport("stdd")
    elif cfg.text.tower == "checkpoint":
        raise ConfigError("text.tower=checkpoint needs --checkpoint (a checkpoint with its own text tower)")
    if ratio:
        _interpolate(model.video_encoder, clip_visual, ratio)
        if clip_text is not None:
            _interpolate(text.clip, clip_text, ratio)
        with torch.no_grad():
            log_scale = ratio * clip_log_scale + (1.0 - ratio) * math.log(float(model.logit_scale))
            model.logit_scale.fill_(math.exp(log_scale))
        if report is not None:
            report.interpolation = ratio
    return model.to(device).eval(), text.to(device), report
