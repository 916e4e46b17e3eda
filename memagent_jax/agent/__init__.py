"""The memory agent: templates, chunking, the jitted chunk scan, a plain-Python reference loop."""

from memagent_jax.agent.chunking import (AgentBudgets, AgentInputError, centre_truncate, read_document_file,
                                         tokenize_document)
from memagent_jax.agent.runner import AgentResult, Conversation, MemoryAgent
from memagent_jax.agent.templates import AgentPrompts, AgentTemplates, TemplateError
from memagent_jax.agent.settings import (SETTINGS_FILE, AgentSettings, AgentSettingsError,
                                         write_agent_settings)
from memagent_jax.agent.reference import reference_run  # noqa: E402  (imports runner)

__all__ = [
    "AgentBudgets", "AgentInputError", "AgentPrompts", "AgentResult", "AgentSettings", "AgentSettingsError",
    "AgentTemplates", "Conversation", "MemoryAgent", "SETTINGS_FILE", "write_agent_settings", "TemplateError", "centre_truncate", "read_document_file", "reference_run", "tokenize_document",
]
