"""Zero-shot evaluation protocols: which classes (and videos) each evaluation round uses.

- EP1 (Brattoli et al. 2020): a random half of the classes (UCF101: 50,
  HMDB51: 25), drawn 10 times with fixed seeds; each draw is evaluated on
  every given video of its classes; top-1/top-5 mean ± std over the draws.
- EP2: all classes, all given videos (one round).
- EP3 (X-CLIP, Ni et al. 2022): the three official test splits of UCF101 /
  HMDB51, all classes; mean ± std over the three.
- Kinetics-600: the 220 classes of K600 that are not in K400, three seeded
  draws of 160 of them (ER-ZSAR's protocol), or the splits of a file the user
  gives (``read_split_file``) to match published split lists exactly. The
  authors' STDD release draws from 232 classes instead (the 220 plus the 12
  K400 classes that K600 renamed): ``k600_splits(..., novel_names=...)``.

- Base-to-novel (ViFi-CLIP, Rasheed et al. 2023): a model trained on the published 16-shot list of a
  seed (base classes only) is scored on the base classes' validation videos against the base classes
  and on the novel classes' videos against the novel classes; per seed and over the three seeds,
  with the harmonic mean HM = 2BN / (B + N) (``stdd.engine.metrics.summarize_runs``).
- Few-shot: a model trained on the published K-shot list (K = 2, 4, 8, 16) is scored on the
  validation list, all classes.
  Both read published split folders (``stdd.data.annotations.SplitFolder``; the shipped ones in
  ``stdd/resources/splits/``); :func:`published_run_key` checks what a model was trained on.

"Seeded random" draws here are made by ranking each class by a SHA-256 hash
of ``"<seed>/<round>/<class name>"``: the same seed gives the same classes on
every machine, Python and NumPy version, and regardless of the order in which
the class list is written. (The published EP1/K600 draws of earlier papers
are not public lists; results are comparable in protocol, not split-for-split.)

Scores are computed once for all (video, class) pairs; each split then only
selects rows and columns (see ``stdd.engine.metrics``), so 10 draws cost no
more model time than one.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from ..data.annotations import SplitFolder

K600_NOVEL_CLASS_COUNT = 220
K600_SPLIT_SIZE = 160


@dataclass(frozen=True)
class ZeroShotSplit:
    """One evaluation round.

    ``class_indices``: positions in the evaluation dataset's class list, in the
    order the split's labels are numbered. ``sample_indices``: the videos of
    this round (positions in the dataset's sample list); ``None`` means every
    video whose label is one of ``class_indices``.
    """

    name: str
    class_indices: tuple[int, ...]
    sample_indices: Optional[tuple[int, ...]] = None

    def select_samples(self, labels: Sequence[int]) -> np.ndarray:
        """Sample positions of this round, keeping only videos of the split's classes."""
        labels = np.asarray(labels)
        allowed = np.zeros(int(max(labels.max(initial=-1), max(self.class_indices, default=-1))) + 1, bool)
        allowed[list(self.class_indices)] = True
        candidates = np.arange(len(labels)) if self.sample_indices is None else np.asarray(self.sample_indices)
        return candidates[allowed[labels[candidates]]]

    def to_json(self, class_names: Optional[Sequence[str]] = None) -> dict:
        data = {"name": self.name, "class_indices": list(self.class_indices)}
        if class_names is not None:
            data["classes"] = [class_names[i] for i in self.class_indices]
        if self.sample_indices is not None:
            data["num_samples"] = len(self.sample_indices)
        return data


def normalize_class_name(name: str) -> str:
    """Compare class names across datasets: case, ``_``/spaces, quotes and repeated blanks ignored."""
    text = name.strip().lower().replace("_", " ").replace('"', "").replace("'", "")
    return re.sub(r"\s+", " ", text)


def _ranked_by_hash(names: Sequence[str], seed: int, round_index: int) -> list[int]:
    def key(position: int) -> str:
        text = f"{seed}/{round_index}/{normalize_class_name(names[position])}"
        return hashlib.sha256(text.encode()).hexdigest()

    return sorted(range(len(names)), key=key)


def ep1_splits(class_names: Sequence[str], *, draws: int = 10, seed: int = 0, fraction: float = 0.5) -> list[ZeroShotSplit]:
    """``draws`` seeded draws of ``floor(fraction * K)`` classes (UCF101: 50, HMDB51: 25)."""
    if draws <= 0:
        raise ValueError(f"ep1_splits: draws must be positive, got {draws}")
    if not 0 < fraction <= 1:
        raise ValueError(f"ep1_splits: fraction must be in (0, 1], got {fraction}")
    count = int(len(class_names) * fraction)
    if count < 1:
        raise ValueError(f"ep1_splits: {len(class_names)} classes x fraction {fraction} selects no class")
    return [
        ZeroShotSplit(f"ep1-draw{draw:02d}", tuple(sorted(_ranked_by_hash(class_names, seed, draw)[:count])))
        for draw in range(draws)
    ]


def ep2_splits(class_names: Sequence[str]) -> list[ZeroShotSplit]:
    return [ZeroShotSplit("ep2-all", tuple(range(len(class_names))))]


def ep3_splits(class_names: Sequence[str], test_sample_indices: Sequence[Sequence[int]]) -> list[ZeroShotSplit]:
    """One round per official test list (``test_sample_indices[i]``: samples of split i+1)."""
    if not test_sample_indices:
        raise ValueError("ep3_splits: no official test splits given")
    everything = tuple(range(len(class_names)))
    return [
        ZeroShotSplit(f"ep3-split{number}", everything, tuple(int(i) for i in samples))
        for number, samples in enumerate(test_sample_indices, start=1)
    ]


def k600_novel_class_indices(
    k600_names: Sequence[str],
    k400_names: Sequence[str],
    *,
    renamed: Optional[Mapping[str, str]] = None,
    expected: Optional[int] = K600_NOVEL_CLASS_COUNT,
) -> list[int]:
    """Positions in ``k600_names`` of the classes that are not K400 classes.

    ``renamed``: K400 name -> K600 name for the K400 classes Kinetics-600 only
    renamed (``stdd.resources.K400_RENAMED_IN_K600``); those are seen classes.
    With the official lists this leaves 220 classes; ``expected`` checks it so
    a renamed or misspelt class cannot silently leak a training class into the
    zero-shot set (pass ``expected=None`` to skip the check).
    """
    seen = {normalize_class_name(name) for name in k400_names}
    for old, new in (renamed or {}).items():
        if normalize_class_name(old) in seen:
            seen.add(normalize_class_name(new))
    novel = [i for i, name in enumerate(k600_names) if normalize_class_name(name) not in seen]
    if expected is not None and len(novel) != expected:
        raise ValueError(
            f"K600 novel classes: found {len(novel)} K600 classes not in K400, expected {expected} "
            f"(check that both class lists are the official ones)"
        )
    return novel


def class_indices(class_names: Sequence[str], wanted: Sequence[str], where: str) -> list[int]:
    """Positions in ``class_names`` of the names ``wanted`` (matched with ``normalize_class_name``), sorted.

    A name that is not in ``class_names`` is a ``ValueError`` naming ``where`` and the names.
    """
    lookup = {normalize_class_name(name): i for i, name in enumerate(class_names)}
    missing = [name for name in wanted if normalize_class_name(name) not in lookup]
    if missing:
        raise ValueError(f"{where}: {len(missing)} of its {len(wanted)} classes are not in the evaluated "
                         f"class list, e.g. {missing[:5]}")
    return sorted({lookup[normalize_class_name(name)] for name in wanted})


def k600_splits(
    k600_names: Sequence[str],
    k400_names: Optional[Sequence[str]] = None,
    *,
    num_splits: int = 3,
    split_size: int = K600_SPLIT_SIZE,
    seed: int = 0,
    renamed: Optional[Mapping[str, str]] = None,
    expected_novel: Optional[int] = K600_NOVEL_CLASS_COUNT,
    novel_names: Optional[Sequence[str]] = None,
) -> list[ZeroShotSplit]:
    """``num_splits`` seeded draws of ``split_size`` of the K600 classes new to K400.

    The candidates are ``k600_names`` minus ``k400_names`` and its ``renamed`` classes
    (:func:`k600_novel_class_indices`, 220), or, given ``novel_names``, exactly those
    classes (e.g. the authors' release's 232, ``stdd.resources.class_names("k600_new_release")``).
    """
    if novel_names is not None:
        novel = class_indices(k600_names, novel_names, "the K600 novel class list")
    elif k400_names is None:
        raise ValueError("k600_splits: give the K400 class names (k400_names) or the novel classes (novel_names)")
    else:
        novel = k600_novel_class_indices(k600_names, k400_names, renamed=renamed, expected=expected_novel)
    if split_size > len(novel):
        raise ValueError(f"k600_splits: split_size {split_size} > {len(novel)} novel classes")
    novel_names = [k600_names[i] for i in novel]
    return [
        ZeroShotSplit(
            f"k600-split{number + 1}",
            tuple(sorted(novel[j] for j in _ranked_by_hash(novel_names, seed, number)[:split_size])),
        )
        for number in range(num_splits)
    ]


def read_split_file(path: Union[str, Path], class_names: Sequence[str]) -> list[ZeroShotSplit]:
    """Splits from a user file, classes by name (matched with ``normalize_class_name``).

    Formats: JSON — a list of lists of class names, or ``{"split name": [names]}``;
    text — one class name per line, splits separated by blank lines or by
    ``[name]`` header lines, ``#`` comments ignored.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"split file {path}: cannot be read ({error})") from error
    lookup = {normalize_class_name(name): i for i, name in enumerate(class_names)}
    named_blocks: list[tuple[str, list[tuple[str, str]]]] = []  # (split name, [(class, where)])
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"split file {path}: invalid JSON ({error})") from error
        items = data.items() if isinstance(data, dict) else ((f"split{i + 1}", v) for i, v in enumerate(data))
        for name, names in items:
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"split file {path}: split {name!r} must be a list of class names")
            named_blocks.append((str(name), [(n, f"{path}: split {name!r}") for n in names]))
    else:
        current: Optional[list] = None
        for line_number, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            header = re.fullmatch(r"\[(.+)\]", line)
            if header or not line:
                current = None
                if header:
                    current = []
                    named_blocks.append((header.group(1).strip(), current))
                continue
            if current is None:
                current = []
                named_blocks.append((f"split{len(named_blocks) + 1}", current))
            current.append((line, f"{path}:{line_number}"))
    splits = []
    for name, entries in named_blocks:
        if not entries:
            continue
        indices = []
        for class_name, where in entries:
            index = lookup.get(normalize_class_name(class_name))
            if index is None:
                raise ValueError(f"split file {where}: class {class_name!r} is not in the dataset's class list")
            indices.append(index)
        if len(set(indices)) != len(indices):
            raise ValueError(f"split file {path}: split {name!r} lists a class twice")
        splits.append(ZeroShotSplit(name, tuple(sorted(indices))))
    if not splits:
        raise ValueError(f"split file {path}: no splits found")
    return splits


# ----------------------------------------------------------------------------- published split lists


def _same_split(first: SplitFolder, second: SplitFolder) -> bool:
    return first.protocol == second.protocol and first.folder.resolve() == second.folder.resolve()


def published_run_key(protocol: str, split: SplitFolder, trained: Optional[tuple[SplitFolder, int]], *,
                      shots: Optional[int] = None, source: str = "--checkpoint") -> Optional[int]:
    """Whether a model may be scored on ``split`` by ``protocol``, given the published split it was trained
    on: returns the seed (base2novel) or shot count (fewshot) of its training list, or None when it was not
    trained on a published split (``trained`` None: e.g. plain CLIP, or a model of one's own lists).

    Refused with a ``ValueError`` naming ``source``:

    - base2novel: a model trained on a few-shot list (it holds the novel classes too, so its novel
      accuracy would not be zero-shot), or on the base classes of another split;
    - fewshot: a model trained on a base-to-novel list or on another split, or (``shots`` given) with
      another shot count.
    """
    if trained is None:
        return None
    trained_split, key = trained
    if protocol == "base2novel" and trained_split.protocol == "fewshot":
        raise ValueError(f"{source}: trained on the {key}-shot list of {trained_split.describe()}, which holds the "
                         f"novel classes too: its novel accuracy would not be zero-shot")
    if not _same_split(trained_split, split):
        raise ValueError(f"{source}: trained on {trained_split.describe()} (its {trained_split.train_key} {key}), "
                         f"scored on {split.describe()}: give a model trained on this split")
    if protocol == "fewshot" and shots is not None and key != shots:
        raise ValueError(f"{source}: trained on the {key}-shot list, scored as --shots {shots}")
    return key
