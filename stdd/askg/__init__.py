"""ASKG tooling: Action Semantic Knowledge Graphs built with an LLM, the authors' release imported.

The graph and prompt formats these write, and the prompt loaders the model and
the engine read, are in :mod:`stdd.knowledge` (a lower layer: the model and
the engine never import this package).

- ``builder.py``: construction with an LLM (any OpenAI-compatible endpoint),
  two stages per class, cached and resumable (:class:`AskgBuilder`).
- ``release.py``: the authors' released knowledge files (YAML) read into these formats.
- ``cli.py`` / ``python -m stdd.askg``: ``build``, ``prompts``, ``inspect``, ``validate``,
  ``import-release``.

Importing this package does not import the ``openai`` client (the builder does,
when it is created without a client).
"""

from .builder import AskgBuilder, AskgConfig, BuildReport, FatalEndpointError

__all__ = ["AskgBuilder", "AskgConfig", "BuildReport", "FatalEndpointError"]
