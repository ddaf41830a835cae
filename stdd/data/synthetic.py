"""Synthetic motion videos: a labelled action dataset whose classes are defined only by motion.

Why: tests, the demo and CPU smoke training need real encoded videos whose label cannot be read off
one frame (otherwise a frozen image CLIP would solve it and the temporal modelling would go untested).

Every video shows one shape on a plain background. Appearance (shape, colours, size, start position,
start orientation) and the motion magnitudes (distance, angle, growth ratio) are drawn by
`draw_motion_sample`, which does NOT see the class; the class only decides which motion is applied
and its sign:

    moving left / right / up / down       translation on a torus: the shape leaves one edge and
                                          re-enters at the opposite one, so the position of the shape
                                          in ANY single frame is uniform for every translation class
    rotating clockwise / counterclockwise the start angle is uniform, so every frame's angle is too
    growing / shrinking                   the size changes by a ratio r from the same start size

Consequences (tested in tests/test_data_synthetic.py): the first frame of a video has the same
distribution for every class (for a given random draw it is the same image whatever the class), and
the class is recovered from two frames but not from one. Horizontal flips swap "moving left" with
"moving right" and "rotating clockwise" with "rotating counterclockwise": train on this set WITHOUT
flip augmentation (`build_dataloader(..., horizontal_flip=False)`).

Files written under `root` by `generate_synthetic_dataset` (atomically; a finished dataset with the same
parameters is reused, an interrupted one is completed):

    classes.txt     class names, one per line; line i is label i
    prompts.json    {"<class name>": ["a sentence", ...], ...} a few prompt sentences per class
    train.txt       mmaction2-style annotation: "videos/train/<class_dir>/<nnnn>.mp4 <label>" per line
    val.txt         the same for the validation split
    dataset.json    the generation parameters (used to decide whether the files can be reused)
    videos/<split>/<class_dir>/<nnnn>.mp4   H.264 (yuv420p) mp4, or .webm (VP9) with codec="vp9"

Sampling: the default videos have 32 frames, so use e.g. `ClipSampling(clip_length=8, stride=4)` (span 29)
or segment sampling; the paper's 8 x 16 (span 113) would loop a 32-frame video and scramble its motion.

Deterministic: the same seed and parameters give the same frames (and, with the same PyAV/codec build,
the same bytes: the encoders run single-threaded).

Command line: `python -m stdd.data.synthetic OUT_DIR [--videos-per-class 16] [--codec vp9] ...`
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..cli import ArgumentParser, cli_main
from ..files import atomic_output, atomic_write

# Class name -> (motion kind, sign). Order fixes the label ids.
MOTION_CLASSES: dict[str, tuple[str, int]] = {
    "moving left": ("translate_x", -1),
    "moving right": ("translate_x", +1),
    "moving up": ("translate_y", -1),  # image y grows downwards
    "moving down": ("translate_y", +1),
    "rotating clockwise": ("rotate", +1),  # +angle in y-down image coordinates turns clockwise on screen
    "rotating counterclockwise": ("rotate", -1),
    "growing": ("scale", +1),
    "shrinking": ("scale", -1),
}
CLASS_NAMES: tuple[str, ...] = tuple(MOTION_CLASSES)

CLASS_PROMPTS: dict[str, list[str]] = {
    "moving left": [
        "a video of a shape moving to the left.",
        "an object slides leftwards across the frame.",
        "something travels from the right side to the left side.",
        "a shape drifts steadily towards the left edge.",
    ],
    "moving right": [
        "a video of a shape moving to the right.",
        "an object slides rightwards across the frame.",
        "something travels from the left side to the right side.",
        "a shape drifts steadily towards the right edge.",
    ],
    "moving up": [
        "a video of a shape moving upwards.",
        "an object rises towards the top of the frame.",
        "something travels from the bottom to the top.",
        "a shape drifts steadily up the screen.",
    ],
    "moving down": [
        "a video of a shape moving downwards.",
        "an object sinks towards the bottom of the frame.",
        "something travels from the top to the bottom.",
        "a shape drifts steadily down the screen.",
    ],
    "rotating clockwise": [
        "a video of a shape rotating clockwise.",
        "an object spins in the clockwise direction.",
        "a shape turns around its centre like the hands of a clock.",
        "something rotates to the right in place.",
    ],
    "rotating counterclockwise": [
        "a video of a shape rotating counterclockwise.",
        "an object spins in the anticlockwise direction.",
        "a shape turns around its centre against the hands of a clock.",
        "something rotates to the left in place.",
    ],
    "growing": [
        "a video of a shape growing larger.",
        "an object expands and gets bigger over time.",
        "a shape swells until it fills more of the frame.",
        "something scales up steadily in place.",
    ],
    "shrinking": [
        "a video of a shape shrinking.",
        "an object contracts and gets smaller over time.",
        "a shape dwindles until it is tiny.",
        "something scales down steadily in place.",
    ],
}

# Polygons in unit coordinates (x right, y down), extent about [-1, 1]. None of them is symmetric under
# any rotation below 360 degrees, so the direction of a rotation is visible between any two frames
# whose angle differs by less than 180 degrees.
SHAPES: dict[str, tuple[tuple[float, float], ...]] = {
    "triangle": ((0.0, -1.0), (0.62, 0.8), (-0.62, 0.8)),
    "l_shape": ((-0.6, -1.0), (-0.1, -1.0), (-0.1, 0.45), (0.65, 0.45), (0.65, 1.0), (-0.6, 1.0)),
    "arrow": ((0.0, -1.0), (0.75, -0.15), (0.25, -0.15), (0.25, 1.0), (-0.25, 1.0), (-0.25, -0.15), (-0.75, -0.15)),
    "notched_rectangle": ((-0.9, -0.6), (0.9, -0.6), (0.9, 0.6), (0.2, 0.6), (0.2, 0.1), (-0.3, 0.1), (-0.3, 0.6), (-0.9, 0.6)),
    "kite": ((0.0, -1.0), (0.45, -0.35), (0.0, 1.0), (-0.8, -0.2)),
}
SHAPE_NAMES: tuple[str, ...] = tuple(SHAPES)

CODEC_SETTINGS = {
    # codec name -> (file suffix, PyAV encoder, encoder options). Single-threaded encoders keep the
    # bytes reproducible (the clips are tiny, threads would not buy anything); x264 also needs
    # cpu-independent=1: without it, the same frames gave different bytes in different processes on
    # this project's machine (decoding to the same pixels, but a dataset should be byte-reproducible).
    "h264": (".mp4", "libx264", {"crf": "18", "preset": "veryfast", "threads": "1", "x264-params": "cpu-independent=1"}),
    "vp9": (".webm", "libvpx-vp9", {"crf": "24", "b": "0", "deadline": "good", "cpu-used": "5", "threads": "1"}),
}

_FORMAT_VERSION = 2  # 2: byte-reproducible encoder settings


@dataclass(frozen=True)
class MotionSample:
    """Everything random about one video except its class (drawn by `draw_motion_sample`).

    Lengths are fractions of the frame width/height; `size` is the shape's half-extent over the
    frame's shorter side.
    """

    shape: str
    foreground_rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]
    center_x: float  # start centre, fraction of width in [0, 1)
    center_y: float  # start centre, fraction of height in [0, 1)
    angle_degrees: float  # start orientation in [0, 360)
    size: float  # start half-extent / min(height, width)
    travel: float  # total translation over the video, fraction of the frame side (translation classes)
    turn_degrees: float  # total rotation over the video (rotation classes)
    growth_ratio: float  # last size / first size for "growing" (its inverse for "shrinking")


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> tuple[int, int, int]:
    sector = int(hue * 6.0) % 6
    fraction = hue * 6.0 - math.floor(hue * 6.0)
    p = value * (1.0 - saturation)
    q = value * (1.0 - fraction * saturation)
    t = value * (1.0 - (1.0 - fraction) * saturation)
    r, g, b = [(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q)][sector]
    return (round(r * 255), round(g * 255), round(b * 255))


def draw_motion_sample(rng: np.random.Generator) -> MotionSample:
    """Draw the appearance and motion magnitudes of one video. Deliberately class-blind."""
    shape = SHAPE_NAMES[int(rng.integers(len(SHAPE_NAMES)))]
    # Bright saturated shape on a dark, greyish background: always visible, colour says nothing.
    foreground = _hsv_to_rgb(rng.uniform(), rng.uniform(0.55, 1.0), rng.uniform(0.7, 1.0))
    background = _hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.5), rng.uniform(0.05, 0.35))
    return MotionSample(
        shape=shape,
        foreground_rgb=foreground,
        background_rgb=background,
        center_x=float(rng.uniform()),
        center_y=float(rng.uniform()),
        angle_degrees=float(rng.uniform(0.0, 360.0)),
        # log-uniform size; the largest grown shape (0.2 * 2.2 = 0.44 half-extent) still fits the frame,
        # so the wrapped copies drawn for the torus never overlap each other
        size=float(math.exp(rng.uniform(math.log(0.1), math.log(0.2)))),
        travel=float(rng.uniform(0.25, 0.6)),
        turn_degrees=float(rng.uniform(90.0, 240.0)),
        growth_ratio=float(rng.uniform(1.5, 2.2)),
    )


def motion_state(class_name: str, sample: MotionSample, progress: float) -> tuple[float, float, float, float]:
    """(centre_x, centre_y, angle_degrees, size) at `progress` in [0, 1] (0 = first frame).

    At progress 0 the state does not depend on the class.
    """
    try:
        kind, sign = MOTION_CLASSES[class_name]
    except KeyError:
        raise ValueError(f"class_name: unknown synthetic class {class_name!r}; expected one of {list(CLASS_NAMES)}") from None
    center_x, center_y, angle, size = sample.center_x, sample.center_y, sample.angle_degrees, sample.size
    if kind == "translate_x":
        center_x = (center_x + sign * sample.travel * progress) % 1.0
    elif kind == "translate_y":
        center_y = (center_y + sign * sample.travel * progress) % 1.0
    elif kind == "rotate":
        angle = (angle + sign * sample.turn_degrees * progress) % 360.0
    else:  # scale: geometric growth looks like steady zooming
        size = size * sample.growth_ratio ** (sign * progress)
    return center_x, center_y, angle, size


def render_motion_frames(
    class_name: str,
    sample: MotionSample,
    *,
    num_frames: int = 32,
    height: int = 64,
    width: int = 64,
    supersample: int = 4,
) -> np.ndarray:
    """Render one video as uint8 RGB frames, shape (num_frames, height, width, 3).

    Drawn at `supersample` times the size and box-filtered down, so edges are anti-aliased and sub-pixel
    motion stays smooth.
    """
    if num_frames < 2:
        raise ValueError(f"num_frames: expected at least 2 frames to show motion, got {num_frames}")
    if height < 16 or width < 16:
        raise ValueError(f"height/width: expected at least 16 pixels, got {height}x{width}")
    if sample.shape not in SHAPES:
        raise ValueError(f"sample.shape: unknown shape {sample.shape!r}; expected one of {list(SHAPE_NAMES)}")
    big_height, big_width = height * supersample, width * supersample
    unit_polygon = np.asarray(SHAPES[sample.shape], dtype=np.float64)  # (V, 2)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for frame_index in range(num_frames):
        center_x, center_y, angle, size = motion_state(class_name, sample, frame_index / (num_frames - 1))
        radians = math.radians(angle)
        rotation = np.array([[math.cos(radians), -math.sin(radians)], [math.sin(radians), math.cos(radians)]])
        half_extent = size * min(big_height, big_width)
        polygon = unit_polygon @ rotation.T * half_extent + np.array([center_x * big_width, center_y * big_height])
        image = Image.new("RGB", (big_width, big_height), sample.background_rgb)
        draw = ImageDraw.Draw(image)
        # Torus: draw the 3x3 wrapped copies; those fully outside the canvas cost nothing visible.
        for shift_y in (-big_height, 0, big_height):
            for shift_x in (-big_width, 0, big_width):
                points = polygon + np.array([shift_x, shift_y])
                draw.polygon([tuple(point) for point in points.tolist()], fill=sample.foreground_rgb)
        frames[frame_index] = np.asarray(image.resize((width, height), Image.Resampling.BOX))
    return frames


def encode_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    *,
    fps: int = 16,
    codec: str = "h264",
    keyframe_interval: int | None = None,
) -> None:
    """Encode uint8 RGB frames (T, H, W, 3) to `path` with PyAV (atomically, `stdd.files.atomic_output`).

    codec "h264" -> libx264 yuv420p (use a .mp4 path), "vp9" -> libvpx-vp9 yuv420p (use .webm).
    Height and width must be even (yuv420p chroma subsampling). keyframe_interval: maximum frames
    between keyframes (encoder default if None); small values make seeking matter in tests.
    """
    import av  # PyAV is optional until a video is written: the package's other parts work without it

    if codec not in CODEC_SETTINGS:
        raise ValueError(f"codec: expected one of {list(CODEC_SETTINGS)}, got {codec!r}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames: expected uint8 array (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frames: height and width must be even for yuv420p, got {frames.shape[1]}x{frames.shape[2]}")
    _, encoder_name, options = CODEC_SETTINGS[codec]
    path = Path(path)
    # the temporary file keeps the extension: PyAV picks the container format from it
    with atomic_output(path, suffix=path.suffix) as temporary:
        # bitexact: no random segment UID or date in the container, so the bytes depend only on the frames
        with av.open(str(temporary), mode="w", options={"fflags": "+bitexact"}) as container:
            stream = container.add_stream(encoder_name, rate=fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = dict(options)
            if keyframe_interval is not None:
                stream.codec_context.gop_size = keyframe_interval
            for frame_index, frame_array in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(frame_array, format="rgb24")
                frame.pts = frame_index  # in 1/fps units (the stream's codec time base)
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():  # flush delayed frames
                container.mux(packet)


@dataclass(frozen=True)
class SyntheticDataset:
    """Paths of a generated dataset (see the module docstring for the layout)."""

    root: Path
    class_names: tuple[str, ...]
    classes_file: Path
    prompts_file: Path
    annotation_files: dict[str, Path]  # split name -> annotation file

    @property
    def train_annotation(self) -> Path:
        return self.annotation_files["train"]

    @property
    def val_annotation(self) -> Path:
        return self.annotation_files["val"]


def _sample_rng(seed: int, split_index: int, class_index: int, video_index: int) -> np.random.Generator:
    # One independent stream per video: any video can be regenerated alone, in any order.
    return np.random.default_rng(np.random.SeedSequence([seed, split_index, class_index, video_index]))


def generate_synthetic_dataset(
    root: str | os.PathLike,
    *,
    videos_per_class: int | dict[str, int] = 16,
    val_videos_per_class: int = 4,
    classes: Sequence[str] | None = None,
    num_frames: int = 32,
    height: int = 64,
    width: int = 64,
    fps: int = 16,
    codec: str = "h264",
    seed: int = 0,
) -> SyntheticDataset:
    """Generate (or reuse) a synthetic motion dataset under `root`; returns its paths.

    videos_per_class: training videos per class, or a dict {split name: videos per class} for custom
    splits (then `val_videos_per_class` is ignored). classes: a subset of `CLASS_NAMES` (default all
    eight), labels follow the order given. Defaults (8 classes x 20 videos of 32 frames at 64x64) take a
    few seconds on 2 CPU cores.
    """
    if codec not in CODEC_SETTINGS:
        raise ValueError(f"codec: expected one of {list(CODEC_SETTINGS)}, got {codec!r}")
    class_names = tuple(CLASS_NAMES if classes is None else classes)
    unknown = [name for name in class_names if name not in MOTION_CLASSES]
    if unknown or not class_names or len(set(class_names)) != len(class_names):
        raise ValueError(f"classes: expected distinct names from {list(CLASS_NAMES)}, got {list(class_names)}")
    if isinstance(videos_per_class, dict):
        split_sizes = {str(name): int(count) for name, count in videos_per_class.items()}
    else:
        split_sizes = {"train": int(videos_per_class), "val": int(val_videos_per_class)}
    if any(count < 0 for count in split_sizes.values()) or not any(split_sizes.values()):
        raise ValueError(f"videos_per_class: expected non-negative counts with at least one video, got {split_sizes}")
    if height % 2 or width % 2:
        raise ValueError(f"height/width: expected even sizes (yuv420p), got {height}x{width}")

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    suffix = CODEC_SETTINGS[codec][0]
    # Anti-aliasing by supersampling costs supersample^2 pixels per frame: 4x for the small default
    # videos, less for large ones (224 px frames barely need it and would take 16x the drawing time).
    supersample = max(1, min(4, 256 // max(height, width)))
    parameters = {
        "format_version": _FORMAT_VERSION,
        "classes": list(class_names),
        "splits": split_sizes,
        "num_frames": num_frames,
        "height": height,
        "width": width,
        "fps": fps,
        "codec": codec,
        "seed": seed,
    }
    metadata_file = root / "dataset.json"
    reuse_videos = False
    if metadata_file.exists():
        try:
            reuse_videos = json.loads(metadata_file.read_text(encoding="utf-8")).get("parameters") == parameters
        except (json.JSONDecodeError, OSError):
            reuse_videos = False
    if not reuse_videos:
        # Parameters changed (or first run): mark the directory as unfinished before touching videos, so
        # an interrupted run is never mistaken for a finished one.
        metadata_file.unlink(missing_ok=True)

    annotation_lines: dict[str, list[str]] = {name: [] for name in split_sizes}
    for split_index, (split_name, count) in enumerate(split_sizes.items()):
        for class_index, class_name in enumerate(class_names):
            class_directory = class_name.replace(" ", "_")
            for video_index in range(count):
                relative = f"videos/{split_name}/{class_directory}/{video_index:04d}{suffix}"
                target = root / relative
                # Seeded by the class's position in CLASS_NAMES, not in `classes`, so a subset run
                # reproduces the same videos as the full set.
                rng = _sample_rng(seed, split_index, CLASS_NAMES.index(class_name), video_index)
                if not (reuse_videos and target.exists() and target.stat().st_size > 0):
                    frames = render_motion_frames(
                        class_name, draw_motion_sample(rng), num_frames=num_frames, height=height, width=width,
                        supersample=supersample,
                    )
                    encode_video(target, frames, fps=fps, codec=codec)
                annotation_lines[split_name].append(f"{relative} {class_index}")

    classes_file = root / "classes.txt"
    prompts_file = root / "prompts.json"
    atomic_write(classes_file, "".join(f"{name}\n" for name in class_names))
    atomic_write(
        prompts_file, json.dumps({name: CLASS_PROMPTS[name] for name in class_names}, indent=2) + "\n"
    )
    annotation_files = {}
    for split_name, lines in annotation_lines.items():
        annotation_files[split_name] = root / f"{split_name}.txt"
        atomic_write(annotation_files[split_name], "".join(f"{line}\n" for line in lines))
    atomic_write(
        metadata_file,
        json.dumps({"parameters": parameters, "horizontal_flip_changes_label": True}, indent=2) + "\n",
    )
    return SyntheticDataset(
        root=root,
        class_names=class_names,
        classes_file=classes_file,
        prompts_file=prompts_file,
        annotation_files=annotation_files,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m stdd.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("root", help="output directory")
    parser.add_argument("--videos-per-class", type=int, default=16, help="training videos per class")
    parser.add_argument("--val-videos-per-class", type=int, default=4)
    parser.add_argument("--num-frames", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, help="frame height and width (even)")
    parser.add_argument("--fps", type=int, default=16)
    parser.add_argument("--codec", choices=sorted(CODEC_SETTINGS), default="h264")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    dataset = generate_synthetic_dataset(
        arguments.root,
        videos_per_class=arguments.videos_per_class,
        val_videos_per_class=arguments.val_videos_per_class,
        num_frames=arguments.num_frames,
        height=arguments.size,
        width=arguments.size,
        fps=arguments.fps,
        codec=arguments.codec,
        seed=arguments.seed,
    )
    print(json.dumps({"root": str(dataset.root), "classes": list(dataset.class_names),
                      "annotations": {k: str(v) for k, v in dataset.annotation_files.items()}}, indent=2))


if __name__ == "__main__":
    sys.exit(cli_main(main))
