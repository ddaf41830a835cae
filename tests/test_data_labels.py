"""Labels mean the class the text side scores: class orders reconciled by name, labels range-checked."""

from pathlib import Path

import pytest

pytest.importorskip("omegaconf")

from stdd.data import AnnotationError, load_annotations
from stdd.engine.config import load_config
from stdd.engine.task import build_video_dataset, data_spec

INDEX_ORDER = ["ApplyEyeMakeup", "ApplyLipstick", "Archery"]
CONFIG_ORDER = ["Archery", "ApplyEyeMakeup", "ApplyLipstick"]


def ucf101_layout(tmp_path: Path) -> Path:
    """classInd.txt in the official order, a trainlist with one video per class (files exist, empty)."""
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    (split_dir / "classInd.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(INDEX_ORDER)))
    lines = []
    for i, name in enumerate(INDEX_ORDER):
        video = tmp_path / "UCF-101" / name / f"v_{name}_g01_c01.avi"
        video.parent.mkdir(parents=True)
        video.write_bytes(b"")
        lines.append(f"{name}/{video.name} {i + 1}\n")
    (split_dir / "trainlist01.txt").write_text("".join(lines))
    return split_dir


def test_ucf101_labels_follow_the_given_class_list_by_name(tmp_path):
    split_dir = ucf101_layout(tmp_path)
    records, names = load_annotations(split_dir / "trainlist01.txt", format="ucf101", root=tmp_path / "UCF-101",
                                      class_names=CONFIG_ORDER)
    assert names == CONFIG_ORDER
    assert {r.path.parent.name: names[r.label] for r in records} == {n: n for n in INDEX_ORDER}
    with pytest.raises(AnnotationError, match=r"classInd\.txt: 1 of its classes are not in the given class list"):
        load_annotations(split_dir / "trainlist01.txt", format="ucf101", root=tmp_path / "UCF-101",
                         class_names=CONFIG_ORDER[:2])


def test_training_on_ucf101_with_another_class_order_trains_each_video_on_its_own_class(tmp_path):
    split_dir = ucf101_layout(tmp_path)
    class_file = tmp_path / "classes.txt"
    class_file.write_text("\n".join(CONFIG_ORDER) + "\n")
    cfg = load_config("demo", ["data.dataset=ucf101", f"data.root={tmp_path / 'UCF-101'}",
                               f"data.train_annotations={split_dir / 'trainlist01.txt'}",
                               f"data.class_names={class_file}"])
    spec = data_spec(cfg, "train")
    dataset = build_video_dataset(cfg, spec, training=True)
    assert len(dataset.records) == 3
    for record in dataset.records:  # the text features are spec.class_names[label]
        assert spec.class_names[record.label] == record.path.parent.name


def test_list_labels_out_of_range_name_the_file_and_line(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    listing = tmp_path / "train.txt"
    listing.write_text("a.mp4 0\na.mp4 3\n")
    cfg = load_config("demo", ["data.dataset=list", f"data.root={tmp_path}", f"data.train_annotations={listing}",
                               "data.class_names=[x,y,z]"])
    with pytest.raises(AnnotationError, match=r"train\.txt:2: label 3 out of range, expected in \[0, 2\]"):
        build_video_dataset(cfg, data_spec(cfg, "train"), training=True)
