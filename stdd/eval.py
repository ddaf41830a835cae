"""Zero-shot evaluation: ``python -m stdd.eval --checkpoint W --protocol ep1|ep2|ep3|k600 ...``.

Protocols (``stdd.engine.protocols``):
  ep1   random half of the classes, 10 seeded draws (``--draws``, ``--seed``), all given videos
  ep2   all classes, all given videos
  ep3   the official test splits: UCF101 ``--format ucf101 --annotations testlist01.txt testlist02.txt
        testlist03.txt``; HMDB51 ``--format hmdb51 --annotations <split dir>`` (splits 1-3, test ids)
  k600  the 220 Kinetics-600 classes new to K400, 3 seeded splits of 160, or ``--split-file``;
        ``--k600-classes k600_new_release``: the 232 of the authors' release (the 220 + 12 K400 renames)

Every video is scored once (``eval.n_temporal_views`` x ``eval.n_spatial_crops`` views, 3 x 1 by
default, aggregated by the mean of the per-view softmax over each split's classes), then each
split only selects rows and columns. Writes ``results.json`` (top-1/top-5 per split and
mean ± std), ``per_class.csv`` and ``confusion.png`` (summed over the splits) to ``--out-dir``.
One evaluation at a time holds ``--out-dir`` (``<out-dir>/eval.lock``, from before scoring until
its files are written); a second one stops at once naming the holder. ``results.json`` is
written last, so where it is, the other two beside it are of the same evaluation.

Weights: ``--checkpoint`` takes ``final.pt`` / ``averaged.pt`` / ``ema.pt`` or a training
checkpoint, or a checkpoint of Open-VCLIP, FROSTER or ViFi-CLIP (the format is found from its keys;
``--checkpoint-format`` forces one), scored by its method's published recipe (the presets
``open_vclip``, ``froster``, ``vifi_clip``) or, with ``--recipe stdd`` (or another recipe), under
that recipe's protocol: frames, pixels, prompts, score and views (``stdd.engine.config.PROTOCOL_KEYS``);
the model (its temporal attention, weights, weight interpolation and text tower) stays the checkpoint's.
For an stdd checkpoint the model settings come from the config stored in it (``--config`` and
``key=value`` overrides change them), its run-time settings (device, precision, workers, frame
cache, batch size: ``stdd.engine.config.RUNTIME_KEYS``) do not: they are this command's defaults
and options. A CLIP weights *file* named by the stored config's
``model.pretrained`` is not loaded unless ``--trust-checkpoint-pretrained`` is given (or
``model.pretrained=<file>`` is set by hand); open_clip tags are used as stored. Without ``--checkpoint`` the configured CLIP weights are
evaluated as they are (e.g. ``--config k400_vitb16 model.stca.enabled=false`` is plain CLIP).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .cli import ArgumentParser, cli_main
from .data import load_annotations
from .data.annotations import ANNOTATION_FORMATS, OFFICIAL_SPLITS, resolve_class_names
from .data.sampling import SPATIAL_CROPS
from .engine import metrics, protocols
from .engine.checkpoint_formats import AUTO, CHECKPOINT_FORMATS, RECIPES
from .engine.config import ConfigError, temporal_of
from .engine.distributed import DEVICES, cleanup_distributed, init_distributed
from .engine.evaluation import score_dataset
from .engine.inference import config_for_weights, load_model_for_inference
from .engine.precision import autocast_dtype
from .engine.runlock import EVAL_LOCK_NAME, acquire_lock, describe_holder
from .engine.task import build_prompts, build_video_dataset, text_features_for
from .errors import InputError
from .files import atomic_write, remove_orphan_temporaries
from .resources import DATASETS, K400_RENAMED_IN_K600, K600_NOVEL_LISTS
from .resources import class_names as shipped  # the shipped class lists

PROTOCOLS = ("ep1", "ep2", "ep3", "k600")


def _records_for(args, class_names: Optional[list[str]]):
    """``(records, class names, per-file record index lists)`` from ``--annotations``."""
    all_records, per_file, names = [], [], class_names
    position = {}
    sources = list(args.annotations)
    if args.format == "hmdb51":
        if len(sources) != 1:
            raise ConfigError("--format hmdb51 takes one --annotations: the directory of *_test_split{1,2,3}.txt")
        splits = list(OFFICIAL_SPLITS) if args.protocol == "ep3" else [args.hmdb_split]
        jobs = [(sources[0], {"split": s, "subset": "test"}) for s in splits]
    else:
        jobs = [(source, {}) for source in sources]
    for source, options in jobs:
        records, file_names = load_annotations(source, format=args.format, root=args.root, class_names=names, **options)
        if names is None:
            names = file_names
        elif file_names is not None and list(file_names) != list(names):
            raise ConfigError(f"--annotations {source}: its class list differs from the others / --classes")
        indices = []
        for record in records:
            key = str(record.path)
            if key not in position:
                position[key] = len(all_records)
                all_records.append(record)
            indices.append(position[key])
        per_file.append(indices)
    if names is None:
        raise ConfigError("--classes is required for this annotation format (it carries no class names)")
    return all_records, list(names), per_file


def build_splits(args, class_names: list[str], per_file: list[list[int]]) -> list[protocols.ZeroShotSplit]:
    if args.split_file:
        return protocols.read_split_file(args.split_file, class_names)
    if args.protocol == "ep1":
        return protocols.ep1_splits(class_names, draws=args.draws, seed=args.seed)
    if args.protocol == "ep2":
        return protocols.ep2_splits(class_names)
    if args.protocol == "ep3":
        if len(per_file) < 2:
            raise ConfigError("--protocol ep3 needs the official test lists: give --annotations three times "
                              "(UCF101 testlist01..03) or an HMDB51 split directory with --format hmdb51")
        return protocols.ep3_splits(class_names, per_file)
    if args.protocol == "k600":
        if args.k600_classes == "k600_new_release":
            return protocols.k600_splits(class_names, novel_names=shipped(args.k600_classes), seed=args.seed,
                                         num_splits=args.k600_splits)
        return protocols.k600_splits(class_names, shipped("k400"), renamed=K400_RENAMED_IN_K600, seed=args.seed,
                                     num_splits=args.k600_splits)
    raise ConfigError(f"--protocol {args.protocol!r}: expected one of {PROTOCOLS}")


def prepare_out_dir(path, context=None):
    """``(--out-dir, its lock)``: created, checked writable and locked before any scoring (a bad path
    must not lose results, a second evaluation must not mix its files with these). The lock is
    rank 0's (None on the other ranks); release it when the outputs are written."""
    out = Path(os.path.expanduser(str(path)))
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as error:
        raise InputError(f"--out-dir {out}: cannot write results there ({error.strerror or error})") from error
    lock = acquire_lock(out, context, name=EVAL_LOCK_NAME, label="--out-dir", holder_kind="evaluation",
                        setting="--out-dir")
    if lock is not None:
        if lock.stale_holder:
            print(f"[stdd] took over the lock of --out-dir {out} from an evaluation that is gone "
                  f"({describe_holder(lock.stale_holder)})", file=sys.stderr)
        # no other evaluation writes here (we hold the lock): temporary files are a killed write's leftovers
        for orphan in remove_orphan_temporaries(out):
            print(f"[stdd] removed {orphan}, the temporary file of a write that was killed", file=sys.stderr)
    return out, lock


def write_outputs(out: Path, report: dict, class_names: list[str], matrix: np.ndarray, title: str) -> None:
    """``per_class.csv``, ``confusion.png``, then ``results.json``, as one set: all three are made before
    any is written, and an earlier ``results.json`` is removed first, so a ``results.json`` is only
    ever beside the other two of its own evaluation (a kill in between leaves none)."""
    table = metrics.per_class_csv(class_names, matrix)
    figure = metrics.confusion_matrix_png(matrix, class_names, title=title)
    (out / "results.json").unlink(missing_ok=True)
    atomic_write(out / "per_class.csv", table)
    atomic_write(out / "confusion.png", figure)
    atomic_write(out / "results.json", json.dumps(report, indent=2) + "\n")


def require_scored_videos(scored, records, sources) -> None:
    """An evaluation over zero decodable videos has no accuracy: one clear error instead of empty tensors."""
    if scored.view_scores.shape[1] > 0:
        return
    listed = " ".join(str(s) for s in sources)
    first = scored.failures[0] if scored.failures else None
    detail = f"; first: {first.path}: {first.reason}" if first is not None else ""
    raise InputError(f"--annotations {listed}: none of the {len(records)} listed videos could be decoded{detail}")


def run_evaluation(args) -> dict:
    cfg, state = config_for_weights(args.checkpoint, args.config, args.overrides,
                                    trust_checkpoint_pretrained=args.trust_checkpoint_pretrained,
                                    checkpoint_format=args.checkpoint_format, recipe=args.recipe)
    context = init_distributed(cfg.run.device if args.device is None else args.device)
    out, lock = prepare_out_dir(args.out_dir, context)
    try:
        return _evaluate(args, cfg, state, context, out)
    finally:
        if lock is not None:
            lock.release()


def _evaluate(args, cfg, state, context, out: Path) -> dict:
    """The evaluation itself, with ``--out-dir`` held (:func:`run_evaluation`)."""
    class_names = resolve_class_names(args.classes, where="--classes") if args.classes else None
    records, class_names, per_file = _records_for(args, class_names)
    if not records:
        raise InputError(f"--annotations {' '.join(map(str, args.annotations))}: lists no video")
    splits = build_splits(args, class_names, per_file)
    dataset_key = (args.dataset or (args.classes if isinstance(args.classes, str) else "") or "").lower()
    if dataset_key not in DATASETS:
        dataset_key = None
    views = int(args.views or cfg.eval.n_temporal_views)
    crops = int(args.crops or cfg.eval.n_spatial_crops)
    aggregation = args.aggregation or cfg.eval.aggregation
    dataset = build_video_dataset(cfg, None, training=False, n_temporal_views=views, n_spatial_crops=crops,
                                  records=records)
    model, text, loaded = load_model_for_inference(cfg, state, context.device)
    if loaded is not None and context.is_main and not args.quiet:
        print(f"[stdd] --checkpoint {args.checkpoint}: {loaded.summary()}", file=sys.stderr)
    # Only the classes some split uses get text features (K600: the 220 new ones, whose shipped
    # ASKG prompts exist; the K400 classes of the list are never scored).
    needed = sorted(set().union(*(split.class_indices for split in splits)))
    needed_names = [class_names[i] for i in needed]
    prompts = build_prompts(args.prompts or cfg.text.prompts, needed_names, dataset=dataset_key,
                            with_templates=args.with_templates or cfg.text.with_templates,
                            templates=cfg.text.templates, class_name_form=cfg.text.class_name_form)
    features = text_features_for(text, prompts, cfg.text, class_list=class_names)
    start = time.time()
    scored = score_dataset(
        model, dataset, features.features, features.mask, batch_size=int(args.batch_size or cfg.eval.batch_size),
        num_workers=int(args.num_workers if args.num_workers is not None else cfg.data.num_workers),
        device=context.device, context=context, progress=not args.quiet,
        autocast_dtype=autocast_dtype(cfg.run.precision, context.device), seed=int(cfg.run.seed),
    )
    require_scored_videos(scored, records, args.annotations)
    if len(needed) != len(class_names):  # back to full class positions; unused columns are never read
        full = torch.zeros(scored.view_scores.shape[0], scored.view_scores.shape[1], len(class_names))
        full[:, :, needed] = scored.view_scores
        scored.view_scores = full
    labels = scored.labels.numpy()
    results = [metrics.evaluate_split(scored.view_scores, labels, split, aggregation=aggregation) for split in splits]
    summary = metrics.summarize(results)
    total = np.zeros((len(class_names), len(class_names)), dtype=np.int64)
    for result in results:
        chosen = np.asarray(result["class_indices"])
        split_matrix = metrics.confusion_matrix(result["labels"], result["predictions"], len(chosen))
        total[np.ix_(chosen, chosen)] += split_matrix
    report = {
        "protocol": args.protocol if not args.split_file else f"split-file:{args.split_file}",
        "checkpoint": args.checkpoint,
        "checkpoint_weights": None if loaded is None else loaded.to_json(),
        "recipe": args.recipe,
        "model": str(cfg.model.clip_name),
        "stca": temporal_of(cfg) == "stca",
        "temporal": temporal_of(cfg),
        "views": f"{views} temporal x {crops} spatial",
        "aggregation": aggregation,
        "videos": int(len(records)),
        "videos_failed": len({f.index for f in scored.failures}),
        "seconds": round(time.time() - start, 2),
        **summary,
        "split_classes": [split.to_json(class_names) for split in splits],
    }
    if context.is_main:
        write_outputs(out, report, class_names, total, title=f"{report['protocol']} ({len(splits)} split(s) summed)")
        if not args.quiet:
            print(f"{report['protocol']}: top-1 {summary['top1_mean']:.2f} ± {summary['top1_std']:.2f}  "
                  f"top-5 {summary['top5_mean']:.2f} ± {summary['top5_std']:.2f}  over {len(splits)} split(s), "
                  f"{report['videos'] - report['videos_failed']} videos ({report['videos_failed']} failed); "
                  f"written to {out}")
    return report


def build_argument_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m stdd.eval", description=__doc__.split("\n")[0], epilog=__doc__)
    parser.add_argument("--checkpoint", help="weights file (final.pt / averaged.pt / ema.pt), training checkpoint, or "
                                             "an Open-VCLIP / FROSTER / ViFi-CLIP checkpoint")
    parser.add_argument("--checkpoint-format", choices=(AUTO, *CHECKPOINT_FORMATS), default=AUTO,
                        help="the checkpoint's format (default: found from its keys)")
    parser.add_argument("--recipe", choices=RECIPES, default=RECIPES[0],
                        help="how to score: own (the checkpoint's method's published recipe; default), stdd (stdd's "
                             "protocol, for comparing checkpoints under one protocol) or another method's")
    parser.add_argument("--config", help="preset or YAML (default: the config stored in --checkpoint)")
    parser.add_argument("--trust-checkpoint-pretrained", action="store_true",
                        help="load the CLIP weights file the checkpoint's stored config names in model.pretrained "
                             "(a path there is refused by default; open_clip tags are always used)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="ep2")
    parser.add_argument("--annotations", nargs="+", required=True, help="annotation file(s) / HMDB51 split directory")
    parser.add_argument("--format", default="list", choices=ANNOTATION_FORMATS)
    parser.add_argument("--root", help="video root directory")
    parser.add_argument("--classes", help="shipped class list (ucf101, hmdb51, k400, k600) or a class-name file")
    parser.add_argument("--dataset", help="dataset name for display names / shipped ASKG prompts (default: --classes)")
    parser.add_argument("--hmdb-split", type=int, default=1, choices=OFFICIAL_SPLITS,
                        help="HMDB51 split whose test videos ep1/ep2 use (default 1)")
    parser.add_argument("--split-file", help="class splits to evaluate (JSON or text, see stdd.engine.protocols)")
    parser.add_argument("--draws", type=int, default=10, help="ep1 draws (default 10)")
    parser.add_argument("--k600-splits", type=int, default=3, help="k600 seeded splits of 160 classes (default 3)")
    parser.add_argument("--k600-classes", choices=K600_NOVEL_LISTS, default=K600_NOVEL_LISTS[0],
                        help="k600 candidate classes: k600_new (220, default) or k600_new_release (the authors' 232)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the ep1/k600 class draws")
    parser.add_argument("--prompts", help="templates | askg | dataset | prompts JSON (default: config text.prompts)")
    parser.add_argument("--with-templates", action="store_true", help="add template sentences to file/ASKG prompts")
    parser.add_argument("--views", type=int, help="temporal views per video (default eval.n_temporal_views)")
    parser.add_argument("--crops", type=int, choices=SPATIAL_CROPS, help="spatial crops per view (default eval.n_spatial_crops)")
    parser.add_argument("--aggregation", choices=metrics.AGGREGATIONS, help="how views are combined (default eval.aggregation)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--device", choices=DEVICES)
    parser.add_argument("--out-dir", default="eval_results")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    return parser


def run(argv: Optional[Sequence[str]] = None) -> int:
    """The command line's work; errors are raised (:func:`main` reports them)."""
    args = build_argument_parser().parse_args(argv)
    try:
        run_evaluation(args)
    finally:
        cleanup_distributed()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m stdd.eval``; exit status 0 done, 2 bad input (one line), 3 unexpected (traceback)."""
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
