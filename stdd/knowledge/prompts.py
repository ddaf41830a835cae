"""The prompt sentences the model's text side consumes, from ASKG graphs, prompt files or templates.

- :func:`template_prompts`: hand-written templates (:data:`DEFAULT_TEMPLATES`, or another set of
  :data:`TEMPLATE_SETS`) x class name.
- :func:`load_graphs`: ``(dataset, {class: graph})`` from a shipped / merged
  ASKG file or a ``python -m stdd.askg build --out`` directory, validated.
- :func:`prompt_lists`: ``{class: [sentences]}`` (spatial, temporal or both,
  the paper's [S] + [T]).
- :func:`load_prompts`: the one prompt loader: any prompt source (a shipped set
  name, an ASKG file or build directory, a ``{"class": ["sentence", ...]}``
  prompts file, a ``{"0": "Name: description", ...}`` class-description file),
  optionally for given classes, in their order.
- :func:`description_prompts`: FROSTER's prompts of a class description.
- :func:`check_prompts`: the check of a ``{class: [sentences]}`` mapping that
  every prompt source (and the text encoder) passes.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from ..resources import ASKG_SETS, askg_path
from .schema import AskgError, AskgFileError, class_slug, read_json_file, validate_askg_document, validate_graph

# Video templates in the style of ActionCLIP / FROSTER (photo/video/example/demonstration of a person ...).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of {}.",
    "a photo of a person {}.",
    "a photo of a person doing {}.",
    "a photo of a person performing {}.",
    "a video of {}.",
    "a video of a person {}.",
    "a video of a person doing {}.",
    "a video of a person performing {}.",
    "a video of a person practicing {}.",
    "an example of {}.",
    "an example of a person {}.",
    "an example of a person doing {}.",
    "a demonstration of {}.",
    "a demonstration of a person {}.",
    "a demonstration of a person performing {}.",
    "{}",
)

# Open-VCLIP's 28 templates (its text classifier, and FROSTER's with class descriptions): every opening with
# every ending, spelt as it spells them ("a example of").
_OPEN_VCLIP_OPENINGS = ("a photo of", "a video of", "a example of", "a demonstration of")
_OPEN_VCLIP_ENDINGS = ("{}.", "a person {}.", "a person using {}.", "a person doing {}.", "a person during {}.",
                       "a person performing {}.", "a person practicing {}.")
OPEN_VCLIP_TEMPLATES: tuple[str, ...] = tuple(
    f"{opening} {ending}" for opening in _OPEN_VCLIP_OPENINGS for ending in _OPEN_VCLIP_ENDINGS)
# ViFi-CLIP's one prompt: its context "a photo of a", the class name and a full stop.
VIFI_CLIP_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
# The template sets a config can name (text.templates).
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "stdd": DEFAULT_TEMPLATES, "open_vclip": OPEN_VCLIP_TEMPLATES, "vifi_clip": VIFI_CLIP_TEMPLATES}

logger = logging.getLogger(__name__)


class PromptSourceError(AskgError, ValueError):
    """A prompt source cannot be read, is malformed or lacks classes; the message names it."""


class UnsplitPromptsError(PromptSourceError):
    """Spatial or temporal prompts alone (``only`` S or T) were asked of a source that does not keep them
    apart: a prompts file ``{"class": [sentences]}`` or a class-description file."""


def _check_class_names(class_names, name: str = "class_names") -> list[str]:
    if isinstance(class_names, str) or not isinstance(class_names, Sequence):
        raise ValueError(f"{name} must be a sequence of class-name strings, got {type(class_names).__name__}")
    names = list(class_names)
    for item in names:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{name} must hold non-empty strings, got {item!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{name} has duplicate entries: {duplicates[:10]}")
    if not names:
        raise ValueError(f"{name} is empty")
    return names


def template_prompts(
    class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> dict[str, list[str]]:
    """``{class: [template.format(class) for template in templates]}`` in ``class_names`` order."""
    names = _check_class_names(class_names)
    if isinstance(templates, str) or not templates:
        raise ValueError("templates must be a non-empty sequence of strings with one '{}' each")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"every template needs exactly one '{{}}' placeholder, got {template!r}")
    return {name: [template.format(name) for template in templates] for name in names}


def check_prompts(prompts: Mapping[str, Sequence[str]], source: str = "prompts") -> dict[str, list[str]]:
    """Validate a ``{class: [sentence, ...]}`` mapping (:class:`PromptSourceError` naming ``source``)."""
    if not isinstance(prompts, Mapping):
        raise PromptSourceError(f"{source} must be an object {{class name: [sentences]}}, got {type(prompts).__name__}")
    if not prompts:
        raise PromptSourceError(f"{source} holds no classes")
    checked = {}
    for name, sentences in prompts.items():
        if not isinstance(name, str) or not name.strip():
            raise PromptSourceError(f"{source}: class names must be non-empty strings, got {name!r}")
        if isinstance(sentences, str) or not isinstance(sentences, Sequence) or len(sentences) == 0:
            raise PromptSourceError(
                f"{source}: class {name!r} must map to a non-empty list of sentences, got {sentences!r}")
        for sentence in sentences:
            if not isinstance(sentence, str) or not sentence.strip():
                raise PromptSourceError(f"{source}: class {name!r} has an empty or non-string sentence {sentence!r}")
        checked[name] = list(sentences)
    return checked


def load_graphs(path: str | Path, *, allow_missing: bool = False) -> tuple[str, dict[str, dict]]:
    """(dataset, {class: graph}) from a shipped/merged ASKG json or a `build --out` directory.

    Everything read is validated; a directory's classes that are not built yet are
    an error unless `allow_missing`. A file that cannot be read, is not JSON or is
    not what it should be (a build directory's ``manifest.json`` and cache entries
    included) is an :class:`AskgError` naming it; ``python -m stdd.askg build`` on
    the directory sets a damaged cache entry aside and rebuilds its class.
    """
    path = Path(path)
    if path.is_dir():
        manifest_path = path / "manifest.json"
        if not manifest_path.exists():
            raise AskgError(f"--graph {path}: a directory must be a `stdd.askg build --out` directory "
                            f"(no manifest.json)")
        manifest = read_json_file(manifest_path, "--graph")
        if (not isinstance(manifest, dict) or not isinstance(manifest.get("dataset"), str)
                or not isinstance(manifest.get("classes"), list)
                or not all(isinstance(name, str) and name for name in manifest["classes"])):
            raise AskgFileError(f"--graph {manifest_path}: expected a build manifest "
                                f"{{\"dataset\": name, \"classes\": [class names]}}")
        dataset, names = manifest["dataset"], manifest["classes"]
        graphs, missing, errors = {}, [], []
        for name in names:
            cache = path / "classes" / f"{class_slug(name)}.json"
            if not cache.exists():
                missing.append(name)
                continue
            graph = _cache_entry_result(cache, name)
            problems = validate_graph(graph, dataset, name)
            if problems:
                errors.extend(f"{cache}: {p}" for p in problems)
            graphs[name] = graph
        if errors:
            raise AskgError("invalid graphs:\n" + "\n".join(errors[:20]))
        if missing and not allow_missing:
            raise AskgError(f"--graph {path}: {len(missing)} of {len(names)} classes not built yet "
                            f"(e.g. {missing[:3]}); rerun build to finish, or pass --allow-missing")
        return dataset, graphs
    if not path.exists():
        raise AskgError(f"--graph {path}: no such file or directory")
    document = read_json_file(path, "--graph")
    errors = validate_askg_document(document, str(path), require_complete=not allow_missing)
    if errors:
        raise AskgError("invalid ASKG file:\n" + "\n".join(errors[:20]))
    return document["dataset"], dict(document["classes"])


def _cache_entry_result(cache: Path, name: str) -> object:
    """The graph in a build directory's cache entry of class ``name`` (:class:`AskgFileError` naming it)."""
    rebuild = "; rerun `python -m stdd.askg build` on the directory to set it aside and rebuild the class"
    try:
        entry = read_json_file(cache, "--graph")
    except AskgFileError as error:
        raise AskgFileError(f"{error}{rebuild}") from None
    if not isinstance(entry, dict) or "result" not in entry or entry.get("class") != name:
        raise AskgFileError(f"--graph {cache}: expected the cache entry {{\"class\": {name!r}, \"result\": graph, "
                            f"\"provenance\"}}{rebuild}")
    return entry["result"]


PROMPT_KINDS = {"S": ("spatial",), "T": ("temporal",), "ST": ("spatial", "temporal")}
ALL_PROMPT_KINDS = "ST"  # every prompt of a graph: what a source without the split gives


def _prompt_kinds(only: str) -> tuple[str, ...]:
    kinds = PROMPT_KINDS.get(str(only).upper())
    if kinds is None:
        raise ValueError(f"--only {only!r}: expected one of {', '.join(PROMPT_KINDS)}")
    return kinds


def prompt_lists(graphs: dict[str, dict], only: str = "ST") -> dict[str, list[str]]:
    """{class: [sentences]}: spatial, temporal, or spatial then temporal prompts."""
    kinds = _prompt_kinds(only)
    return {name: [s for kind in kinds for s in graph["prompts"][kind]] for name, graph in graphs.items()}


def has_prompt_kinds(source: Union[str, os.PathLike]) -> bool:
    """Whether a prompt source keeps spatial and temporal prompts apart: ASKG graphs (a shipped set name,
    an ASKG file, a build directory) do; a prompts file ``{"class": [sentences]}`` and a class-description
    file do not. A file that cannot be read as JSON counts as graphs here: :func:`load_prompts` says
    what is wrong with it."""
    path = Path(os.path.expanduser(str(source)))
    if not path.exists() and isinstance(source, str) and source.lower() in ASKG_SETS:
        return True
    if not path.is_file():
        return True
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return True
    return not _is_unsplit(document)


def _is_unsplit(document) -> bool:
    """A prompts or class-description document: prompts without a spatial / temporal split."""
    return is_class_descriptions(document) or (isinstance(document, dict) and "classes" not in document)


def format_graph(name: str, graph: dict) -> str:
    """Human-readable view of one class's graph and prompts."""
    lines = [f"class: {name}", "objects: " + ", ".join(graph["objects"]),
             "sub-actions (in order): " + " -> ".join(graph["sub_actions"]), "relations:"]
    for kind in ("object_object", "action_object", "action_action"):
        lines.append(f"  {kind}:")
        lines.extend(f"    ({s}) --{p}--> ({o})" for s, p, o in graph["relations"][kind])
    for kind in ("spatial", "temporal"):
        lines.append(f"{kind} prompts:")
        lines.extend(f"  - {s}" for s in graph["prompts"][kind])
    return "\n".join(lines)


def _plain(name: str) -> str:
    """Comparison key of a class name: lower-case words (``brush_hair`` matches ``Brush hair``)."""
    return " ".join(name.replace("_", " ").lower().split())


def is_class_descriptions(document) -> bool:
    """Whether a JSON document is a class-description file: ``{"0": "Name: description", ...}``, keys the
    class indices (FROSTER's ``label_rephrase/*_rephrased_classes.json``)."""
    return (isinstance(document, dict) and bool(document)
            and all(isinstance(key, str) and key.strip().isdigit() for key in document)
            and all(isinstance(value, str) for value in document.values()))


def description_prompts(description: str, templates: Sequence[str] = OPEN_VCLIP_TEMPLATES) -> list[str]:
    """FROSTER's prompts of one class description ``"Name: description"``: every template with the name
    (the text before the first colon), a space and the whole description; then the description alone."""
    name = description.split(":")[0]
    return [template.format(name) + " " + description for template in templates] + [description]


def _compact(name: str) -> str:
    """Comparison key of a class-description name: letters and digits, lower case ("Apply Eye Makeup"
    matches "ApplyEyeMakeup", "Brush hair" matches "brush_hair")."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _description_prompts(document: dict, path: Path, class_names: Optional[Sequence[str]],
                         templates: Sequence[str], partial: bool) -> dict[str, list[str]]:
    """``{class: prompts}`` of a class-description file (:func:`is_class_descriptions`)."""
    entries = [document[key] for key in sorted(document, key=lambda key: int(key))]
    if class_names is None:
        return {entry.split(":")[0].strip(): description_prompts(entry, templates) for entry in entries}
    if isinstance(class_names, str):
        raise PromptSourceError("class_names must be a sequence of class names, not one string")
    by_name = {}
    for entry in entries:
        by_name.setdefault(_compact(entry.split(":")[0]), entry)
    chosen = {name: by_name.get(_compact(name)) for name in class_names}
    missing = [name for name, entry in chosen.items() if entry is None]
    if missing and len(entries) == len(class_names):
        # the file's names do not all match (rephrased): its i-th entry describes the i-th class
        paired = [f"{name} <- {entries[index].split(':')[0]!r}" for index, name in enumerate(class_names)
                  if chosen[name] is None]
        logger.warning("class descriptions %s: %d classes matched by position, not by name: %s", path,
                       len(paired), "; ".join(paired[:10]))
        chosen = {name: entry if entry is not None else entries[index]
                  for index, (name, entry) in enumerate(chosen.items())}
        missing = []
    if missing and not partial:
        raise PromptSourceError(
            f"class descriptions {path} describe no class named like {len(missing)} of {len(class_names)} "
            f"classes, e.g. {missing[:5]} (and list {len(entries)} classes, not {len(class_names)})")
    return {name: description_prompts(entry, templates) for name, entry in chosen.items() if entry is not None}


def load_prompts(
    source: Union[str, os.PathLike],
    class_names: Optional[Sequence[str]] = None,
    *,
    only: str = "ST",
    allow_missing: bool = False,
    partial: bool = False,
    templates: Sequence[str] = OPEN_VCLIP_TEMPLATES,
) -> dict[str, list[str]]:
    """``{class: [prompt sentences]}`` from any prompt source the model's text side may be given.

    ``source``: a shipped set name (``ucf101``, ``hmdb51``, ``k400``, ``k600_new``),
    an ASKG json (shipped format or ``build --out DIR/askg.json``), a build
    directory (``allow_missing``: classes not built yet are left out), or a
    prompts json ``{"class": ["sentence", ...]}`` such as ``python -m stdd.askg
    prompts`` writes (``only`` applies to graphs: a prompts file cannot be re-split, so ``only`` S or
    T with it is an :class:`UnsplitPromptsError`), or a class-description file ``{"0": "Name: description", ...}`` (FROSTER's), whose
    prompts are :func:`description_prompts` with ``templates`` and whose entries are
    matched to ``class_names`` by their names' letters and digits (by position when
    some do not match and the file lists as many classes).
    Without ``class_names`` the source's classes come in its order; with them,
    exactly those classes in that order, each matched by its exact name, else by
    its plain words (:func:`_plain`); a class the source lacks is an error naming
    the source, or, with ``partial``, left out.
    Errors are :class:`PromptSourceError` (an ``AskgError`` and a ``ValueError``).
    """
    kinds = _prompt_kinds(only)
    path = Path(os.path.expanduser(str(source)))
    if not path.exists() and isinstance(source, str) and source.lower() in ASKG_SETS:
        path = askg_path(source)
    if not path.exists():
        raise PromptSourceError(f"prompt file {path} does not exist")
    document = None
    if path.is_file():
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise PromptSourceError(f"prompt file {path} is not valid UTF-8 JSON: {error}") from None
    if _is_unsplit(document) and kinds != PROMPT_KINDS[ALL_PROMPT_KINDS]:
        what = "class-description" if is_class_descriptions(document) else "prompts"
        raise UnsplitPromptsError(f"prompt file {path} is a {what} file, not ASKG graphs: its prompts are not "
                                  f"split into spatial and temporal ones, so only={only!r} cannot be applied "
                                  f"(only {ALL_PROMPT_KINDS})")
    if is_class_descriptions(document):
        return _description_prompts(document, path, class_names, templates, partial)
    if isinstance(document, dict) and "classes" not in document:
        prompts = check_prompts(document, source=f"prompt file {path}")
    else:
        try:
            _, graphs = load_graphs(path, allow_missing=allow_missing)
        except PromptSourceError:
            raise
        except AskgError as error:
            raise PromptSourceError(str(error)) from error
        prompts = prompt_lists(graphs, only)
    if class_names is None:
        return prompts
    if isinstance(class_names, str):
        raise PromptSourceError("class_names must be a sequence of class names, not one string")
    lookup = {_plain(name): name for name in prompts}
    selected, missing = {}, []
    for name in class_names:
        key = name if name in prompts else lookup.get(_plain(name))
        if key is None:
            missing.append(name)
        else:
            selected[name] = list(prompts[key])
    if missing and not partial:
        raise PromptSourceError(
            f"prompt file {path} has no prompts for {len(missing)} of {len(class_names)} classes, e.g. {missing[:5]}"
        )
    return selected
