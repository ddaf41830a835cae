"""Text side: class names -> prompt sentences -> frozen CLIP text features (cached).

Prompt sources (both give an ordered ``{class name: [sentence, ...]}`` dict whose
order is the class index order):

- :func:`stdd.knowledge.template_prompts`: hand-written templates x class name;
- :func:`stdd.knowledge.load_prompts`: a prompts or ASKG file (the one prompt loader).

:class:`TextEncoder` runs the frozen open_clip text tower and returns
:class:`ClassTextFeatures`: ``features (K, N_max, E)`` (unit norm) and a
``mask (K, N_max)`` marking real prompts (classes have different prompt counts:
the rest is zero padding, masked in the alignment, never repeated prompts).
With a ``cache_dir`` the features are stored on disk under a key made from the
model name, its weights (tag, checkpoint SHA-256 or hash of random weights), the
tokenizer's context length and every prompt; any change gives a new key, so
features are recomputed exactly when something they depend on changed. Files are
written atomically (``stdd.files.atomic_write``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import open_clip
import torch
from torch import nn

from ..files import atomic_write
from ..knowledge.prompts import check_prompts
from ..serialization import load_torch_file
from .clip_loading import ClipSource, load_clip

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


@dataclass(frozen=True)
class ClassTextFeatures:
    """Prompt features of ``K`` classes.

    ``features``: ``(K, N_max, E)`` float32, unit-norm rows, zeros where padded;
    ``mask``: ``(K, N_max)`` bool, True for real prompts; ``class_names`` and
    ``prompts`` in class-index order. ``cache_path`` / ``cache_hit``: where the
    features are stored and whether they were read from there.
    """

    class_names: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]
    features: torch.Tensor
    mask: torch.Tensor
    cache_path: Optional[str] = None
    cache_hit: bool = False

    def to(self, device) -> "ClassTextFeatures":
        return replace(self, features=self.features.to(device), mask=self.mask.to(device))


TEXT_FEATURE_SOURCES = ("encoder", "orthogonal", "words")  # what gives the class features (config: text.features)
# Whose text tower encodes the prompts (config: text.tower): the CLIP the model was built from (frozen: STDD,
# Open-VCLIP), or the one a checkpoint carries (fine-tuned with the video side: FROSTER, ViFi-CLIP).
TEXT_TOWERS = ("clip", "checkpoint")


def orthogonal_class_features(prompts: Mapping[str, Sequence[str]], dim: int) -> ClassTextFeatures:
    """One fixed unit vector per class, orthogonal to the other classes' (``dim >= K``); the prompts are not read.

    A stand-in for the features of a pretrained text tower, for models trained from random weights (the
    demo): a frozen *random* text tower maps every prompt to nearly the same direction, so the class features
    it gives are hard to tell apart. The vectors are a function of the class list only: each class name seeds
    a Gaussian vector (SHA-256 of the name), then they are orthonormalised in class order (QR), so a class
    list gives the same features in training, evaluation and prediction. ``features (K, 1, E)``, all real.
    """
    names = list(prompts)
    if not names:
        raise ValueError("orthogonal class features: expected at least one class")
    if len(names) > dim:
        raise ValueError(f"orthogonal class features: {len(names)} classes need a feature width >= {len(names)}, "
                         f"the model's is {dim}")
    columns = []
    for name in names:
        seed = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
        columns.append(torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    basis, triangle = torch.linalg.qr(torch.stack(columns, dim=1))  # (E, K): orthonormal columns
    basis = basis * torch.sign(torch.diagonal(triangle))  # the sign QR leaves open, fixed: each stays near its draw
    features = basis.T.to(torch.float32).unsqueeze(1).contiguous()
    return TextEncoder._result(prompts, features, torch.ones(len(names), 1, dtype=torch.bool), None, cache_hit=False)


def _word_vector(word: str, dim: int) -> torch.Tensor:
    """A fixed unit vector of ``word`` (a Gaussian draw seeded by its SHA-256), float64."""
    seed = int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:8], "little")
    vector = torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return vector / vector.norm()


def word_class_features(prompts: Mapping[str, Sequence[str]], dim: int) -> ClassTextFeatures:
    """Class features in which classes share what their prompts share: each prompt is the normalised mean
    of one fixed random unit vector per word (seeded by the word, so a word means the same in every class
    list; words are the lower-case runs of letters and digits). ``features (K, N_max, E)``, padded prompts
    masked.

    A stand-in for a pretrained text tower for models trained from random weights, like the orthogonal
    features, but with structure: "horizontal decreasing" and "vertical decreasing" share a direction, so
    a model can score classes it was not trained on from words it was trained on (the synthetic
    base-to-novel benchmark, bench/b2n_synthetic.py). Word vectors are random, not orthogonal: in E
    dimensions two of them have a cosine of about ``1/sqrt(E)``.
    """
    names = list(prompts)
    if not names:
        raise ValueError("word class features: expected at least one class")
    rows = []
    for name in names:
        sentences = list(prompts[name])
        if not sentences:
            raise ValueError(f"word class features: class {name!r} has no prompt")
        features = []
        for sentence in sentences:
            words = re.findall(r"[a-z0-9]+", sentence.lower())
            if not words:
                raise ValueError(f"word class features: prompt {sentence!r} of class {name!r} has no word")
            mean = torch.stack([_word_vector(word, dim) for word in words]).mean(0)
            features.append(mean / mean.norm())
        rows.append(torch.stack(features))
    width = max(len(row) for row in rows)
    features = torch.zeros(len(names), width, dim, dtype=torch.float32)
    mask = torch.zeros(len(names), width, dtype=torch.bool)
    for index, row in enumerate(rows):
        features[index, : len(row)] = row.to(torch.float32)
        mask[index, : len(row)] = True
    return TextEncoder._result(prompts, features, mask, None, cache_hit=False)


class TextEncoder(nn.Module):
    """The frozen open_clip text tower (eval mode, no grad) with a prompt-feature cache.

    Build with :meth:`from_pretrained` or from a loaded CLIP model and its
    :class:`~stdd.model.clip_loading.ClipSource`; the CLIP model's image tower
    is dropped (``clip_model.visual = None``) so this module holds text weights only.
    """

    def __init__(self, clip_model: nn.Module, source: ClipSource, *, tokenizer=None, batch_size: int = 256):
        super().__init__()
        if not hasattr(clip_model, "encode_text"):
            raise ValueError(f"clip_model must be an open_clip CLIP model, got {type(clip_model).__name__}")
        if not isinstance(source, ClipSource):
            raise ValueError(f"source must be a ClipSource (from load_clip), got {type(source).__name__}")
        if getattr(clip_model, "visual", None) is not None:
            clip_model.visual = None  # the text side never needs it; the video encoder owns its own
        self.clip = clip_model
        self.clip.requires_grad_(False)
        self.clip.eval()
        self.source = source
        self.tokenizer = tokenizer if tokenizer is not None else open_clip.get_tokenizer(source.model_name)
        self.context_length = int(getattr(self.tokenizer, "context_length", 0) or 0)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        pretrained: Optional[str],
        *,
        allow_random_init: bool = False,
        device="cpu",
        precision: str = "fp32",
        cache_dir: Optional[str] = None,
        batch_size: int = 256,
    ) -> "TextEncoder":
        clip_model, source = load_clip(
            model_name, pretrained, allow_random_init=allow_random_init, device=device,
            precision=precision, cache_dir=cache_dir,
        )
        return cls(clip_model, source, batch_size=batch_size)

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(False)  # frozen: always eval

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    @property
    def output_dim(self) -> int:
        """``E``, the width of the features (read off one encoded sentence: any tower, any projection)."""
        return int(self.encode(["a"]).shape[1])

    @torch.no_grad()
    def encode(self, sentences: Sequence[str]) -> torch.Tensor:
        """Unit-norm features ``(len(sentences), E)``, float32 on the CPU."""
        if isinstance(sentences, str):
            raise ValueError("sentences must be a list of strings, not one string")
        outputs = []
        for start in range(0, len(sentences), self.batch_size):
            tokens = self.tokenizer(list(sentences[start:start + self.batch_size])).to(self.device)
            outputs.append(self.clip.encode_text(tokens, normalize=True).float().cpu())
        if not outputs:
            raise ValueError("sentences is empty")
        return torch.cat(outputs, dim=0)

    def cache_key(self, prompts: Mapping[str, Sequence[str]]) -> str:
        """SHA-256 over the model, its weights, the context length and every prompt (in order)."""
        material = {
            "format": CACHE_FORMAT,
            "model_name": self.source.model_name,
            "weights_id": self.source.weights_id,
            "context_length": self.context_length,
            "classes": [[name, list(sentences)] for name, sentences in prompts.items()],
        }
        return hashlib.sha256(json.dumps(material, ensure_ascii=False).encode("utf-8")).hexdigest()

    def class_features(
        self, prompts: Mapping[str, Sequence[str]], cache_dir: Optional[Union[str, os.PathLike]] = None
    ) -> ClassTextFeatures:
        """Features ``(K, N_max, E)`` + mask for ``{class: [sentences]}`` (order = class index).

        With ``cache_dir``: reuse ``<cache_dir>/text-<model>-<key>.pt`` when its key
        matches, else compute and store it atomically. An unreadable cache file
        is recomputed (and overwritten) with a warning.
        """
        prompts = check_prompts(prompts)
        key = self.cache_key(prompts)
        path = None
        if cache_dir is not None:
            safe_model = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.source.model_name)
            path = Path(cache_dir) / f"text-{safe_model}-{key[:32]}.pt"
            if path.is_file():
                try:
                    stored = load_torch_file(path, "text-feature cache")  # CRCs checked: a changed byte recomputes
                    if stored.get("key") == key:
                        return self._result(prompts, stored["features"], stored["mask"], path, cache_hit=True)
                    logger.warning("text-feature cache %s holds another key; recomputing", path)
                except Exception as error:  # a truncated/corrupt file: recompute
                    logger.warning("text-feature cache %s is unreadable (%s); recomputing", path, error)
        counts = [len(sentences) for sentences in prompts.values()]
        flat = [sentence for sentences in prompts.values() for sentence in sentences]
        encoded = self.encode(flat)  # (sum of counts, E)
        classes, longest, dim = len(counts), max(counts), encoded.shape[1]
        features = torch.zeros(classes, longest, dim)
        mask = torch.zeros(classes, longest, dtype=torch.bool)
        for index, chunk in enumerate(torch.split(encoded, counts)):
            features[index, : len(chunk)] = chunk
            mask[index, : len(chunk)] = True
        if path is not None:
            buffer = io.BytesIO()
            torch.save({"key": key, "features": features, "mask": mask, "class_names": list(prompts),
                        "model_name": self.source.model_name, "weights_id": self.source.weights_id}, buffer)
            atomic_write(path, buffer.getvalue())
        return self._result(prompts, features, mask, path, cache_hit=False)

    @staticmethod
    def _result(prompts, features, mask, path, cache_hit) -> ClassTextFeatures:
        return ClassTextFeatures(
            class_names=tuple(prompts),
            prompts=tuple(tuple(s) for s in prompts.values()),
            features=features,
            mask=mask,
            cache_path=None if path is None else str(path),
            cache_hit=cache_hit,
        )
