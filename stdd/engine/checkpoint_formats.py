"""Checkpoints of other zero-shot video methods, read for stdd's model: the formats and their recipes.

``stdd.eval`` and ``stdd.predict`` take ``--checkpoint FILE`` in any of :data:`CHECKPOINT_FORMATS`:

``stdd``
    stdd's weights files and training checkpoints (``{"format": "stdd-weights-v1" | "stdd-checkpoint-v1",
    "model": ..., "config": ...}``), read by :func:`stdd.engine.checkpoint.weights_of`.
``open_vclip``
    Open-VCLIP (wengzejia1/Open-VCLIP): ``{"model_state": {"model.<OpenAI CLIP key>": ...}}``, both
    towers and ``logit_scale`` of a CLIP whose every vision block runs widened-time attention
    (:mod:`stdd.model.expand_view`; the weights keep OpenAI CLIP's names). Its training checkpoints add
    ``epoch``, ``optimizer_state`` and ``cfg`` (a YAML string), which nothing here reads.
``froster``
    FROSTER (Visual-AI/FROSTER): Open-VCLIP's layout plus the distillation heads ``projector_v.*`` /
    ``projector_t.*``, which evaluation does not use.
``vifi_clip``
    ViFi-CLIP (muzairkhattak/ViFi-CLIP): ``{"model": {"module.image_encoder.<CLIP visual key>",
    "module.text_encoder.<transformer.* | positional_embedding | ln_final.* | text_projection>",
    "module.logit_scale", "module.prompt_learner.*"}, "config": <yacs CfgNode>, ...}``. The prompt
    learner's buffer holds token embeddings of its training classes and is not used; the token
    embedding itself is not in the file (it is the original CLIP's).

The format is found from the keys (:func:`detect_format`) or forced (``--checkpoint-format``). Every
file is read by :func:`stdd.serialization.load_torch_file` (archive CRCs checked, ``weights_only=True``;
yacs configs are read as plain mappings). An Open-VCLIP / FROSTER / ViFi-CLIP file becomes a
:class:`PeerCheckpoint`: its tensors under open_clip's CLIP names, which of its keys nothing reads, and
how to name a key as the file names it (errors name the file's own keys).

A recipe (:data:`RECIPES`) is how a checkpoint is scored: each method's published inference protocol is
a preset (:data:`RECIPE_PRESETS`, in ``stdd/configs/``); the protocol keys it sets are
``stdd.engine.config.PROTOCOL_KEYS``. ``own`` scores a checkpoint the way its method does
(:data:`FORMAT_RECIPES`; stdd checkpoints: their stored config).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from ..serialization import UnreadableFileError, load_torch_file
from .checkpoint import CheckpointError, first_non_finite, is_stdd_payload, weights_of

CHECKPOINT_FORMATS = ("stdd", "open_vclip", "froster", "vifi_clip")
FORMAT_NAMES = {"stdd": "STDD", "open_vclip": "Open-VCLIP", "froster": "FROSTER", "vifi_clip": "ViFi-CLIP"}
AUTO = "auto"  # --checkpoint-format's default: found from the keys

# How scoring is done: "own" (the checkpoint's method's published recipe), or one recipe for all.
RECIPES = ("own", "stdd", "open_vclip", "froster", "vifi_clip")
# recipe -> the preset in stdd/configs/ that holds it (stdd's protocol: the paper's K400 preset)
RECIPE_PRESETS = {"stdd": "k400_vitb16", "open_vclip": "open_vclip", "froster": "froster", "vifi_clip": "vifi_clip"}
# a checkpoint format -> its method's recipe (an stdd checkpoint's own recipe is its stored config)
FORMAT_RECIPES = {"open_vclip": "open_vclip", "froster": "froster", "vifi_clip": "vifi_clip"}

# Where each format keeps a CLIP's tensors: (the file's key prefix, open_clip's) pairs, after a leading
# "module." (DistributedDataParallel) that the file may or may not have.
LAYOUTS = {
    "open_vclip": (("model.", ""),),
    "froster": (("model.", ""),),
    "vifi_clip": (("image_encoder.", "visual."), ("text_encoder.", ""), ("logit_scale", "logit_scale")),
}
# Keys of a saved OpenAI CLIP (torch.jit) that are numbers, not weights (Open-VCLIP drops them too).
_OPENAI_JIT_NUMBERS = ("input_resolution", "context_length", "vocab_size")
# Text-tower weights a format does not store: the recipe takes them from the original CLIP.
FILLED_FROM_CLIP = {"vifi_clip": ("token_embedding.weight",)}


@dataclass
class PeerCheckpoint:
    """An Open-VCLIP / FROSTER / ViFi-CLIP checkpoint, its tensors under open_clip CLIP names."""

    path: Path
    format: str
    state: dict  # open_clip CLIP key -> tensor (visual.*, transformer.*, logit_scale, ...)
    module_prefix: str = ""  # "module." when the file's keys carry DistributedDataParallel's prefix
    unused: list = field(default_factory=list)  # the file's keys that hold no CLIP weight (never read)

    @property
    def name(self) -> str:
        return FORMAT_NAMES[self.format]

    def file_key(self, clip_key: str) -> str:
        """How the file names (or would name) the weight open_clip calls ``clip_key``."""
        best = None
        for file_prefix, clip_prefix in LAYOUTS[self.format]:
            if clip_key.startswith(clip_prefix) and (best is None or len(clip_prefix) > len(best[1])):
                best = (file_prefix, clip_prefix)
        file_prefix, clip_prefix = best
        return self.module_prefix + file_prefix + clip_key[len(clip_prefix):]

    def describe(self) -> str:
        return f"--checkpoint {self.path} ({self.name} format)"


def _tensor_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _without_module_prefix(state: dict) -> tuple[dict, str]:
    if all(str(key).startswith("module.") for key in state):
        return {str(key)[len("module."):]: value for key, value in state.items()}, "module."
    return dict(state), ""


def detect_format(payload, path: Union[str, Path]) -> str:
    """The format of a loaded checkpoint file, from its keys (:class:`CheckpointError` when none fits)."""
    if is_stdd_payload(payload):
        return "stdd"
    if isinstance(payload, dict):
        state = payload.get("model_state")
        if _tensor_dict(state):
            keys, _ = _without_module_prefix(state)
            if any(key.startswith("model.visual.") for key in keys):
                return "froster" if any(key.startswith(("projector_v.", "projector_t.")) for key in keys) \
                    else "open_vclip"
        state = payload.get("model")
        if _tensor_dict(state):
            keys, _ = _without_module_prefix(state)
            if any(key.startswith("image_encoder.") for key in keys):
                return "vifi_clip"
    shown = sorted(map(str, payload))[:8] if isinstance(payload, dict) else type(payload).__name__
    raise CheckpointError(
        f"--checkpoint {path}: not a checkpoint format stdd reads ({', '.join(FORMAT_NAMES.values())}): "
        f"found top-level {shown}; expected 'format' (stdd), 'model_state' with model.visual.* keys (Open-VCLIP, "
        f"FROSTER) or 'model' with module.image_encoder.* keys (ViFi-CLIP)"
    )


def peer_checkpoint(payload, checkpoint_format: str, path: Union[str, Path]) -> PeerCheckpoint:
    """The CLIP tensors of an Open-VCLIP / FROSTER / ViFi-CLIP file under open_clip names."""
    path = Path(path)
    name = FORMAT_NAMES[checkpoint_format]
    container = "model" if checkpoint_format == "vifi_clip" else "model_state"
    state = payload.get(container) if isinstance(payload, dict) else None
    if not _tensor_dict(state):
        found = sorted(map(str, payload))[:8] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"--checkpoint {path}: not a {name} checkpoint: expected a {container!r} entry "
                              f"holding the weights (name -> tensor), found top-level {found}")
    state, module_prefix = _without_module_prefix(state)
    checkpoint = PeerCheckpoint(path, checkpoint_format, {}, module_prefix)
    for key, value in state.items():
        clip_key = None
        for file_prefix, clip_prefix in LAYOUTS[checkpoint_format]:
            if key.startswith(file_prefix):
                clip_key = clip_prefix + key[len(file_prefix):]
                break
        if clip_key is None or clip_key in _OPENAI_JIT_NUMBERS:
            checkpoint.unused.append(module_prefix + key)
        else:
            checkpoint.state[clip_key] = value
    if not any(key.startswith("visual.") for key in checkpoint.state):
        raise CheckpointError(f"--checkpoint {path}: holds no image-tower weights in {name}'s layout "
                              f"({checkpoint.file_key('visual.proj')}, ...)")
    bad = first_non_finite(checkpoint.state)
    if bad is not None:
        raise CheckpointError(f"--checkpoint {path}: weight {checkpoint.file_key(bad)!r} holds NaN or inf values")
    return checkpoint


def read_checkpoint(path: Union[str, Path], checkpoint_format: str = AUTO):
    """``(format, contents)`` of ``--checkpoint``: ``contents`` is ``{"model", "config"}`` for an stdd file
    (:func:`stdd.engine.checkpoint.weights_of`), else a :class:`PeerCheckpoint`. ``checkpoint_format``:
    one of :data:`CHECKPOINT_FORMATS`, or ``auto`` (:func:`detect_format`)."""
    if checkpoint_format not in (AUTO, *CHECKPOINT_FORMATS):
        raise CheckpointError(f"--checkpoint-format {checkpoint_format!r}: expected one of "
                              f"{', '.join((AUTO, *CHECKPOINT_FORMATS))}")
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--checkpoint {path}: no such file")
    try:
        payload = load_torch_file(path, "--checkpoint")
    except UnreadableFileError as error:
        raise CheckpointError(str(error)) from error
    found = detect_format(payload, path) if checkpoint_format == AUTO else checkpoint_format
    if found == "stdd":
        return found, weights_of(payload, path)
    return found, peer_checkpoint(payload, found, path)


def key_groups(keys) -> str:
    """``"model.transformer.* (144), projector_v.* (2)"``: keys summarised by their leading names (two of
    them under a container name such as ``model.`` or ``module.``)."""
    counts = Counter()
    for key in keys:
        parts = key.split(".")
        depth = 1
        while depth < len(parts) and parts[depth - 1] in ("model", "module"):
            depth += 1
        counts[".".join(parts[:depth]) + (".*" if len(parts) > depth else "")] += 1
    return ", ".join(f"{group} ({count})" for group, count in sorted(counts.items()))


def split_tower_keys(state: dict) -> tuple[dict, dict, Optional[torch.Tensor]]:
    """``(visual, text, logit_scale)`` of an open_clip-named state: the image tower without its
    ``visual.`` prefix, the text tower, and the raw (log) logit scale or ``None``."""
    visual = {key[len("visual."):]: value for key, value in state.items() if key.startswith("visual.")}
    text = {key: value for key, value in state.items()
            if not key.startswith("visual.") and key not in ("logit_scale", "logit_bias")}
    return visual, text, state.get("logit_scale")


def block_free_name(name: str) -> str:
    """An STCA encoder's visual key as open_clip names it (``transformer.resblocks.3.block.ln_1.weight`` ->
    ``transformer.resblocks.3.ln_1.weight``)."""
    return re.sub(r"^(transformer\.resblocks\.\d+)\.block\.", r"\1.", name)
