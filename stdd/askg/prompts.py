"""The prompt loaders, importable under their earlier name: they live in :mod:`stdd.knowledge.prompts`."""

from ..knowledge.prompts import (  # noqa: F401  (re-exported)
    DEFAULT_TEMPLATES,
    PROMPT_KINDS,
    PromptSourceError,
    check_prompts,
    format_graph,
    load_graphs,
    load_prompts,
    prompt_lists,
    template_prompts,
)
