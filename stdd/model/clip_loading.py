"""Loading open_clip CLIP models with their weights, and naming those weights.

Weights come from an open_clip pretrained tag (``load_clip("ViT-B-16", "openai")``,
downloaded by open_clip into its cache) or from a local checkpoint file
(``load_clip("ViT-B-16", "/models/ViT-B-16.bin")``, an open_clip / OpenAI CLIP
state dict in a ``torch.save`` file or a ``.safetensors`` file). With neither,
loading fails with a message saying how to provide them; a random
initialisation needs the explicit ``allow_random_init=True`` (tests, demos).

A local file is read by stdd itself (:func:`stdd.serialization.load_state_dict_file`:
archive checksums verified, ``torch.load(weights_only=True)`` with no retry, or
safetensors), and the state dict is handed to the model open_clip built without
weights, with the conversions open_clip applies to its own loads. open_clip's
file loader is not used: it retries ``torch.load`` without ``weights_only``
after some errors, which runs whatever code a crafted file carries.

The tiny configs in ``stdd/model/configs/`` (``STDD-Tiny-ViT``: 32 px, 8 px
patches, a 4x4 grid; ``STDD-Tiny-ViT-64``: 64 px, an 8x8 grid) are registered
with open_clip on import, so they load by name like the released models.

:class:`ClipSource` says which weights a model holds (``weights_id``: the tag,
the checkpoint's SHA-256, or a hash of randomly initialised parameters); the
text-feature cache is keyed by it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit
from pathlib import Path
from typing import Optional, Union

import open_clip
import torch
from open_clip.convert import convert_state_dict
from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed
from open_clip.transformer import VisionTransformer
from torch import nn

from ..errors import UsageError
from ..serialization import load_state_dict_file

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TINY_MODEL_NAMES = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))


def register_model_configs() -> None:
    """Make the configs in ``stdd/model/configs/`` known to open_clip (idempotent)."""
    known = set(open_clip.list_models())
    if not all(name in known for name in TINY_MODEL_NAMES):
        open_clip.add_model_config(CONFIG_DIR)


register_model_configs()


@dataclass(frozen=True)
class ClipSource:
    """Which CLIP model and weights were loaded.

    ``pretrained``: the tag, the absolute checkpoint path, or ``None`` for a
    random initialisation. ``weights_id``: ``"tag:<tag>"``,
    ``"sha256:<hex>"`` of the checkpoint file, or ``"random:<hex>"`` hashed
    from the randomly initialised parameters.
    """

    model_name: str
    pretrained: Optional[str]
    weights_id: str

    @property
    def random_init(self) -> bool:
        return self.pretrained is None


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Union[str, Path]) -> str:
    """SHA-256 of a file, memoised per (path, size, mtime) within the process."""
    path = os.path.realpath(path)
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def parameters_sha256(module: nn.Module) -> str:
    """SHA-256 over a module's state dict (names, shapes, dtypes and values)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _how_to_provide(model_name: str) -> str:
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    tag_hint = f"one of its open_clip tags {tags}" if tags else "no open_clip tag (none exist for it)"
    return (
        f"Provide weights for {model_name!r} as either (a) {tag_hint}, downloaded by open_clip into "
        "its cache (pass cache_dir=..., or pre-fill the Hugging Face cache and set HF_HUB_OFFLINE=1 "
        "on machines without network), or (b) the path of a local checkpoint file (an open_clip or "
        "OpenAI CLIP state dict). For tests and demos only: pretrained=None with "
        "allow_random_init=True."
    )


def is_pretrained_tag(model_name: str, pretrained) -> bool:
    """Whether ``pretrained`` is one of open_clip's pretrained tags for ``model_name`` (not a file path)."""
    return isinstance(pretrained, str) and bool(open_clip.get_pretrained_cfg(model_name, pretrained))


class WeightsUnavailableError(UsageError, RuntimeError):
    """The weights of a pretrained tag are neither in the local cache nor downloadable (the message says why)."""


HUB_PROBE_TIMEOUT_S = 3.0  # one TCP connect to the hub before a download; unreachable: cache only


def hub_offline() -> bool:
    """Whether tag weights can only come from the local cache: ``HF_HUB_OFFLINE`` set, or the hub unreachable.

    One TCP connect (``HF_ENDPOINT``'s host, default huggingface.co) instead of the
    download's own minute of retries when there is no network.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443),
                                 timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        return True
    return False


def _drop_record(record: logging.LogRecord) -> bool:
    return False


@contextlib.contextmanager
def _cache_only(offline: bool):
    """While active, huggingface_hub reads its cache only (it reads ``HF_HUB_OFFLINE`` at import), and
    open_clip's own "Failed to download" line on the root logger is dropped (the raised error says it)."""
    if not offline:
        yield
        return
    try:  # optional package (open_clip works without it)
        from huggingface_hub import constants
    except ImportError:  # no hub client: open_clip downloads by URL, which fails at once offline
        constants = None
    saved = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    root = logging.getLogger()
    root.addFilter(_drop_record)
    try:
        yield
    finally:
        root.removeFilter(_drop_record)
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved


def tag_needs_quick_gelu(model_name: str, tag: str) -> bool:
    """Whether weights ``tag`` were trained with QuickGELU but config ``model_name`` uses GELU.

    open_clip only warns about this mismatch (``ViT-B-16`` + ``openai``); the
    activation must match the weights, so :func:`load_clip` forces QuickGELU then.
    """
    trained_quick = bool(open_clip.get_pretrained_cfg(model_name, tag).get("quick_gelu", False))
    config = open_clip.get_model_config(model_name) or {}
    return trained_quick and not bool(config.get("quick_gelu", False))


def load_clip(
    model_name: str,
    pretrained: Optional[str],
    *,
    allow_random_init: bool = False,
    device: Union[str, torch.device] = "cpu",
    precision: str = "fp32",
    cache_dir: Optional[str] = None,
) -> tuple[nn.Module, ClipSource]:
    """Build an open_clip CLIP model by name with its weights.

    Args:
        model_name: an open_clip architecture name (``"ViT-B-16"``, ``"ViT-L-14"``,
            ``"STDD-Tiny-ViT"``; see ``open_clip.list_models()``).
        pretrained: an open_clip pretrained tag (``"openai"``), a local checkpoint
            file, or ``None`` (needs ``allow_random_init=True``). A tag trained with
            QuickGELU gets QuickGELU whatever the config says; for a checkpoint
            file of such weights (OpenAI's) name the ``-quickgelu`` config
            (``"ViT-B-16-quickgelu"``), as the file does not say which activation it needs.
        precision: open_clip precision (``"fp32"``, ``"bf16"``, ``"fp16"``, ...).

    Returns ``(model, source)``; the model is in eval mode.
    Raises ``ValueError`` for an unknown model name, a missing file, an unknown
    tag or missing weights, and ``RuntimeError`` when a tag's download fails.
    """
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be an open_clip model name, got {model_name!r}")
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(
            f"model_name {model_name!r} is not an open_clip model config; known ViT names include "
            f"{[m for m in open_clip.list_models() if m.startswith(('ViT', 'STDD'))][:12]} ..."
        )
    if pretrained is None:
        if not allow_random_init:
            raise ValueError(f"pretrained=None: no weights given for {model_name!r}. {_how_to_provide(model_name)}")
        model = open_clip.create_model(model_name, pretrained=None, device=device, precision=precision)
        source = ClipSource(model_name, None, "random:" + parameters_sha256(model))
        return model.eval(), source
    if not isinstance(pretrained, (str, os.PathLike)):
        raise ValueError(f"pretrained must be a tag, a file path or None, got {pretrained!r}")
    pretrained = os.fspath(pretrained)
    if is_pretrained_tag(model_name, pretrained):
        offline = hub_offline()
        try:
            with _cache_only(offline):
                model = open_clip.create_model(
                    model_name, pretrained=pretrained, device=device, precision=precision, cache_dir=cache_dir,
                    require_pretrained=True, force_quick_gelu=tag_needs_quick_gelu(model_name, pretrained),
                )
        except Exception as error:  # download / hub errors come in many types
            where = ("not in the local cache, and the hub is unreachable or HF_HUB_OFFLINE is set" if offline
                     else f"{str(error).splitlines()[0] if str(error) else type(error).__name__}")
            raise WeightsUnavailableError(
                f"could not load the {model_name!r} weights for pretrained tag {pretrained!r}: {where}. "
                f"{_how_to_provide(model_name)}"
            ) from None if offline else error
        return model.eval(), ClipSource(model_name, pretrained, f"tag:{pretrained}")
    looks_like_path = os.sep in pretrained or Path(pretrained).suffix != ""
    if not os.path.isfile(pretrained):
        what = "checkpoint file does not exist" if looks_like_path else "is neither a known tag nor a file"
        raise ValueError(f"pretrained={pretrained!r} {what}. {_how_to_provide(model_name)}")
    path = os.path.abspath(pretrained)
    state_dict = load_state_dict_file(path, "pretrained weights file")  # UnreadableFileError is a ValueError
    model = open_clip.create_model(model_name, pretrained=None, device=device, precision=precision)
    try:
        _load_clip_state_dict(model, state_dict)
    except Exception as error:
        raise ValueError(
            f"checkpoint file {path} does not hold {model_name!r} CLIP weights "
            f"(expected an open_clip/OpenAI CLIP state dict for that architecture): {error}"
        ) from error
    return model.eval(), ClipSource(model_name, path, "sha256:" + file_sha256(path))


def _load_clip_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Load a CLIP state dict into an open_clip model strictly, converting it as
    ``open_clip.factory.load_checkpoint`` does after reading a file (third-party and old
    layouts, scalar vs 1-d logit scale/bias, positional embeddings of another size)."""
    state_dict = convert_state_dict(model, dict(state_dict))
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    for key in ("logit_scale", "logit_bias"):
        current = getattr(model, key, None)
        if key in state_dict and current is not None and current.ndim != state_dict[key].ndim:
            state_dict[key] = state_dict[key].reshape(current.shape)
    if "logit_bias" not in state_dict and getattr(model, "logit_bias", None) is not None:
        state_dict["logit_bias"] = torch.zeros_like(state_dict["logit_scale"])
    state_dict.pop("text.transformer.embeddings.position_ids", None)
    resize_pos_embed(state_dict, model)
    resize_text_pos_embed(state_dict, model)
    model.load_state_dict(state_dict, strict=True)


def vision_tower(clip_model: nn.Module) -> nn.Module:
    """The open_clip ``VisionTransformer`` of a CLIP model (``ValueError`` if it has none)."""
    visual = getattr(clip_model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            "the CLIP model's image tower must be an open_clip VisionTransformer (ViT-B/32, B/16, L/14, "
            f"...), got {type(visual).__name__}; ResNet and timm towers have no STCA form"
        )
    return visual
