"""Shipped class lists: counts, spelling anchors, the K600-new derivation, display names."""

from __future__ import annotations

import pytest

from stdd import resources
from stdd.resources import CLASS_COUNTS, K400_RENAMED_IN_K600, class_names, display_name


@pytest.mark.parametrize("dataset, count", sorted(CLASS_COUNTS.items()))
def test_counts_and_uniqueness(dataset, count):
    names = class_names(dataset)
    assert len(names) == count == len(set(names))
    assert all(n == n.strip() and n for n in names)


def test_official_order_anchors():
    ucf = class_names("ucf101")
    assert ucf[0] == "ApplyEyeMakeup" and ucf[-1] == "YoYo" and ucf.index("Haircut") == 33
    hmdb = class_names("hmdb51")
    assert hmdb[0] == "brush_hair" and hmdb[-1] == "wave" and "flic_flac" in hmdb
    k400 = class_names("k400")
    assert k400[0] == "abseiling" and k400[-1] == "zumba" and k400 == sorted(k400)
    assert "passing American football (not in game)" in k400 and "skiing (not slalom or crosscountry)" in k400
    k600 = class_names("k600")
    assert k600[0] == "abseiling" and k600[-1] == "zumba"
    assert k600 == sorted(k600, key=str.lower)


def test_k600_new_is_k600_minus_k400_minus_renames():
    k400, k600, new = set(class_names("k400")), class_names("k600"), class_names("k600_new")
    assert all(old in k400 for old in K400_RENAMED_IN_K600)
    assert all(renamed in k600 for renamed in K400_RENAMED_IN_K600.values())
    unseen_by_spelling = [n for n in k600 if n not in k400]
    assert len(unseen_by_spelling) == 232
    expected = [n for n in unseen_by_spelling if n not in set(K400_RENAMED_IN_K600.values())]
    assert new == expected and len(new) == 220
    assert not set(new) & k400
    # 368 K400 classes are unchanged in K600 (Carreira et al. 2018).
    assert len(k400 & set(k600)) == 368


def test_display_names():
    assert display_name("ucf101", "ApplyEyeMakeup") == "apply eye makeup"
    assert display_name("ucf101", "YoYo") == "yo yo"
    assert display_name("ucf101", "PlayingDhol") == "playing dhol"
    assert display_name("ucf101", "Skijet") == "skijet"
    assert display_name("UCF101", "Top10Moves") == "top 10 moves"
    assert display_name("hmdb51", "brush_hair") == "brush hair"
    assert display_name("hmdb51", "flic_flac") == "flic flac"
    assert display_name("k400", "abseiling") == "abseiling"
    assert display_name("k600_new", "backflip (human)") == "backflip (human)"
    assert display_name("my_list", "  Jumping   Rope ") == "Jumping Rope"
    for name in class_names("ucf101"):
        words = display_name("ucf101", name).split()
        assert "".join(words) == name.lower()
    with pytest.raises(ValueError, match="class_name"):
        display_name("k400", " ")
    with pytest.raises(ValueError, match="CamelCase"):
        display_name("ucf101", "apply_eye makeup!")


def test_bad_dataset_and_corrupted_list(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="dataset='kinetics'"):
        class_names("kinetics")
    (tmp_path / "hmdb51.txt").write_text("brush_hair\ncartwheel\n")
    monkeypatch.setattr(resources, "CLASSES_DIR", tmp_path)
    resources._load_class_names.cache_clear()
    try:
        with pytest.raises(ValueError, match="2 names, expected 51"):
            class_names("hmdb51")
    finally:
        resources._load_class_names.cache_clear()


# The 12 names the authors' release adds to the 220 (as its list writes them).
RELEASE_RENAMES = [
    "changing wheel (not on bike)", "cooking sausages (not on barbeque)", "dyeing hair", "hugging (not baby)",
    "inflating balloons", "making the bed", "opening bottle (not wine)", "passing american football (not in game)",
    "person collecting garbage", "throwing ball (not baseball or american football)", "tying necktie", "waking up",
]


def test_k600_new_release_is_the_220_plus_the_12_k400_renames():
    k400, k600, new = set(class_names("k400")), class_names("k600"), class_names("k600_new")
    release = class_names("k600_new_release")
    assert release == [n for n in k600 if n not in k400]  # every K600 name not spelled as in K400, K600 order
    assert len(release) == 232 and set(new) < set(release)
    added = [n for n in release if n not in set(new)]
    assert set(added) == set(K400_RENAMED_IN_K600.values())
    # 11 of the release's names are spelled exactly so in k600.txt; "throwing ball (not baseball or
    # American football)" differs in case only (the K600 label csv capitalises it there)
    assert [n for n in RELEASE_RENAMES if n not in k600] == ["throwing ball (not baseball or american football)"]
    assert sorted(n.lower() for n in RELEASE_RENAMES) == sorted(n.lower() for n in added)
    assert resources.K600_NOVEL_LISTS == ("k600_new", "k600_new_release")
