"""Classify your own videos with your own action names.

    python -m stdd.predict video.mp4 [more.mp4 | folder/ ...] --classes "juggling,cooking,dancing" \
        [--class-file names.txt] [--prompts askg.json] [--checkpoint averaged.pt] [--top-k 5] [--json] \
        [--checkpoint-format auto] [--recipe own] [key=value ...]

A folder stands for every video file directly in it (by suffix, sorted). ``key=value`` config
overrides may stand anywhere on the line. Exit status: 0 every video classified; 1 some video
could not be decoded (the others are classified and reported); 2 bad input -- arguments, config,
files, or no usable weights -- as one line on stderr.

From Python::

    from stdd.predict import predict
    results = predict(["video.mp4"], classes=["juggling", "cooking"], checkpoint="averaged.pt")
    results[0]["predictions"]   # [{"class": "juggling", "score": 0.93}, ...] best first

Scores are the mean over views (``eval.n_temporal_views`` x ``eval.n_spatial_crops`` of the
config) of the softmax over the given classes of the model's score (``loss.score``: STDD's is
paper Eq. 8); with ``eval.aggregation: mean_score`` (Open-VCLIP's and FROSTER's recipes, which sum
the views' logits) the softmax of the views' mean score.
With ``--checkpoint`` the config is the one stored in it, but for its run-time settings (device,
precision, workers, decoder, frame cache, batch sizes: ``stdd.engine.config.RUNTIME_KEYS``), which
are those of the machine it was trained on: here they are the defaults, or ``key=value`` (e.g.
``data.frame_cache_mb=512``).
``--prompts``: a JSON file ``{"class": ["sentence", ...]}`` (what ``python -m stdd.askg
prompts`` writes), a shipped ASKG file or a class-description file ``{"0": "Name: description"}``
(FROSTER's); classes it does not cover fall back to the templates (``text.templates``). Of an ASKG
file it reads the prompts ``text.prompt_kinds`` names (S, T or ST, from the checkpoint's config or an
override); S or T with a prompts or class-description file is refused. The template fallback is
used as it is.
``--checkpoint`` also takes Open-VCLIP, FROSTER and ViFi-CLIP checkpoints, scored by their
method's recipe or ``--recipe`` (see ``python -m stdd.eval --help``).
Without ``--checkpoint`` the weights of the configured CLIP model are used
(``--config``, default ``k400_vitb16``: ViT-B/16 ``openai``, which must be available locally).
Weights come from one of three places: ``--checkpoint`` (an STDD weights file), a local CLIP
file (``model.pretrained=/path/clip.bin``), or an open_clip tag already in the local cache (or
downloadable). When the hub cannot be reached (or ``HF_HUB_OFFLINE=1``), only the cache is
looked at, and missing weights fail at once with one line naming the three ways.
A video that cannot be decoded is reported (``"error"``) and the others are still classified.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from .cli import EXIT_FAILURES, EXIT_OK, ArgumentParser, cli_main, split_overrides
from .data import VideoRecord, read_class_names
from .data.decoders import VIDEO_SUFFIXES
from .engine.checkpoint_formats import AUTO, CHECKPOINT_FORMATS, RECIPES
from .engine.distributed import DEVICES, resolve_device
from .engine.metrics import aggregate_views
from .engine.precision import autocast_dtype
from .errors import InputError
from .knowledge.prompts import ALL_PROMPT_KINDS, TEMPLATE_SETS, UnsplitPromptsError, load_prompts


def _class_list(classes, class_file) -> list[str]:
    if classes is not None and class_file is not None:
        raise InputError("give either classes or class_file, not both")
    if class_file is not None:
        path = Path(os.path.expanduser(str(class_file)))
        if not path.is_file():
            raise InputError(f"class_file {path}: no such file")
        names = read_class_names(path)
    elif classes is None:
        raise InputError("no classes given: pass classes (a list or 'a,b,c') or class_file")
    elif isinstance(classes, str):
        names = [name.strip() for name in classes.split(",")]
    else:
        names = [str(name).strip() for name in classes]
    if not names or any(not name for name in names):
        raise InputError(f"classes: expected non-empty, comma-separated names, got {classes!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"classes: duplicated names {duplicates}")
    if len(names) < 2:
        raise InputError("classes: give at least two action names (scores are a softmax over them)")
    return names


def video_paths(videos) -> list[Path]:
    """The video files of ``videos`` (files, or folders standing for the videos directly in them)."""
    if isinstance(videos, (str, os.PathLike)):
        videos = [videos]
    paths = []
    for video in videos:
        path = Path(os.path.expanduser(str(video)))
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
            if not found:
                raise InputError(f"video folder {path}: holds no video file (suffixes {', '.join(VIDEO_SUFFIXES)})")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise InputError(f"video {path}: no such file or folder")
    if not paths:
        raise InputError("videos: give at least one video file or folder")
    return paths


def _file_prompts(names: list[str], prompts_file, templates=TEMPLATE_SETS["stdd"],
                  prompt_kinds: str = ALL_PROMPT_KINDS) -> dict[str, list[str]]:
    """The prompts ``prompts_file`` holds for some of ``names`` (the others get the templates);
    ``templates``: those a class-description file is read with; ``prompt_kinds``: which prompts of ASKG
    graphs (``text.prompt_kinds``; S or T with a file without the spatial / temporal split: a ConfigError)."""
    try:
        covered = load_prompts(prompts_file, names, partial=True, templates=templates, only=prompt_kinds)
    except UnsplitPromptsError as error:
        from .engine.task import unsplit_prompts_error

        raise unsplit_prompts_error(prompt_kinds, f"--prompts {prompts_file}") from error
    if not covered:
        raise InputError(f"prompts {prompts_file}: covers none of the classes {names[:5]}")
    return covered


def predict(
    videos: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    classes: Optional[Union[str, Sequence[str]]] = None,
    *,
    class_file: Optional[Union[str, os.PathLike]] = None,
    prompts: Optional[Union[str, os.PathLike]] = None,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    config: Optional[str] = None,
    overrides: Sequence[str] = (),
    top_k: int = 5,
    device: Optional[str] = None,
    batch_size: int = 4,
    trust_checkpoint_pretrained: bool = False,
    checkpoint_format: str = AUTO,
    recipe: str = RECIPES[0],
) -> list[dict]:
    """Top-k actions per video: ``[{"video": path, "predictions": [{"class", "score"}, ...]}]``
    (or ``{"video": path, "error": reason}`` for a video that cannot be decoded).

    ``trust_checkpoint_pretrained``: load the CLIP weights file that the checkpoint's stored
    config names in ``model.pretrained`` (refused by default; open_clip tags are always used).
    ``checkpoint_format`` / ``recipe``: as ``stdd.eval``'s ``--checkpoint-format`` / ``--recipe``."""
    paths = video_paths(videos)
    if not isinstance(top_k, int) or top_k < 1:
        raise InputError(f"top_k must be a positive integer, got {top_k!r}")
    names = _class_list(classes, class_file)
    covered = {} if prompts is None else _file_prompts(names, prompts)
    # The model's side imports open_clip (seconds): here, after the arguments are checked, so that
    # --help and a bad argument answer at once.
    from .engine.evaluation import score_dataset
    from .engine.inference import config_for_weights, load_model_for_inference
    from .engine.task import CLASS_DESCRIPTIONS, build_prompts, build_video_dataset, text_features_for
    from .model.clip_loading import WeightsUnavailableError

    cfg, state = config_for_weights(None if checkpoint is None else str(checkpoint), config, list(overrides),
                                    trust_checkpoint_pretrained=trust_checkpoint_pretrained,
                                    checkpoint_format=checkpoint_format, recipe=recipe)
    if prompts is None and cfg.text.prompts == CLASS_DESCRIPTIONS:
        build_prompts(CLASS_DESCRIPTIONS, names)  # says which file the recipe needs
    if prompts is not None:  # read again with the config's templates (a class-description file uses them)
        covered = _file_prompts(names, prompts, TEMPLATE_SETS[cfg.text.templates], cfg.text.prompt_kinds)
    templates = build_prompts("templates", names, templates=cfg.text.templates,
                              class_name_form=cfg.text.class_name_form)
    class_prompts = {name: covered.get(name, templates[name]) for name in names}
    run_device = resolve_device(device or cfg.run.device)
    try:
        model, text, loaded = load_model_for_inference(cfg, state, run_device)
    except WeightsUnavailableError as error:
        reason = str(error).split(". Provide weights")[0]
        raise WeightsUnavailableError(
            f"no usable weights ({reason}); give them one of three ways: --checkpoint <STDD weights .pt>, "
            f"model.pretrained=<a local CLIP checkpoint file>, or the open_clip weights of tag "
            f"{cfg.model.pretrained!r} in the local cache (downloaded once where the hub is reachable)"
        ) from error
    if loaded is not None:
        print(f"[stdd] --checkpoint {checkpoint}: {loaded.summary()}", file=sys.stderr)
    features = text_features_for(text, class_prompts, cfg.text)
    dataset = build_video_dataset(
        cfg, None, training=False, records=[VideoRecord(path, -1) for path in paths],
        n_temporal_views=cfg.eval.n_temporal_views, n_spatial_crops=cfg.eval.n_spatial_crops,
    )
    scored = score_dataset(model, dataset, features.features, features.mask, batch_size=batch_size,
                           device=run_device, autocast_dtype=autocast_dtype(cfg.run.precision, run_device),
                           seed=int(cfg.run.seed))
    # (N, C): the mean of the views' softmax, or (eval.aggregation: mean_score) the softmax of their mean score
    probabilities = aggregate_views(scored.view_scores, range(len(names)), cfg.eval.aggregation)
    if cfg.eval.aggregation == "mean_score":
        probabilities = probabilities.softmax(dim=-1)
    k = min(top_k, len(names))
    by_index = {int(i): row for i, row in zip(scored.indices, probabilities)}
    errors = {f.index: f.reason for f in scored.failures}
    results = []
    for index, path in enumerate(paths):
        if index not in by_index:
            results.append({"video": str(path), "error": errors.get(index, "could not be decoded")})
            continue
        values, order = by_index[index].topk(k)
        results.append({"video": str(path), "predictions": [
            {"class": names[int(c)], "score": round(float(v), 6)} for v, c in zip(values, order)
        ]})
    return results


def build_argument_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m stdd.predict", description="Top-k actions of videos "
                            "for action names you give (zero-shot, STDD).")
    parser.add_argument("videos", nargs="+", help="video files or folders of videos; key=value words "
                        "anywhere on the line are config overrides")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--classes", help='comma-separated action names, e.g. "juggling,cooking,dancing"')
    group.add_argument("--class-file", help="file with one action name per line")
    parser.add_argument("--prompts", help="prompt JSON {class: [sentences]} or ASKG file (default: templates)")
    parser.add_argument("--checkpoint", help="weights (final.pt / averaged.pt), training checkpoint, or an "
                                             "Open-VCLIP / FROSTER / ViFi-CLIP checkpoint")
    parser.add_argument("--checkpoint-format", choices=(AUTO, *CHECKPOINT_FORMATS), default=AUTO,
                        help="the checkpoint's format (default: found from its keys)")
    parser.add_argument("--recipe", choices=RECIPES, default=RECIPES[0],
                        help="how to score: own (the checkpoint's method's recipe; default), stdd, or another method's")
    parser.add_argument("--config", help="preset or YAML (default: the checkpoint's config, else k400_vitb16)")
    parser.add_argument("--trust-checkpoint-pretrained", action="store_true",
                        help="load the CLIP weights file the checkpoint's stored config names in model.pretrained "
                             "(a path there is refused by default; open_clip tags are always used)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", choices=DEVICES)
    return parser


def run(argv: Optional[Sequence[str]] = None) -> int:
    """The command line's work; errors are raised (:func:`main` reports them)."""
    args = build_argument_parser().parse_args(argv)
    videos, overrides = split_overrides(args.videos)  # key=value words may stand anywhere
    if not videos:
        raise InputError("videos: give at least one video file or folder (only key=value overrides were given)")
    results = predict(videos, args.classes, class_file=args.class_file, prompts=args.prompts,
                      checkpoint=args.checkpoint, config=args.config, overrides=overrides,
                      top_k=args.top_k, device=args.device,
                      trust_checkpoint_pretrained=args.trust_checkpoint_pretrained,
                      checkpoint_format=args.checkpoint_format, recipe=args.recipe)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            print(result["video"])
            if "error" in result:
                print(f"  error: {result['error']}")
                continue
            for rank, prediction in enumerate(result["predictions"], start=1):
                print(f"  {rank}. {prediction['class']:<40s} {prediction['score']:.4f}")
    return EXIT_FAILURES if any("error" in r for r in results) else EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m stdd.predict``; exit status 0 / 1 (some video failed) / 2 (bad input), see above."""
    return cli_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
