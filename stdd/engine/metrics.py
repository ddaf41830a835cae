"""Zero-shot metrics: view aggregation, top-k, per-class accuracy, confusion matrix, mean ± std."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from ..files import atomic_write
from .protocols import ZeroShotSplit

AGGREGATIONS = ("mean_softmax", "mean_score")


def aggregate_views(view_scores: torch.Tensor, class_indices: Sequence[int], aggregation: str = "mean_softmax") -> torch.Tensor:
    """Per-video class scores over a split's classes from per-view scores.

    ``view_scores``: ``(V, N, C)`` alignment scores (already logit-scaled) of
    V views (temporal x spatial) for N videos and all C classes. Returns
    ``(N, len(class_indices))``. ``mean_softmax`` (default, the usual "linear
    aggregation of predictions") takes the softmax over the split's classes
    per view, then averages the views; the softmax must be over the split's
    classes, which is why the raw per-view scores are kept. ``mean_score``
    averages the raw scores.
    """
    if view_scores.dim() != 3:
        raise ValueError(f"aggregate_views: view_scores must be (views, videos, classes), got {tuple(view_scores.shape)}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregate_views: aggregation {aggregation!r}, expected one of {AGGREGATIONS}")
    columns = view_scores[:, :, list(class_indices)].to(torch.float64)
    if aggregation == "mean_softmax":
        return columns.softmax(dim=-1).mean(dim=0)
    return columns.mean(dim=0)


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, torch.Tensor]:
    """Boolean ``(N,)`` per k: is the label among the k best scores (k capped at the class count)."""
    ranked = scores.argsort(dim=-1, descending=True)
    return {k: (ranked[:, : min(k, scores.shape[-1])] == labels[:, None]).any(dim=-1) for k in ks}


def evaluate_split(
    view_scores: torch.Tensor,
    labels: Sequence[int],
    split: ZeroShotSplit,
    *,
    aggregation: str = "mean_softmax",
    ks: Sequence[int] = (1, 5),
) -> dict:
    """Top-k accuracy (%) of one split, plus what the per-class CSV / confusion matrix need.

    ``labels``: the dataset label (position in the full class list) of each
    of the N videos in ``view_scores``; unreadable videos must already be
    dropped from both.
    """
    labels_np = np.asarray(labels)
    rows = split.select_samples(labels_np)
    if len(rows) == 0:
        raise ValueError(f"split {split.name}: no evaluated video belongs to its classes")
    column_of = {c: j for j, c in enumerate(split.class_indices)}
    split_labels = torch.tensor([column_of[int(c)] for c in labels_np[rows]])
    scores = aggregate_views(view_scores[:, torch.as_tensor(rows)], split.class_indices, aggregation)
    correct = topk_correct(scores, split_labels, ks)
    predictions = scores.argmax(dim=-1)
    return {
        "name": split.name,
        "num_videos": int(len(rows)),
        "num_classes": len(split.class_indices),
        **{f"top{k}": float(correct[k].double().mean() * 100) for k in ks},
        "labels": split_labels,
        "predictions": predictions,
        "class_indices": split.class_indices,
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population std (ddof=0) over rounds, as reported in the ZSAR literature."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std())


def summarize(split_results: Sequence[dict], ks: Sequence[int] = (1, 5)) -> dict:
    summary = {"num_splits": len(split_results)}
    for k in ks:
        mean, std = mean_std([result[f"top{k}"] for result in split_results])
        summary[f"top{k}_mean"], summary[f"top{k}_std"] = mean, std
    summary["splits"] = [
        {key: result[key] for key in ("name", "num_videos", "num_classes", *[f"top{k}" for k in ks])}
        for result in split_results
    ]
    return summary


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> np.ndarray:
    """``(C, C)`` counts, rows = true class, columns = predicted class."""
    flat = labels.to(torch.int64) * num_classes + predictions.to(torch.int64)
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).numpy()


def per_class_accuracy(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy (%) per true class (NaN for a class with no video) and video counts."""
    counts = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(counts > 0, np.diag(matrix) / np.maximum(counts, 1) * 100.0, np.nan)
    return accuracy, counts


def per_class_csv(class_names: Sequence[str], matrix: np.ndarray) -> str:
    """The per-class CSV's text: ``class,videos,correct,top1_accuracy`` rows from a confusion matrix."""
    accuracy, counts = per_class_accuracy(matrix)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["class", "videos", "correct", "top1_accuracy"])
    for name, count, correct, acc in zip(class_names, counts, np.diag(matrix), accuracy):
        writer.writerow([name, int(count), int(correct), "" if np.isnan(acc) else f"{acc:.2f}"])
    return buffer.getvalue()


def write_per_class_csv(path: Union[str, Path], class_names: Sequence[str], matrix: np.ndarray) -> Path:
    return atomic_write(path, per_class_csv(class_names, matrix))


def plot_confusion_matrix(path: Union[str, Path], matrix: np.ndarray, class_names: Sequence[str], title: Optional[str] = None) -> Path:
    """Row-normalised confusion matrix as a PNG (matplotlib, Agg backend: no display needed)."""
    return atomic_write(path, confusion_matrix_png(matrix, class_names, title))


def confusion_matrix_png(matrix: np.ndarray, class_names: Sequence[str], title: Optional[str] = None) -> bytes:
    """The bytes of :func:`plot_confusion_matrix`'s PNG."""
    # Imported here, where a PNG is made: pyplot takes half a second to import (every command line
    # imports this module), and choosing its backend is process-wide, which only plotting should do.
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    counts = matrix.sum(axis=1, keepdims=True)
    normalized = matrix / np.maximum(counts, 1)
    size = min(max(4.0, 0.18 * len(class_names) + 2.0), 40.0)
    figure, axis = plt.subplots(figsize=(size, size), dpi=100)
    image = axis.imshow(normalized, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    if len(class_names) <= 120:  # beyond that the labels are unreadable anyway
        ticks = np.arange(len(class_names))
        fontsize = max(3, min(9, int(600 / max(len(class_names), 1))))
        axis.set_xticks(ticks, labels=class_names, rotation=90, fontsize=fontsize)
        axis.set_yticks(ticks, labels=class_names, fontsize=fontsize)
    if title:
        axis.set_title(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2BN / (B + N) of a base and a novel accuracy, the base-to-novel summary (0 when both are 0)."""
    if base < 0 or novel < 0:
        raise ValueError(f"harmonic_mean: accuracies must be >= 0, got base {base}, novel {novel}")
    return 0.0 if base + novel == 0 else 2.0 * base * novel / (base + novel)


def summarize_runs(runs: Sequence[dict], parts: Sequence[str], ks: Sequence[int] = (1, 5)) -> dict:
    """The mean ± std over ``runs`` (models: one per training seed) of each part's top-k.

    ``runs``: dicts holding ``{part: {"top1": ..., "top5": ...}}`` for every part. With parts ``base`` and
    ``novel`` (base-to-novel) each run gets its ``hm`` and the summary the ``hm`` of the mean base and mean
    novel top-1, as the field reports it (and ``hm_of_runs_mean``, the mean of the runs' HMs, beside it).
    """
    if not runs:
        raise ValueError("summarize_runs: no runs")
    summary = {"num_runs": len(runs)}
    for part in parts:
        for k in ks:
            mean, std = mean_std([run[part][f"top{k}"] for run in runs])
            summary[f"{part}_top{k}_mean"], summary[f"{part}_top{k}_std"] = mean, std
    if set(parts) == {"base", "novel"}:
        for run in runs:
            run["hm"] = harmonic_mean(run["base"]["top1"], run["novel"]["top1"])
        summary["hm"] = harmonic_mean(summary["base_top1_mean"], summary["novel_top1_mean"])
        summary["hm_of_runs_mean"] = mean_std([run["hm"] for run in runs])[0]
    return summary
