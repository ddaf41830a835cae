"""ASKG tooling: Action Semantic Knowledge Graphs built with an LLM, the authors' release imported.

The graph and prompt formats these write, and the prompt loaders the model and
the engine read, are in :mod:`stdd.knowledge` (a lower layer: the model and
the engine never import this package); they are re-exported here and under
their earlier module names ``stdd.askg.schema`` and ``stdd.askg.prompts``.

- ``builder.py``: construction with an LLM (any OpenAI-compatible endpoint),
  two stages per class, cached and resumable (:class:`AskgBuilder`).
- ``release.py``: the authors' released knowledge files (YAML) read into these formats.
- ``cli.py`` / ``python -m stdd.askg``: ``build``, ``prompts``, ``inspect``, ``validate``,
  ``import-release``.

Importing this package does not import the ``openai`` client (the builder does,
when it is created without a client).
"""

from ..knowledge.prompts import load_graphs, load_prompts, prompt_lists
from ..knowledge.schema import AskgError
from .builder import AskgBuilder, AskgConfig, BuildReport, FatalEndpointError

__all__ = [
    "AskgBuilder", "AskgConfig", "AskgError", "BuildReport", "FatalEndpointError",
    "load_graphs", "load_prompts", "prompt_lists",
]
