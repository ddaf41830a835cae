"""Official splits in a run: training reads the train half of split ``data.split``, validation its test half.

Real HMDB51 / UCF101 split files and real tiny videos (every listed video exists, so a wrong half would
be read without complaint: the tests compare the exact videos).
"""

import logging
from pathlib import Path

import pytest

pytest.importorskip("omegaconf")
pytest.importorskip("open_clip")
pytest.importorskip("av")

from coded_video import index_coded_frames, write_video

from stdd.engine.config import ConfigError, load_config
from stdd.engine.task import TrainingTask, build_video_dataset, data_spec

CLASSES = ["brush_hair", "cartwheel"]
# class -> split -> [(video, id)]: id 1 train, 2 test, 0 unused; the three splits differ
HMDB_SPLITS = {
    "brush_hair": {1: [("bh_a.avi", 1), ("bh_b.avi", 1), ("bh_c.avi", 2), ("bh_d.avi", 0)],
                   2: [("bh_a.avi", 2), ("bh_b.avi", 1), ("bh_c.avi", 1), ("bh_d.avi", 1)]},
    "cartwheel": {1: [("cw_a.avi", 1), ("cw_b.avi", 2), ("cw_c.avi", 2), ("cw_d.avi", 1)],
                  2: [("cw_a.avi", 1), ("cw_b.avi", 1), ("cw_c.avi", 2), ("cw_d.avi", 0)]},
}


@pytest.fixture(scope="module")
def hmdb51(tmp_path_factory):
    """``(split directory, video root)``: the official file names and line format, one real 16-frame video each."""
    base = tmp_path_factory.mktemp("hmdb51")
    splits, videos = base / "testTrainMulti_7030_splits", base / "videos"
    splits.mkdir()
    frames = index_coded_frames(16)
    for name, per_split in HMDB_SPLITS.items():
        (videos / name).mkdir(parents=True)
        for split, lines in per_split.items():
            (splits / f"{name}_test_split{split}.txt").write_text("".join(f"{video} {i} \n" for video, i in lines))
        for video, _ in per_split[1]:
            write_video(videos / name / video, frames, encoder="mpeg4", options={"qscale": "2"})
    return splits, videos


def hmdb_config(hmdb51, tmp_path, *extra):
    splits, videos = hmdb51
    return load_config("demo", ["data.dataset=hmdb51", f"data.root={videos}", f"data.train_annotations={splits}",
                                f"data.val_annotations={splits}", f"data.class_names=[{','.join(CLASSES)}]",
                                "data.on_missing=fail", "data.num_frames=4", "data.stride=2", "text.prompts=templates",
                                f"run.output_dir={tmp_path / 'run'}", *extra])


def expected(split, wanted_id, videos):
    return sorted((videos / name / video, label) for label, name in enumerate(CLASSES)
                  for video, i in HMDB_SPLITS[name][split] if i == wanted_id)


def records_of(dataset):
    return sorted((record.path, record.label) for record in dataset.records)


def test_hmdb51_training_reads_the_train_videos_and_validation_the_test_videos(hmdb51, tmp_path):
    _, videos = hmdb51
    cfg = hmdb_config(hmdb51, tmp_path)
    task = TrainingTask(cfg)  # what the trainer builds
    assert records_of(task.train_dataset) == expected(1, 1, videos)
    item = task.train_dataset[0]  # a real clip of a train video
    assert not item["failures"] and item["video"].shape[0] == 4
    val = task.validation_dataset()  # what the trainer's evaluations read: built on the first one, then kept
    assert records_of(val) == expected(1, 2, videos) and task.validation_dataset() is val
    assert val[0]["video"].shape[:2] == (cfg.eval.n_temporal_views * cfg.eval.n_spatial_crops, 4)
    assert not set(records_of(task.train_dataset)) & set(records_of(val))


def test_a_run_without_validation_annotations_has_no_validation_split(hmdb51, tmp_path):
    task = TrainingTask(hmdb_config(hmdb51, tmp_path, "data.val_annotations=null"))
    assert task.val_spec is None and task.validation_dataset() is None


def test_hmdb51_split_is_a_config_key(hmdb51, tmp_path):
    _, videos = hmdb51
    cfg = hmdb_config(hmdb51, tmp_path, "data.split=2")
    assert records_of(build_video_dataset(cfg, data_spec(cfg, "train"), training=True)) == expected(2, 1, videos)
    assert records_of(build_video_dataset(cfg, data_spec(cfg, "val"), training=False)) == expected(2, 2, videos)
    three = hmdb_config(hmdb51, tmp_path, "data.split=3")  # a split, whose files are not here
    with pytest.raises(FileNotFoundError, match=r"no '<class>_test_split3\.txt' files"):
        build_video_dataset(three, data_spec(three, "train"), training=True)


@pytest.fixture(scope="module")
def ucf101(tmp_path_factory):
    """``(ucfTrainTestlist directory, video root)`` with splits 1 and 2; real videos."""
    base = tmp_path_factory.mktemp("ucf101")
    lists, videos = base / "ucfTrainTestlist", base / "UCF-101"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 Archery\n2 Fencing\n")
    frames = index_coded_frames(16)
    names = {1: ["g01", "g02", "g03"], 2: ["g02", "g03", "g01"]}  # groups: train, train, test
    for split, (train_a, train_b, test) in names.items():
        (lists / f"trainlist0{split}.txt").write_text(
            "".join(f"{c}/v_{c}_{g}_c01.avi {i + 1}\n" for i, c in enumerate(["Archery", "Fencing"]) for g in (train_a, train_b)))
        (lists / f"testlist0{split}.txt").write_text(
            "".join(f"{c}/v_{c}_{test}_c01.avi\n" for c in ["Archery", "Fencing"]))
    for c in ["Archery", "Fencing"]:
        (videos / c).mkdir(parents=True)
        for g in ("g01", "g02", "g03"):
            write_video(videos / c / f"v_{c}_{g}_c01.avi", frames, encoder="mpeg4", options={"qscale": "2"})
    return lists, videos


def ucf_overrides(ucf101, train, val, *extra):
    lists, videos = ucf101
    return ["data.dataset=ucf101", f"data.root={videos}", f"data.train_annotations={lists / train}",
            f"data.val_annotations={lists / val}", f"data.class_names={lists / 'classInd.txt'}", "data.on_missing=fail",
            *extra]


def test_ucf101_lists_must_be_the_train_and_test_lists_of_data_split(ucf101):
    cfg = load_config("demo", ucf_overrides(ucf101, "trainlist02.txt", "testlist02.txt", "data.split=2"))
    train = build_video_dataset(cfg, data_spec(cfg, "train"), training=True)
    assert sorted(r.path.name for r in train.records) == sorted(
        f"v_{c}_{g}_c01.avi" for c in ["Archery", "Fencing"] for g in ("g02", "g03"))
    with pytest.raises(ConfigError, match=r"data\.train_annotations=.*testlist01\.txt: a UCF101 test list, where "
                                          r"the train list \(trainlist01\.txt\) is read"):
        load_config("demo", ucf_overrides(ucf101, "testlist01.txt", "testlist01.txt"))
    with pytest.raises(ConfigError, match=r"data\.val_annotations=.*testlist02\.txt: a list of UCF101 split 2, "
                                          r"where split 1 is read .*\(data\.split=1\)"):
        load_config("demo", ucf_overrides(ucf101, "trainlist01.txt", "testlist02.txt"))
    with pytest.raises(ConfigError, match=r"data\.val_annotations=.*trainlist01\.txt: a UCF101 train list"):
        load_config("demo", ucf_overrides(ucf101, "trainlist01.txt", "trainlist01.txt"))


def test_ucf101_lists_named_otherwise_are_taken_as_given(ucf101, tmp_path):
    lists, _ = ucf101
    own = tmp_path / "my_train.txt"  # with the classInd.txt the reader looks for next to it
    own.write_text((lists / "testlist01.txt").read_text())
    (tmp_path / "classInd.txt").write_text((lists / "classInd.txt").read_text())
    cfg = load_config("demo", ucf_overrides(ucf101, own, "testlist01.txt"))
    assert len(build_video_dataset(cfg, data_spec(cfg, "train"), training=True).records) == 2


def test_duplicate_lines_are_kept_and_reported_once_per_file_at_start(tmp_path, caplog):
    pytest.importorskip("av")
    video = tmp_path / "clips" / "a.mp4"
    video.parent.mkdir()
    write_video(video, index_coded_frames(16))
    other = tmp_path / "clips" / "b.mp4"
    write_video(other, index_coded_frames(16, offset=3))
    listing = tmp_path / "train.txt"
    listing.write_text("clips/a.mp4 0\nclips/b.mp4 1\nclips/a.mp4 0\nclips/a.mp4 0\n")
    cfg = load_config("demo", ["data.dataset=list", f"data.root={tmp_path}", f"data.train_annotations={listing}",
                               "data.class_names=[x,y]"])
    with caplog.at_level(logging.WARNING, logger="stdd.data.annotations"):
        dataset = build_video_dataset(cfg, data_spec(cfg, "train"), training=True)
    assert len(dataset.records) == 4  # kept: weighting by repetition may be meant
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert str(listing) in warnings[0] and "2 duplicate lines" in warnings[0] and "a.mp4 x3" in warnings[0]
