"""The ASKG schema: one Action Semantic Knowledge Graph per class, and the file of them.

A graph (JSON object) is what stage 1 (objects, sub-actions, relation triples)
and stage 2 (prompt sentences) of the ASKG pipeline produce for one class:

    {"class": "archery",
     "objects": [5..10 distinct objects],
     "sub_actions": [3..10 distinct sub-actions, in temporal order],
     "relations": {"object_object": [[obj, predicate, obj], ...]    (>= 3),
                   "action_object": [[action, predicate, obj], ...]  (>= 1),
                   "action_action": [[action, predicate, sub_action], ...]  (>= 2)},
     "prompts": {"spatial": [>= 3 sentences from object_object triples],
                 "temporal": [>= 3 sentences from action_* triples]}}

As in the paper's ASKG, the action class is itself a node of its graph, with
edges to its objects and sub-actions: an ``action`` above is a sub-action or the
class (its name or display name, e.g. ``["archery", "requires", "bow"]``,
``["archery", "starts with", "nocking the arrow"]``), and any triple may name
the class. A triple naming an entity of the wrong list for its kind (an object
as the subject of an action_object triple) is an error; one naming an entity in
neither list (``["helmet", "worn for", "safety"]``) is valid, and reported as a
note (validators take a ``notes`` list to collect them).

Every prompt is one sentence "This is a video of <display name>, ...". The
shipped files (`stdd/resources/askg/<set>.json`) hold
{"schema_version": 1, "dataset", "provenance", "classes": {name: graph}} with
every class of the set's class list, in class-list order.

Validators return lists of error strings (empty = valid) so a file with many
problems is reported in one pass; each error names the class and the field.
`python -m stdd.askg validate FILE...` validates files from the shell.
:func:`read_json_file` is how the ASKG tooling reads every JSON file: a file
that is missing, unreadable or not JSON is one :class:`AskgFileError` line
naming the file and what is wrong with it.

A build directory (``python -m stdd.askg build --out DIR``) holds
``manifest.json`` ({"dataset", "classes": [names]}), ``stage1/<slug>.json`` and
``classes/<slug>.json`` (one cache entry {"class", "result": graph, "provenance"}
per class), the slug of a class being :func:`class_slug` of its name.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..resources import ASKG_SETS, CLASS_COUNTS, class_names, display_name

SCHEMA_VERSION = 1

OBJECTS_MIN, OBJECTS_MAX = 5, 10
SUB_ACTIONS_MIN, SUB_ACTIONS_MAX = 3, 10
RELATION_MINIMUMS = {"object_object": 3, "action_object": 1, "action_action": 2}
PROMPT_MINIMUMS = {"spatial": 3, "temporal": 3}
# Prompts are fed to the CLIP text encoder (77 tokens, roughly 50-60 words):
# a longer sentence would be truncated silently.
PROMPT_MAX_WORDS = 45

GRAPH_KEYS = ("class", "objects", "sub_actions", "relations", "prompts")
FILE_KEYS = ("schema_version", "dataset", "provenance", "classes")
SHIPPED_PROVENANCE_KEYS = ("generator", "how", "date", "regenerate")

# Two sentences glued together: a sentence end followed by a capitalised word.
_SENTENCE_BREAK = re.compile(r"[.!?;]\s+[A-Z]")


class AskgError(UsageError, RuntimeError):
    """A class could not be built (after retries), a run could not start, or an ASKG input is unusable."""


class AskgFileError(AskgError, ValueError):
    """A file the ASKG tooling reads is missing, unreadable or not JSON; the message names it."""


def read_json_file(path: str | Path, label: str = "") -> Any:
    """The JSON document in ``path``; :class:`AskgFileError` naming ``label`` (the argument it came
    from, e.g. ``--graph``) and the file, and saying what is wrong, if it cannot be read or parsed."""
    path = Path(path)
    where = f"{label} {path}" if label else str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AskgFileError(f"{where}: no such file") from None
    except OSError as error:
        raise AskgFileError(f"{where}: cannot be read ({error.strerror or error})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise AskgFileError(f"{where}: not UTF-8 text (byte {error.start} of {len(data)})") from None
    if not text.strip():
        raise AskgFileError(f"{where}: empty file, expected JSON (truncated?)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        # Python's parser reports an unterminated string where the string starts; it runs to the end.
        cut = error.pos >= len(text.rstrip()) or error.msg.startswith("Unterminated string")
        ends = "; the file ends before the JSON does: truncated?" if cut else ""
        raise AskgFileError(f"{where}: not valid JSON: {error.msg} (line {error.lineno}, "
                            f"column {error.colno}){ends}") from None


def class_slug(name: str) -> str:
    """File-name-safe, collision-free name: readable part + hash of the exact name.

    (K600 has names differing only in case, e.g. "passing American/american football".)
    """
    readable = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")[:60] or "class"
    return f"{readable}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:8]}"


def normalize_entity(text: str) -> str:
    """Comparison key of an entity: lower case, single spaces (LLMs vary case/spacing)."""
    return " ".join(text.lower().split())


def prompt_prefix(display: str) -> str:
    return f"This is a video of {display},"


def _string_list(value: Any, where: str, errors: list[str]) -> list[str]:
    if not isinstance(value, list):
        errors.append(f"{where}: expected a list of strings, got {type(value).__name__}")
        return []
    good = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            errors.append(f"{where}[{i}]: expected a non-empty string, got {item!r}")
        else:
            good.append(item)
    return good


def _check_entities(items: list[str], where: str, low: int, high: int, errors: list[str]) -> None:
    if not low <= len(items) <= high:
        errors.append(f"{where}: {len(items)} entries, expected {low}-{high}")
    seen: dict[str, str] = {}
    for item in items:
        key = normalize_entity(item)
        if key in seen:
            errors.append(f"{where}: duplicate entry {item!r}")
        seen[key] = item


def check_prompt(sentence: str, display: str) -> str | None:
    """Why `sentence` is not a valid prompt for a class shown as `display`, or None."""
    prefix = prompt_prefix(display)
    if not sentence.lower().startswith(prefix.lower()):
        return f"must start with {prefix!r}"
    if "\n" in sentence or "\r" in sentence:
        return "must be one line"
    if not sentence.rstrip().endswith("."):
        return "must end with '.'"
    clause = sentence[len(prefix):].strip()
    if len(clause.rstrip(".").split()) < 3:
        return "needs a clause of at least 3 words after the prefix"
    if _SENTENCE_BREAK.search(sentence.rstrip()[:-1]):
        return "must be a single sentence"
    if len(sentence.split()) > PROMPT_MAX_WORDS:
        return f"longer than {PROMPT_MAX_WORDS} words (CLIP's 77-token context)"
    return None


def _kinds_section(graph: dict, key: str, kinds, where: str, errors: list) -> dict:
    """``graph[key]``, an object keyed by the kinds in ``kinds``; a non-object (reported) reads as empty,
    keys outside ``kinds`` are reported."""
    section = graph.get(key, {})
    if not isinstance(section, dict):
        errors.append(f"{where}.{key}: expected an object, got {type(section).__name__}")
        section = {}
    unknown = sorted(set(section) - set(kinds))
    if unknown:
        errors.append(f"{where}.{key}: unknown kinds {unknown}")
    return section


def class_node_keys(dataset: str, class_name: str) -> set[str]:
    """The comparison keys (:func:`normalize_entity`) under which a graph's triples name its class,
    the graph's action node: the class name and its display name."""
    keys = {normalize_entity(class_name)} if isinstance(class_name, str) else set()
    try:
        keys.add(normalize_entity(display_name(dataset, class_name)))
    except ValueError:
        pass
    return keys


def _validate_knowledge(graph: dict, where: str, errors: list[str], class_keys: set[str],
                        notes: list[str] | None) -> tuple[set[str], set[str]]:
    """Check objects, sub_actions and relations; return the normalized object / sub-action sets.

    A triple may name the class (``class_keys``) anywhere; an entity in neither list is noted."""
    objects = _string_list(graph.get("objects", []), f"{where}.objects", errors)
    sub_actions = _string_list(graph.get("sub_actions", []), f"{where}.sub_actions", errors)
    _check_entities(objects, f"{where}.objects", OBJECTS_MIN, OBJECTS_MAX, errors)
    _check_entities(sub_actions, f"{where}.sub_actions", SUB_ACTIONS_MIN, SUB_ACTIONS_MAX, errors)
    object_keys = {normalize_entity(o) for o in objects}
    action_keys = {normalize_entity(a) for a in sub_actions}
    entity_sets = {
        "object_object": (object_keys, object_keys, "objects", "objects"),
        "action_object": (action_keys, object_keys, "sub_actions", "objects"),
        "action_action": (action_keys, action_keys, "sub_actions", "sub_actions"),
    }
    listed = {"objects": object_keys, "sub_actions": action_keys}

    relations = _kinds_section(graph, "relations", RELATION_MINIMUMS, where, errors)
    for kind, minimum in RELATION_MINIMUMS.items():
        triples = relations.get(kind)
        rwhere = f"{where}.relations.{kind}"
        if not isinstance(triples, list):
            errors.append(f"{rwhere}: expected a list of [subject, predicate, object] triples")
            continue
        if len(triples) < minimum:
            errors.append(f"{rwhere}: {len(triples)} triples, expected at least {minimum}")
        subjects, objects_, subject_field, object_field = entity_sets[kind]
        seen = set()
        for i, triple in enumerate(triples):
            if (not isinstance(triple, list) or len(triple) != 3
                    or not all(isinstance(t, str) and t.strip() for t in triple)):
                errors.append(f"{rwhere}[{i}]: expected [subject, predicate, object] non-empty strings, got {triple!r}")
                continue
            subject, _, obj = (normalize_entity(t) for t in triple)
            for role, text, key, allowed, field in (("subject", triple[0], subject, subjects, subject_field),
                                                    ("object", triple[2], obj, objects_, object_field)):
                if key in allowed or key in class_keys:
                    continue
                other = "objects" if field == "sub_actions" else "sub_actions"
                if key in listed[other]:  # a listed entity in the wrong place: the triple is of another kind
                    errors.append(f"{rwhere}[{i}]: {role} {text!r} is not in {field} (it is in {other})")
                elif notes is not None:
                    notes.append(f"{rwhere}[{i}]: {role} {text!r} is in neither objects nor sub_actions "
                                 f"(nor the class)")
            if subject == obj:
                errors.append(f"{rwhere}[{i}]: subject and object are the same ({triple[0]!r})")
            key = tuple(normalize_entity(t) for t in triple)
            if key in seen:
                errors.append(f"{rwhere}[{i}]: duplicate triple {triple!r}")
            seen.add(key)
    return object_keys, action_keys


def _field_errors(obj: dict, keys, where: str) -> list[str]:
    """Missing and unknown top-level fields of a JSON object, in that order."""
    errors: list[str] = []
    missing = [k for k in keys if k not in obj]
    if missing:
        errors.append(f"{where}: missing fields {missing}")
    unknown = sorted(set(obj) - set(keys))
    if unknown:
        errors.append(f"{where}: unknown fields {unknown}")
    return errors


def validate_graph(graph: Any, dataset: str, class_name: str, *, notes: list[str] | None = None) -> list[str]:
    """Errors of one class's graph (empty list: valid).

    `dataset` picks the display-name rule (see `stdd.resources.display_name`);
    any name outside the known sets (a user's class file) keeps names as written.
    `notes`, if given, receives what is valid but worth reporting: relations naming
    an entity in neither list.
    """
    where = f"class {class_name!r}"
    if not isinstance(graph, dict):
        return [f"{where}: expected a JSON object, got {type(graph).__name__}"]
    errors = _field_errors(graph, GRAPH_KEYS, where)
    if "class" in graph and graph["class"] != class_name:
        errors.append(f"{where}: field 'class' is {graph['class']!r}, expected {class_name!r}")
    try:
        display = display_name(dataset, class_name)
    except ValueError as exc:
        return errors + [f"{where}: {exc}"]

    object_keys, action_keys = _validate_knowledge(graph, where, errors, class_node_keys(dataset, class_name), notes)

    prompts = _kinds_section(graph, "prompts", PROMPT_MINIMUMS, where, errors)
    for kind, minimum in PROMPT_MINIMUMS.items():
        pwhere = f"{where}.prompts.{kind}"
        sentences = _string_list(prompts.get(kind, []), pwhere, errors)
        if len(sentences) < minimum:
            errors.append(f"{pwhere}: {len(sentences)} sentences, expected at least {minimum}")
        # Spatial prompts describe objects, temporal ones sub-actions: a sentence
        # naming none of its graph's entities is filler, not drawn from a triple.
        entities = object_keys if kind == "spatial" else action_keys | object_keys
        needed = "object" if kind == "spatial" else "sub-action or object"
        seen_sentences = set()
        for i, sentence in enumerate(sentences):
            problem = check_prompt(sentence, display)
            if problem:
                errors.append(f"{pwhere}[{i}]: {problem}: {sentence!r}")
                continue
            lowered = normalize_entity(sentence)
            if lowered in seen_sentences:
                errors.append(f"{pwhere}[{i}]: duplicate sentence {sentence!r}")
            seen_sentences.add(lowered)
            clause = lowered[len(normalize_entity(prompt_prefix(display))):]
            if entities and not any(e in clause for e in entities):
                errors.append(f"{pwhere}[{i}]: names no {needed} of the graph: {sentence!r}")
        if kind == "temporal" and action_keys and sentences:
            # At least one temporal sentence must carry an ordered sub-action.
            if not any(any(a in normalize_entity(s) for a in action_keys) for s in sentences):
                errors.append(f"{pwhere}: no sentence names a sub-action")
    return errors


STAGE1_KEYS = ("objects", "sub_actions", "relations")


def validate_stage1(answer: Any, class_name: str, dataset: str = "custom", *,
                    notes: list[str] | None = None) -> list[str]:
    """Errors of a stage-1 answer (objects, sub_actions, relations; no prompts yet); ``dataset`` and
    ``notes`` as in :func:`validate_graph`."""
    where = f"class {class_name!r}"
    if not isinstance(answer, dict):
        return [f"{where}: expected a JSON object, got {type(answer).__name__}"]
    errors = _field_errors(answer, STAGE1_KEYS, where)
    _validate_knowledge(answer, where, errors, class_node_keys(dataset, class_name), notes)
    return errors


def validate_askg_document(document: Any, source: str = "<document>", *,
                           require_complete: bool = True, notes: list[str] | None = None) -> list[str]:
    """Errors of a whole ASKG file already parsed from JSON (see `validate_askg_file`); `notes` as in
    :func:`validate_graph`."""
    if not isinstance(document, dict):
        return [f"{source}: expected a JSON object, got {type(document).__name__}"]
    errors: list[str] = []
    missing = [k for k in FILE_KEYS if k not in document]
    if missing:
        errors.append(f"{source}: missing fields {missing}")
    if "schema_version" in document and document["schema_version"] != SCHEMA_VERSION:
        errors.append(f"{source}: schema_version {document['schema_version']!r}, expected {SCHEMA_VERSION}")
    dataset = document.get("dataset")
    if not isinstance(dataset, str) or not dataset:
        errors.append(f"{source}: field 'dataset' must be a non-empty string")
        dataset = "custom"
    provenance = document.get("provenance")
    if not isinstance(provenance, dict):
        errors.append(f"{source}: field 'provenance' must be an object")
    elif dataset in ASKG_SETS:
        for key in SHIPPED_PROVENANCE_KEYS:
            if not isinstance(provenance.get(key), str) or not provenance[key].strip():
                errors.append(f"{source}: provenance.{key} must be a non-empty string")
    classes = document.get("classes")
    if not isinstance(classes, dict):
        errors.append(f"{source}: field 'classes' must be an object mapping class name -> graph")
        return errors
    if dataset in CLASS_COUNTS and require_complete:
        expected = class_names(dataset)
        missing_classes = [c for c in expected if c not in classes]
        extra = [c for c in classes if c not in set(expected)]
        if missing_classes:
            errors.append(f"{source}: {len(missing_classes)} of {len(expected)} {dataset} classes missing, "
                          f"e.g. {missing_classes[:5]}")
        if extra:
            errors.append(f"{source}: classes not in the {dataset} list: {extra[:5]}")
        if not missing_classes and not extra and list(classes) != expected:
            errors.append(f"{source}: classes are not in {dataset} class-list order")
    for name, graph in classes.items():
        graph_notes: list[str] = []
        errors.extend(f"{source}: {e}" for e in validate_graph(graph, dataset, name, notes=graph_notes))
        if notes is not None:
            notes.extend(f"{source}: {n}" for n in graph_notes)
    return errors


def validate_askg_file(path: str | Path, *, require_complete: bool = True,
                       notes: list[str] | None = None) -> list[str]:
    """Errors of an ASKG JSON file (empty list: valid); a file that cannot be read or parsed is one
    error (:func:`read_json_file`'s message).

    For a known dataset (ucf101, hmdb51, k400, k600, k600_new) every class of
    its list must be present, in list order, unless `require_complete=False`.
    """
    try:
        document = read_json_file(path)
    except AskgFileError as error:
        return [str(error)]
    return validate_askg_document(document, str(path), require_complete=require_complete, notes=notes)
