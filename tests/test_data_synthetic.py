"""Synthetic motion videos: real files, deterministic, class visible in motion but not in one frame."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

from stdd.data.annotations import read_class_names, read_video_list
from stdd.data.synthetic import (
    CLASS_NAMES,
    draw_motion_sample,
    generate_synthetic_dataset,
    render_motion_frames,
)

SIZE, FRAMES = 32, 12


def decode_all(path):
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def motion_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("motion")
    dataset = generate_synthetic_dataset(
        root, videos_per_class=24, val_videos_per_class=0, num_frames=FRAMES, height=SIZE, width=SIZE, seed=3
    )
    records = read_video_list(dataset.train_annotation)
    videos = np.stack([decode_all(record.path) for record in records]).astype(np.float32)  # (N, T, H, W, 3)
    labels = np.array([record.label for record in records])
    return dataset, videos, labels


def test_files_annotation_classes_and_prompts(motion_set):
    dataset, videos, labels = motion_set
    assert read_class_names(dataset.classes_file) == list(CLASS_NAMES)
    prompts = json.loads(dataset.prompts_file.read_text())
    assert list(prompts) == list(CLASS_NAMES)
    assert all(len(sentences) >= 3 and all(isinstance(s, str) and s for s in sentences) for sentences in prompts.values())
    assert dataset.prompts_file.parent == dataset.train_annotation.parent
    assert videos.shape == (24 * len(CLASS_NAMES), FRAMES, SIZE, SIZE, 3)
    assert np.bincount(labels).tolist() == [24] * len(CLASS_NAMES)
    with av.open(str(read_video_list(dataset.train_annotation)[0].path)) as container:
        assert container.streams.video[0].codec_context.name == "h264"


def leave_one_out_nearest_neighbour_accuracy(features, labels):
    features = features.reshape(len(features), -1)
    squared = (features**2).sum(1)
    distances = squared[:, None] + squared[None, :] - 2 * features @ features.T
    np.fill_diagonal(distances, np.inf)
    return float((labels[distances.argmin(1)] == labels).mean())


def test_one_frame_does_not_reveal_the_class(motion_set):
    _, videos, labels = motion_set
    # 8 classes: chance is 0.125. A nearest-neighbour classifier on the pixels of the first (or the
    # middle) frame stays near chance (0.13 / 0.17 for this seed); the class is in the motion, which the
    # next tests read from two frames.
    first = leave_one_out_nearest_neighbour_accuracy(videos[:, 0], labels)
    middle = leave_one_out_nearest_neighbour_accuracy(videos[:, FRAMES // 2], labels)
    assert first < 0.25 and middle < 0.25, (first, middle)


def horizontal_vertical_shift(first, later, max_shift=SIZE // 2):
    """Best circular (dy, dx) moving `first` onto `later` (the set's translations wrap around)."""
    best, best_error = (0, 0), np.inf
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            error = np.abs(np.roll(first, (dy, dx), axis=(0, 1)) - later).mean()
            if error < best_error:
                best, best_error = (dy, dx), error
    return best


def test_translation_direction_is_recovered_from_two_frames(motion_set):
    _, videos, labels = motion_set
    expected = {0: (0, -1), 1: (0, 1), 2: (-1, 0), 3: (1, 0)}  # left, right, up, down as (sign dy, sign dx)
    correct = total = 0
    for video, label in zip(videos, labels):
        if label in expected:
            dy, dx = horizontal_vertical_shift(video[0], video[FRAMES // 2])
            correct += (np.sign(dy), np.sign(dx)) == expected[label]
            total += 1
    assert correct / total >= 0.95, correct / total


def foreground_area(frame):
    background = np.median(frame.reshape(-1, 3), axis=0)  # the shape covers well under half the frame
    return int((np.abs(frame - background).max(-1) > 40).sum())


def test_growing_and_shrinking_are_recovered_from_two_frames(motion_set):
    _, videos, labels = motion_set
    growing, shrinking = CLASS_NAMES.index("growing"), CLASS_NAMES.index("shrinking")
    for video, label in zip(videos, labels):
        if label in (growing, shrinking):
            ratio = foreground_area(video[-1]) / max(foreground_area(video[0]), 1)
            assert (ratio > 1.5) if label == growing else (ratio < 1 / 1.5), (label, ratio)


def test_renderer_first_frame_is_class_blind_and_motion_differs():
    rng = np.random.default_rng(11)
    for _ in range(5):
        sample = draw_motion_sample(rng)
        clips = {name: render_motion_frames(name, sample, num_frames=6, height=32, width=32) for name in CLASS_NAMES}
        firsts = [clip[0] for clip in clips.values()]
        assert all(np.array_equal(firsts[0], first) for first in firsts)
        lasts = [clip[-1].astype(int) for clip in clips.values()]
        for i in range(len(lasts)):
            for j in range(i + 1, len(lasts)):
                assert np.abs(lasts[i] - lasts[j]).sum() > 0, (CLASS_NAMES[i], CLASS_NAMES[j])


def test_rotation_direction_on_screen():
    # An arrow pointing up (angle 0) turned a quarter clockwise points right.
    sample = draw_motion_sample(np.random.default_rng(0))
    sample = type(sample)(**{**sample.__dict__, "shape": "arrow", "angle_degrees": 0.0, "turn_degrees": 90.0,
                             "center_x": 0.5, "center_y": 0.5, "size": 0.35,
                             "foreground_rgb": (255, 255, 255), "background_rgb": (0, 0, 0)})
    last = render_motion_frames("rotating clockwise", sample, num_frames=2, height=64, width=64)[-1, :, :, 0] > 128
    columns = np.nonzero(last)[1]
    # the arrow head is wider than the shaft: more lit pixels right of centre than left
    assert (columns > 36).sum() > (columns < 28).sum()


def test_deterministic_reused_and_resumed(tmp_path):
    options = dict(videos_per_class=1, val_videos_per_class=1, classes=["moving left", "growing"], num_frames=6,
                   height=32, width=32, seed=5)
    first = generate_synthetic_dataset(tmp_path / "a", **options)
    # the same bytes from another process: x264's default CPU-dependent choices and the containers'
    # random IDs once made them differ between processes, though never within one
    subprocess.run(
        [sys.executable, "-c", "import sys; from stdd.data.synthetic import generate_synthetic_dataset as g; "
         f"g(sys.argv[1], **{options!r})", str(tmp_path / "b")],
        check=True, cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    second_root = tmp_path / "b"
    files = sorted(path.relative_to(first.root) for path in first.root.rglob("*.mp4"))
    assert len(files) == 4
    assert all(digest(first.root / name) == digest(second_root / name) for name in files)
    assert (first.root / "train.txt").read_text() == (second_root / "train.txt").read_text()
    other = generate_synthetic_dataset(tmp_path / "c", **{**options, "seed": 6})
    assert digest(first.root / files[0]) != digest(other.root / files[0])
    # a finished dataset is reused as it is; a deleted video is regenerated identically
    video = first.root / files[0]
    modified = video.stat().st_mtime_ns
    generate_synthetic_dataset(tmp_path / "a", **options)
    assert video.stat().st_mtime_ns == modified
    expected = digest(video)
    video.unlink()
    generate_synthetic_dataset(tmp_path / "a", **options)
    assert digest(video) == expected
    # a subset of classes reproduces the same videos as the full set (seeded by class name)
    full = generate_synthetic_dataset(tmp_path / "full", **{**options, "classes": None})
    assert digest(full.root / "videos/train/growing/0000.mp4") == digest(first.root / "videos/train/growing/0000.mp4")


def test_vp9_on_request_and_argument_errors(tmp_path):
    dataset = generate_synthetic_dataset(tmp_path, videos_per_class=1, val_videos_per_class=0, classes=["shrinking"],
                                         num_frames=4, height=32, width=32, codec="vp9")
    path = read_video_list(dataset.train_annotation)[0].path
    assert path.suffix == ".webm"
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "vp9"
    assert decode_all(path).shape == (4, 32, 32, 3)
    again = generate_synthetic_dataset(tmp_path / "again", videos_per_class=1, val_videos_per_class=0, classes=["shrinking"],
                                       num_frames=4, height=32, width=32, codec="vp9")
    assert digest(read_video_list(again.train_annotation)[0].path) == digest(path)
    with pytest.raises(ValueError, match="codec"):
        generate_synthetic_dataset(tmp_path, codec="av1")
    with pytest.raises(ValueError, match="classes"):
        generate_synthetic_dataset(tmp_path, classes=["dancing"])
    with pytest.raises(ValueError, match="even"):
        generate_synthetic_dataset(tmp_path, height=33)


def test_command_line_writes_the_dataset(tmp_path, capsys):
    from stdd.data.synthetic import main

    main([str(tmp_path / "cli"), "--videos-per-class", "1", "--val-videos-per-class", "0", "--num-frames", "4",
          "--size", "32", "--codec", "vp9"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["classes"] == list(CLASS_NAMES)
    records = read_video_list(printed["annotations"]["train"])
    assert len(records) == len(CLASS_NAMES) and all(record.path.suffix == ".webm" for record in records)
