"""Video data: annotation formats, frame sampling, transforms, PyAV/DALI decoding, synthetic videos.

Entry points:
- `build_dataloader(annotation_file, training=..., ...)` -> iterable of batch dicts
  {"video", "label", "index", "failures"} (format in stdd/data/dataset.py), backend "pyav" or "dali".
- `generate_synthetic_dataset(root, ...)` -> a small labelled dataset of motion-defined classes.
- `ClipSampling` (stdd/data/sampling.py) says how frames are picked.
DALI (stdd/data/dali.py) is imported only when a DALI loader is built.
"""

from .dali import build_dali_loader, dali_available  # imports DALI itself only when a loader is built
from .annotations import AnnotationError, VideoRecord, load_annotations, read_class_names, resolve_videos
from .dataset import DecodeFailure, EpochReport, VideoDataset, VideoLoader, build_dataset
from .loaders import build_dataloader
from .decoders import PyAVDecoder, VideoDecodeError, VideoInfo
from .sampling import ClipSampling, dense_clip_indices, sample_clip_indices, segment_indices
from .synthetic import CLASS_NAMES as SYNTHETIC_CLASS_NAMES
from .synthetic import SyntheticDataset, generate_synthetic_dataset
from .transforms import CLIP_MEAN, CLIP_STD

__all__ = [
    "AnnotationError", "VideoRecord", "load_annotations", "read_class_names", "resolve_videos",
    "DecodeFailure", "EpochReport", "VideoDataset", "VideoLoader", "build_dataloader", "build_dataset",
    "PyAVDecoder", "VideoDecodeError", "VideoInfo",
    "ClipSampling", "dense_clip_indices", "sample_clip_indices", "segment_indices",
    "SYNTHETIC_CLASS_NAMES", "SyntheticDataset", "generate_synthetic_dataset",
    "CLIP_MEAN", "CLIP_STD", "build_dali_loader", "dali_available",
]
