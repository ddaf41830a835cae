"""PyAV decoding with seeking, the DataLoader (2 workers, seeding, sharding), and bad files."""

import logging
import os
import socket
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

av = pytest.importorskip("av")

from stdd.data import ClipSampling, PyAVDecoder, VideoDecodeError, build_dataloader
from stdd.data.annotations import read_video_list
from stdd.data.synthetic import encode_video, generate_synthetic_dataset

from coded_video import index_coded_frames, read_codes, write_video


@pytest.fixture(scope="module")
def coded_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("coded")
    frames = index_coded_frames(200)
    paths = {"h264": root / "coded.mp4", "vp9": root / "coded.webm"}
    for codec, path in paths.items():
        # a keyframe every 16 frames, so far targets are reached by seeking, not decoding through
        encode_video(path, frames, fps=25, codec=codec, keyframe_interval=16)
    # UCF101 / HMDB51 style: MPEG-4 part 2 in AVI, here with B-frames, whose AVI timestamps start at 1
    # while the stream claims to start at 0
    paths["mpeg4_avi"] = root / "coded.avi"
    write_video(paths["mpeg4_avi"], frames, encoder="mpeg4", keyframe_interval=12, max_b_frames=2, options={"qscale": "2"})
    return paths


def test_raw_stream_without_timestamps_is_counted_and_decoded_in_order(tmp_path):
    path = tmp_path / "raw.h264"
    # an elementary H.264 stream: no container, so no frame count, duration or timestamps
    write_video(path, index_coded_frames(100), format="h264")
    decoder = PyAVDecoder(seek_gap_frames=4)
    assert decoder.probe(path).num_frames == 100
    indices = np.array([[0, 10, 50], [99, 90, 10]])
    assert np.array_equal(read_codes(decoder.decode(path, indices).frames), indices)


@pytest.mark.parametrize("codec", ["h264", "vp9", "mpeg4_avi"])
@pytest.mark.parametrize("seek_gap_frames", [4, 48, 1000])
def test_pyav_returns_exactly_the_requested_frames(coded_videos, codec, seek_gap_frames):
    decoder = PyAVDecoder(seek_gap_frames=seek_gap_frames)
    info = decoder.probe(coded_videos[codec])
    assert info.num_frames == 200 and info.fps == 25 and (info.height, info.width) == (32, 32)
    rng = np.random.default_rng(0)
    requests = [
        np.arange(0, 200, 16),  # keyframes
        np.array([199, 3, 150, 150, 17]),  # unsorted, repeated, last frame
        rng.integers(0, 200, size=(3, 8)),  # views x frames
        np.array([[120 + 9 * k for k in range(8)]]),
    ]
    for indices in requests:
        clip = decoder.decode(coded_videos[codec], indices)
        assert clip.frames.shape == (*indices.shape, 32, 32, 3)
        assert np.array_equal(read_codes(clip.frames), indices), (codec, indices)


def test_pyav_resizes_short_side_while_converting(coded_videos):
    clip = PyAVDecoder(short_side=16).decode(coded_videos["h264"], lambda num_frames: np.array([0, num_frames - 1]))
    assert clip.frames.shape == (2, 16, 16, 3) and clip.info.num_frames == 200


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    dataset = generate_synthetic_dataset(root, videos_per_class=2, val_videos_per_class=1, num_frames=16, height=32, width=32, seed=1)
    return dataset


def make_bad_copies(dataset, directory):
    """Zero-byte, truncated (mp4 whose index is cut off; webm cut mid-stream), garbage; returns a list file."""
    directory.mkdir(exist_ok=True)
    good = read_video_list(dataset.train_annotation)
    source = good[0].path.read_bytes()
    (directory / "zero.mp4").write_bytes(b"")
    (directory / "cut.mp4").write_bytes(source[: len(source) // 2])
    (directory / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    webm = directory / "full.webm"
    encode_video(webm, index_coded_frames(64), codec="vp9")
    (directory / "cut.webm").write_bytes(webm.read_bytes()[: webm.stat().st_size // 3])
    lines = [f"{record.path} {record.label}" for record in good]
    lines += [f"{directory / name} 0" for name in ("zero.mp4", "cut.mp4", "garbage.mp4", "cut.webm")]
    listing = directory / "with_bad.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing, len(good)


def test_decoder_errors_name_the_file(small_set, tmp_path):
    listing, _ = make_bad_copies(small_set, tmp_path)
    decoder = PyAVDecoder()
    expectations = {"zero.mp4": "empty file", "cut.mp4": "cannot open", "garbage.mp4": "cannot open", "cut.webm": "truncated"}
    for name, reason in expectations.items():
        with pytest.raises(VideoDecodeError, match=rf"{name}: {reason}"):
            decoder.decode(tmp_path / name, lambda num_frames: np.arange(num_frames))


def test_bad_files_are_skipped_counted_and_summarised(small_set, tmp_path, caplog):
    listing, num_good = make_bad_copies(small_set, tmp_path)
    sampling = ClipSampling(clip_length=4, stride=3)
    loader = build_dataloader(listing, training=True, batch_size=4, num_workers=2, sampling=sampling, crop_size=32)
    # failures travel with the batches: logged here, in the loader's process, not warned in the workers
    with caplog.at_level(logging.INFO, logger="stdd.data.dataset"), warnings.catch_warnings():
        warnings.simplefilter("error")
        batches = list(loader)
    total = num_good + 4
    # training replaces a failed video by another one: every batch stays full, the epoch completes
    assert len(batches) == total // 4 and all(batch["video"].shape == (4, 4, 3, 32, 32) for batch in batches)
    report = loader.last_epoch_report
    assert report.failed_videos == 4 and report.samples == (total // 4) * 4
    assert {os.path.basename(failure.path) for failure in report.failures} == {"zero.mp4", "cut.mp4", "garbage.mp4", "cut.webm"}
    assert "4 videos failed to decode" in caplog.text
    delivered = torch.cat([batch["index"] for batch in batches])
    assert (delivered < num_good).all()  # only good videos reach the model
    skip_lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("skipping undecodable video")]
    assert len(skip_lines) == 4 and any("cut.webm: truncated: frames end at index" in line for line in skip_lines)
    # evaluation drops failed videos (no substitutes that would be scored twice)
    evaluation = build_dataloader(listing, training=False, batch_size=3, num_workers=0, sampling=sampling, crop_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eval_batches = list(evaluation)
    assert sum(batch["video"].shape[0] for batch in eval_batches) == num_good
    assert evaluation.last_epoch_report.failed_videos == 4
    assert all(batch["video"].shape[1:] == (1, 4, 3, 32, 32) for batch in eval_batches)
    # the second epoch counts again, without logging the same files again
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stdd.data.dataset"):
        list(loader)
    assert loader.last_epoch_report.epoch == 1 and loader.last_epoch_report.failed_videos == 4
    assert not [record for record in caplog.records if record.getMessage().startswith("skipping undecodable video")]
    assert "4 videos failed to decode" in caplog.text


def test_fail_policy_raises_with_the_file_name(small_set, tmp_path):
    listing, _ = make_bad_copies(small_set, tmp_path)
    loader = build_dataloader(listing, training=False, batch_size=16, num_workers=2, on_error="fail",
                              sampling=ClipSampling(clip_length=2, stride=2), crop_size=32)
    with pytest.raises(VideoDecodeError, match=r"(zero\.mp4: empty file|cut\.mp4|garbage\.mp4|cut\.webm)"):
        list(loader)


def test_missing_video_fails_or_is_skipped_at_build(small_set, tmp_path):
    listing = tmp_path / "missing.txt"
    good = read_video_list(small_set.val_annotation)
    listing.write_text("".join(f"{record.path} {record.label}\n" for record in good) + f"{tmp_path / 'nope.mp4'} 1\n")
    with pytest.raises(FileNotFoundError, match=r"missing\.txt: 8/9 videos found, 1 missing"):
        build_dataloader(listing, training=False, num_workers=0)
    loader = build_dataloader(listing, training=False, num_workers=0, on_missing="skip", crop_size=32,
                              sampling=ClipSampling(clip_length=2, stride=2))
    assert len(loader.dataset) == 8


def test_two_workers_match_one_process_and_epochs_differ(small_set):
    options = dict(training=True, batch_size=4, sampling=ClipSampling(clip_length=4, stride=2), crop_size=24, seed=7)
    in_process = build_dataloader(small_set.train_annotation, num_workers=0, **options)
    with_workers = build_dataloader(small_set.train_annotation, num_workers=2, **options)
    first = list(in_process)
    second = list(with_workers)
    assert len(first) == len(second) == 4
    for a, b in zip(first, second):
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["video"], b["video"])
        assert torch.equal(a["label"], torch.tensor([small_set_label(small_set, i) for i in a["index"]]))
    assert first[0]["video"].dtype == torch.float32
    # CLIP normalisation: the dark background maps to strongly negative values, the shapes above zero
    assert first[0]["video"].min() < -1.0 and first[0]["video"].max() > 0.5
    next_epoch = list(in_process)
    assert not torch.equal(torch.cat([b["index"] for b in next_epoch]), torch.cat([b["index"] for b in first]))
    in_process.set_epoch(0)
    assert all(torch.equal(a["video"], b["video"]) for a, b in zip(first, list(in_process)))


def small_set_label(dataset, index):
    return read_video_list(dataset.train_annotation)[int(index)].label


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _shard_worker(rank, world_size, port, annotation, results):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        loader = build_dataloader(annotation, training=False, batch_size=3, num_workers=0, crop_size=16,
                                  sampling=ClipSampling(clip_length=2, stride=2))
        results[rank] = torch.cat([batch["index"] for batch in loader]).tolist()
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_ranks_read_disjoint_shards(small_set):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_shard_worker, args=(2, _free_port(), str(small_set.train_annotation), results), nprocs=2, join=True)
    first, second = results[0], results[1]
    assert len(first) == len(second) == 8
    assert sorted(first + second) == list(range(16)) and not set(first) & set(second)
