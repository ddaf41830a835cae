"""Decoding throughput: clips/s of the PyAV DataLoader (CPU, N workers) vs DALI (GPU; DALI's CPU decoder
for VP9 when no GPU is present) on the synthetic motion set at 224 px.

    python bench/decode.py --out bench/results/decode_<machine>.json [--workers 0 1 2] [--videos-per-class 8]

Each configuration reads one warm-up epoch, then times `--epochs` full epochs of training clips
(clip_length x stride, random-resized crop to 224, CLIP normalisation) and reports clips per second.
Prints a table and writes JSON with the machine, library versions and date. Timings are only
comparable on the same machine; GPU rows appear only where a GPU was present.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from stdd.data import ClipSampling, build_dataloader, generate_synthetic_dataset  # noqa: E402
from stdd.data.dali import dali_available  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict:
    import av
    import numpy

    found = {"python": platform.python_version(), "torch": torch.__version__, "av": av.__version__, "numpy": numpy.__version__}
    if dali_available():
        import nvidia.dali

        found["nvidia-dali"] = nvidia.dali.__version__
    return found


def machine_record(load_before: tuple[float, float, float]) -> dict:
    """The machine a benchmark ran on, with the load average before and after it."""
    return {
        "hostname": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        # other jobs on a shared machine slow every row alike; compare rows of one file only
        "load_average_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }


def write_result(out: str | os.PathLike, result: dict) -> None:
    """Write the JSON record atomically (a temporary file renamed over `out`) and say where."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_suffix(out.suffix + ".tmp")
    temporary.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(temporary, out)
    print(f"wrote {out}")


def time_loader(loader, epochs: int) -> tuple[int, float]:
    for _ in loader:  # warm-up epoch: worker start-up, DALI pipeline start, file cache
        pass
    clips, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            clips += batch["video"].shape[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return clips, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON results path")
    parser.add_argument("--data-dir", help="where the synthetic sets go (default: a temporary directory)")
    parser.add_argument("--videos-per-class", type=int, default=8)
    parser.add_argument("--num-frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=224, help="video frame size and crop size")
    parser.add_argument("--clip-length", type=int, default=8)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="PyAV DataLoader worker counts")
    parser.add_argument("--dali-threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    arguments = parser.parse_args(argv)

    load_before = os.getloadavg()
    data_dir = Path(arguments.data_dir) if arguments.data_dir else Path(tempfile.mkdtemp(prefix="stdd_decode_bench_"))
    generation = {}
    sets = {}
    for codec in ("h264", "vp9"):
        start = time.perf_counter()
        sets[codec] = generate_synthetic_dataset(
            data_dir / codec, videos_per_class=arguments.videos_per_class, val_videos_per_class=0,
            num_frames=arguments.num_frames, height=arguments.size, width=arguments.size, codec=codec, seed=0,
        )
        generation[codec] = round(time.perf_counter() - start, 2)
    sampling = ClipSampling(clip_length=arguments.clip_length, stride=arguments.stride)
    common = dict(training=True, batch_size=arguments.batch_size, sampling=sampling, crop_size=arguments.size,
                  horizontal_flip=False)

    rows = []

    def record(name, codec, device, workers, mode, loader):
        clips, seconds = time_loader(loader, arguments.epochs)
        rows.append({"backend": name, "codec": codec, "device": device, "workers_or_threads": workers, "mode": mode,
                     "clips": clips, "seconds": round(seconds, 3), "clips_per_s": round(clips / seconds, 2)})
        print(f"{name:6s} {codec:5s} {device:4s} {workers:>3} {mode:8s} {clips:6d} clips {seconds:8.2f} s {clips / seconds:9.1f} clips/s",
              flush=True)

    for codec in ("h264", "vp9"):
        for workers in arguments.workers:
            record("pyav", codec, "cpu", workers, "dataset",
                   build_dataloader(sets[codec].train_annotation, num_workers=workers, **common))
    dali_notes = "DALI not installed"
    if dali_available():
        devices = ["cpu"] + (["gpu"] if torch.cuda.is_available() else [])
        for device in devices:
            codecs = ("vp9",) if device == "cpu" else ("h264", "vp9")  # DALI's CPU decoder: VP8/VP9/MJPEG only
            for codec in codecs:
                for mode in ("reader", "indexed"):
                    record("dali", codec, device, arguments.dali_threads, mode,
                           build_dataloader(sets[codec].train_annotation, backend="dali", device=device, mode=mode,
                                            num_workers=arguments.dali_threads, **common))
        dali_notes = "GPU rows measured" if torch.cuda.is_available() else "no GPU on this machine: GPU decoding not measured"

    result = {
        "benchmark": "decode",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_record(load_before),
        "versions": versions(),
        "settings": {**{key: value for key, value in vars(arguments).items() if key not in ("out", "data_dir")},
                     "video": f"{arguments.num_frames} frames {arguments.size}x{arguments.size}, 8 classes",
                     "note": "reader mode: one epoch = every non-overlapping clip of every video (2 per 32-frame video at "
                             "8x4); dataset/indexed: one clip per video"},
        "generation_seconds": generation,
        "dali": dali_notes,
        "results": rows,
    }
    write_result(arguments.out, result)


if __name__ == "__main__":
    main()
