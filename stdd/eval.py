"""Evaluation: ``python -m stdd.eval --checkpoint W --protocol ep1|ep2|ep3|k600|base2novel|fewshot ...``.

Protocols (``stdd.engine.protocols``):
  ep1   random half of the classes, 10 seeded draws (``--draws``, ``--seed``), all given videos
  ep2   all classes, all given videos
  ep3   the official test splits: UCF101 ``--format ucf101 --annotations testlist01.txt testlist02.txt
        testlist03.txt``; HMDB51 ``--format hmdb51 --annotations <split dir>`` (splits 1-3, test ids)
  k600  the 220 Kinetics-600 classes new to K400, 3 seeded splits of 160, or ``--split-file``;
        ``--k600-classes k600_new_release``: the 232 of the authors' release (the 220 + 12 K400 renames)
  base2novel  the published base-to-novel split of ``--dataset k400|hmdb51|ucf101|ssv2`` (or a split
        folder): base top-1 on the base classes' validation videos (base classes only), novel top-1 on
        the novel ones (novel classes only), HM = 2BN / (B + N). ``--checkpoint`` takes one model per
        training seed (``s1.pt s2.pt s3.pt``): each is scored, then the seed average and the HM of the
        averages, as the field reports them
  fewshot  the published few-shot split of ``--dataset hmdb51|ucf101|ssv2``: top-1 on its validation
        list, all classes; ``--shots 2|4|8|16`` says which list the model was trained on
  Both read the videos under ``--root`` where the lists put them (a video that is not there is also
  looked for in its class's folder, ``<root>/<class>/<file>``); videos that are missing are skipped and
  counted. A model trained on a published split (``data.dataset: published``) is checked against the
  evaluated one (its seed or shot count labels its results).

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

from .cli import ArgumentParser, cli_main, split_overrides
from .data import load_annotations
from .data.annotations import ANNOTATION_FORMATS, OFFICIAL_SPLITS, resolve_class_names, resolve_split, resolve_videos
from .data.sampling import SPATIAL_CROPS
from .engine import metrics, protocols
from .engine.checkpoint_formats import AUTO, CHECKPOINT_FORMATS, RECIPES
from .engine.config import PUBLISHED_DATASET, ConfigError, published_split_of, temporal_of
from .engine.distributed import DEVICES, cleanup_distributed, init_distributed
from .engine.evaluation import score_dataset
from .engine.inference import config_for_weights, load_model_for_inference
from .engine.precision import autocast_dtype
from .engine.runlock import EVAL_LOCK_NAME, acquire_lock, describe_holder
from .engine.task import build_prompts, build_video_dataset, check_prompt_kinds, text_features_for
from .errors import InputError
from .files import atomic_write, remove_orphan_temporaries
from .resources import DATASETS, K400_RENAMED_IN_K600, K600_NOVEL_LISTS, SPLIT_PROTOCOLS, published_datasets
from .resources import class_names as shipped  # the shipped class lists

PROTOCOLS = ("ep1", "ep2", "ep3", "k600", *SPLIT_PROTOCOLS)


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


def require_scored_videos(scored, records, sources, what: str = "--annotations") -> None:
    """An evaluation over zero decodable videos has no accuracy: one clear error instead of empty tensors."""
    if scored.view_scores.shape[1] > 0:
        return
    listed = " ".join(str(s) for s in sources)
    first = scored.failures[0] if scored.failures else None
    detail = f"; first: {first.path}: {first.reason}" if first is not None else ""
    raise InputError(f"{what} {listed}: none of the {len(records)} listed videos could be decoded{detail}")


def _check_arguments(args) -> None:
    """What each protocol takes: the published ones read their own lists (``--dataset``, ``--root``), the
    others ``--annotations``; several ``--checkpoint`` files (one per seed) only for the published ones."""
    published = args.protocol in SPLIT_PROTOCOLS
    if published:
        for option, value in (("--annotations", args.annotations), ("--split-file", args.split_file),
                              ("--classes", args.classes)):
            if value:
                raise ConfigError(f"{option}: not read by --protocol {args.protocol} (the split's own lists and "
                                  f"class lists are); give --dataset and --root")
        if not args.dataset:
            raise ConfigError(f"--dataset is required for --protocol {args.protocol}: one of the published splits "
                              f"or a folder holding a split.json")
        if not args.root:
            raise ConfigError(f"--root is required for --protocol {args.protocol}: the folder of the videos its "
                              f"lists name")
    else:
        if not args.annotations:
            raise ConfigError(f"--annotations is required for --protocol {args.protocol}")
        if len(args.checkpoint or []) > 1:
            raise ConfigError(f"--checkpoint: --protocol {args.protocol} scores one model; several (one per "
                              f"training seed) are for --protocol {' / '.join(SPLIT_PROTOCOLS)}")
    if args.shots is not None and args.protocol != "fewshot":
        raise ConfigError(f"--shots: only --protocol fewshot reads it, not {args.protocol}")


def run_evaluation(args) -> dict:
    _check_arguments(args)
    checkpoints = list(args.checkpoint or [None])
    weights = dict(trust_checkpoint_pretrained=args.trust_checkpoint_pretrained,
                   checkpoint_format=args.checkpoint_format, recipe=args.recipe)
    if args.protocol in SPLIT_PROTOCOLS:
        split = resolve_split(args.dataset, args.protocol, where="--dataset")
        if args.shots is not None:  # a shot count that has no list: refused before any model is loaded
            try:
                split.train_list(args.shots)
            except ValueError as error:
                raise ConfigError(f"--{error}") from error
        # every model's config, before anything is scored or written: a bad one stops the whole evaluation
        models = [(checkpoint, *config_for_weights(checkpoint, args.config, args.overrides, **weights))
                  for checkpoint in checkpoints]
        keys = [_published_key(args, split, checkpoint, cfg) for checkpoint, cfg, _ in models]
        for _, cfg, _ in models:
            check_prompt_kinds(cfg, args.prompts, dataset_prompts=split.prompts)
        records, missing = _published_records(split, Path(os.path.expanduser(args.root)))
        context = init_distributed(models[0][1].run.device if args.device is None else args.device)
        out, lock = prepare_out_dir(args.out_dir, context)
        try:
            return _evaluate_published(args, split, models, keys, records, missing, context, out)
        finally:
            if lock is not None:
                lock.release()
    cfg, state = config_for_weights(checkpoints[0], args.config, args.overrides, **weights)
    check_prompt_kinds(cfg, args.prompts)  # before --out-dir is written
    context = init_distributed(cfg.run.device if args.device is None else args.device)
    out, lock = prepare_out_dir(args.out_dir, context)
    try:
        return _evaluate(args, cfg, state, context, out)
    finally:
        if lock is not None:
            lock.release()


def _published_key(args, split, checkpoint, cfg) -> Optional[int]:
    """The seed / shot count of the published list ``checkpoint`` was trained on (None: not trained on one),
    checked against the evaluated split (:func:`stdd.engine.protocols.published_run_key`)."""
    source = f"--checkpoint {checkpoint}"
    trained = None
    if checkpoint is not None and cfg.data.dataset == PUBLISHED_DATASET:
        try:
            trained = published_split_of(cfg)
        except ConfigError as error:
            raise ConfigError(f"{source} (its stored config): {error}") from error
    return protocols.published_run_key(args.protocol, split, trained, shots=args.shots, source=source)


def _published_records(split, root: Path) -> tuple[dict, dict]:
    """``(part -> records of the videos found, part -> how many are missing)`` of every validation list of
    ``split``; the missing ones are skipped and counted (one warning naming the first ones), a list none of
    whose videos is under ``root`` is bad input."""
    records, missing = {}, {}
    for part, listing in split.val.items():
        listed = split.records(listing, part, root)
        records[part], report = resolve_videos(listed, on_missing="skip", source=str(listing))
        missing[part] = len(report.missing)
        if not records[part]:
            raise InputError(f"--root {root}: none of the {len(listed)} videos of {listing} is there (looked for "
                             f"<root>/<listed path> and <root>/<class>/<file name>; first: {report.missing[0]})")
    return records, missing


def _evaluate_published(args, split, models, keys, records, missing, context, out: Path) -> dict:
    """Base-to-novel / few-shot: every model scored on every validation list of ``split`` against that
    list's classes (:func:`run_evaluation` holds ``--out-dir``)."""
    shots = args.shots
    if args.protocol == "fewshot":
        known = sorted({key for key in keys if key is not None})
        if len(known) > 1:
            raise ConfigError(f"--checkpoint: the models were trained on lists of different shot counts {known}")
        shots = shots if shots is not None else (known[0] if known else None)
    seeds = [key for key in keys if key is not None] if args.protocol == "base2novel" else []
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--checkpoint: several models of the same seed {seeds}: give one per seed")
    root = Path(os.path.expanduser(args.root))
    parts = list(split.val)
    names = [name for part in parts for name in split.classes[part]]  # per-class rows: every part's classes
    offsets = {part: sum(len(split.classes[p]) for p in parts[:i]) for i, part in enumerate(parts)}
    total = np.zeros((len(names), len(names)), dtype=np.int64)
    start = time.time()
    runs = []
    for (checkpoint, cfg, state), key in zip(models, keys):
        views = int(args.views or cfg.eval.n_temporal_views)
        crops = int(args.crops or cfg.eval.n_spatial_crops)
        aggregation = args.aggregation or cfg.eval.aggregation
        model, text, loaded = load_model_for_inference(cfg, state, context.device)
        if loaded is not None and context.is_main and not args.quiet:
            print(f"[stdd] --checkpoint {checkpoint}: {loaded.summary()}", file=sys.stderr)
        run = {"checkpoint": checkpoint, split.train_key: key, "views": f"{views} temporal x {crops} spatial",
               "aggregation": aggregation, "checkpoint_weights": None if loaded is None else loaded.to_json()}
        for part in parts:
            classes = split.classes[part]
            dataset = build_video_dataset(cfg, None, training=False, n_temporal_views=views, n_spatial_crops=crops,
                                          records=records[part])
            prompts = build_prompts(args.prompts or cfg.text.prompts, classes, dataset=split.dataset,
                                    dataset_prompts=split.prompts,
                                    with_templates=args.with_templates or cfg.text.with_templates,
                                    templates=cfg.text.templates, class_name_form=cfg.text.class_name_form,
                                    prompt_kinds=cfg.text.prompt_kinds)
            features = text_features_for(text, prompts, cfg.text)
            scored = score_dataset(
                model, dataset, features.features, features.mask,
                batch_size=int(args.batch_size or cfg.eval.batch_size),
                num_workers=int(args.num_workers if args.num_workers is not None else cfg.data.num_workers),
                device=context.device, context=context, progress=not args.quiet,
                autocast_dtype=autocast_dtype(cfg.run.precision, context.device), seed=int(cfg.run.seed),
            )
            require_scored_videos(scored, dataset.records, [split.val[part]], what="the list")
            whole = protocols.ZeroShotSplit(part, tuple(range(len(classes))))
            result = metrics.evaluate_split(scored.view_scores, scored.labels.numpy(), whole, aggregation=aggregation)
            block = slice(offsets[part], offsets[part] + len(classes))
            total[block, block] += metrics.confusion_matrix(result["labels"], result["predictions"], len(classes))
            run[part] = {"top1": result["top1"], "top5": result["top5"], "classes": len(classes),
                         "videos_listed": len(records[part]) + missing[part], "videos_missing": missing[part],
                         "videos_failed": len({f.index for f in scored.failures}),
                         "videos_scored": result["num_videos"]}
        runs.append(run)
    summary = metrics.summarize_runs(runs, parts)
    report = {
        "protocol": args.protocol,
        "dataset": split.dataset or str(split.folder),
        "split": str(split.folder),
        "root": str(root),
        **({"shots": shots} if args.protocol == "fewshot" else {}),
        "model": str(models[0][1].model.clip_name),
        "stca": [bool(cfg.model.stca.enabled) for _, cfg, _ in models],
        "seconds": round(time.time() - start, 2),
        **summary,
        "runs": runs,
    }
    if context.is_main:
        write_outputs(out, report, names, total, title=f"{args.protocol} {report['dataset']} "
                                                       f"({len(runs)} model(s) summed)")
        if not args.quiet:
            for line in published_report_lines(report, parts, split.train_key):
                print(line)
            print(f"written to {out}")
    return report


def published_report_lines(report: dict, parts, key_name: str) -> list[str]:
    """The printed result of a base-to-novel / few-shot evaluation: one line per model, then the mean."""
    def videos(run):
        counts = [f"{part} {run[part]['videos_scored']}" for part in parts]
        missing = sum(run[part]["videos_missing"] for part in parts)
        failed = sum(run[part]["videos_failed"] for part in parts)
        return f"videos scored: {', '.join(counts)} ({missing} missing, {failed} failed to decode)"

    what = f"{report['protocol']} {report['dataset']}"
    if report["protocol"] == "fewshot":
        what = f"{report['shots']}-shot {report['dataset']}" if report.get("shots") else what
    lines = []
    for number, run in enumerate(report["runs"], start=1):
        label = f"{key_name} {run[key_name]}" if run.get(key_name) is not None else f"model {number}"
        scores = "  ".join(f"{part} {run[part]['top1']:.2f}" for part in parts)
        if "hm" in run:
            scores += f"  HM {run['hm']:.2f}"
        lines.append(f"{what}, {label} ({run['checkpoint'] or 'no checkpoint'}): top-1 {scores}; {videos(run)}")
    if len(report["runs"]) > 1 or "hm" in report:
        scores = "  ".join(f"{part} {report[f'{part}_top1_mean']:.2f} ± {report[f'{part}_top1_std']:.2f}"
                           for part in parts)
        if "hm" in report:
            scores += f"  HM {report['hm']:.2f} (of the mean base and novel top-1)"
        lines.append(f"{what}, mean of {len(report['runs'])} model(s): top-1 {scores}")
    return lines


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
        print(f"[stdd] --checkpoint {(args.checkpoint or [None])[0]}: {loaded.summary()}", file=sys.stderr)
    # Only the classes some split uses get text features (K600: the 220 new ones, whose shipped
    # ASKG prompts exist; the K400 classes of the list are never scored).
    needed = sorted(set().union(*(split.class_indices for split in splits)))
    needed_names = [class_names[i] for i in needed]
    prompts = build_prompts(args.prompts or cfg.text.prompts, needed_names, dataset=dataset_key,
                            with_templates=args.with_templates or cfg.text.with_templates,
                            templates=cfg.text.templates, class_name_form=cfg.text.class_name_form,
                            prompt_kinds=cfg.text.prompt_kinds)
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
        "checkpoint": (args.checkpoint or [None])[0],
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
    parser.add_argument("--checkpoint", nargs="+",
                        help="weights file (final.pt / averaged.pt / ema.pt), training checkpoint, or an Open-VCLIP / "
                             "FROSTER / ViFi-CLIP checkpoint; base2novel / fewshot: one per training seed")
    parser.add_argument("--checkpoint-format", choices=(AUTO, *CHECKPOINT_FORMATS), default=AUTO,
                        help="the checkpoints' format (default: found from the keys of each)")
    parser.add_argument("--recipe", choices=RECIPES, default=RECIPES[0],
                        help="how to score: own (the checkpoint's method's published recipe; default), stdd (stdd's "
                             "protocol, for comparing checkpoints under one protocol) or another method's")
    parser.add_argument("--config", help="preset or YAML (default: the config stored in --checkpoint)")
    parser.add_argument("--trust-checkpoint-pretrained", action="store_true",
                        help="load the CLIP weights file the checkpoint's stored config names in model.pretrained "
                             "(a path there is refused by default; open_clip tags are always used)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="ep2")
    parser.add_argument("--annotations", nargs="+",
                        help="annotation file(s) / HMDB51 split directory (not with base2novel / fewshot)")
    parser.add_argument("--format", default="list", choices=ANNOTATION_FORMATS)
    parser.add_argument("--root", help="video root directory")
    parser.add_argument("--classes", help="shipped class list (ucf101, hmdb51, k400, k600) or a class-name file")
    splits = "; ".join(f"{protocol}: {', '.join(published_datasets(protocol))}" for protocol in SPLIT_PROTOCOLS)
    parser.add_argument("--dataset", help="dataset name for display names / shipped ASKG prompts (default: --classes); "
                                          f"the published splits ({splits}) or a folder holding a split.json")
    parser.add_argument("--shots", type=int, help="fewshot: the shot count of the list the model was trained on "
                                                  "(one of the split's lists; default: from the checkpoint)")
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
    if args.checkpoint:  # --checkpoint takes several files: key=value words after them are overrides
        args.checkpoint, overrides = split_overrides(args.checkpoint)
        args.overrides = [*overrides, *args.overrides]
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
