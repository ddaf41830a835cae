"""What stdd knows about actions, as files: the ASKG graph format and the prompt sentences read from it.

The low half of ASKG, read by the model's text side, the engine and the ASKG
tooling alike; it imports nothing above :mod:`stdd.errors` and
:mod:`stdd.resources` (the shipped class lists and graphs). Building graphs
with an LLM, importing the authors' release and ``python -m stdd.askg`` are in
:mod:`stdd.askg`, on top.

- ``schema.py``: the graph and file format, its validators, how the ASKG files
  are read (:func:`read_json_file`) and a build directory's file names
  (:func:`class_slug`).
- ``prompts.py``: the prompt sources: :func:`template_prompts` (hand-written
  templates), :func:`load_graphs` / :func:`prompt_lists` (graphs) and
  :func:`load_prompts`, the one prompt loader; :func:`check_prompts`, the check
  every prompt mapping passes.
"""

from .prompts import (
    DEFAULT_TEMPLATES,
    TEMPLATE_SETS,
    PromptSourceError,
    check_prompts,
    load_graphs,
    load_prompts,
    prompt_lists,
    template_prompts,
)
from .schema import AskgError, AskgFileError, validate_askg_document, validate_askg_file, validate_graph

__all__ = [
    "DEFAULT_TEMPLATES", "TEMPLATE_SETS", "AskgError", "AskgFileError", "PromptSourceError", "check_prompts",
    "load_graphs", "load_prompts", "prompt_lists", "template_prompts", "validate_askg_document", "validate_askg_file",
    "validate_graph",
]
