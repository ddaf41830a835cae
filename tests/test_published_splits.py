"""The shipped published split lists (stdd/resources/splits): provenance, counts, labels, classes.

Every list is read whole with the reader training and evaluation use, and checked against what the
published files hold (stdd/resources/splits/README.md).
"""

from __future__ import annotations

import collections
import gzip
import hashlib
import re

import pytest

from stdd.data.annotations import SPLIT_FILE, read_video_list, resolve_split
from stdd.resources import SPLIT_PROTOCOLS, class_names, display_name, published_datasets, split_dir

# dataset: (base classes, novel classes, lines of each seed's training list, base_val lines, novel_val lines)
BASE2NOVEL = {"k400": (200, 200, 3200, 9944, 9933), "hmdb51": (26, 25, 416, 780, 750),
              "ucf101": (51, 50, 816, 2088, 1695), "ssv2": (87, 87, 1392, 17562, 7215)}
# dataset: (classes, validation lines); the K-shot list has K lines per class
FEWSHOT = {"hmdb51": (51, 1530), "ucf101": (101, 3783), "ssv2": (174, 24777)}
SHOTS = (2, 4, 8, 16)
SEEDS = (1, 2, 3)


def entries(path):
    """(relative path, label) per line, read by the list reader (no root: paths stay as written)."""
    return [(str(record.path), record.label) for record in read_video_list(path, root="")]


def test_the_shipped_splits_are_the_published_ones():
    assert published_datasets("base2novel") == tuple(sorted(BASE2NOVEL))
    assert published_datasets("fewshot") == tuple(sorted(FEWSHOT))  # no Kinetics-400 few-shot list was published
    for protocol in SPLIT_PROTOCOLS:
        for dataset in published_datasets(protocol):
            split = resolve_split(dataset, protocol)
            assert split.dataset == dataset and (split.folder / SPLIT_FILE).is_file()
            lists = [*split.train.values(), *split.val.values()]
            assert sorted(path.name for path in lists) == sorted(split.files)
            for path in lists:  # byte for byte the published file (its SHA-256 recorded when it was copied)
                text = gzip.decompress(path.read_bytes())
                assert hashlib.sha256(text).hexdigest() == split.files[path.name]["sha256"], path
                assert len(entries(path)) == split.files[path.name]["lines"] == len(text.splitlines()), path


@pytest.mark.parametrize("dataset", sorted(BASE2NOVEL))
def test_base_to_novel_lists(dataset):
    base_count, novel_count, train_lines, base_lines, novel_lines = BASE2NOVEL[dataset]
    split = resolve_split(dataset, "base2novel")
    base, novel = split.classes["base"], split.classes["novel"]
    assert (len(base), len(novel)) == (base_count, novel_count)
    assert not set(base) & set(novel) and sorted(base + novel) == sorted(class_names(dataset))
    assert split.train_key == "seed" and split.train_part == "base" and sorted(split.train) == list(SEEDS)
    validation = {}
    for part, lines in (("base", base_lines), ("novel", novel_lines)):
        listed = entries(split.val[part])
        assert len(listed) == lines and len({path for path, _ in listed}) == lines
        assert {label for _, label in listed} == set(range(len(split.classes[part])))  # every class, in range
        validation.update(listed)
    for seed in SEEDS:
        listed = entries(split.train_list(seed))
        assert len(listed) == train_lines == 16 * base_count and len({path for path, _ in listed}) == train_lines
        assert collections.Counter(label for _, label in listed) == {label: 16 for label in range(base_count)}
        assert not {path for path, _ in listed} & set(validation)  # no training video is scored


@pytest.mark.parametrize("dataset", sorted(FEWSHOT))
def test_few_shot_lists(dataset):
    count, val_lines = FEWSHOT[dataset]
    split = resolve_split(dataset, "fewshot")
    assert split.classes == {"all": class_names(dataset)} and len(split.classes["all"]) == count
    assert split.train_key == "shots" and sorted(split.train) == list(SHOTS)
    validation = entries(split.val["all"])
    assert len(validation) == val_lines == len({path for path, _ in validation})
    assert {label for _, label in validation} == set(range(count))
    for shots in SHOTS:
        listed = entries(split.train_list(shots))
        assert len(listed) == shots * count == len({path for path, _ in listed})
        assert collections.Counter(label for _, label in listed) == {label: shots for label in range(count)}
        assert not {path for path, _ in listed} & {path for path, _ in validation}


# HMDB51 file names: "<title>_<class>_<body part>_<camera motion>_np<people>_<view>_<quality>_<n>.avi"
_HMDB_TAGS = r"_[fhlub]_(?:cm|nm)_np\d+_(?:fr|ba|le|ri)_(?:goo|med|bad)_\d+\.avi"


def _named_class(dataset, file_name):
    """The class a UCF101 / HMDB51 file name carries (HMDB51: the longest class whose name ends the title)."""
    if dataset == "ucf101":
        return re.fullmatch(r"v_(\w+?)_g\d+_c\d+\.avi", file_name).group(1).lower()
    found = [name for name in class_names("hmdb51")
             if re.search(rf"(^|_){re.escape(name)}{_HMDB_TAGS}$", file_name)]
    return max(found, key=len) if found else None


@pytest.mark.parametrize("dataset", ["ucf101", "hmdb51"])
def test_every_label_is_the_class_its_video_file_names(dataset):
    """UCF101 and HMDB51 file names say their class: every line of every list agrees with its label, so the
    class lists (HMDB51: with the two pairs the published label files swap put right) name what the videos show."""
    checked = 0
    for protocol in SPLIT_PROTOCOLS:
        split = resolve_split(dataset, protocol)
        lists = [(path, split.train_part) for path in split.train.values()] + [(p, part) for part, p in split.val.items()]
        for path, part in lists:
            names = split.classes[part]
            for file_name, label in entries(path):
                expected = names[label].lower()
                named = _named_class(dataset, file_name)
                if dataset == "ucf101" and named == "handstandpushups":  # UCF101's file names spell it HandStand
                    named = expected if expected == "handstandpushups" else named
                assert named == expected, f"{path.name}: {file_name} labelled {names[label]!r}"
                checked += 1
    assert checked > 5000
    hmdb = class_names("hmdb51")
    assert dataset != "hmdb51" or (hmdb.index("kick"), hmdb.index("kick_ball"), hmdb.index("sword"),
                                   hmdb.index("sword_exercise")) == (20, 21, 44, 45)


def test_ssv2_class_list_and_split_folders_of_the_resources():
    ssv2 = class_names("ssv2")
    assert len(ssv2) == 174 and ssv2 == sorted(ssv2)
    assert ssv2[0] == "Approaching something with your camera" and ssv2[-1] == "Wiping something off of something"
    assert display_name("ssv2", "Pushing something from left to right") == "pushing something from left to right"
    assert split_dir("base2novel", "HMDB51").name == "hmdb51"
    with pytest.raises(ValueError, match=r"dataset='k400': no published fewshot split lists for it; expected one "
                                         r"of hmdb51, ssv2, ucf101"):
        split_dir("fewshot", "k400")
