"""Annotation formats: parsing, and errors that name file:line and what was expected."""

from pathlib import Path

import pytest

from stdd.data.annotations import (
    AnnotationError,
    VideoRecord,
    load_annotations,
    read_class_names,
    resolve_class_names,
    read_csv_list,
    read_hmdb51_split,
    read_kinetics_csv,
    read_ucf101_split,
    read_video_list,
    resolve_videos,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_video_list_paths_with_spaces_comments_and_root(tmp_path):
    listing = write(tmp_path / "train.txt", "# comment\nclips/a b.mp4 3\n\n  clips/c.mp4\t0  \n")
    records = read_video_list(listing)
    assert records == [VideoRecord(tmp_path / "clips/a b.mp4", 3), VideoRecord(tmp_path / "clips/c.mp4", 0)]
    assert read_video_list(listing, root="/data")[0].path == Path("/data/clips/a b.mp4")


@pytest.mark.parametrize(
    "line, expected",
    [("clips/a.mp4", "expected '<relative/path> <integer label>'"), ("clips/a.mp4 walk", "expected .*integer label.*got .clips/a.mp4 walk."),
     ("clips/a.mp4 7", "label 7 out of range, expected in \\[0, 4\\]")],
)
def test_video_list_errors_name_file_and_line(tmp_path, line, expected):
    listing = write(tmp_path / "list.txt", f"ok.mp4 1\n# comment\n{line}\n")
    with pytest.raises(AnnotationError, match=rf"list\.txt:3: {expected}") as caught:
        read_video_list(listing, num_classes=5)
    assert caught.value.line_number == 3 and caught.value.file == str(listing)


def test_csv_list_header_names_and_errors(tmp_path):
    table = write(tmp_path / "a.csv", "path,label\nx/1.mp4,2\n\"x/with,comma.mp4\",walk\n")
    records = read_csv_list(table, class_names=["run", "jump", "sit", "walk"])
    assert [record.label for record in records] == [2, 3]
    assert records[1].path == tmp_path / "x/with,comma.mp4"
    with pytest.raises(AnnotationError, match=r"a\.csv:3: expected an integer label"):
        read_csv_list(table)
    bad = write(tmp_path / "b.csv", "x.mp4,1\ny.mp4,1,extra\n")
    with pytest.raises(AnnotationError, match=r"b\.csv:2: expected 2 columns"):
        read_csv_list(bad)
    unknown = write(tmp_path / "c.csv", "x.mp4,fly\n")
    with pytest.raises(AnnotationError, match=r"c\.csv:1: unknown class name 'fly'"):
        read_csv_list(unknown, class_names=["walk"])


def test_class_name_files(tmp_path):
    assert read_class_names(write(tmp_path / "plain.txt", "walk\nrun\n")) == ["walk", "run"]
    assert read_class_names(write(tmp_path / "ind.txt", "1 ApplyEyeMakeup\n2 ApplyLipstick\n")) == ["ApplyEyeMakeup", "ApplyLipstick"]
    with pytest.raises(AnnotationError, match=r"gap\.txt:2: expected class id 2"):
        read_class_names(write(tmp_path / "gap.txt", "1 A\n3 B\n"))
    with pytest.raises(AnnotationError, match=r"dup\.txt:3: duplicate class name 'a'"):
        read_class_names(write(tmp_path / "dup.txt", "a\nb\na\n"))
    with pytest.raises(AnnotationError, match="empty"):
        read_class_names(write(tmp_path / "empty.txt", "\n"))


def test_one_class_list_reader_for_names_files_and_lists(tmp_path):
    from stdd.resources import class_names

    assert resolve_class_names("UCF101") == class_names("ucf101")
    assert resolve_class_names(["walk", "run"]) == ["walk", "run"]
    ind = write(tmp_path / "classInd.txt", "1 ApplyEyeMakeup\r\n2 ApplyLipstick\r\n")
    assert resolve_class_names(str(ind)) == ["ApplyEyeMakeup", "ApplyLipstick"]
    with pytest.raises(ValueError, match=r"--classes 'nope.txt': neither a shipped list"):
        resolve_class_names("nope.txt", where="--classes")
    with pytest.raises(ValueError, match="duplicated"):
        resolve_class_names(["a", "a"])
    with pytest.raises(ValueError, match="no class list"):
        resolve_class_names(None)


def test_askg_build_reads_a_classind_file_without_its_ids(tmp_path):
    """The ASKG CLI read classInd.txt lines as names ('1 ApplyEyeMakeup'); it now uses the one reader."""
    from stdd.askg.builder import resolve_classes

    ind = write(tmp_path / "classInd.txt", "1 ApplyEyeMakeup\n2 ApplyLipstick\n3 Archery\n")
    assert resolve_classes(str(ind)) == ("classInd", ["ApplyEyeMakeup", "ApplyLipstick", "Archery"])
    assert resolve_classes("hmdb51")[0] == "hmdb51" and len(resolve_classes("hmdb51")[1]) == 51


def test_ucf101_official_layout(tmp_path):
    # the official files' format: classInd "1 ApplyEyeMakeup", trainlist "Class/v_X.avi 1", testlist "Class/v_X.avi"
    split_dir = tmp_path / "ucfTrainTestlist"
    write(split_dir / "classInd.txt", "1 ApplyEyeMakeup\r\n2 ApplyLipstick\r\n3 Archery\r\n")
    write(split_dir / "trainlist01.txt", "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\nArchery/v_Archery_g08_c01.avi 3\r\n")
    write(split_dir / "testlist01.txt", "ApplyLipstick/v_ApplyLipstick_g01_c01.avi\r\nArchery/v_Archery_g01_c01.avi\r\n")
    test_records, names = read_ucf101_split(split_dir / "testlist01.txt", split_dir / "classInd.txt", tmp_path / "UCF-101")
    assert names == ["ApplyEyeMakeup", "ApplyLipstick", "Archery"]
    assert test_records == [
        VideoRecord(tmp_path / "UCF-101/ApplyLipstick/v_ApplyLipstick_g01_c01.avi", 1),
        VideoRecord(tmp_path / "UCF-101/Archery/v_Archery_g01_c01.avi", 2),
    ]
    train_records, _ = load_annotations(split_dir / "trainlist01.txt", format="ucf101", root=tmp_path / "UCF-101")
    assert [record.label for record in train_records] == [0, 2]
    write(split_dir / "trainlist02.txt", "Archery/v_Archery_g08_c01.avi 2\n")
    with pytest.raises(AnnotationError, match=r"trainlist02\.txt:1: label 2 \(1-based\) disagrees with class directory 'Archery'"):
        read_ucf101_split(split_dir / "trainlist02.txt", split_dir / "classInd.txt", tmp_path)
    write(split_dir / "testlist03.txt", "Archery/v_1.avi\nFencing/v_Fencing_g01_c01.avi\n")
    with pytest.raises(AnnotationError, match=r"testlist03\.txt:2: class directory 'Fencing' is not in"):
        read_ucf101_split(split_dir / "testlist03.txt", split_dir / "classInd.txt", tmp_path)


def test_hmdb51_official_split_files(tmp_path):
    splits = tmp_path / "testTrainMulti_7030_splits"
    write(splits / "brush_hair_test_split1.txt", "Blonde_brush_hair_0.avi 1 \nBrushing_hair_1.avi 2 \nx_2.avi 0 \n")
    write(splits / "cartwheel_test_split1.txt", "c_0.avi 2 \nc_1.avi 1 \n")
    write(splits / "cartwheel_test_split2.txt", "c_0.avi 1 \n")
    test_records, names = read_hmdb51_split(splits, tmp_path / "hmdb51", split=1, subset="test")
    assert names == ["brush_hair", "cartwheel"]
    assert test_records == [
        VideoRecord(tmp_path / "hmdb51/brush_hair/Brushing_hair_1.avi", 0),
        VideoRecord(tmp_path / "hmdb51/cartwheel/c_0.avi", 1),
    ]
    train_records, _ = load_annotations(splits, format="hmdb51", root=tmp_path / "hmdb51", split=1, subset="train")
    assert [record.path.name for record in train_records] == ["Blonde_brush_hair_0.avi", "c_1.avi"]
    write(splits / "cartwheel_test_split3.txt", "c_0.avi 3\n")
    write(splits / "brush_hair_test_split3.txt", "a.avi 1\n")
    with pytest.raises(AnnotationError, match=r"cartwheel_test_split3\.txt:1: expected '<video>\.avi <0\|1\|2>'"):
        read_hmdb51_split(splits, tmp_path, split=3, subset="train")
    with pytest.raises(FileNotFoundError, match="no split file brush_hair_test_split2"):
        read_hmdb51_split(splits, tmp_path, split=2, subset="test", class_names=["brush_hair", "cartwheel"])


def test_kinetics_csv(tmp_path):
    table = write(
        tmp_path / "val.csv",
        "label,youtube_id,time_start,time_end,split\n"
        "abseiling,0wR5jVB-WPk,417,427,val\n"
        "air drumming,--nQbRBEz2s,104,114,val\n",
    )
    records, names = read_kinetics_csv(table, tmp_path / "k400")
    assert names == ["abseiling", "air drumming"]
    assert records[0] == VideoRecord(tmp_path / "k400/0wR5jVB-WPk_000417_000427.mp4", 0)
    nested, _ = load_annotations(table, format="kinetics", root=tmp_path, path_template="{split}/{label}/{youtube_id}.mp4")
    assert nested[1].path == tmp_path / "val/air drumming/--nQbRBEz2s.mp4" and nested[1].label == 1
    broken = write(tmp_path / "broken.csv", "label,youtube_id,time_start,time_end,split\nabseiling,x,abc,10,val\n")
    with pytest.raises(AnnotationError, match=r"broken\.csv:2: expected integer time_start/time_end"):
        read_kinetics_csv(broken, tmp_path)
    with pytest.raises(AnnotationError, match=r"nohdr\.csv:1: expected a header"):
        read_kinetics_csv(write(tmp_path / "nohdr.csv", "abseiling,x,1,2,val\n"), tmp_path)
    with pytest.raises(AnnotationError, match=r"val\.csv:3: label 'air drumming' is not in class_names"):
        read_kinetics_csv(table, tmp_path, class_names=["abseiling"])


def test_missing_videos_fail_or_skip_with_count(tmp_path, caplog):
    present = write(tmp_path / "here.mp4", "x")
    records = [VideoRecord(present, 0), VideoRecord(tmp_path / "gone1.mp4", 1), VideoRecord(tmp_path / "gone2.mp4", 1)]
    with pytest.raises(FileNotFoundError, match=r"list\.txt: 1/3 videos found, 2 missing \(first: .*gone1\.mp4"):
        resolve_videos(records, on_missing="fail", source="list.txt")
    kept, report = resolve_videos(records, on_missing="skip", source="list.txt")
    assert kept == records[:1] and report.found == 1 and len(report.missing) == 2
    assert "2 missing" in caplog.text
    with pytest.raises(ValueError, match="on_missing"):
        resolve_videos(records, on_missing="ignore")


def test_load_annotations_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="format: expected one of"):
        load_annotations(write(tmp_path / "a.txt", "a.mp4 0\n"), format="json")
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        load_annotations(tmp_path / "absent.txt")


def test_official_splits_always_say_which_half_is_read(tmp_path):
    splits = tmp_path / "splits"
    write(splits / "cartwheel_test_split1.txt", "c_0.avi 1\nc_1.avi 2\n")
    with pytest.raises(ValueError, match=r"give split and subset"):
        load_annotations(splits, format="hmdb51", root=tmp_path)  # no default that could read the test videos
    with pytest.raises(ValueError, match=r"give subset"):
        load_annotations(splits, format="hmdb51", root=tmp_path, split=1)
    with pytest.raises(ValueError, match=r"subset: expected one of train, test, got 'val'"):
        load_annotations(splits, format="hmdb51", root=tmp_path, split=1, subset="val")
    with pytest.raises(ValueError, match=r"split: expected one of 1, 2, 3, got 4"):
        read_hmdb51_split(splits, tmp_path, split=4, subset="train")
    train, _ = load_annotations(splits, format="hmdb51", root=tmp_path, split=1, subset="train")
    assert [record.path.name for record in train] == ["c_0.avi"]


def test_ucf101_lists_are_checked_against_the_split_and_subset_asked_for(tmp_path):
    split_dir = tmp_path / "ucfTrainTestlist"
    write(split_dir / "classInd.txt", "1 Archery\n")
    write(split_dir / "trainlist02.txt", "Archery/v_Archery_g01_c01.avi 1\n")
    write(split_dir / "testlist02.txt", "Archery/v_Archery_g02_c01.avi\n")
    train, _ = load_annotations(split_dir / "trainlist02.txt", format="ucf101", root=tmp_path, split=2, subset="train")
    assert [record.path.name for record in train] == ["v_Archery_g01_c01.avi"]
    with pytest.raises(ValueError, match=r"testlist02\.txt: a UCF101 test list, where the train list"):
        load_annotations(split_dir / "testlist02.txt", format="ucf101", root=tmp_path, split=2, subset="train")
    with pytest.raises(ValueError, match=r"trainlist02\.txt: a list of UCF101 split 2, where split 1 is read"):
        load_annotations(split_dir / "trainlist02.txt", format="ucf101", root=tmp_path, split=1, subset="train")
    # without split and subset (stdd.eval's explicit files) a list is read as it is
    assert len(load_annotations(split_dir / "testlist02.txt", format="ucf101", root=tmp_path)[0]) == 1


def test_duplicate_lines_are_kept_with_one_warning_naming_the_file_and_count(tmp_path, caplog):
    listing = write(tmp_path / "train.txt", "a.mp4 0\nb.mp4 1\na.mp4 0\na.mp4 1\n")
    with caplog.at_level("WARNING", logger="stdd.data.annotations"):
        records = read_video_list(listing)
    assert len(records) == 4  # kept as listed
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and str(listing) in messages[0] and "1 duplicate line " in messages[0]
    caplog.clear()
    splits = tmp_path / "splits"
    repeated = write(splits / "cartwheel_test_split1.txt", "c_0.avi 1\nc_0.avi 1\nc_0.avi 1\nc_1.avi 2\nc_1.avi 2\n")
    write(splits / "brush_hair_test_split1.txt", "b_0.avi 1\nb_1.avi 2\n")
    with caplog.at_level("WARNING", logger="stdd.data.annotations"):
        train, _ = read_hmdb51_split(splits, tmp_path, split=1, subset="train")
    assert [record.path.name for record in train] == ["b_0.avi", "c_0.avi", "c_0.avi", "c_0.avi"]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and str(repeated) in messages[0] and "2 duplicate lines" in messages[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="stdd.data.annotations"):
        read_video_list(write(tmp_path / "clean.txt", "a.mp4 0\nb.mp4 0\n"))
    assert not caplog.records


def test_a_video_named_with_a_leading_hash_is_an_entry_not_a_comment(tmp_path):
    """HMDB51 names videos "#437_How_To_Ride_A_Bike_...avi"; "# text" is still a comment."""
    name = "#437_How_To_Ride_A_Bike_ride_bike_f_cm_np1_ba_med_1.avi"
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\n#\n{name} 5\nother.avi 1\n")
    assert read_video_list(listing, root=tmp_path) == [VideoRecord(tmp_path / name, 5),
                                                       VideoRecord(tmp_path / "other.avi", 1)]
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "ride_bike_test_split1.txt").write_text(f"{name} 2 \nplain_ride_bike_u_nm_np1_fr_med_0.avi 1 \n")
    records, _ = read_hmdb51_split(splits, tmp_path / "videos", split=1, subset="test")
    assert records == [VideoRecord(tmp_path / "videos" / "ride_bike" / name, 0)]
    table = write(tmp_path / "list.csv", f"# a comment\n{name},1\n")
    assert read_csv_list(table) == [VideoRecord(tmp_path / name, 1)]
