"""The memory agent: types, templates, chunking, the jitted chunk scan, device placement, the document engine,
the runner (`MemoryAgent`), the text prompt mode, a plain-Python reference loop.

The names below load on first use (PEP 562), so importing a light submodule (e.g. `agent.types`,
plain dataclasses) does not pull in JAX through this file.
"""

from memagent_jax._lazy import lazy_exports

# name -> submodule, imported on first access.
_EXPORTS = {
    "AgentBudgets": ".chunking",
    "AgentInputError": ".chunking",
    "centre_truncate": ".chunking",
    "read_document_file": ".chunking",
    "tokenize_document": ".chunking",
    "AgentResult": ".types",
    "Conversation": ".types",
    "MemoryAgent": ".runner",
    "SCHEDULING": ".runner",
    "choose_scheduling": ".runner",
    "AgentPrompts": ".templates",
    "AgentTemplates": ".templates",
    "TemplateError": ".templates",
    "SETTINGS_FILE": ".settings",
    "AgentSettings": ".settings",
    "AgentSettingsError": ".settings",
    "write_agent_settings": ".settings",
    "reference_run": ".reference",
}

__all__ = [
    "AgentBudgets",
    "AgentInputError",
    "AgentPrompts",
    "AgentResult",
    "AgentSettings",
    "AgentSettingsError",
    "AgentTemplates",
    "Conversation",
    "MemoryAgent",
    "SCHEDULING",
    "SETTINGS_FILE",
    "write_agent_settings",
    "TemplateError",
    "centre_truncate",
    "choose_scheduling",
    "read_document_file",
    "reference_run",
    "tokenize_document",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
