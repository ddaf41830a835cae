"""Typed run configs: the schema (dataclasses), shipped presets or a YAML file, ``key=value`` overrides.

A config is plain data (YAML) bound to the dataclasses below with
``OmegaConf.structured``: every key has one type and one default, written here
once (the ``model.stca`` section is generated from
:class:`~stdd.model.stca_settings.STCASettings`, whose fields and defaults are
the STCA settings' only home). Code reads ``cfg.section.key`` directly. A key
that is not in the schema, or a value of the wrong type, is a
:class:`ConfigError` naming its dotted path (``model.stca.mask_ration``), in a
file as in an override.

``load_config(None)`` gives the ``demo`` preset. A user YAML may start from a
preset with ``base: <preset or path>`` and change only what differs.
Overrides use omegaconf's dot-list syntax (``optim.lr=1e-5 data.batch_size=8``);
``+key=value`` adds a key of a new top-level section, which nothing in stdd
reads (for a user's own tooling); the typed sections stay closed.

Values are checked when a config is loaded, before anything is built or
written: numeric ranges (:data:`VALUE_RANGES`), the keys with a fixed set of
values (:data:`VALUE_CHOICES`, which points at each list's one home, e.g.
``stdd.data.sampling.SAMPLING_MODES``, and takes every ``model.stca`` field
declared with :func:`stdd.model.stca_settings.choice`), and what only makes
sense together (a warm-up no longer than the run; UCF101 lists of the split
``data.split`` names; a published split list that exists, ``data.published``).
Each error is one line naming the dotted key, the value and what was expected.
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..data.annotations import (ANNOTATION_FORMATS, OFFICIAL_SPLITS, ON_MISSING_POLICIES, SplitFolder, resolve_split,
                                ucf101_list_mismatch)
from ..data.dataset import ON_ERROR_POLICIES
from ..data.loaders import DECODERS
from ..data.sampling import SAMPLING_MODES, SPATIAL_CROPS
from ..data.synthetic import CODEC_SETTINGS
from ..data.transforms import NORMALIZATIONS
from ..errors import UsageError
from ..files import atomic_write
from ..knowledge.prompts import PROMPT_KINDS, TEMPLATE_SETS
from ..model.alignment import SCORE_MODES
from ..model.prompt_adaptation import ADAPTATIONS, PromptSettings
from ..model.stca_settings import STCASettings, allowed_values, choice_fields
from ..model.stdd_model import DISTILL_WEIGHT
from ..model.text_encoder import TEXT_FEATURE_SOURCES, TEXT_TOWERS
from ..model.video_encoder import TEMPORAL_KINDS
from ..resources import CLASS_NAME_FORMS, SPLIT_PROTOCOLS
from .distributed import DEVICES
from .metrics import AGGREGATIONS
from .optimization import NONFINITE_POLICIES
from .precision import PRECISIONS

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = "demo"
SYNTHETIC_DATASET = "synthetic"  # data.dataset of the generated motion set; the others are annotation formats
PUBLISHED_DATASET = "published"  # data.dataset of a published split list (data.published says which)
DATASETS = (SYNTHETIC_DATASET, PUBLISHED_DATASET, *ANNOTATION_FORMATS)  # the values of data.dataset


class ConfigError(UsageError, ValueError):
    """A config file or override is malformed; the message names it."""


# ----------------------------------------------------------------------------- the schema


@dataclass
class RunConfig:
    output_dir: str = "runs/stdd"  # run directory: config.yaml, metrics.jsonl, checkpoints/, final.pt
    seed: int = 0  # the run seed: model init, data order, augmentation and phase streams derive from it
    device: str = "auto"  # auto (the local GPU under torchrun, else CPU) | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    log_every_steps: int = 10  # training scalars every N optimizer steps (and at each epoch end)
    max_steps: Optional[int] = None  # stop with a checkpoint after this many optimizer steps (job limits)
    tensorboard: bool = True  # also write the scalars for TensorBoard (metrics.jsonl is always written)


def _stca_config_class():
    """``model.stca``: ``enabled`` plus every :class:`STCASettings` field with its type and default."""
    hints = typing.get_type_hints(STCASettings)
    # false: no STCA (with model.temporal: stca, the frame-only baseline: the older spelling of temporal none)
    specs = [("enabled", bool, field(default=True))]
    specs += [(f.name, hints[f.name], field(default=f.default)) for f in fields(STCASettings)]
    cls = make_dataclass("STCAConfig", specs)
    cls.__doc__ = "``enabled`` (false: frame-only, open_clip's own blocks) + the fields of STCASettings."
    return cls


STCAConfig = _stca_config_class()


@dataclass
class PromptConfig:
    """``model.prompt``: the prompt generators of ``model.adaptation: prompt`` (PromptSettings)."""

    tokens: int = PromptSettings.tokens  # prompt tokens per frame, prepended in every block but the first
    hidden: Optional[int] = PromptSettings.hidden  # the generators' hidden width; null: the model width / 4


@dataclass
class ModelConfig:
    clip_name: str = "ViT-B-16"  # an open_clip architecture name (open_clip.list_models())
    pretrained: Optional[str] = "openai"  # an open_clip tag or a local checkpoint file; null: random init
    allow_random_init: bool = False  # pretrained null needs this: never train from random weights silently
    # how frames meet: stca (the paper, settings in model.stca) | expand_view (every block's attention also reads
    # the neighbour frames: Open-VCLIP, FROSTER) | none (frame-only: open_clip's blocks). model.stca.enabled=false
    # is the older spelling of none
    temporal: str = "stca"
    # at evaluation, every weight w of a checkpoint becomes r * w_clip + (1 - r) * w with r this share of the
    # CLIP weights of model.pretrained (Open-VCLIP's test-time interpolation: 0.5 for B/16, 0.6 for L/14); 0: as is
    weight_interpolation: float = 0.0
    # full: every weight of the CLIP tower trains (the paper's STDD; Table 4's fully-tuned) | prompt: the tower
    # frozen as loaded, STCA kept, only a small MLP per block gap trains, turning a block's output tokens into
    # prompt tokens prepended to the next block's (Table 4's prompt-based; settings in model.prompt)
    adaptation: str = ADAPTATIONS[0]
    prompt: PromptConfig = field(default_factory=PromptConfig)
    stca: STCAConfig = field(default_factory=STCAConfig)


@dataclass
class TextConfig:
    # templates | askg (shipped ASKG prompts) | dataset (its prompts.json) | a file (prompts, ASKG or class
    # descriptions) | class_descriptions (a class-description file must be given: FROSTER's recipe)
    prompts: str = "templates"
    cache_dir: Optional[str] = None  # text-feature cache directory; null: no cache
    with_templates: bool = False  # add the template sentences to file / ASKG prompts
    # which ASKG prompts a class gets: S (spatial) | T (temporal) | ST (spatial then temporal: the paper); S and T
    # need ASKG graphs (text.prompts askg or an ASKG file): the paper's Figure 4 ablation
    prompt_kinds: str = "ST"
    # encoder: the frozen text tower reads the prompts (the paper) | orthogonal: a fixed orthonormal vector per
    # class, prompts unread (stand-in for a pretrained tower when training from random weights: the demo) |
    # words: each prompt the mean of fixed random word vectors (a stand-in whose classes share structure)
    features: str = "encoder"
    # templates x class name for prompts=templates (and for class-description files): stdd | open_vclip (its 28)
    # | vifi_clip ("a photo of a {}.")
    templates: str = "stdd"
    # how a class is named in the prompts: words (plain lower-case words: ApplyEyeMakeup -> apply eye makeup) |
    # listed (as the class list writes it, underscores read as spaces: ViFi-CLIP's label files)
    class_name_form: str = "words"
    # which text tower reads the prompts: clip (the frozen CLIP of model.pretrained: STDD, Open-VCLIP) |
    # checkpoint (the checkpoint's own fine-tuned tower: FROSTER, ViFi-CLIP)
    tower: str = "clip"


@dataclass
class LossConfig:
    distillation_weight: float = DISTILL_WEIGHT  # weight of the distillation term; 0: no teacher
    score: str = SCORE_MODES[0]  # frame_prompt (Eq. 8) | mean_pool (the ablation)


@dataclass
class SyntheticConfig:
    """The synthetic motion set (``data.dataset: synthetic``); null: the generator's default."""

    videos_per_class: Optional[int] = None  # training videos per class
    val_videos_per_class: Optional[int] = None  # held-out videos per class
    num_frames: Optional[int] = None  # frames per video
    size: Optional[int] = None  # frame height and width in pixels (even)
    seed: Optional[int] = None  # seed of the generated set
    classes: Optional[list[str]] = None  # a subset of the motion classes; null: all
    codec: Optional[str] = None  # h264 | vp9


@dataclass
class PublishedSplitConfig:
    """A published split list to train on (``data.dataset: published``; stdd/resources/splits/README.md)."""

    protocol: Optional[str] = None  # base2novel (a seed's list of the base classes) | fewshot (K videos per class)
    dataset: Optional[str] = None  # k400 | hmdb51 | ucf101 | ssv2 (fewshot: not k400), or a folder with a split.json
    seed: Optional[int] = None  # base2novel: which training list, 1, 2 or 3
    shots: Optional[int] = None  # fewshot: videos per class, 2, 4, 8 or 16


@dataclass
class DataConfig:
    dataset: str = "kinetics"  # kinetics (csv) | list (mmaction2) | csv | ucf101 | hmdb51 | ssv2 | synthetic | published
    root: Optional[str] = None  # video root directory (synthetic: where the set is generated)
    train_annotations: Optional[str] = None  # annotation file of the training split (hmdb51: the split directory)
    val_annotations: Optional[str] = None  # annotation file of the validation split (optional; hmdb51: as above)
    # the official split of ucf101 / hmdb51 (1, 2 or 3): training reads its train videos, validation its test
    # videos (hmdb51: ids 1 and 2 of the split directory's files; ucf101: trainlist0N / testlist0N must be N)
    split: int = 1
    class_names: Any = None  # a shipped list name (k400, ucf101, hmdb51, k600), a class-name file or a list
    decoder: str = "pyav"  # pyav (CPU workers) | dali (GPU decoding)
    num_frames: int = 8  # frames per clip, T
    stride: int = 16  # frames between sampled frames (dense sampling)
    sampling: str = "dense"  # dense | segments (TSN)
    input_size: int = 224  # crop size in pixels (the model's image size)
    short_side: Optional[int] = None  # frames are decoded with this shorter side; null: input_size
    normalization: str = "clip"  # pixel statistics: clip (OpenAI CLIP's) | imagenet (ViFi-CLIP's)
    horizontal_flip: bool = True  # random horizontal flips in training
    batch_size: int = 4  # clips per process and step
    num_workers: int = 2  # decoding worker processes (0: in the main process)
    frame_cache_mb: float = 0  # PyAV: keep whole decoded videos in memory, MiB per process; 0: off
    on_missing: str = "skip"  # listed videos that do not exist: skip (counted) | fail
    on_error: str = "skip"  # videos that do not decode: skip (counted, replaced in training) | fail
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    published: PublishedSplitConfig = field(default_factory=PublishedSplitConfig)


@dataclass
class OptimConfig:
    lr: float = 3.33e-6  # AdamW lr for a global batch of reference_batch clips
    reference_batch: int = 32  # the global batch lr is given for
    scale_lr: bool = True  # scale lr linearly with the actual global batch
    weight_decay: float = 0.01  # on matrices only (no decay on 1-D parameters)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    eps: float = 1e-8  # AdamW eps
    epochs: int = 22  # training epochs
    warmup_epochs: float = 2.0  # linear warm-up, in epochs
    warmup_start_factor: float = 0.01  # warm-up starts at lr * this
    end_factor: float = 0.01  # the cosine ends at lr * this
    grad_clip_norm: Optional[float] = 1.0  # clip the gradient norm; null: no clipping
    accumulation_steps: int = 1  # micro-batches per optimizer step
    on_nonfinite_loss: str = "stop"  # a step with a NaN/inf loss: stop (naming it) | skip (no update, counted)


@dataclass
class CheckpointConfig:
    every_epochs: int = 1  # end-of-epoch checkpoint every N epochs; 0: none (the last and averaged ones always)
    every_steps: int = 0  # mid-epoch checkpoint every N optimizer steps; 0: none
    keep_mid_epoch: int = 1  # mid-epoch checkpoints kept (the newest)


@dataclass
class AveragingConfig:
    epochs: Any = None  # uniform weight average over epochs: all | last:N | A-B | [list]; null: off
    include_raw_clip: bool = False  # the weights before training count as "epoch 0" of the average
    ema_decay: Optional[float] = None  # also keep an exponential moving average (ema.pt); null: off


@dataclass
class EvalConfig:
    every_epochs: int = 0  # validation top-1 during training every N epochs; 0: off
    n_temporal_views: int = 3  # temporal views per video (evaluation, prediction)
    n_spatial_crops: int = 1  # spatial crops per view: 1 | 3
    aggregation: str = "mean_softmax"  # how views are combined: mean_softmax | mean_score
    batch_size: int = 8  # videos per evaluation batch


@dataclass
class STDDConfig:
    """A whole run: what ``stdd.train`` / ``stdd.eval`` / ``stdd.predict`` read."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    averaging: AveragingConfig = field(default_factory=AveragingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS = tuple(f.name for f in fields(STDDConfig))

# Run-time settings: how and where one process runs (devices, precision, op implementations, decoding
# workers and caches, batch sizes of scoring, failure policies, logging, output and cache paths), never
# what the model is or computes. A checkpoint records them with the rest of its config, but they belong
# to the machine it was trained on: stdd.eval / stdd.predict take them from their own defaults and
# command line, not from the checkpoint (stdd.engine.inference), and a resumed run may change them
# (stdd.engine.resume). Dotted keys of the schema above.
RUNTIME_KEYS = (
    "run.output_dir",  # (a resumed run may continue a checkpoint copied from another directory)
    "run.device",
    "run.precision",  # the same model and objective; the numbers are no longer bit-reproducible
    "run.log_every_steps",
    "run.max_steps",
    "run.tensorboard",
    "model.stca.backend",  # STCA op implementations compute the same function
    "model.stca.attention",  # sdpa / xformers (CUDA only): the same attention
    "model.stca.projection",  # shared / per_path: the same block, exactly (docs/stca.md section 6)
    "text.cache_dir",
    "data.decoder",
    "data.num_workers",
    "data.frame_cache_mb",
    "data.on_missing",
    "data.on_error",
    "optim.on_nonfinite_loss",
    "eval.batch_size",
)

# How a checkpoint is scored rather than what it is: the frames a video gives, their pixels, the prompts
# and the score. A recipe (stdd.engine.inference.RECIPES: stdd's protocol, or a method's published one) sets
# these keys and nothing else, so checkpoints of any method can be scored under one protocol. What the
# model is (architecture, temporal kind, weights and their interpolation, text tower) is never among them.
PROTOCOL_KEYS = (
    "data.num_frames",
    "data.stride",
    "data.sampling",
    "data.input_size",
    "data.short_side",
    "data.normalization",
    "text.prompts",
    "text.with_templates",
    "text.prompt_kinds",
    "text.templates",
    "text.class_name_form",
    "loss.score",
    "eval.n_temporal_views",
    "eval.n_spatial_crops",
    "eval.aggregation",
)

# ----------------------------------------------------------------------------- value ranges

# dotted key -> (what it must be, check); a null value of an Optional key is never checked.
# Types are the schema's (omegaconf converts and refuses); these are the ranges it cannot express.
_POSITIVE_INT = ("an integer >= 1", lambda v: v >= 1)
_NON_NEGATIVE = ("a number >= 0", lambda v: v >= 0)
_POSITIVE = ("a number > 0", lambda v: v > 0)
VALUE_RANGES: dict[str, tuple[str, Any]] = {
    "run.max_steps": _POSITIVE_INT,
    "run.log_every_steps": _POSITIVE_INT,
    "data.num_frames": _POSITIVE_INT,
    "data.stride": _POSITIVE_INT,
    "data.input_size": _POSITIVE_INT,
    "data.short_side": _POSITIVE_INT,
    "data.batch_size": _POSITIVE_INT,
    "data.num_workers": ("an integer >= 0", lambda v: v >= 0),
    "data.frame_cache_mb": _NON_NEGATIVE,
    "optim.lr": _POSITIVE,
    "optim.reference_batch": _POSITIVE_INT,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.betas": ("two numbers in [0, 1)", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v)),
    "optim.eps": _POSITIVE,
    "optim.epochs": _POSITIVE_INT,
    "optim.warmup_epochs": _NON_NEGATIVE,
    "optim.warmup_start_factor": ("a number in (0, 1]", lambda v: 0 < v <= 1),
    "optim.end_factor": ("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "optim.grad_clip_norm": _POSITIVE,
    "optim.accumulation_steps": _POSITIVE_INT,
    "checkpoint.every_steps": ("an integer >= 0 (0: none)", lambda v: v >= 0),
    "checkpoint.keep_mid_epoch": ("an integer >= 0", lambda v: v >= 0),
    "averaging.ema_decay": ("a number in (0, 1)", lambda v: 0 < v < 1),
    "eval.every_epochs": ("an integer >= 0 (0: off)", lambda v: v >= 0),
    "eval.n_temporal_views": _POSITIVE_INT,
    "eval.batch_size": _POSITIVE_INT,
    "loss.distillation_weight": _NON_NEGATIVE,
    "model.weight_interpolation": ("a number in [0, 1]", lambda v: 0 <= v <= 1),
    "model.prompt.tokens": _POSITIVE_INT,
    "model.prompt.hidden": _POSITIVE_INT,
}

# dotted key -> its allowed values: the list's one home (a sequence, or a function giving one, for names
# known only at run time); never a copy, so a new value is added in one place. A null value of an Optional
# key is never checked. Every model.stca field declared as a choice in STCASettings is taken as it is.
VALUE_CHOICES: dict[str, Any] = {
    "run.device": DEVICES,
    "run.precision": PRECISIONS,
    "model.temporal": TEMPORAL_KINDS,
    "model.adaptation": ADAPTATIONS,
    "text.features": TEXT_FEATURE_SOURCES,
    "text.templates": TEMPLATE_SETS,
    "text.prompt_kinds": PROMPT_KINDS,
    "text.class_name_form": CLASS_NAME_FORMS,
    "text.tower": TEXT_TOWERS,
    "loss.score": SCORE_MODES,
    "data.dataset": DATASETS,
    "data.split": OFFICIAL_SPLITS,
    "data.decoder": DECODERS,
    "data.sampling": SAMPLING_MODES,
    "data.normalization": NORMALIZATIONS,
    "data.on_missing": ON_MISSING_POLICIES,
    "data.on_error": ON_ERROR_POLICIES,
    "data.synthetic.codec": CODEC_SETTINGS,
    "data.published.protocol": SPLIT_PROTOCOLS,
    "optim.on_nonfinite_loss": NONFINITE_POLICIES,
    "eval.n_spatial_crops": SPATIAL_CROPS,
    "eval.aggregation": AGGREGATIONS,
    **{f"model.stca.{name}": allowed for name, allowed in choice_fields().items()},
}


def check_value_ranges(cfg: DictConfig, source: Optional[str] = None) -> DictConfig:
    """Raise :class:`ConfigError` ``"[<source>: ]<dotted.key>=<value>: expected ..."`` for a value out of
    its range (:data:`VALUE_RANGES`) or not one of its allowed values (:data:`VALUE_CHOICES`)."""
    prefix = f"{source}: " if source else ""
    for key, (expected, within) in VALUE_RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        plain = list(value) if OmegaConf.is_list(value) else value
        if not within(plain):
            raise ConfigError(f"{prefix}{key}={plain!r}: expected {expected}")
    for key, allowed in VALUE_CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        values = allowed_values(allowed)
        if value not in values:
            optional = OmegaConf.select(OmegaConf.structured(STDDConfig), key) is None
            also = " (or null)" if optional else ""
            raise ConfigError(f"{prefix}{key}={value!r}: expected one of {', '.join(map(str, values))}{also}")
    return cfg


def check_run_settings(cfg: DictConfig) -> DictConfig:
    """What only makes sense together, for a run (training): raise :class:`ConfigError` naming the keys.

    - ``optim.warmup_epochs`` no longer than ``optim.epochs``: a longer warm-up would be cut at the
      run's end, so the learning rate would only climb and never decay (a warm-up of the whole run is
      taken as written);
    - UCF101 (``data.dataset: ucf101``): annotation files named as the official lists must be the train
      list (training) and the test list (validation) of split ``data.split``;
    - a published split (``data.dataset: published`` with ``data.published.protocol``): it exists and has a
      training list of ``data.published.seed`` / ``shots`` (:func:`published_split_of`);
    - Something-Something v2 (its format, class list or published split) without horizontal flips: a flip
      turns some of its classes into others.
    """
    optim = cfg.optim
    if float(optim.warmup_epochs) > int(optim.epochs):
        raise ConfigError(
            f"optim.warmup_epochs={float(optim.warmup_epochs):g} is longer than the run (optim.epochs="
            f"{int(optim.epochs)}): the learning rate would only climb; give a warm-up of at most optim.epochs"
        )
    data = cfg.data
    if data.dataset == "ucf101":
        for role, subset in (("train", "train"), ("val", "test")):
            path = data[f"{role}_annotations"]
            mismatch = None if path is None else ucf101_list_mismatch(path, int(data.split), subset)
            if mismatch is not None:
                raise ConfigError(f"data.{role}_annotations={path}: {mismatch} (data.split={int(data.split)})")
    if data.dataset == PUBLISHED_DATASET and data.published.protocol is not None:
        published_split_of(cfg)  # (without a protocol the run stops where it reads its data, as without a list)
    if data.horizontal_flip and _dataset_name(cfg) == "ssv2":
        raise ConfigError("data.horizontal_flip=true: Something-Something v2 has classes a flip turns into others "
                          "('Pushing something from left to right'); set data.horizontal_flip=false")
    return cfg


def _dataset_name(cfg: DictConfig) -> Optional[str]:
    """Which benchmark dataset a run reads, where the config says it: ssv2 (its format or its class list), or
    a published split's dataset; None otherwise."""
    data = cfg.data
    if data.dataset == PUBLISHED_DATASET:
        return str(data.published.dataset).lower() if data.published.dataset else None
    if data.dataset == "ssv2" or (isinstance(data.class_names, str) and data.class_names.lower() == "ssv2"):
        return "ssv2"
    return None


# what picks the training list of a published split: base-to-novel by seed, few-shot by shot count
_PUBLISHED_KEY = {"base2novel": "seed", "fewshot": "shots"}


def published_split_of(cfg: DictConfig) -> tuple[SplitFolder, int]:
    """The published split and training-list key (seed or shots) of ``data.published`` (``data.dataset:
    published``), each value checked: :class:`ConfigError` naming the dotted key and what exists. Its
    lists name the videos and classes, so ``data.train_annotations``, ``data.val_annotations`` and
    ``data.class_names`` must stay null."""
    data, published = cfg.data, cfg.data.published
    for key in ("train_annotations", "val_annotations", "class_names"):
        if data[key] is not None:
            raise ConfigError(f"data.{key}={data[key]}: not read with data.dataset=published (the split's own lists "
                              f"and class lists are); leave it null")
    if published.protocol is None:
        raise ConfigError(f"data.published.protocol=null: data.dataset=published needs one of "
                          f"{', '.join(SPLIT_PROTOCOLS)}")
    try:
        split = resolve_split(published.dataset, published.protocol, where="data.published.dataset")
    except ValueError as error:
        raise ConfigError(str(error)) from error
    name = _PUBLISHED_KEY[published.protocol]
    other = "shots" if name == "seed" else "seed"
    if published[other] is not None:
        raise ConfigError(f"data.published.{other}={published[other]}: a {published.protocol} split picks its list "
                          f"by data.published.{name}; leave {other} null")
    try:
        split.train_list(published[name])
    except ValueError as error:
        raise ConfigError(f"data.published.{error}") from error
    return split, int(published[name])


def _error_text(error: OmegaConfBaseException) -> str:
    """omegaconf's message with the dotted path of the key first (``model.stca.window: ...``)."""
    message = str(getattr(error, "msg", None) or error).splitlines()[0]
    key = getattr(error, "full_key", None)
    return f"{key}: {message}" if key else message


def typed_config(data: Union[DictConfig, dict], source: str) -> DictConfig:
    """``data`` (a loaded YAML, a checkpoint's stored config) bound to the schema.

    Unknown keys and values of the wrong type raise :class:`ConfigError`
    ``"<source>: <dotted.key>: ..."``. Top-level keys outside the schema are kept
    only when they were added with ``+key=value`` (see :func:`apply_overrides`).
    """
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(STDDConfig), data)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{source}: {_error_text(error)}") from error
    return cfg


def temporal_of(cfg: DictConfig) -> str:
    """The video encoder's temporal kind (one of ``TEMPORAL_KINDS``): ``model.temporal``, except that
    ``model.stca.enabled: false`` with ``model.temporal: stca`` (the older spelling) is ``none``."""
    temporal = str(cfg.model.temporal)
    return "none" if temporal == "stca" and not cfg.model.stca.enabled else temporal


def stca_settings_of(cfg: DictConfig) -> Optional[STCASettings]:
    """The :class:`STCASettings` of ``cfg.model.stca``; ``None`` unless the encoder runs STCA
    (:func:`temporal_of` is ``stca``: not frame-only, not the widened-time attention)."""
    section = cfg.model.stca
    if temporal_of(cfg) != "stca":
        return None
    values = OmegaConf.to_container(section, resolve=True)
    try:
        return STCASettings(**{f.name: values[f.name] for f in fields(STCASettings)})
    except ValueError as error:
        raise ConfigError(f"model.stca: {error}") from error


def prompt_settings_of(cfg: DictConfig) -> Optional[PromptSettings]:
    """The :class:`PromptSettings` of ``model.prompt`` with ``model.adaptation: prompt``, else ``None``.

    Prompt-based adaptation keeps the CLIP tower as loaded and trains only the prompt generators, so
    it needs STCA (``model.temporal: stca``: the generators read STCA blocks' outputs), and nothing
    that mixes CLIP weights into trained ones applies (``model.weight_interpolation``,
    ``averaging.include_raw_clip``): each is a :class:`ConfigError` naming the key.
    """
    model = cfg.model
    if model.adaptation != "prompt":
        return None
    if temporal_of(cfg) != "stca":
        raise ConfigError(f"model.adaptation=prompt: the prompt generators read STCA blocks' outputs; it needs "
                          f"model.temporal=stca with model.stca.enabled=true, got {temporal_of(cfg)}")
    if float(model.weight_interpolation):
        raise ConfigError(f"model.weight_interpolation={float(model.weight_interpolation):g}: with model.adaptation="
                          "prompt the CLIP tower is not trained (nothing to mix CLIP back into); set it to 0")
    if cfg.averaging.include_raw_clip:
        raise ConfigError("averaging.include_raw_clip=true: with model.adaptation=prompt the average holds only the "
                          "prompt generators, which CLIP has no weights of; set it to false")
    return PromptSettings(tokens=int(model.prompt.tokens),
                          hidden=None if model.prompt.hidden is None else int(model.prompt.hidden))


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _resolve_source(config: Union[str, Path]) -> Path:
    """A path to an existing YAML file, or the name of a shipped preset."""
    path = Path(os.path.expanduser(str(config)))
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{config}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(
        f"--config {config!r}: neither a YAML file nor a shipped preset "
        f"(presets: {', '.join(list_presets()) or 'none'})"
    )


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in seen + (path,))
        raise ConfigError(f"config 'base' chain loops: {chain}")
    try:
        cfg = OmegaConf.load(path)
    except (OSError, OmegaConfBaseException, Exception) as error:  # yaml.YAMLError is not an OmegaConf error
        raise ConfigError(f"config file {path}: cannot be read as YAML ({error})") from error
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got a list")
    if len(cfg) == 0:
        raise ConfigError(f"config file {path}: is empty (expected 'base: <preset or file>' and/or sections "
                          f"such as data: or optim:)")
    base = cfg.pop("base", None)
    if base is None:
        return typed_config(cfg, f"config file {path}")
    base_source = Path(os.path.expanduser(str(base)))
    if not base_source.is_absolute() and (path.parent / base_source).is_file():
        base_source = path.parent / base_source
    base_cfg = _load_yaml(_resolve_source(base_source if base_source.is_file() else base), seen + (path,))
    try:
        return OmegaConf.merge(base_cfg, cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(f"config file {path}: {_error_text(error)}") from error


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Merge ``key=value`` strings into the typed ``cfg``; ``+key=value`` adds a new top-level section.

    A key outside the schema, or a value of the wrong type, is a :class:`ConfigError`
    naming the dotted key.
    """
    strict, additions = [], []
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.lr=1e-5)")
        (additions if item.startswith("+") else strict).append(item.lstrip("+"))
    for item in additions:
        if item.split(".", 1)[0].split("=", 1)[0] in SECTIONS:
            raise ConfigError(
                f"override +{item}: the {item.split('.', 1)[0]!r} section has a fixed set of keys; "
                "write key=value for one of them (a + key may only start a new top-level section)"
            )
    cfg = cfg.copy()
    try:
        if additions:
            for section in SECTIONS:  # keep the typed sections closed while the root takes new keys
                OmegaConf.set_struct(cfg[section], True)
            OmegaConf.set_struct(cfg, False)
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(additions))
    except OmegaConfBaseException as error:
        raise ConfigError(f"override: {_error_text(error)}") from error
    OmegaConf.set_struct(cfg, True)
    for item in strict:  # one at a time, so an error without a key path still names its override
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as error:
            hint = " (not a key of the config)" if "not in" in str(error) else ""
            where = "" if getattr(error, "full_key", None) else f" {item}"
            raise ConfigError(f"override{where}: {_error_text(error)}{hint}") from error
    return cfg


def load_config(config: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a preset/YAML (``None`` = the demo preset), apply overrides, resolve interpolations."""
    cfg = _load_yaml(_resolve_source(DEFAULT_PRESET if config is None else config))
    cfg = apply_overrides(cfg, overrides)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as error:
        raise ConfigError(f"config interpolation failed: {error}") from error
    check_value_ranges(cfg)
    check_run_settings(cfg)
    stca_settings_of(cfg)  # the STCA values are checked now, not when the model is built
    prompt_settings_of(cfg)
    return cfg


def config_to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, path: Union[str, Path]) -> Path:
    """Write the resolved config atomically (the run directory's record of what ran)."""
    return atomic_write(path, config_to_yaml(cfg))
