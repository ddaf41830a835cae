"""The knowledge files of the authors' STDD release, read into this project's graph and prompt formats.

The release ships, per dataset, three YAML files (its GPT-3.5 outputs):

- ``classes_ASKG_<set>.yml``: ``{key: {label, obj_en_li, obj_rel_triples,
  act_obj_triples, sub_act_en_li, act_rel_triples}}``: objects, sub-actions and
  relation triples, each triple one string ``"<a, relation, b>"`` (some are
  malformed, e.g. with two parts);
- ``classes_xprompt_<set>.yml``: ``{key: {label, xprompt_oo, xprompt_ao,
  xprompt_aa}}``: the clauses completed from the object-object,
  action-object and action-action triples ("where beer is poured into a glass");
- ``classes_label_<set>.yml``: ``{classes, templates, obj_templates}``: the
  class names and the sentence templates (``"a video of a person {}."``).

Class names there are spaced words ("Apply Eye Makeup" in the label file,
"apply eye makeup" in the others, for UCF101's ``ApplyEyeMakeup``), and a few
entries name their class otherwise (HMDB51's clause file has ``chew`` with
``label: chewing``, and ``falling to the floor`` for ``fall floor``):
:func:`import_release` matches entries by key, label, normalised name
(:func:`match_key`) and position, and reports every inexact match. The
release's prompts of class ``c`` under a template are the plain
``template.format(c)`` followed by ``template.format(f"{c}, {clause}")`` for each
clause (:func:`release_prompts`); its reported runs used the first
:data:`RELEASE_TEMPLATE_COUNT` templates and the union of the three clause
lists ("xmix"), which the release forms with a Python ``set`` (an order that
changes between runs); here the order is stable: per template the plain prompt,
then the oo, ao and aa clauses in file order, a repeated sentence kept once.
Spatial prompts come from ``xprompt_oo``, temporal ones from ``xprompt_ao`` +
``xprompt_aa``.

:func:`import_release` reads the three files (:class:`ReleaseImport`);
:func:`write_release_import` writes ``askg.json`` (this project's graph file,
``stdd.knowledge.schema``), ``prompts.json`` (xmix), ``prompts_spatial.json``,
``prompts_temporal.json`` (``{class: [sentences]}``, what ``stdd.eval
--prompts`` reads) and ``report.json``. ``python -m stdd.askg import-release``
is the command line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Hashable, Mapping, Optional, Sequence

import yaml

from ..knowledge.prompts import DEFAULT_TEMPLATES
from ..knowledge.schema import (
    SCHEMA_VERSION, AskgError, class_node_keys, normalize_entity, prompt_prefix, validate_graph,
)
from ..resources import class_names, display_name
from .builder import atomic_write_json

# The sets the release ships knowledge files for.
RELEASE_SETS = ("ucf101", "hmdb51", "k400")
# The release's reported runs used this many of the label file's templates.
RELEASE_TEMPLATE_COUNT = 8
# The release's clause lists, in xmix order, and which of this project's prompt kinds each feeds.
CLAUSE_FIELDS = ("xprompt_oo", "xprompt_ao", "xprompt_aa")
SPATIAL_FIELDS = ("xprompt_oo",)
TEMPORAL_FIELDS = ("xprompt_ao", "xprompt_aa")
# The release's knowledge fields -> this project's graph fields.
ENTITY_FIELDS = {"obj_en_li": "objects", "sub_act_en_li": "sub_actions"}
TRIPLE_FIELDS = {"obj_rel_triples": "object_object", "act_obj_triples": "action_object",
                 "act_rel_triples": "action_action"}
# What write_release_import writes: {class: [sentences]} files by clause selection.
PROMPT_FILES = {"prompts.json": CLAUSE_FIELDS, "prompts_spatial.json": SPATIAL_FIELDS,
                "prompts_temporal.json": TEMPORAL_FIELDS}


class ReleaseFormatError(AskgError, ValueError):
    """A release knowledge file cannot be read or is not in the release's format; the message names it."""


def match_key(name: str) -> str:
    """Comparison key of a class name: lower-case letters and digits only.

    ``"Apply Eye Makeup"`` and ``ApplyEyeMakeup``, ``"Brush Hair"`` and ``brush_hair``,
    ``"Massaging Person'S Head"`` and ``massaging person's head`` get the same key.
    """
    return re.sub(r"[^a-z0-9]", "", name.lower())


def parse_triple(text: Any) -> Optional[list[str]]:
    """``"<a, relation, b>"`` -> ``[a, relation, b]``; ``None`` when it is not three non-empty parts."""
    if not isinstance(text, str):
        return None
    body = text.strip()
    if body.startswith("<") and body.endswith(">"):
        body = body[1:-1]
    parts = [" ".join(part.split()) for part in body.split(",")]
    if len(parts) != 3 or not all(parts):
        return None
    return parts


def release_prompts(class_text: str, clauses: Sequence[str], templates: Sequence[str]) -> list[str]:
    """The release's sentences of one class: per template the plain prompt, then one per clause.

    A sentence that repeats an earlier one is kept once (the release's xmix is a set).
    """
    sentences: dict[str, None] = {}
    for template in templates:
        sentences.setdefault(template.format(class_text), None)
        for clause in clauses:
            sentences.setdefault(template.format(f"{class_text}, {clause}"), None)
    return list(sentences)


def _load_yaml(path: Path, argument: str) -> tuple[Any, list[str]]:
    """The document in ``path`` and the top-level keys it repeats (YAML keeps the last; we report them)."""
    repeated: list[str] = []

    class _Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        if node is document_root[0]:
            seen = set()
            for key_node, _ in node.value:
                key = loader.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    continue  # SafeLoader refuses it below, naming the line
                if key in seen:
                    repeated.append(str(key))
                seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    document_root: list = [None]

    def compose_document(loader):
        node = yaml.SafeLoader.compose_document(loader)
        document_root[0] = node
        return node

    _Loader.compose_document = compose_document
    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReleaseFormatError(f"{argument} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ReleaseFormatError(f"{argument} {path}: cannot be read as UTF-8 text ({error})") from None
    try:
        document = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        raise ReleaseFormatError(f"{argument} {path}: not valid YAML: {_yaml_problem(error, text)}") from None
    if document is None:
        raise ReleaseFormatError(f"{argument} {path}: empty file, expected YAML (truncated?)")
    return document, repeated


def _yaml_problem(error: Exception, text: str) -> str:
    """What a YAML parser error says, on one line: the problem and where (line, column), and whether the
    file ends there (cut short)."""
    mark = getattr(error, "problem_mark", None)
    problem = ": ".join(filter(None, (getattr(error, "context", None), getattr(error, "problem", None))))
    if mark is None:
        return " ".join(str(error).split())
    ends = "; the file ends there: truncated?" if mark.index >= len(text.rstrip()) else ""
    return f"{problem or type(error).__name__} (line {mark.line + 1}, column {mark.column + 1}){ends}"


@dataclass
class _Entry:
    """One class entry of a per-class release file: its key, its ``label`` field and its position."""

    key: str
    label: Optional[str]
    position: int
    fields: dict

    @property
    def name(self) -> str:
        """How the report names the entry: its key, and its label when that differs."""
        return self.key if self.label in (None, self.key) else f"{self.key} (label {self.label!r})"


def _class_entries(document: Any, path: Path, argument: str, expected: str) -> list[_Entry]:
    """The class entries of a per-class release file, in file order (key and label whitespace-collapsed)."""
    if not isinstance(document, Mapping) or not document:
        raise ReleaseFormatError(
            f"{argument} {path}: expected a mapping of classes to {{{expected}}}, got {type(document).__name__}")
    entries = []
    for position, (key, entry) in enumerate(document.items()):
        if not isinstance(entry, Mapping):
            raise ReleaseFormatError(
                f"{argument} {path}: class {key!r} must map to {{{expected}}}, got {type(entry).__name__}")
        label = entry.get("label")
        label = " ".join(label.split()) if isinstance(label, str) and label.strip() else None
        entries.append(_Entry(" ".join(str(key).split()), label, position, dict(entry)))
    return entries


# How an entry was matched to a class, in the order the ways are tried (the first that names a free class wins).
MATCH_WAYS = ("key", "label", "normalised key", "normalised label", "position")


def _match_entries(entries: list[_Entry], exact: Mapping[str, str], normalised: Mapping[str, str],
                   by_position: Optional[list[Optional[str]]], argument: str,
                   problems: list[str]) -> tuple[dict[str, tuple[_Entry, str]], list[_Entry]]:
    """``({class: (entry, way)}, unmatched entries)``: each entry matched to a class of the set.

    An entry is matched by its key, then its label (``exact``: a class as this project or the label file
    writes it), then either one normalised (:func:`match_key`), then, when ``by_position`` is given (the
    set's class at each position of the label file, which has as many classes as there are entries), by its
    position, as the release pairs them. A class already taken by an earlier way or entry is noted, and
    the entry tried the next way.
    """
    matched: dict[str, tuple[_Entry, str]] = {}
    done: set[int] = set()
    conflicts: set[tuple[int, str]] = set()
    for way in MATCH_WAYS:
        for entry in entries:
            if entry.position in done:
                continue
            if way == "position":
                name = by_position[entry.position] if by_position is not None else None
            else:
                text = entry.key if way.endswith("key") else entry.label
                if text is None:
                    continue
                name = (exact if way in ("key", "label") else normalised).get(
                    text if way in ("key", "label") else match_key(text))
            if name is None:
                continue
            if name in matched:
                other, other_way = matched[name]
                if (entry.position, name) not in conflicts:  # said once, whichever ways name it
                    conflicts.add((entry.position, name))
                    problems.append(f"{argument}: entry {entry.key!r} is {name!r} by its {way}, but entry "
                                    f"{other.key!r} is, by its {other_way}; {other.key!r} is kept for it")
                continue
            matched[name] = (entry, way)
            done.add(entry.position)
    return matched, [entry for entry in entries if entry.position not in done]


def _strings(entry: Mapping, name: str, where: str, problems: list[str]) -> list[str]:
    """A list-of-strings field; a missing field is empty, a non-string item is left out (both noted)."""
    value = entry.get(name)
    if value is None:
        problems.append(f"{where}: no {name}")
        return []
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ReleaseFormatError(f"{where}: {name} must be a list, got {type(value).__name__}")
    kept = [" ".join(item.split()) for item in value if isinstance(item, str) and item.strip()]
    if len(kept) != len(value):
        problems.append(f"{where}: {len(value) - len(kept)} empty or non-string {name} entries left out")
    return kept


def _unique(items: Sequence[str]) -> list[str]:
    """``items`` without repeats (compared like graph entities), first spelling kept."""
    seen, kept = set(), []
    for item in items:
        if normalize_entity(item) not in seen:
            seen.add(normalize_entity(item))
            kept.append(item)
    return kept


def _read_labels(path: Path) -> tuple[list[str], list[str]]:
    """``(classes, templates)`` of a ``classes_label_<set>.yml`` file, checked."""
    document, _ = _load_yaml(path, "--labels")
    if not isinstance(document, Mapping):
        raise ReleaseFormatError(f"--labels {path}: expected a mapping with 'classes' and 'templates', "
                                 f"got {type(document).__name__}")
    for key in ("classes", "templates"):
        value = document.get(key)
        if (isinstance(value, str) or not isinstance(value, Sequence) or not value
                or not all(isinstance(item, str) and item.strip() for item in value)):
            raise ReleaseFormatError(f"--labels {path}: '{key}' must be a non-empty list of strings")
    for template in document["templates"]:
        if template.count("{}") != 1:
            raise ReleaseFormatError(f"--labels {path}: template {template!r} needs exactly one '{{}}'")
    return [" ".join(c.split()) for c in document["classes"]], list(document["templates"])


@dataclass
class ReleaseImport:
    """What :func:`import_release` read: the graph file, the prompt files and the report."""

    dataset: str
    document: dict  # this project's ASKG file format (schema_version, dataset, provenance, classes)
    prompts: dict[str, dict[str, list[str]]]  # file name (PROMPT_FILES) -> {class: [sentences]}
    report: dict = field(default_factory=dict)

    @property
    def missing(self) -> list[str]:
        """The set's classes the release's files have no prompts for."""
        return self.report["project_classes_missing"]


def import_release(
    askg: str | Path,
    xprompt: str | Path,
    *,
    dataset: str,
    labels: Optional[str | Path] = None,
    num_templates: int = RELEASE_TEMPLATE_COUNT,
) -> ReleaseImport:
    """Read the release's files of ``dataset`` (one of :data:`RELEASE_SETS`) into this project's formats.

    Each entry of the two per-class files is matched to a class of
    ``stdd.resources.class_names(dataset)`` by its key, then its ``label`` field (each
    as this project or the label file writes the class), then either one
    normalised (:func:`match_key`: case, spaces, underscores, punctuation), then, when
    the label file lists as many classes as the file has entries, by its position
    (the release's own pairing); every entry matched other than by its key (or
    whose label names no class) is listed in the report
    (``release_entries_matched_inexactly``). Entries that match no class and classes
    the release lacks are reported, not fatal. Malformed triples are left out and
    counted; in the triples the class, spelled as the release's files spell it, is
    written as its display name (the graph's class node). Templates:
    the first ``num_templates`` of the ``labels`` file; without one, this project's
    video templates (``stdd.knowledge.DEFAULT_TEMPLATES``), said so in the report.
    Errors (an unreadable file, a field of the wrong type) are
    :class:`ReleaseFormatError` naming the argument and the file.
    """
    if dataset not in RELEASE_SETS:
        raise ReleaseFormatError(f"--set {dataset!r}: expected one of {', '.join(RELEASE_SETS)}")
    if isinstance(num_templates, bool) or not isinstance(num_templates, int) or num_templates < 1:
        raise ReleaseFormatError(f"--templates must be a positive int, got {num_templates!r}")
    askg, xprompt = Path(askg), Path(xprompt)
    project = class_names(dataset)
    by_key = {match_key(name): name for name in project}

    askg_document, askg_repeated = _load_yaml(askg, "--askg")
    xprompt_document, xprompt_repeated = _load_yaml(xprompt, "--xprompt")
    knowledge = _class_entries(askg_document, askg, "--askg", "label, obj_en_li, obj_rel_triples, ...")
    clauses = _class_entries(xprompt_document, xprompt, "--xprompt", "label, xprompt_oo, xprompt_ao, xprompt_aa")

    if labels is not None:
        label_classes, all_templates = _read_labels(Path(labels))
        template_source = f"the first {num_templates} of {Path(labels).name}"
    else:
        label_classes, all_templates = None, list(DEFAULT_TEMPLATES)
        template_source = f"no --labels: the first {num_templates} of this project's templates"
    templates = all_templates[:num_templates]

    problems: list[str] = []
    # The names under which an entry matches a class exactly: as this project writes it (name, display name)
    # and as the label file does; the label file's classes are matched to the set's the same way.
    exact = {text: name for name in project for text in (name, display_name(dataset, name))}
    label_names: dict[str, str] = {}  # the set's class -> its name in the label file
    label_project: Optional[list[Optional[str]]] = None  # the set's class at each label-file position
    labels_unmatched: list[str] = []
    if label_classes is not None:
        for text in label_classes:
            name = exact.get(text) or by_key.get(match_key(text))
            if name is None:
                labels_unmatched.append(text)
            else:
                label_names.setdefault(name, text)
        exact.update({text: name for name, text in label_names.items()})
        label_project = [exact.get(text) for text in label_classes]
    unmatched, inexact = {}, {}
    matched_entries: dict[str, dict[str, tuple[_Entry, str]]] = {}
    for argument, entries in (("--askg", knowledge), ("--xprompt", clauses)):
        # The release pairs the i-th entry with the i-th class of the label file: the last way to match.
        by_position = label_project if label_project is not None and len(label_project) == len(entries) else None
        matched, left = _match_entries(entries, exact, by_key, by_position, argument, problems)
        matched_entries[argument] = matched
        unmatched[argument] = [entry.name for entry in left]
        inexact[argument] = [
            {"entry": entry.key, "label": entry.label, "class": name, "matched_by": way, "position": entry.position,
             **({"label_file_class": label_classes[entry.position]} if way == "position" else {})}
            for name, (entry, way) in sorted(matched.items(), key=lambda item: item[1][0].position)
            if way != "key" or entry.label not in (None, entry.key) and exact.get(entry.label) != name]
    matched_knowledge = {name: (entry.key, entry) for name, (entry, _) in matched_entries["--askg"].items()}
    matched_clauses = {name: (entry.key, entry) for name, (entry, _) in matched_entries["--xprompt"].items()}
    # The release pairs the i-th clause entry with the i-th class of the label file by position.
    out_of_place = []
    if label_classes is not None:
        out_of_place = [f"{entry.name!r} is entry {entry.position} of --xprompt, --labels class {entry.position} is "
                        f"{label_classes[entry.position]!r}"
                        for name, (_, entry) in sorted(matched_clauses.items(), key=lambda item: item[1][1].position)
                        if entry.position >= len(label_classes) or label_project[entry.position] != name]

    # The clause lists of every matched class, as the file writes them (whitespace collapsed).
    clause_lists = {}
    for name, (_, entry) in matched_clauses.items():
        where = f"--xprompt {xprompt}: class {entry.name!r}"
        clause_lists[name] = {key: _strings(entry.fields, key, where, problems) for key in CLAUSE_FIELDS}
    prompts = {file_name: {} for file_name in PROMPT_FILES}
    malformed = {kind: [] for kind in TRIPLE_FIELDS.values()}
    graphs, schema_deviations, unlisted_entities = {}, {}, {}
    for name in project:
        lists = clause_lists.get(name, {key: [] for key in CLAUSE_FIELDS})
        if name in matched_clauses:
            # The class as the release writes it into its prompts: the label file's name (else the entry's key).
            class_text = label_names.get(name, matched_clauses[name][0])
            for file_name, keys in PROMPT_FILES.items():
                prompts[file_name][name] = release_prompts(
                    class_text, [c for key in keys for c in lists[key]], templates)
        if name not in matched_knowledge:
            continue
        release_name, entry = matched_knowledge[name]
        where = f"--askg {askg}: class {entry.name!r}"
        graph: dict[str, Any] = {"class": name}
        for release_field, own in ENTITY_FIELDS.items():
            graph[own] = _unique(_strings(entry.fields, release_field, where, problems))
        # The class node as the release's files spell it (key, label, label file) -> its display name.
        display = display_name(dataset, name)
        listed = {normalize_entity(e) for own in ENTITY_FIELDS.values() for e in graph[own]}
        spellings = {normalize_entity(text) for text in (entry.key, entry.label, label_names.get(name)) if text}
        spellings -= class_node_keys(dataset, name) | listed
        graph["relations"] = {}
        for release_field, kind in TRIPLE_FIELDS.items():
            written = entry.fields.get(release_field)
            if written is None:
                problems.append(f"{where}: no {release_field}")
            elif isinstance(written, str) or not isinstance(written, Sequence):
                raise ReleaseFormatError(f"{where}: {release_field} must be a list, got {type(written).__name__}")
            triples = []
            for text in written or []:
                triple = parse_triple(text)
                if triple is None:
                    malformed[kind].append(f"{release_name}: {text!r}")
                    continue
                triple = [display if i != 1 and normalize_entity(part) in spellings else part
                          for i, part in enumerate(triple)]
                if triple not in triples:
                    triples.append(triple)
            graph["relations"][kind] = triples
        graph["prompts"] = {
            kind: _unique([f"{prompt_prefix(display)} {clause.rstrip('.').rstrip()}."
                           for key in keys for clause in lists[key] if clause.rstrip(".").strip()])
            for kind, keys in (("spatial", SPATIAL_FIELDS), ("temporal", TEMPORAL_FIELDS))
        }
        graphs[name] = graph
        notes: list[str] = []
        deviations = validate_graph(graph, dataset, name, notes=notes)
        if deviations:
            schema_deviations[name] = deviations[:5]
        if notes:
            unlisted_entities[name] = notes

    missing = [name for name in project if name not in prompts["prompts.json"]]
    document = {
        "schema_version": SCHEMA_VERSION, "dataset": dataset,
        "provenance": {
            "generator": "the STDD authors' release (GPT-3.5 outputs), imported by python -m stdd.askg import-release",
            "how": (f"objects, sub-actions and triples from {askg.name}; prompt sentences 'This is a video of "
                    f"<class>, <clause>.' from the clauses of {xprompt.name} (spatial: xprompt_oo, temporal: "
                    f"xprompt_ao + xprompt_aa)"),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "regenerate": (f"python -m stdd.askg import-release --askg {askg.name} --xprompt {xprompt.name}"
                           + (f" --labels {Path(labels).name}" if labels is not None else "")
                           + f" --set {dataset} --out DIR"),
        },
        "classes": graphs,
    }
    report = {
        "dataset": dataset,
        "project_classes": len(project),
        "classes_with_prompts": len(project) - len(missing),
        "classes_with_graphs": len(graphs),
        "project_classes_missing": missing,
        "project_classes_without_graph": [name for name in project if name not in graphs],
        "release_classes_unmatched": unmatched,
        "release_entries_matched_inexactly": inexact,
        "label_classes_unmatched": labels_unmatched,
        "repeated_keys": {"--askg": askg_repeated, "--xprompt": xprompt_repeated},
        "xprompt_entries_out_of_label_order": out_of_place,
        "malformed_triples": {kind: len(items) for kind, items in malformed.items()},
        "malformed_triple_examples": [item for items in malformed.values() for item in items][:20],
        "templates": templates,
        "template_source": template_source,
        "prompt_files": {file_name: list(keys) for file_name, keys in PROMPT_FILES.items()},
        "classes_outside_the_graph_schema": schema_deviations,
        "relations_to_unlisted_entities": unlisted_entities,
        "notes": problems,
    }
    return ReleaseImport(dataset, document, prompts, report)


def describe_match(item: Mapping[str, Any]) -> str:
    """One line for an entry of the report's ``release_entries_matched_inexactly``."""
    entry = repr(item["entry"]) + (f" (label {item['label']!r})" if item["label"] not in (None, item["entry"]) else "")
    way = item["matched_by"]
    if way == "position":
        how = f"by its position {item['position']}, as the release pairs it (--labels class {item['label_file_class']!r})"
    elif way == "key":
        how = "by its key; its label differs"
    else:
        how = f"by its {way}"
    return f"{entry} -> {item['class']}: {how}"


def write_release_import(result: ReleaseImport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``askg.json``, the :data:`PROMPT_FILES` and ``report.json`` into ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ReleaseFormatError(f"--out {out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"askg.json": out_dir / "askg.json"}
    atomic_write_json(written["askg.json"], result.document)
    for file_name, prompts in result.prompts.items():
        if prompts:
            written[file_name] = out_dir / file_name
            atomic_write_json(written[file_name], prompts)
    written["report.json"] = out_dir / "report.json"
    atomic_write_json(written["report.json"], result.report)
    return written
