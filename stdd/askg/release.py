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

Class names there are spaced title case ("Apply Eye Makeup" for UCF101's
``ApplyEyeMakeup``); :func:`match_key` maps them onto this project's class
lists. The release's prompts of class ``c`` under a template are the plain
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
``stdd.askg.schema``), ``prompts.json`` (xmix), ``prompts_spatial.json``,
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

from ..resources import class_names, display_name
from .builder import AskgError, atomic_write_json
from .schema import SCHEMA_VERSION, normalize_entity, prompt_prefix, validate_graph

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
    import yaml

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


def _class_entries(document: Any, path: Path, argument: str, expected: str) -> dict[str, dict]:
    """``{release class name: entry}`` of a per-class release file; the name is the entry's ``label``, else its key."""
    if not isinstance(document, Mapping) or not document:
        raise ReleaseFormatError(
            f"{argument} {path}: expected a mapping of classes to {{{expected}}}, got {type(document).__name__}")
    entries = {}
    for key, entry in document.items():
        if not isinstance(entry, Mapping):
            raise ReleaseFormatError(
                f"{argument} {path}: class {key!r} must map to {{{expected}}}, got {type(entry).__name__}")
        label = entry.get("label")
        name = label if isinstance(label, str) and label.strip() else str(key)
        entries[" ".join(name.split())] = dict(entry)
    return entries


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

    Classes are matched onto ``stdd.resources.class_names(dataset)`` by :func:`match_key`;
    release classes that match none and project classes the release lacks are
    reported, not fatal. Malformed triples are left out and counted. Templates:
    the first ``num_templates`` of the ``labels`` file; without one, this project's
    video templates (``stdd.model.DEFAULT_TEMPLATES``), said so in the report.
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
        from ..model import DEFAULT_TEMPLATES

        label_classes, all_templates = None, list(DEFAULT_TEMPLATES)
        template_source = f"no --labels: the first {num_templates} of this project's templates"
    templates = all_templates[:num_templates]

    problems: list[str] = []
    unmatched = {"--askg": [], "--xprompt": []}
    matched_knowledge: dict[str, tuple[str, dict]] = {}
    matched_clauses: dict[str, tuple[str, dict]] = {}
    for argument, entries, matched in (("--askg", knowledge, matched_knowledge),
                                       ("--xprompt", clauses, matched_clauses)):
        for release_name, entry in entries.items():
            name = by_key.get(match_key(release_name))
            if name is None:
                unmatched[argument].append(release_name)
            elif name in matched:
                problems.append(f"{argument}: {release_name!r} and {matched[name][0]!r} are both {name!r}; "
                                f"the first is kept")
            else:
                matched[name] = (release_name, entry)
    # The release pairs the i-th clause entry with the i-th class of the label file by position.
    out_of_place = []
    if label_classes is not None:
        release_order = list(clauses)
        out_of_place = [f"{release_order[i]!r} is entry {i} of --xprompt, --labels class {i} is {c!r}"
                        for i, c in enumerate(label_classes[:len(release_order)])
                        if match_key(c) != match_key(release_order[i])]

    # The clause lists of every matched class, as the file writes them (whitespace collapsed).
    clause_lists = {}
    for name, (release_name, entry) in matched_clauses.items():
        where = f"--xprompt {xprompt}: class {release_name!r}"
        clause_lists[name] = {key: _strings(entry, key, where, problems) for key in CLAUSE_FIELDS}
    prompts = {file_name: {} for file_name in PROMPT_FILES}
    malformed = {kind: [] for kind in TRIPLE_FIELDS.values()}
    graphs, schema_deviations, unlisted_entities = {}, {}, {}
    for name in project:
        lists = clause_lists.get(name, {key: [] for key in CLAUSE_FIELDS})
        if name in matched_clauses:
            release_name = matched_clauses[name][0]
            for file_name, keys in PROMPT_FILES.items():
                prompts[file_name][name] = release_prompts(
                    release_name, [c for key in keys for c in lists[key]], templates)
        if name not in matched_knowledge:
            continue
        release_name, entry = matched_knowledge[name]
        where = f"--askg {askg}: class {release_name!r}"
        graph: dict[str, Any] = {"class": name}
        for release_field, own in ENTITY_FIELDS.items():
            graph[own] = _unique(_strings(entry, release_field, where, problems))
        graph["relations"] = {}
        for release_field, kind in TRIPLE_FIELDS.items():
            written = entry.get(release_field)
            if written is None:
                problems.append(f"{where}: no {release_field}")
            elif isinstance(written, str) or not isinstance(written, Sequence):
                raise ReleaseFormatError(f"{where}: {release_field} must be a list, got {type(written).__name__}")
            triples = []
            for text in written or []:
                triple = parse_triple(text)
                if triple is None:
                    malformed[kind].append(f"{release_name}: {text!r}")
                elif triple not in triples:
                    triples.append(triple)
            graph["relations"][kind] = triples
        display = display_name(dataset, name)
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
