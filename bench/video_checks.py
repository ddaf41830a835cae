"""What the per-video checks cost: the packet index (verify_videos="open", and every uncached PyAV open),
a decode of every frame (verify_videos="decode"), against decoding one training clip.

    python bench/video_checks.py --out bench/results/video_checks_<machine>.json [--repeats 5]

Videos are written here with PyAV (textured moving pattern, H.264 mp4 and VP9 webm, a keyframe every
2 s), in two sizes: 250 frames at 320x240 (a 10 s clip at 25 fps, UCF101-like) and 2000 frames at
160x120 (a long video, where the index pass matters most). Per video and check: the median of
`--repeats` runs (the file is in the page cache). Prints a table and writes JSON with the machine,
its load average, library versions and date; timings are only comparable on the same machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402

from bench.decode import machine_record, versions, write_result  # noqa: E402
from stdd.data import ClipSampling, sample_clip_indices  # noqa: E402
from stdd.data.decoders import PyAVDecoder, build_frame_index  # noqa: E402
from stdd.data.synthetic import encode_video  # noqa: E402


def textured_frames(count: int, height: int, width: int) -> np.ndarray:
    """A drifting sine texture with noise: enough detail that the encoders spend realistic bits."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((count, height, width, 3), dtype=np.uint8)
    for t in range(count):
        phase = 0.15 * t
        base = 127 + 60 * np.sin(x / 9.0 + phase) * np.cos(y / 13.0 - 0.5 * phase)
        noise = rng.normal(0, 12, size=(height, width, 1))
        frames[t] = np.clip(base[..., None] + noise + np.array([0, 20, -20]), 0, 255).astype(np.uint8)
    return frames


def median_ms(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 2)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.add_argument("--repeats", type=int, default=5)
    arguments = parser.parse_args(argv)

    load_before = os.getloadavg()
    rows = []
    sampling = ClipSampling(clip_length=8, stride=8)
    with tempfile.TemporaryDirectory(prefix="stdd_video_checks_") as directory:
        for count, height, width in ((250, 240, 320), (2000, 120, 160)):
            frames = textured_frames(count, height, width)
            for codec, suffix in (("h264", ".mp4"), ("vp9", ".webm")):
                path = Path(directory) / f"{count}_{codec}{suffix}"
                encode_video(path, frames, fps=25, codec=codec, keyframe_interval=50)
                decoder = PyAVDecoder()  # indexes cached: a file opened again
                uncached = PyAVDecoder(index_cache_size=0)  # as in the DataLoader's per-epoch workers
                info = decoder.probe(path)
                rng = np.random.default_rng(0)

                def clip():
                    return sample_clip_indices(info.num_frames, sampling, training=True, rng=rng)

                row = {
                    "codec": codec, "frames": info.num_frames, "size": f"{width}x{height}",
                    "file_kib": round(path.stat().st_size / 1024, 1),
                    "index_ms": median_ms(lambda: build_frame_index(path), arguments.repeats),
                    "decode_every_frame_ms": median_ms(lambda: decoder.verify(path), arguments.repeats),
                    "clip_8x8_cached_index_ms": median_ms(lambda: decoder.decode(path, clip()), arguments.repeats),
                    "clip_8x8_uncached_ms": median_ms(lambda: uncached.decode(path, clip()), arguments.repeats),
                }
                rows.append(row)
                print(f"{codec:5s} {row['frames']:5d} frames {row['size']:>8s}: index {row['index_ms']:8.2f} ms, "
                      f"decode every frame {row['decode_every_frame_ms']:9.2f} ms, one 8x8 clip "
                      f"{row['clip_8x8_cached_index_ms']:8.2f} ms (index cached) {row['clip_8x8_uncached_ms']:8.2f} ms (not)",
                      flush=True)
    result = {
        "benchmark": "video_checks",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_record(load_before),
        "versions": versions(),
        "settings": {"repeats": arguments.repeats, "threads": 1, "clip": "8 frames 8 apart, random start (training)",
                     "note": "index = verify_videos='open' (open + packet pass + first frame); decode_every_frame = "
                             "verify_videos='decode' (no RGB conversion); clip rows: one training clip to RGB, with "
                             "the index cached or built in the same open; medians, files in the page cache"},
        "results": rows,
    }
    write_result(arguments.out, result)


if __name__ == "__main__":
    main()
