"""ASKG: Action Semantic Knowledge Graphs and the prompts STDD reads from them.

- ``schema.py``: the graph and file format, and its validators.
- ``builder.py``: construction with an LLM (any OpenAI-compatible endpoint),
  two stages per class, cached and resumable (:class:`AskgBuilder`).
- ``prompts.py``: reading graphs and the one prompt loader (:func:`load_prompts`).
- ``release.py``: the authors' released knowledge files (YAML) read into these formats.
- ``cli.py`` / ``python -m stdd.askg``: ``build``, ``prompts``, ``inspect``, ``validate``,
  ``import-release``.

Importing this package does not import the ``openai`` client (the builder does,
when it is created without a client).
"""

from .builder import AskgBuilder, AskgConfig, AskgError, BuildReport, FatalEndpointError
from .prompts import load_graphs, load_prompts, prompt_lists

__all__ = [
    "AskgBuilder", "AskgConfig", "AskgError", "BuildReport", "FatalEndpointError",
    "load_graphs", "load_prompts", "prompt_lists",
]
