"""DALI loader on the CPU (VP9): same frames as PyAV, transforms, epochs, bad files, sharding.

DALI's CPU video decoder handles VP8/VP9/MJPEG; H.264 needs the GPU path, which is not run here.
"""

import dataclasses
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("nvidia.dali")

from stdd.data import ClipSampling, PyAVDecoder, VideoDecodeError, VideoRecord, build_dataloader  # noqa: E402
from stdd.data.dali import build_dali_loader  # noqa: E402
from stdd.data.sampling import sample_clip_indices  # noqa: E402
from stdd.data.synthetic import encode_video, generate_synthetic_dataset  # noqa: E402

from coded_video import index_coded_frames, read_codes, write_video  # noqa: E402


@pytest.fixture(scope="module")
def coded_records(tmp_path_factory):
    """Three VP9 videos of 40, 57 and 90 frames whose pixels spell their frame index."""
    root = tmp_path_factory.mktemp("coded_vp9")
    records = []
    for position, count in enumerate((40, 57, 90)):
        path = root / f"coded_{count}.webm"
        encode_video(path, index_coded_frames(count), fps=25, codec="vp9", keyframe_interval=16)
        records.append(VideoRecord(path, position))
    return records


@pytest.fixture(scope="module")
def vp9_set(tmp_path_factory):
    return generate_synthetic_dataset(tmp_path_factory.mktemp("synthetic_vp9"), videos_per_class=2, val_videos_per_class=1,
                                      num_frames=16, height=32, width=32, codec="vp9", seed=2)


def test_reader_mode_decodes_the_frames_pyav_decodes(coded_records):
    sampling = ClipSampling(clip_length=4, stride=5)  # span 16
    loader = build_dali_loader(records=coded_records, training=False, mode="reader", sampling=sampling, batch_size=2,
                               device="cpu", apply_transforms=False)
    decoder = PyAVDecoder()
    len_of = {0: 40, 1: 57, 2: 90}
    seen = []
    for batch in loader:
        seen.extend(zip(batch["index"].tolist(), batch["frame_start"].tolist()))
    first_epoch, seen = sorted(seen), []
    for batch in loader:  # second epoch: the same 13 clips, none lost to the first epoch's padding
        for frames, position, start in zip(batch["video"].numpy(), batch["index"].tolist(), batch["frame_start"].tolist()):
            # the last clip of a video may run past its end: padded with the last frame
            expected = np.minimum(start + 5 * np.arange(4), len_of[position] - 1)
            assert np.array_equal(read_codes(frames), expected)  # DALI's own frame numbers are right
            reference = decoder.decode(coded_records[position].path, expected).frames
            # same frames, decoded by two FFmpeg builds: only YUV->RGB rounding at the stripe edges differs
            assert np.abs(reference.astype(np.int16) - frames.astype(np.int16)).mean() < 2.0
            seen.append((position, start))
    # every clip of every video once: a clip every step = span = 16 frames, from every start inside the video
    expected_clips = [(position, start) for position, count in enumerate((40, 57, 90)) for start in range(0, count, 16)]
    assert first_epoch == sorted(seen) == expected_clips


def test_indexed_mode_uses_the_pyav_dataset_frame_choice(coded_records):
    sampling = ClipSampling(mode="segments", clip_length=6)
    loader = build_dali_loader(records=coded_records, training=True, mode="indexed", sampling=sampling, batch_size=3,
                               device="cpu", apply_transforms=False, seed=4)
    loader.set_epoch(2)  # resuming: the first pass is epoch 2, the next epoch 3
    for epoch in (2, 3):
        seen = []
        for batch in loader:
            for frames, position, indices in zip(batch["video"].numpy(), batch["index"].tolist(), batch["frame_indices"].numpy()):
                count = (40, 57, 90)[position]
                expected = sample_clip_indices(count, sampling, training=True, rng=np.random.default_rng([4, epoch, position, 0]))[0]
                assert np.array_equal(indices, expected)
                assert np.array_equal(read_codes(frames), expected)
                seen.append(position)
        assert sorted(seen) == [0, 1, 2] and loader.last_epoch_report.epoch == epoch
        loader.set_epoch(epoch + 1)  # allowed: it is the next epoch anyway


def test_evaluation_views_match_the_pyav_loader(vp9_set):
    sampling = ClipSampling(clip_length=4, stride=3, n_temporal_views=2, n_spatial_crops=3)
    options = dict(training=False, batch_size=3, sampling=sampling, crop_size=24, short_side=32)
    pyav_batches = list(build_dataloader(vp9_set.val_annotation, num_workers=0, **options))
    dali_loader = build_dataloader(vp9_set.val_annotation, backend="dali", device="cpu", **options)
    dali_batches = list(dali_loader)
    assert len(pyav_batches) == len(dali_batches) == 3  # 8 videos: 3 + 3 + 2, the partial batch kept
    for pyav_batch, dali_batch in zip(pyav_batches, dali_batches):
        assert dali_batch["video"].shape == pyav_batch["video"].shape
        assert dali_batch["video"].shape[1:] == (6, 4, 3, 24, 24)
        assert torch.equal(dali_batch["index"], pyav_batch["index"]) and torch.equal(dali_batch["label"], pyav_batch["label"])
        difference = (dali_batch["video"] - pyav_batch["video"]).abs()
        # no resize (short side 32 = frame size): only colour conversion rounding, ~1/255 / 0.27 per pixel
        assert difference.mean() < 0.05, difference.mean()


def test_training_reader_shuffles_per_epoch_and_normalises(vp9_set):
    loader = build_dali_loader(vp9_set.train_annotation, training=True, batch_size=4, device="cpu", crop_size=24,
                               sampling=ClipSampling(clip_length=4, stride=3), horizontal_flip=False, seed=0)
    epochs = []
    for _ in range(2):
        batches = list(loader)
        # 16 videos of 16 frames, span 10 = step: clips start at 0 and 10 (the second padded)
        assert len(batches) == len(loader) == 8
        video = batches[0]["video"]
        assert video.shape == (4, 4, 3, 24, 24) and video.dtype == torch.float32
        assert video.min() < -1.0 and video.max() > 0.5
        epochs.append(torch.cat([batch["index"] for batch in batches]).tolist())
        labels = torch.cat([batch["label"] for batch in batches])
        assert torch.equal(labels, torch.tensor([loader.records[i].label for i in epochs[-1]]))
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(list(range(16)) * 2)
    assert epochs[0] != epochs[1]
    assert loader.last_epoch_report.epoch == 1
    with pytest.raises(ValueError, match="starting epoch"):
        loader.set_epoch(7)


def test_bad_files_left_out_and_reported_each_epoch(vp9_set, tmp_path):
    good = vp9_set.train_annotation.read_text().splitlines()
    source = (vp9_set.root / good[0].split()[0]).read_bytes()
    (tmp_path / "zero.webm").write_bytes(b"")
    (tmp_path / "garbage.webm").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (tmp_path / "header_only.webm").write_bytes(source[:200])
    listing = tmp_path / "list.txt"
    # bad files first: the good videos' positions (batch "index") must still be their line numbers
    listing.write_text("".join(f"{tmp_path / name} 0\n" for name in ("zero.webm", "garbage.webm", "header_only.webm"))
                       + "".join(f"{vp9_set.root / line.split()[0]} {line.split()[1]}\n" for line in good))
    options = dict(training=True, batch_size=4, device="cpu", crop_size=16, sampling=ClipSampling(clip_length=2, stride=2))
    loader = build_dali_loader(listing, **options)
    for epoch in range(2):
        assert sum(batch["video"].shape[0] for batch in loader) == 16 * 6  # 16 frames, span 3 = step: 6 clips per video
        report = loader.last_epoch_report
        assert report.epoch == epoch and report.failed_videos == 3
        assert {os.path.basename(failure.path) for failure in report.failures} == {"zero.webm", "garbage.webm", "header_only.webm"}
    assert len(loader.records) == 19 and sorted(failure.index for failure in report.failures) == [0, 1, 2]
    evaluation = build_dali_loader(listing, training=False, batch_size=4, device="cpu", crop_size=16,
                                   sampling=ClipSampling(clip_length=2, stride=2, n_temporal_views=2, n_spatial_crops=3))
    batches = list(evaluation)
    indices, labels = torch.cat([batch["index"] for batch in batches]), torch.cat([batch["label"] for batch in batches])
    assert sorted(indices.tolist()) == list(range(3, 19))
    assert labels.tolist() == [int(good[i - 3].split()[1]) for i in indices.tolist()]
    with pytest.raises(VideoDecodeError, match="zero.webm: empty file"):
        build_dali_loader(listing, on_error="fail", **options)
    # a probe cache gives the same result; a file changed since is probed again
    cache = tmp_path / "probe.json"
    first = build_dali_loader(listing, probe_cache=cache, **options)
    assert cache.exists() and len(first.skipped) == 3
    (tmp_path / "zero.webm").write_bytes(source)  # repaired
    second = build_dali_loader(listing, probe_cache=cache, **options)
    assert {os.path.basename(failure.path) for failure in second.skipped} == {"garbage.webm", "header_only.webm"}
    with pytest.raises(VideoDecodeError, match="garbage.webm"):
        build_dali_loader(listing, probe_cache=cache, on_error="fail", **options)


def _coded_vp9(path, count, **options):
    """VP9 whose frames show 1..count (never an all-black frame, so padding cannot hide)."""
    write_video(path, index_coded_frames(count, width=options.pop("width", None), offset=1), encoder="libvpx-vp9", **options)
    return path


def test_truncated_vp9_is_left_out_instead_of_padded_with_black(tmp_path):
    good = _coded_vp9(tmp_path / "good.webm", 90)
    data = good.read_bytes()
    (tmp_path / "cut.webm").write_bytes(data[: len(data) * 2 // 5])
    records = [VideoRecord(good, 0), VideoRecord(tmp_path / "cut.webm", 1)]
    for mode, training in (("reader", True), ("indexed", True), ("indexed", False)):
        loader = build_dali_loader(records=records, training=training, mode=mode, batch_size=1, device="cpu",
                                   sampling=ClipSampling(clip_length=4, stride=5), apply_transforms=False)
        assert [(failure.index, failure.reason.split(":")[0]) for failure in loader.skipped] == [(1, "truncated")]
        for _ in range(2):
            batches = list(loader)
            frames = torch.cat([batch["video"] for batch in batches]).numpy()
            assert frames.shape[0] > 0 and (frames.reshape(*frames.shape[:2], -1).max(-1) > 0).all(), mode
            assert torch.cat([batch["index"] for batch in batches]).unique().tolist() == [0]
            assert loader.last_epoch_report.failed_videos == 1


def test_verify_decode_finds_corrupt_data_that_open_cannot_see(tmp_path):
    import av

    good = _coded_vp9(tmp_path / "good.webm", 64)
    with av.open(str(good)) as container:
        packets = [(packet.pos, packet.size) for packet in container.demux(video=0) if packet.size]
    data = bytearray(good.read_bytes())
    for position, size in packets[30:34]:  # four inter frames' payloads overwritten, the container intact
        data[position + 4 : position + size] = np.random.default_rng(position).integers(0, 256, size - 4, dtype=np.uint8).tobytes()
    (tmp_path / "corrupt.webm").write_bytes(bytes(data))
    records = [VideoRecord(good, 0), VideoRecord(tmp_path / "corrupt.webm", 1)]
    options = dict(training=False, mode="indexed", batch_size=2, device="cpu", sampling=ClipSampling(clip_length=4, stride=5))
    assert build_dali_loader(records=records, **options).skipped == []  # it opens and indexes fine
    checked = build_dali_loader(records=records, verify_videos="decode", **options)
    assert [(failure.index, failure.reason.startswith("decoding failed")) for failure in checked.skipped] == [(1, True)]
    assert [batch["index"].tolist() for batch in checked] == [[0]]


@pytest.mark.parametrize("apply_transforms", [False, True])
def test_indexed_mode_counts_frames_the_decoder_padded(tmp_path, apply_transforms):
    """A file replaced by a shorter one after the check: DALI pads the frames it no longer has."""
    video, other = _coded_vp9(tmp_path / "video.webm", 90), _coded_vp9(tmp_path / "other.webm", 40)
    sampling = ClipSampling(clip_length=4, stride=20)
    loader = build_dali_loader(records=[VideoRecord(video, 0), VideoRecord(other, 1)], training=False, mode="indexed",
                               sampling=sampling, batch_size=2, device="cpu", crop_size=16,
                               apply_transforms=apply_transforms)
    os.replace(_coded_vp9(tmp_path / "shorter.webm", 50), video)
    batches = list(loader)
    assert [batch["index"].tolist() for batch in batches] == [[1]]  # the clip with padded frames is dropped
    asked = sample_clip_indices(90, sampling, training=False, rng=np.random.default_rng(0)).reshape(-1)
    (failure,) = loader.last_epoch_report.failures
    assert failure.index == 0 and f"padded frames {sorted(int(i) for i in asked if i >= 50)}" in failure.reason


def test_reader_clips_that_disagree_with_the_index_are_dropped(coded_records):
    sampling = ClipSampling(clip_length=4, stride=5)  # span 16
    loader = build_dali_loader(records=coded_records, training=False, mode="reader", sampling=sampling, batch_size=2,
                               device="cpu", apply_transforms=False)
    # as if DALI's reader counted more frames than the index: the 90-frame video checked as 60 frames
    loader.infos[2] = dataclasses.replace(loader.infos[2], num_frames=60)
    seen = [pair for batch in loader for pair in zip(batch["index"].tolist(), batch["frame_start"].tolist())]
    assert sorted(start for position, start in seen if position == 2) == [0, 16, 32]
    failures = loader.last_epoch_report.failures
    assert sorted(int(failure.reason.split("clip from frame ")[1].split()[0]) for failure in failures) == [48, 64, 80]
    assert all(failure.index == 2 and "padded or missing frames" in failure.reason for failure in failures)
    # training keeps every batch full: a failed clip's row holds a copy of a good clip of the batch
    training = build_dali_loader(records=coded_records, training=True, mode="reader", sampling=sampling, batch_size=4,
                                 device="cpu", apply_transforms=False)
    training.infos[2] = dataclasses.replace(training.infos[2], num_frames=60)
    batches = list(training)
    assert len(batches) == 3 and all(batch["video"].shape[0] == 4 for batch in batches)  # 13 clips, last batch dropped
    for batch in batches:
        for frames, position, start in zip(batch["video"].numpy(), batch["index"].tolist(), batch["frame_start"].tolist()):
            assert np.array_equal(read_codes(frames), np.minimum(start + 5 * np.arange(4), (40, 57, 90)[position] - 1))
            assert position != 2 or start < 48
    assert len(training.last_epoch_report.failures) == sum(len(batch["failures"]) for batch in batches) <= 3


def test_rotated_vp9_comes_out_upright_as_with_pyav(tmp_path):
    records, upright_sizes = [], []
    for position, (rotation, mirrored) in enumerate(((0, False), (90, False), (270, False), (180, True))):
        upright_sizes.append((48, 32) if rotation in (90, 270) else (32, 48))
        path = _coded_vp9(tmp_path / f"rotated_{rotation}.webm", 40, width=48, rotation=rotation, mirrored=mirrored)
        records.append(VideoRecord(path, position))
    decoder = PyAVDecoder()
    for mode in ("reader", "indexed"):
        loader = build_dali_loader(records=records, training=False, mode=mode, sampling=ClipSampling(clip_length=4, stride=5),
                                   batch_size=1, device="cpu", apply_transforms=False)  # upright sizes differ: 1 per batch
        for batch in loader:
            position = batch["index"].item()
            if mode == "indexed":
                indices = batch["frame_indices"][0].numpy()
            else:
                indices = np.minimum(batch["frame_start"].item() + 5 * np.arange(4), 39)
            reference = decoder.decode(records[position].path, indices).frames
            assert tuple(batch["video"].shape[1:]) == reference.shape == (4, *upright_sizes[position], 3), (mode, position)
            assert np.abs(batch["video"][0].numpy().astype(np.int16) - reference).mean() < 2.0
    options = dict(training=False, batch_size=4, sampling=ClipSampling(clip_length=4, stride=3, n_spatial_crops=3),
                   crop_size=24, short_side=32)
    pyav_batch, = list(build_dataloader(records=records, num_workers=0, **options))
    dali_batch, = list(build_dataloader(records=records, backend="dali", device="cpu", **options))
    assert dali_batch["video"].shape == pyav_batch["video"].shape == (4, 3, 4, 3, 24, 24)
    # per video and crop: the same upright crops in the same order
    assert ((dali_batch["video"] - pyav_batch["video"]).abs().mean(dim=(2, 3, 4, 5)) < 0.05).all()


def test_variable_rate_and_start_time_vp9_give_the_pyav_frames(tmp_path):
    kept = np.sort(np.random.default_rng(5).choice(90, 60, replace=False))
    coded = index_coded_frames(90, offset=1)
    records = []
    for position, pts in enumerate((kept, kept + 76)):  # dropped frames; and a first frame at 3.04 s
        path = tmp_path / f"vfr_{position}.webm"
        write_video(path, coded[kept], encoder="libvpx-vp9", pts=pts)
        records.append(VideoRecord(path, position))
    loader = build_dali_loader(records=records, training=True, mode="indexed", sampling=ClipSampling(mode="segments", clip_length=8),
                               batch_size=2, device="cpu", apply_transforms=False, seed=3)
    decoder = PyAVDecoder()
    for batch in loader:
        for frames, position, indices in zip(batch["video"].numpy(), batch["index"].tolist(), batch["frame_indices"].numpy()):
            assert np.array_equal(read_codes(frames), kept[indices] + 1)
            reference = decoder.decode(records[position].path, indices).frames
            assert np.abs(reference.astype(np.int16) - frames.astype(np.int16)).mean() < 2.0


def test_h264_on_the_cpu_is_refused_with_the_file_name(tmp_path):
    encode_video(tmp_path / "clip.mp4", index_coded_frames(8), codec="h264")
    with pytest.raises(ValueError, match=r"CPU video decoder handles .*clip\.mp4 is h264"):
        build_dali_loader(records=[VideoRecord(tmp_path / "clip.mp4", 0)], training=True, device="cpu",
                          sampling=ClipSampling(clip_length=2, stride=1))
    with pytest.raises(ValueError, match="fn.readers.video decodes on the GPU only"):
        build_dali_loader(records=[VideoRecord(tmp_path / "clip.mp4", 0)], training=True, device="cpu", reader="legacy")


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _shard_worker(rank, world_size, port, annotation, results):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        options = dict(training=False, batch_size=2, device="cpu", crop_size=16, sampling=ClipSampling(clip_length=2, stride=2))
        reader = build_dali_loader(annotation, mode="reader", **options)
        indexed = build_dali_loader(annotation, mode="indexed", **options)
        # training: 7 videos x 3 clips (step 7) = 21 clips, shards of 10 and 11; ranks must still take
        # the same number of steps or DDP would hang
        seven = [line for line in open(annotation).read().splitlines()][:7]
        listing = annotation + f".seven{rank}.txt"
        open(listing, "w").write("".join(f"{line}\n" for line in seven))
        steps = {}
        for batch_size in (3, 11):
            training = build_dali_loader(listing, training=True, mode="reader", batch_size=batch_size, device="cpu",
                                         crop_size=16, sampling=ClipSampling(clip_length=2, stride=2), step=7)
            steps[batch_size] = (len(list(training)), len(training))
        results[rank] = (
            torch.cat([batch["index"] for batch in reader]).tolist(),
            torch.cat([batch["index"] for batch in indexed]).tolist(),
            steps,
        )
    finally:
        torch.distributed.destroy_process_group()


def test_shards_follow_torch_distributed_rank(vp9_set):
    manager = mp.Manager()
    results = manager.dict()
    # val split: 8 videos of 16 frames, span 3 = step: clips start at 0, 3, ..., 15 -> 6 per video
    mp.spawn(_shard_worker, args=(2, _free_port(), str(vp9_set.val_annotation), results), nprocs=2, join=True)
    (reader_0, indexed_0, steps_0), (reader_1, indexed_1, steps_1) = results[0], results[1]
    assert steps_0 == steps_1, (steps_0, steps_1)
    assert all(iterated == declared for iterated, declared in steps_0.values())
    assert sorted(indexed_0 + indexed_1) == list(range(8)) and not set(indexed_0) & set(indexed_1)
    # DALI shards by clip: 48 clips, 24 per rank, together every clip of every video
    assert len(reader_0) == len(reader_1) == 24
    assert sorted(reader_0 + reader_1) == sorted(list(range(8)) * 6)


@pytest.mark.parametrize("reader", ["legacy", "experimental"])
@pytest.mark.parametrize("training", [True, False])
def test_gpu_graphs_are_valid_dali_graphs(reader, training, coded_records):
    """The GPU pipelines cannot run here, but DALI checks operator names, arguments and devices when a
    graph is defined; building (which needs the GPU) is left out. The GPU runs are not measured yet."""
    from nvidia.dali import pipeline_def

    from stdd.data.dali import _IndexedSource, _indexed_pipeline, _reader_pipeline
    from stdd.data.decoders import PyAVDecoder

    transform_options = dict(crop_size=32, short_side=32, horizontal_flip=True, scale=(0.25, 1.0), n_spatial_crops=1)
    pipeline_options = dict(batch_size=2, num_threads=1, device_id=0, seed=0)
    paths = [str(record.path) for record in coded_records]
    pipeline_def(_reader_pipeline)(
        filenames=paths, positions=[0, 1, 2], device="gpu", reader=reader, training=training, clip_length=4, stride=2,
        step=7, shard_id=0, num_shards=1, initial_fill=16, apply_transforms=True, transform_options=transform_options,
        **pipeline_options,
    )
    n_spatial_crops = 1 if training else 3
    sampling = ClipSampling(clip_length=4, stride=2, n_temporal_views=1 if training else 2, n_spatial_crops=n_spatial_crops)
    source = _IndexedSource(coded_records, [PyAVDecoder().probe(path) for path in paths], [0, 1, 2], sampling,
                            training=training, batch_size=2, seed=0, rank=0, world_size=1, drop_last=training,
                            with_orientation=n_spatial_crops == 3)
    pipeline_def(_indexed_pipeline)(
        source=source, decoder_device="mixed", training=training, apply_transforms=True,
        transform_options={**transform_options, "n_spatial_crops": n_spatial_crops}, **pipeline_options,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without a GPU")
def test_gpu_request_without_gpu_says_what_to_do(coded_records):
    with pytest.raises(RuntimeError, match="no CUDA device visible; use device='cpu'"):
        build_dali_loader(records=coded_records, training=True, device="gpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NVDEC)")
@pytest.mark.parametrize("reader", ["legacy", "experimental"])
def test_gpu_decodes_h264_like_pyav(reader, tmp_path):
    records = []
    for position, count in enumerate((40, 57)):
        path = tmp_path / f"coded_{count}.mp4"
        encode_video(path, index_coded_frames(count), fps=25, codec="h264", keyframe_interval=16)
        records.append(VideoRecord(path, position))
    decoder = PyAVDecoder()
    sampling = ClipSampling(clip_length=4, stride=5)
    loader = build_dali_loader(records=records, training=False, mode="reader", reader=reader, sampling=sampling,
                               batch_size=2, device="gpu", apply_transforms=False)
    for batch in loader:
        assert batch["video"].is_cuda
        for frames, position, start in zip(batch["video"].cpu().numpy(), batch["index"].tolist(), batch["frame_start"].tolist()):
            expected = np.minimum(start + 5 * np.arange(4), (40, 57)[position] - 1)
            assert np.array_equal(read_codes(frames), expected)
            reference = decoder.decode(records[position].path, expected).frames
            assert np.abs(reference.astype(np.int16) - frames.astype(np.int16)).mean() < 2.0
    indexed = build_dali_loader(records=records, training=False, mode="indexed", batch_size=2, device="gpu",
                                sampling=ClipSampling(clip_length=4, stride=3, n_temporal_views=2, n_spatial_crops=3),
                                crop_size=24, short_side=32)
    batch = next(iter(indexed))
    assert batch["video"].is_cuda and batch["video"].shape == (2, 6, 4, 3, 24, 24)
