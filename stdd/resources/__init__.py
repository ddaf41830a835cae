"""Shipped data: class lists of the benchmark datasets and the ASKG graphs/prompts.

`class_names(dataset)` returns the official class names in the official order
(the order class indices refer to); `display_name(dataset, name)` is the plain
text form used in prompts ("ApplyEyeMakeup" -> "apply eye makeup");
`prompt_name(dataset, name, form)` is the name a prompt mentions in one of
`CLASS_NAME_FORMS`.

Sources of the lists (see classes/README.md): UCF101 classInd.txt, HMDB51's 51
directory names, the Kinetics-400 / Kinetics-600 label csvs (as shipped by
ActionCLIP / X-CLIP style `kinetics_*_labels.csv` files and mmaction2's
label maps). `k600_new` is the Kinetics-600 classes that are new relative to
Kinetics-400 (the K600 zero-shot benchmark), i.e. K600 minus K400 minus the
K400 classes that Kinetics-600 only renamed (`K400_RENAMED_IN_K600`).
`k600_new_release` is the open-set list of the authors' STDD release: the 232
K600 names not spelled as in K400, i.e. `k600_new` plus those 12 renames.
`ssv2` is Something-Something v2's 174 action templates, alphabetical.

`splits/` holds the published base-to-novel and few-shot split lists (one folder
per protocol and dataset, described by its `split.json`; see splits/README.md):
`split_dir(protocol, dataset)` finds one, `published_datasets(protocol)` lists them.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

RESOURCES_DIR = Path(__file__).resolve().parent
CLASSES_DIR = RESOURCES_DIR / "classes"
ASKG_DIR = RESOURCES_DIR / "askg"
SPLITS_DIR = RESOURCES_DIR / "splits"

# Expected number of classes per shipped list; a list with another count is a
# corrupted install or a bad edit and must fail loudly, not shift class indices.
CLASS_COUNTS = {"ucf101": 101, "hmdb51": 51, "k400": 400, "k600": 600, "k600_new": 220,
                "k600_new_release": 232, "ssv2": 174}
DATASETS = tuple(CLASS_COUNTS)
# The candidate lists of the Kinetics-600 zero-shot protocol: the usual 220 (default) and the release's 232.
K600_NOVEL_LISTS = ("k600_new", "k600_new_release")
# The protocols whose published split lists ship in splits/<protocol>/<dataset>/ (one folder each).
SPLIT_PROTOCOLS = ("base2novel", "fewshot")
# The sets whose ASKG graphs and prompts ship in askg/ (Kinetics-600 as k400 + its 220 new classes).
ASKG_SETS = ("ucf101", "hmdb51", "k400", "k600_new")

# Kinetics-600 renamed (or narrowed with a "(not ...)" qualifier) these K400
# classes; the K600 name covers the same videos, so it is not a class unseen by
# a K400-trained model. "The short note about Kinetics-600" (Carreira et al.
# 2018) says 368 K400 classes are unchanged and the other 32 were renamed,
# split or removed; the 12 below are the renames/narrowings, which leaves the
# 220 K600-only classes of the usual zero-shot protocol (Chen & Huang 2021).
# The public ER-ZSAR class index file was not readable here, so this table is a
# reconstruction from the two label lists: K600 has 232 names not spelled as in
# K400, and these 12 are the ones that denote a K400 class.
K400_RENAMED_IN_K600 = {
    "baby waking up": "waking up",
    "balloon blowing": "inflating balloons",
    "changing wheel": "changing wheel (not on bike)",
    "cooking sausages": "cooking sausages (not on barbeque)",
    "dying hair": "dyeing hair",
    "garbage collecting": "person collecting garbage",
    "hugging": "hugging (not baby)",
    "making bed": "making the bed",
    "opening bottle": "opening bottle (not wine)",
    # Same class; the K600 label csv writes "american" in lower case here.
    "passing American football (not in game)": "passing american football (not in game)",
    "throwing ball": "throwing ball (not baseball or American football)",
    "tying tie": "tying necktie",
}


def _check_dataset(dataset: str) -> str:
    if not isinstance(dataset, str) or dataset.lower() not in CLASS_COUNTS:
        raise ValueError(f"dataset={dataset!r}: expected one of {', '.join(DATASETS)}")
    return dataset.lower()


@functools.lru_cache(maxsize=None)
def _load_class_names(dataset: str) -> tuple[str, ...]:
    path = CLASSES_DIR / f"{dataset}.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"class list {path} is missing (broken install?)") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    expected = CLASS_COUNTS[dataset]
    if len(names) != expected:
        raise ValueError(f"class list {path}: {len(names)} names, expected {expected}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"class list {path}: duplicated names {duplicates}")
    return tuple(names)


def class_names(dataset: str) -> list[str]:
    """Official class names of `dataset` (ucf101|hmdb51|k400|k600|k600_new|k600_new_release), in index order."""
    return list(_load_class_names(_check_dataset(dataset)))


# "ApplyEyeMakeup" -> apply|eye|makeup; "YoYo" -> yo|yo; "HTMLParser" -> html|parser;
# digit runs stay words of their own ("Top10Moves" -> top|10|moves).
_CAMEL_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def display_name(dataset: str, class_name: str) -> str:
    """The class name as plain lower-case words, the form prompts must mention.

    UCF101: CamelCase split into words ("ApplyEyeMakeup" -> "apply eye makeup",
    "YoYo" -> "yo yo"); HMDB51: underscores to spaces ("brush_hair" -> "brush
    hair"); Something-Something v2: lower case ("Pushing something from left to
    right" -> "pushing something from left to right"); Kinetics: unchanged. Any
    other dataset name (a user's own class file) gets the Kinetics rule: the
    name as written, whitespace collapsed.
    """
    if not isinstance(class_name, str) or not class_name.strip():
        raise ValueError(f"class_name={class_name!r}: expected a non-empty string")
    key = dataset.lower() if isinstance(dataset, str) else dataset
    if key == "ucf101":
        if not re.fullmatch(r"[A-Za-z0-9]+", class_name):
            raise ValueError(f"class_name={class_name!r}: not a CamelCase UCF101 name (letters/digits only)")
        return " ".join(w.lower() for w in _CAMEL_WORD.findall(class_name))
    if key == "hmdb51":
        return " ".join(class_name.replace("_", " ").split())
    if key == "ssv2":
        return " ".join(class_name.lower().split())
    return " ".join(class_name.split())


# How prompts name a class (config: text.class_name_form): "words" (display_name: plain lower-case words,
# as stdd, Open-VCLIP and FROSTER write them) or "listed" (as the class list writes it, underscores read as
# spaces: ViFi-CLIP's label files, e.g. "ApplyEyeMakeup", "brush hair").
CLASS_NAME_FORMS = ("words", "listed")


def prompt_name(dataset, class_name: str, form: str = "words") -> str:
    """The name prompts give ``class_name`` in ``form`` (one of :data:`CLASS_NAME_FORMS`).

    ``words``: :func:`display_name` for a known ``dataset``, else the name with its whitespace
    collapsed; ``listed``: the name as listed with underscores read as spaces, whitespace collapsed.
    """
    if form not in CLASS_NAME_FORMS:
        raise ValueError(f"class name form {form!r}: expected one of {', '.join(CLASS_NAME_FORMS)}")
    if form == "listed":
        return " ".join(class_name.replace("_", " ").split())
    return display_name(dataset, class_name) if dataset else " ".join(class_name.split())


def askg_path(dataset: str) -> Path:
    """Path of the shipped ASKG file of one of ``ASKG_SETS`` (ucf101|hmdb51|k400|k600_new)."""
    dataset = _check_dataset(dataset)
    if dataset == "k600":
        raise ValueError("dataset='k600': ASKG graphs ship as k400 + k600_new (the 220 new classes)")
    return ASKG_DIR / f"{dataset}.json"


def _check_protocol(protocol: str) -> str:
    if protocol not in SPLIT_PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: expected one of {', '.join(SPLIT_PROTOCOLS)}")
    return protocol


def published_datasets(protocol: str) -> tuple[str, ...]:
    """The datasets whose published ``protocol`` split ships here (a folder with a ``split.json``), sorted."""
    folder = SPLITS_DIR / _check_protocol(protocol)
    return tuple(sorted(p.parent.name for p in folder.glob("*/split.json")))


def split_dir(protocol: str, dataset: str) -> Path:
    """The folder of the published ``protocol`` split of ``dataset`` (``ValueError`` naming what exists)."""
    available = published_datasets(protocol)
    if not isinstance(dataset, str) or dataset.lower() not in available:
        raise ValueError(f"dataset={dataset!r}: no published {protocol} split lists for it; expected one of "
                         f"{', '.join(available)}")
    return SPLITS_DIR / protocol / dataset.lower()


__all__ = [
    "ASKG_DIR", "ASKG_SETS", "CLASSES_DIR", "CLASS_COUNTS", "DATASETS", "K400_RENAMED_IN_K600", "K600_NOVEL_LISTS",
    "SPLITS_DIR", "SPLIT_PROTOCOLS", "askg_path", "class_names", "display_name", "published_datasets", "split_dir",
]
