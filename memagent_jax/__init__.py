"""memagent-jax: memory agents for arbitrarily long documents, in JAX/Flax."""

__version__ = "0.1.0"
