"""memagent-jax: memory agents for arbitrarily long documents, in JAX/Flax.

The names below load on first use, so `import memagent_jax` stays light (no JAX until you touch one):

    from memagent_jax import MemoryAgent
    agent = MemoryAgent.from_pretrained("runs/tiny_synthetic/rl/export")   # settings from memagent_agent.json
    result = agent.run(["Which city ...?"], [document_text], trace=True)
"""

from __future__ import annotations

from memagent_jax._lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "MemoryAgent": "memagent_jax.agent",
    "AgentBudgets": "memagent_jax.agent",
    "AgentTemplates": "memagent_jax.agent",
    "AgentSettings": "memagent_jax.agent",
    "AgentResult": "memagent_jax.agent",
    "write_agent_settings": "memagent_jax.agent",
    "load_hf_params": "memagent_jax.models",
    "save_hf_checkpoint": "memagent_jax.models",
    "ModelConfig": "memagent_jax.models",
    "SamplingParams": "memagent_jax.sampling",
    "QARecord": "memagent_jax.data",
    "open_file": "memagent_jax.data.formats",
    "evaluate_models": "memagent_jax.evaluation",
    "evaluate_agent": "memagent_jax.evaluation",
    "score": "memagent_jax.evaluation.verifier",
    "extract_prediction": "memagent_jax.evaluation.verifier",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
