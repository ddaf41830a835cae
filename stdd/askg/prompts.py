"""Reading ASKG graphs and the prompt sentences the model's text side consumes.

- :func:`load_graphs`: ``(dataset, {class: graph})`` from a shipped / merged
  ASKG file or a ``python -m stdd.askg build --out`` directory, validated.
- :func:`prompt_lists`: ``{class: [sentences]}`` (spatial, temporal or both,
  the paper's [S] + [T]).
- :func:`load_prompts`: the one prompt loader, for any prompt source.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..resources import askg_path
from .builder import AskgError, class_slug
from .schema import validate_askg_document, validate_graph


def load_graphs(path: str | Path, *, allow_missing: bool = False) -> tuple[str, dict[str, dict]]:
    """(dataset, {class: graph}) from a shipped/merged ASKG json or a `build --out` directory.

    Everything read is validated; a directory's classes that are not built yet are
    an error unless `allow_missing`.
    """
    path = Path(path)
    if path.is_dir():
        manifest_path = path / "manifest.json"
        if not manifest_path.exists():
            raise AskgError(f"--graph {path}: a directory must be a `stdd.askg build --out` directory "
                            f"(no manifest.json)")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        dataset, names = manifest["dataset"], manifest["classes"]
        graphs, missing, errors = {}, [], []
        for name in names:
            cache = path / "classes" / f"{class_slug(name)}.json"
            if not cache.exists():
                missing.append(name)
                continue
            graph = json.loads(cache.read_text(encoding="utf-8"))["result"]
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
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AskgError(f"--graph {path}: not valid JSON ({exc})") from None
    errors = validate_askg_document(document, str(path), require_complete=not allow_missing)
    if errors:
        raise AskgError("invalid ASKG file:\n" + "\n".join(errors[:20]))
    return document["dataset"], dict(document["classes"])


PROMPT_KINDS = {"S": ("spatial",), "T": ("temporal",), "ST": ("spatial", "temporal")}


def prompt_lists(graphs: dict[str, dict], only: str = "ST") -> dict[str, list[str]]:
    """{class: [sentences]}: spatial, temporal, or spatial then temporal prompts."""
    kinds = PROMPT_KINDS.get(only.upper())
    if kinds is None:
        raise ValueError(f"--only {only!r}: expected one of {', '.join(PROMPT_KINDS)}")
    return {name: [s for kind in kinds for s in graph["prompts"][kind]] for name, graph in graphs.items()}


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


def load_prompts(source: str | Path, only: str = "ST", *, allow_missing: bool = False) -> dict[str, list[str]]:
    """{class: [prompt sentences]} from any prompt source the model's text side may be given.

    `source`: a shipped set name (ucf101, hmdb51, k400, k600_new), an ASKG json
    (shipped format or `build --out DIR/askg.json`), a build directory, or a
    prompts json written by `python -m stdd.askg prompts` (then `only` must
    match what that file holds; it cannot be re-split).
    """
    path = Path(source)
    if not path.exists() and isinstance(source, str) and source.lower() in ("ucf101", "hmdb51", "k400", "k600_new"):
        path = askg_path(source)
    if path.is_file():
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AskgError(f"prompt source {path}: not valid JSON ({exc})") from None
        if isinstance(document, dict) and "classes" not in document:
            # A prompts file: {class: [sentence, ...]}.
            bad = [k for k, v in document.items()
                   if not isinstance(v, list) or not v or not all(isinstance(s, str) and s.strip() for s in v)]
            if bad:
                raise AskgError(f"prompt source {path}: classes without a non-empty list of sentences: {bad[:5]}")
            return {k: list(v) for k, v in document.items()}
    _, graphs = load_graphs(path, allow_missing=allow_missing)
    return prompt_lists(graphs, only)
