"""Something-Something v2 as a dataset (its official JSON, <id>.webm videos, 174 classes), published list
files (gzipped, "#"-named videos, class folders) and split folders, on videos the tests encode."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

av = pytest.importorskip("av")

from stdd.data import ClipSampling, PyAVDecoder, build_dataloader
from stdd.data.annotations import (
    AnnotationError,
    VideoRecord,
    load_annotations,
    read_split_folder,
    read_ssv2_labels,
    read_video_list,
    resolve_split,
    resolve_videos,
    write_split_folder,
)
from stdd.data.synthetic import encode_video
from stdd.resources import class_names

from coded_video import index_coded_frames, read_codes

SSV2 = class_names("ssv2")
# (video id, template as the official files write it, its class)
ENTRIES = [
    ("78687", "Pushing [something] from left to right", "Pushing something from left to right"),
    ("42326", "Putting [something], [something] and [something] on the table",
     "Putting something, something and something on the table"),
    ("100", "Putting [number of] [something] onto [something]", "Putting number of something onto something"),
]


@pytest.fixture(scope="module")
def ssv2_videos(tmp_path_factory):
    """The official layout: <root>/<id>.webm (VP9), frame t of video i showing the number 10 * i + t."""
    root = tmp_path_factory.mktemp("ssv2") / "20bn-something-something-v2"
    root.mkdir()
    for position, (video_id, _, _) in enumerate(ENTRIES):
        encode_video(root / f"{video_id}.webm", index_coded_frames(12, offset=10 * position), fps=12, codec="vp9",
                     keyframe_interval=4)
    annotations = root.parent / "something-something-v2-validation.json"
    annotations.write_text(json.dumps([{"id": video_id, "label": "a sentence with the objects", "template": template,
                                        "placeholders": ["a cup"]} for video_id, template, _ in ENTRIES]))
    return root, annotations


def test_ssv2_official_json_gives_webm_paths_and_labels_by_template(ssv2_videos, tmp_path):
    root, annotations = ssv2_videos
    records, names = load_annotations(annotations, format="ssv2", root=root)
    assert names == SSV2
    assert records == [VideoRecord(root / f"{video_id}.webm", SSV2.index(name)) for video_id, _, name in ENTRIES]
    # the official labels file ({"name": "index"}) gives the same classes; a class list of one's own is followed
    labels = tmp_path / "something-something-v2-labels.json"
    labels.write_text(json.dumps({name: str(index) for index, name in enumerate(SSV2)}))
    assert read_ssv2_labels(labels) == SSV2
    assert load_annotations(annotations, format="ssv2", root=root, labels_file=labels)[0] == records
    own = [name for _, _, name in ENTRIES][::-1]
    assert [r.label for r in load_annotations(annotations, format="ssv2", root=root, class_names=own)[0]] == [2, 1, 0]
    # the test file has no template: unlabelled
    test_file = tmp_path / "something-something-v2-test.json"
    test_file.write_text(json.dumps([{"id": "1"}, {"id": 2}]))
    assert [r.label for r in load_annotations(test_file, format="ssv2", root=root)[0]] == [-1, -1]


def test_ssv2_videos_decode_through_the_loader(ssv2_videos):
    root, annotations = ssv2_videos
    records, _ = load_annotations(annotations, format="ssv2", root=root)
    decoder = PyAVDecoder()
    for position, record in enumerate(records):
        indices = np.array([0, 3, 7, 11])
        assert np.array_equal(read_codes(decoder.decode(record.path, indices).frames), indices + 10 * position)
    loader = build_dataloader(annotations, format="ssv2", root=root, training=False, batch_size=3, num_workers=0,
                              sampling=ClipSampling(clip_length=4, stride=3), crop_size=32)
    batches = list(loader)
    assert len(batches) == 1 and not batches[0]["failures"]
    assert batches[0]["video"].shape == (3, 1, 4, 3, 32, 32)
    assert batches[0]["label"].tolist() == [SSV2.index(name) for _, _, name in ENTRIES]


def test_ssv2_malformed_annotations_name_the_file_and_entry(ssv2_videos, tmp_path):
    root, _ = ssv2_videos
    cases = {
        "not_a_list.json": ({"id": "1"}, "expected a JSON list"),
        "no_id.json": ([{"id": "1", "template": "Holding [something]"}, {"template": "x"}], "entry 2: expected an object"),
        "unknown.json": ([{"id": "5", "template": "Juggling [something]"}], r"entry 1 \(id 5\): template 'Juggling "
                                                                            r"\[something\]' names no class"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_text(json.dumps(content))
        with pytest.raises(AnnotationError, match=rf"{name}: {message}"):
            load_annotations(path, format="ssv2", root=root)
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(AnnotationError, match=r"broken\.json: expected a JSON file"):
        load_annotations(broken, format="ssv2", root=root)
    with pytest.raises(ValueError, match="root: Something-Something v2 needs the video folder"):
        load_annotations(broken, format="ssv2")


def test_gzipped_lists_and_videos_in_class_folders(tmp_path):
    """The published lists name files alone; UCF101 / HMDB51 keep each class in a folder of its own."""
    listing = tmp_path / "val.txt.gz"
    listing.write_bytes(gzip.compress(b"v_YoYo_g01_c01.avi 1\nv_Archery_g01_c01.avi 0\nval/abc.mp4 2\nv_Gone.avi 1\n"))
    root = tmp_path / "videos"
    for relative in ("YoYo/v_YoYo_g01_c01.avi", "v_Archery_g01_c01.avi", "val/air_drumming/abc.mp4"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"\x00")
    classes = ["Archery", "YoYo", "air drumming"]
    records = read_video_list(listing, root, class_directories=classes)
    assert records == [VideoRecord(root / "YoYo/v_YoYo_g01_c01.avi", 1), VideoRecord(root / "v_Archery_g01_c01.avi", 0),
                       VideoRecord(root / "val/air_drumming/abc.mp4", 2), VideoRecord(root / "v_Gone.avi", 1)]
    assert load_annotations(listing, root=root, class_names=classes, class_directories=True)[0] == records
    kept, report = resolve_videos(records, on_missing="skip")
    assert len(kept) == 3 and report.missing == [root / "v_Gone.avi"]
    assert read_video_list(listing, root)[0].path == root / "v_YoYo_g01_c01.avi"  # without: as listed
    with pytest.raises(AnnotationError, match=r"val\.txt\.gz:3: label 2 out of range"):
        read_video_list(listing, root, class_directories=classes[:2])
    damaged = tmp_path / "damaged.txt.gz"
    damaged.write_bytes(gzip.compress(b"a.avi 0\n" * 50)[:30])
    with pytest.raises(AnnotationError, match=r"damaged\.txt\.gz: cannot be read as text"):
        read_video_list(damaged, root)


def test_split_folders_written_and_read_and_their_errors(tmp_path):
    split = write_split_folder(
        tmp_path / "split", protocol="base2novel", classes={"base": ["a", "b"], "novel": ["c"]}, train_key="seed",
        train_part="base", train={1: [("x.mp4", 0), ("y.mp4", 1)], 2: [("z.mp4", 1)]},
        val={"base": [("v.mp4", 1)], "novel": [("w.mp4", 0)]}, prompts={"a": ["an a"], "b": ["a b"], "c": ["a c"]})
    assert split.classes == {"base": ["a", "b"], "novel": ["c"]} and sorted(split.train) == [1, 2]
    assert split.records(split.train_list(2), "base", tmp_path) == [VideoRecord(tmp_path / "z.mp4", 1)]
    assert resolve_split(str(tmp_path / "split"), "base2novel").folder == split.folder and split.prompts.is_file()
    with pytest.raises(ValueError, match=r"seed=3: the base2novel split .* has no training list for it; its lists "
                                         r"have seed 1, 2"):
        split.train_list(3)
    with pytest.raises(ValueError, match=r"describes a base2novel split, not fewshot"):
        resolve_split(str(tmp_path / "split"), "fewshot")
    with pytest.raises(ValueError, match=r"--dataset 'hmdb': no published base2novel split for it; expected one of "
                                         r"hmdb51, k400, ssv2, ucf101 or a folder holding a split\.json"):
        resolve_split("hmdb", "base2novel", where="--dataset")
    description = json.loads((tmp_path / "split" / "split.json").read_text())
    for change, message in (({"protocol": "zero-shot"}, "protocol: expected one of base2novel, fewshot"),
                            ({"val": {"other": "base_val.txt"}}, r"val\.other: not one of its class lists"),
                            ({"train": {"key": "seed", "part": "base", "lists": {"1": "gone.txt"}}},
                             r"train\.lists\.1: names 'gone\.txt', which is not a file")):
        (tmp_path / "split" / "split.json").write_text(json.dumps({**description, **change}))
        with pytest.raises(AnnotationError, match=rf"split\.json: {message}"):
            read_split_folder(tmp_path / "split")
