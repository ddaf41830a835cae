"""The bridge from a config to the model (``stdd.model``) and the data (``stdd.data``).

Everything config-shaped lives here so ``train.py`` / ``eval.py`` /
``predict.py`` stay about loops: building the STDD model (STCA on, or the
frame-only baseline with STCA switched off), the class list and prompts, the
text features, the datasets, and the training phases (its :class:`~stdd.model.phases.PhaseSampler`).

Frame-only baseline (``model.stca.enabled: false``): the ``VideoEncoder`` with
``stca=None``, i.e. open_clip's own blocks on every frame, at plain-CLIP cost:
no information crosses frames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..data import ClipSampling, build_dataloader, build_dataset, generate_synthetic_dataset
from ..data.annotations import OFFICIAL_SPLIT_FORMATS, resolve_class_names
from ..knowledge.prompts import (ALL_PROMPT_KINDS, PROMPT_KINDS, TEMPLATE_SETS, UnsplitPromptsError,
                                 has_prompt_kinds, load_prompts, template_prompts)
from ..model import (
    TEXT_FEATURE_SOURCES,
    PhaseSampler,
    build_stdd,
    orthogonal_class_features,
    word_class_features,
)
from ..resources import ASKG_SETS, K400_RENAMED_IN_K600, askg_path, prompt_name
from .config import (
    DATASETS,
    PUBLISHED_DATASET,
    SYNTHETIC_DATASET,
    ConfigError,
    prompt_settings_of,
    published_split_of,
    stca_settings_of,
    temporal_of,
)
from .evaluation import score_dataset
from .metrics import evaluate_split
from .protocols import ZeroShotSplit

# ----------------------------------------------------------------------------- model settings


def build_model(cfg: DictConfig, device, *, with_teacher: Optional[bool] = None):
    """``(STDDModel, TextEncoder)`` from ``cfg.model`` / ``cfg.loss`` (weights as configured)."""
    distill_weight = 0.0 if with_teacher is False else float(cfg.loss.distillation_weight)
    pretrained = cfg.model.pretrained
    if isinstance(pretrained, str) and pretrained.strip().lower() in ("", "none", "null"):
        pretrained = None
    if isinstance(pretrained, str) and (os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".pth", ".safetensors"))):
        pretrained = os.path.expanduser(pretrained)
    # Built under a fixed seed: with random weights (demo/tests) the frozen text tower, which no
    # weights file stores, is then the same at training, evaluation and prediction time.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.run.seed))
        model, text = build_stdd(
            cfg.model.clip_name,
            pretrained,
            stca=stca_settings_of(cfg),
            temporal=temporal_of(cfg),
            prompts=prompt_settings_of(cfg),
            allow_random_init=cfg.model.allow_random_init,
            device=device,
            distill_weight=distill_weight,
            score_mode=cfg.loss.score,
        )
    return model, text


# The state-dict keys of the frozen CLIP tower under prompt-based adaptation (model.adaptation: prompt):
# never trained, so never stored; the checkpoint's FROZEN_DIGEST_KEY says which tower they were.
FROZEN_PREFIXES = ("video_encoder.visual.", "logit_scale")
FROZEN_DIGEST_KEY = "video_encoder.frozen_digest"


def student_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: everything but the frozen teacher (encoder, projector, logit scale).

    With prompt-based adaptation: the prompt generators, the projector and the digest of the frozen
    CLIP tower (its weights come from ``model.pretrained`` when the model is built again)."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("teacher.")}
    if getattr(model.video_encoder, "prompts", None) is not None:
        state = {k: v for k, v in state.items() if not k.startswith(FROZEN_PREFIXES)}
    return state


def load_student_state_dict(model: nn.Module, state: dict, source: str = "checkpoint") -> None:
    """Load student weights; the projector is optional (absent when trained without distillation).

    Prompt generators are loaded only onto the frozen tower they were trained on: the stored digest
    must be the one of the tower this model was built from (``model.pretrained``)."""
    own = student_state_dict(model)
    missing = [k for k in own if k not in state and not k.startswith("projector.")]
    unexpected = [k for k in state if k not in own and not k.startswith("projector.")]
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not fit this model (missing {missing[:4]}, unexpected {unexpected[:4]}); "
            f"were they trained with another model.clip_name, model.stca.enabled, model.adaptation or model.prompt?"
        )
    if FROZEN_DIGEST_KEY in own and not torch.equal(own[FROZEN_DIGEST_KEY].cpu(), state[FROZEN_DIGEST_KEY].cpu()):
        raise ValueError(
            f"{source}: its prompt generators were trained on another frozen CLIP tower than the one "
            "model.pretrained gives here (the digests of the tower's weights differ): build the model from the "
            "CLIP weights it was trained with (model.clip_name, model.pretrained)"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


# ----------------------------------------------------------------------------- classes and prompts


def unsplit_prompts_error(prompt_kinds: str, what: str) -> ConfigError:
    """The error of ``text.prompt_kinds`` S or T with a prompt source ``what`` that has no spatial /
    temporal split (templates, a prompts file, class descriptions): one line naming both."""
    return ConfigError(f"text.prompt_kinds={prompt_kinds}: {what} has no spatial / temporal split of its prompts "
                       f"(only ASKG graphs have one: text.prompts=askg or an ASKG file); use text.prompt_kinds="
                       f"{ALL_PROMPT_KINDS} with it")


def _check_prompt_kinds(prompt_kinds: str) -> str:
    if prompt_kinds not in PROMPT_KINDS:
        raise ConfigError(f"text.prompt_kinds={prompt_kinds!r}: expected one of {', '.join(PROMPT_KINDS)}")
    return prompt_kinds


def _prompts_from_file(path: Path, class_names: Sequence[str], templates: Sequence[str] = TEMPLATE_SETS["stdd"],
                       *, prompt_kinds: str = ALL_PROMPT_KINDS, what: Optional[str] = None) -> dict[str, list[str]]:
    """Prompts of ``class_names`` from a prompts, ASKG or class-description file
    (:func:`stdd.knowledge.load_prompts`; ``templates``: those a class-description file is read with;
    ``prompt_kinds``: which prompts of ASKG graphs, see ``text.prompt_kinds``; ``what``: the source as
    the config names it, for the error of a file without the spatial / temporal split)."""
    try:
        return load_prompts(path, class_names, only=prompt_kinds, templates=templates)
    except UnsplitPromptsError as error:
        raise unsplit_prompts_error(prompt_kinds, what or f"text.prompts={path}") from error
    except ValueError as error:  # the loader's errors name the file
        raise ConfigError(str(error)) from error


def _k600_askg_prompts(class_names: Sequence[str], prompt_kinds: str = ALL_PROMPT_KINDS) -> dict[str, list[str]]:
    """Shipped ASKG prompts of Kinetics-600 classes: the 220 new ones from ``k600_new``; the 12 K400
    classes that K600 only renamed (in the authors' 232-class list, ``k600_new_release``) from the
    K400 graph of their K400 name (``K400_RENAMED_IN_K600``: the same action, so the same knowledge).
    ``prompt_kinds``: as ``text.prompt_kinds``."""
    k400_name = {new: old for old, new in K400_RENAMED_IN_K600.items()}
    renamed = [name for name in class_names if name in k400_name]
    prompts = {}
    others = [name for name in class_names if name not in k400_name]
    if others:
        prompts.update(_prompts_from_file(askg_path("k600_new"), others, prompt_kinds=prompt_kinds))
    if renamed:
        from_k400 = _prompts_from_file(askg_path("k400"), [k400_name[name] for name in renamed],
                                       prompt_kinds=prompt_kinds)
        prompts.update({name: from_k400[k400_name[name]] for name in renamed})
    return {name: prompts[name] for name in class_names}


# text.prompts of a recipe that reads class descriptions (FROSTER's): the file must be given.
CLASS_DESCRIPTIONS = "class_descriptions"


def build_prompts(source, class_names: Sequence[str], *, dataset: Optional[str] = None,
                  dataset_prompts: Optional[Path] = None, with_templates: bool = False, templates: str = "stdd",
                  class_name_form: str = "words", prompt_kinds: str = ALL_PROMPT_KINDS) -> dict[str, list[str]]:
    """``{class: [sentences]}`` in class order.

    ``source``: ``templates`` (the template set ``templates`` of
    :data:`~stdd.knowledge.prompts.TEMPLATE_SETS` x each class's name in ``class_name_form``,
    :func:`stdd.resources.prompt_name`), ``askg`` (the shipped ASKG prompts of ``dataset``),
    ``dataset`` (the dataset's own ``prompts.json``, e.g. the synthetic set), or a JSON file
    (prompts, ASKG, or class descriptions read with the template set). ``class_descriptions``
    stands for a class-description file the recipe needs and that was not given (an error).
    ``prompt_kinds`` (``text.prompt_kinds``, a key of :data:`~stdd.knowledge.prompts.PROMPT_KINDS`):
    the spatial (S), temporal (T) or both (ST) prompts of ASKG graphs; S or T with a source that has no
    such split is a :class:`ConfigError` naming ``text.prompt_kinds``.
    ``with_templates`` adds the template sentences to file/ASKG prompts (after the chosen kinds).
    """
    key = (dataset or "").lower()
    if templates not in TEMPLATE_SETS:
        raise ConfigError(f"text.templates={templates!r}: expected one of {', '.join(TEMPLATE_SETS)}")
    _check_prompt_kinds(prompt_kinds)
    template_set = TEMPLATE_SETS[templates]
    try:
        named = [prompt_name(key, n, class_name_form) for n in class_names]
    except ValueError as error:
        raise ConfigError(f"class names for the prompts (text.class_name_form={class_name_form}): {error}") from error
    templated = {name: sentences for name, sentences in
                 zip(class_names, template_prompts(named, template_set).values())}
    source = "templates" if source is None else str(source)
    if source in ("templates", CLASS_DESCRIPTIONS) and prompt_kinds != ALL_PROMPT_KINDS:
        raise unsplit_prompts_error(prompt_kinds, f"text.prompts={source}")
    if source == "templates":
        return templated
    if source == CLASS_DESCRIPTIONS:
        raise ConfigError(
            f"text.prompts={CLASS_DESCRIPTIONS}: this recipe (FROSTER's) reads each class's description from a "
            "JSON file {\"0\": \"Name: description\", ...} (FROSTER's label_rephrase/<set>_rephrased_classes.json, "
            "not shipped with stdd): give it with --prompts FILE or text.prompts=FILE")
    if source == "askg":
        if not key:
            raise ConfigError(f"text.prompts=askg needs a known dataset ({', '.join(ASKG_SETS)}, k600)")
        if key in ("k600", "k600_new_release"):
            prompts = _k600_askg_prompts(class_names, prompt_kinds)
        else:
            try:
                path = askg_path(key)
            except ValueError as error:
                raise ConfigError(f"text.prompts=askg: {error}") from error
            if not path.is_file():
                raise ConfigError(f"text.prompts=askg: no shipped ASKG prompts at {path}")
            prompts = _prompts_from_file(path, class_names, prompt_kinds=prompt_kinds)
    elif source == "dataset":
        if dataset_prompts is None or not Path(dataset_prompts).is_file():
            raise ConfigError("text.prompts=dataset: this dataset has no prompts.json")
        prompts = _prompts_from_file(Path(dataset_prompts), class_names, prompt_kinds=prompt_kinds,
                                     what=f"text.prompts=dataset ({dataset_prompts})")
    else:
        path = Path(os.path.expanduser(source))
        if not path.is_file():
            raise ConfigError(f"text.prompts {source!r}: expected templates, askg, dataset or a JSON file")
        prompts = _prompts_from_file(path, class_names, template_set, prompt_kinds=prompt_kinds,
                                     what=f"text.prompts={source}")
    if with_templates:
        prompts = {name: list(prompts[name]) + templated[name] for name in class_names}
    return prompts


def check_prompt_kinds(cfg: DictConfig, source=None, *, dataset_prompts: Optional[Path] = None) -> None:
    """Refuse ``text.prompt_kinds`` S or T with a prompt source that has no spatial / temporal split, from
    what is known before a run generates or writes anything (:func:`build_prompts` refuses it as well, when
    the prompts are read): ``text.prompts`` (or ``source``) ``templates`` or ``class_descriptions``, a prompts
    or class-description file, or ``dataset`` prompts that are one: the synthetic set's ``prompts.json``
    (always a prompts file), ``dataset_prompts`` where given, else a published split's prompts file."""
    prompt_kinds = _check_prompt_kinds(str(cfg.text.prompt_kinds))
    source = str(cfg.text.prompts if source is None else source)
    if prompt_kinds == ALL_PROMPT_KINDS or source == "askg":
        return
    if source in ("templates", CLASS_DESCRIPTIONS):
        raise unsplit_prompts_error(prompt_kinds, f"text.prompts={source}")
    path = None
    if source == "dataset":
        what = "text.prompts=dataset"
        if dataset_prompts is not None:
            path, what = Path(dataset_prompts), f"{what} ({dataset_prompts})"
        elif cfg.data.dataset == SYNTHETIC_DATASET:
            raise unsplit_prompts_error(prompt_kinds, f"{what} (the synthetic set's prompts.json, a prompts file)")
        elif cfg.data.dataset == PUBLISHED_DATASET and cfg.data.published.protocol is not None:
            path = published_split_of(cfg)[0].prompts
            what = f"{what} ({path})"
    else:
        path, what = Path(os.path.expanduser(source)), f"text.prompts={source}"
    if path is not None and Path(path).is_file() and not has_prompt_kinds(path):
        raise unsplit_prompts_error(prompt_kinds, what)


def text_features_for(text_encoder, prompts: dict, text_cfg, class_list: Optional[Sequence[str]] = None) -> "object":
    """The class features of ``prompts`` as the ``text`` config section says (``features``, ``cache_dir``):
    what training, evaluation and prediction all use. ``class_list``: the whole ordered class list when
    ``prompts`` holds only some of its classes (orthogonal features are a function of the whole list)."""
    if text_cfg.features not in TEXT_FEATURE_SOURCES:
        raise ConfigError(f"text.features={text_cfg.features!r}: expected one of {', '.join(TEXT_FEATURE_SOURCES)}")
    if text_cfg.features == "words":
        return word_class_features(prompts, text_encoder.output_dim)
    if text_cfg.features == "orthogonal":
        names = list(class_list) if class_list is not None else list(prompts)
        whole = orthogonal_class_features({name: prompts.get(name, []) for name in names}, text_encoder.output_dim)
        rows = [names.index(name) for name in prompts]
        return replace(whole, class_names=tuple(prompts), prompts=tuple(tuple(p) for p in prompts.values()),
                       features=whole.features[rows], mask=whole.mask[rows])
    cache_dir = text_cfg.cache_dir
    cache = None if cache_dir in (None, "", "null") else os.path.expanduser(str(cache_dir))
    return text_encoder.class_features(prompts, cache_dir=cache)


# ----------------------------------------------------------------------------- data


@dataclass
class DataSpec:
    """Where a split's videos are and how to read them."""

    annotation_file: Path
    format: str
    root: Optional[Path]
    class_names: list[str]
    dataset_key: Optional[str]  # for display names / shipped ASKG prompts
    prompts_file: Optional[Path] = None
    options: dict = field(default_factory=dict)  # the reader's options (official splits: split, subset)


# The half of an official split (UCF101, HMDB51) each part of a run reads: never the test videos for training.
SPLIT_SUBSET = {"train": "train", "val": "test"}


def prepare_synthetic(cfg: DictConfig) -> "object":
    """Generate (or reuse) the synthetic motion set under ``data.root``."""
    options = {key: value for key, value in OmegaConf.to_container(cfg.data.synthetic).items() if value is not None}
    if "size" in options:
        options["height"] = options["width"] = options.pop("size")
    return generate_synthetic_dataset(os.path.expanduser(str(cfg.data.root)), **options)


def data_spec(cfg: DictConfig, split: str) -> DataSpec:
    """``split``: ``train`` or ``val``. ``data.dataset`` is ``synthetic``, ``published`` or an annotation
    format; an official split (UCF101, HMDB51) is read as ``data.split`` says, its train half for training
    and its test half for validation (:data:`SPLIT_SUBSET`); a published split (``data.published``) trains
    on the list of its seed or shot count, labelled with its training classes (base-to-novel: the base
    classes only), and validates on its validation list of those classes."""
    data = cfg.data
    kind = data.dataset
    if kind == SYNTHETIC_DATASET:
        generated = prepare_synthetic(cfg)
        return DataSpec(generated.annotation_files[split], "list", generated.root, list(generated.class_names),
                        None, generated.prompts_file)
    if kind == PUBLISHED_DATASET:
        published, key = published_split_of(cfg)
        if data.root is None:
            raise ConfigError(f"data.root is required for data.dataset=published: the folder of the videos that "
                              f"{published.describe()} names")
        part = published.train_part
        listing = published.train_list(key) if split == "train" else published.val[part]
        return DataSpec(listing, "list", Path(os.path.expanduser(data.root)), list(published.classes[part]),
                        published.dataset, published.prompts, options={"class_directories": True})
    if kind not in DATASETS:  # (load_config has checked it; this is for configs built otherwise)
        raise ConfigError(f"data.dataset={kind!r}: expected one of {', '.join(DATASETS)}")
    annotations = data[f"{split}_annotations"]
    if annotations is None:
        raise ConfigError(f"data.{split}_annotations is required for data.dataset={kind}")
    names = resolve_class_names(data.class_names, where="data.class_names")
    key = data.class_names.lower() if isinstance(data.class_names, str) else None
    options = {"split": int(data.split), "subset": SPLIT_SUBSET[split]} if kind in OFFICIAL_SPLIT_FORMATS else {}
    return DataSpec(Path(os.path.expanduser(annotations)), kind,
                    Path(os.path.expanduser(data.root)) if data.root else None, names, key, options=options)


def clip_sampling(cfg: DictConfig, *, training: bool, n_temporal_views: int = 1, n_spatial_crops: int = 1):
    return ClipSampling(
        mode=cfg.data.sampling,
        clip_length=cfg.data.num_frames,
        stride=cfg.data.stride,
        n_temporal_views=1 if training else int(n_temporal_views),
        n_spatial_crops=1 if training else int(n_spatial_crops),
    )


def _clip_options(cfg: DictConfig, *, training: bool, n_temporal_views: int = 1, n_spatial_crops: int = 1) -> dict:
    """How clips are read and transformed, as the PyAV and DALI loaders both take it."""
    data = cfg.data
    return dict(
        training=training,
        sampling=clip_sampling(cfg, training=training, n_temporal_views=n_temporal_views,
                               n_spatial_crops=n_spatial_crops),
        crop_size=data.input_size,
        short_side=data.short_side or data.input_size,
        horizontal_flip=data.horizontal_flip,
        normalization=data.normalization,
        on_missing=data.on_missing,
        on_error=data.on_error,
        seed=cfg.run.seed,
    )


def _annotation_options(spec: DataSpec) -> dict:
    # Every format gets the class list: list labels are range-checked against it, csv / kinetics /
    # hmdb51 names looked up in it, and UCF101's classInd.txt order is mapped onto it by name. The
    # official splits get which split and which half of it (spec.options).
    return dict(format=spec.format, root=str(spec.root) if spec.root else None, class_names=spec.class_names,
                annotation_options=dict(spec.options))


def build_video_dataset(cfg: DictConfig, spec: Optional[DataSpec], *, training: bool, n_temporal_views: int = 1,
                        n_spatial_crops: int = 1, records=None):
    """The PyAV dataset of ``spec``'s annotation file, or of ready ``records``."""
    options = _clip_options(cfg, training=training, n_temporal_views=n_temporal_views,
                            n_spatial_crops=n_spatial_crops)
    options["frame_cache_mb"] = cfg.data.frame_cache_mb  # PyAV only (DALI decodes on the GPU)
    if records is not None:
        return build_dataset(records=records, **options)
    return build_dataset(str(spec.annotation_file), **_annotation_options(spec), **options)


# ----------------------------------------------------------------------------- training task


class TrainingModule(nn.Module):
    """STDD model + the (frozen) text features of the training classes.

    ``forward(video, labels, phase)`` -> dict of scalar tensors ``loss``, ``ce``,
    (``distill``), ``accuracy``; this is what DDP wraps.
    """

    def __init__(self, model: nn.Module, text_features: torch.Tensor, text_mask: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("text_features", text_features, persistent=False)
        self.register_buffer("text_mask", text_mask, persistent=False)

    def forward(self, video, labels, phase=None) -> dict:
        out = self.model(video, self.text_features, self.text_mask, labels=labels, phase=phase)
        result = {"loss": out.loss, "ce": out.ce_loss.detach(),
                  "accuracy": (out.scores.detach().argmax(-1) == labels).float().mean() * 100}
        if out.distill_loss is not None:
            result["distill"] = out.distill_loss.detach()
        return result


class TrainingTask:
    """What ``stdd.train.Trainer`` needs: module, datasets, batching, evaluation.

    Built on the CPU (the trainer moves :attr:`module` to its device). ``val_spec`` is the
    validation split (``None``: the run has none); its dataset is built on the first
    evaluation (:meth:`validation_dataset`).
    """

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.train_spec = data_spec(cfg, "train")
        model, text_encoder = build_model(cfg, "cpu")
        self.class_names = self.train_spec.class_names
        prompts = build_prompts(cfg.text.prompts, self.class_names, dataset=self.train_spec.dataset_key,
                                dataset_prompts=self.train_spec.prompts_file, with_templates=cfg.text.with_templates,
                                templates=cfg.text.templates, class_name_form=cfg.text.class_name_form,
                                prompt_kinds=cfg.text.prompt_kinds)
        features = text_features_for(text_encoder, prompts, cfg.text)
        del text_encoder  # frozen and no longer needed: training reads the cached features
        self.module = TrainingModule(model, features.features, features.mask)
        # The one source of training phases (None for the frame-only baseline, which has no phases).
        settings = model.video_encoder.stca
        self.phase_sampler = None if settings is None else PhaseSampler(
            settings, seed=cfg.run.seed, num_blocks=len(model.video_encoder.blocks))
        self.train_dataset = build_video_dataset(cfg, self.train_spec, training=True)
        has_validation = cfg.data.val_annotations is not None or cfg.data.dataset in (SYNTHETIC_DATASET,
                                                                                     PUBLISHED_DATASET)
        self.val_spec: Optional[DataSpec] = data_spec(cfg, "val") if has_validation else None
        self._val_dataset = None
        self.epoch = 0

    # the Trainer calls these
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.train_dataset.set_epoch(epoch)

    def set_train_mode(self, module: nn.Module) -> None:
        module.train()

    def to_device(self, batch: dict, device):
        video = batch["video"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        phase = None
        if self.phase_sampler is not None:
            phase = self.phase_sampler(batch["index"], epoch=self.epoch, num_frames=video.shape[1], device=device)
        return video, labels, phase

    def build_dali_train_loader(self, batch_size: int):
        """The DALI training loader (GPU decoding; see stdd.data.dali) for ``data.decoder: dali``."""
        return build_dataloader(
            str(self.train_spec.annotation_file), backend="dali", batch_size=batch_size,
            num_workers=self.cfg.data.num_workers, **_annotation_options(self.train_spec),
            **_clip_options(self.cfg, training=True),
        )

    def validation_dataset(self):
        """The validation split's dataset (built on the first call, with ``eval``'s views); ``None``
        without a validation split."""
        if self.val_spec is not None and self._val_dataset is None:
            evaluation = self.cfg.eval
            self._val_dataset = build_video_dataset(
                self.cfg, self.val_spec, training=False, n_temporal_views=evaluation.n_temporal_views,
                n_spatial_crops=evaluation.n_spatial_crops)
        return self._val_dataset

    def student_state_dict(self) -> dict:
        return student_state_dict(self.module.model)

    def load_student_state_dict(self, state: dict) -> None:
        load_student_state_dict(self.module.model, state)

    def evaluate(self, module: nn.Module, context, *, details: bool = False) -> dict:
        """Top-1/top-5 (%) on the validation split with the training classes (single process view);
        ``details``: also ``labels`` and ``predictions`` (class index per evaluated video, as lists)."""
        dataset = self.validation_dataset()
        if dataset is None:
            raise ValueError("this training task has no validation split (data.val_annotations)")
        evaluation = self.cfg.eval
        result = score_dataset(
            module.model, dataset, module.text_features, module.text_mask,
            batch_size=evaluation.batch_size, num_workers=self.cfg.data.num_workers,
            device=module.text_features.device, context=context, seed=int(self.cfg.run.seed),
        )
        split = ZeroShotSplit("val", tuple(range(len(self.class_names))))
        metrics = evaluate_split(result.view_scores, result.labels, split, aggregation=evaluation.aggregation)
        out = {"top1": metrics["top1"], "top5": metrics["top5"], "videos": metrics["num_videos"]}
        if details:
            out.update(labels=metrics["labels"].tolist(), predictions=metrics["predictions"].tolist())
        return out


def build_training_task(cfg: DictConfig) -> TrainingTask:
    return TrainingTask(cfg)
