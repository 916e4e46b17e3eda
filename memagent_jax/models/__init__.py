"""Qwen/Llama-family transformer, HF checkpoint I/O, sharding rules and shape presets."""

from memagent_jax.models.config import ConfigError, ModelConfig, RopeConfig
from memagent_jax.models.hf_io import CheckpointError, load_hf_params, save_hf_checkpoint
from memagent_jax.models.transformer import (
    KVCache,
    abstract_params,
    forward,
    forward_hidden,
    init_cache,
    init_params,
    logits_from_hidden,
    positions_from_mask,
    rewind_cache,
    unstack_layers,
)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "ModelConfig",
    "RopeConfig",
    "abstract_params",
    "forward",
    "forward_hidden",
    "init_cache",
    "init_params",
    "load_hf_params",
    "logits_from_hidden",
    "positions_from_mask",
    "rewind_cache",
    "save_hf_checkpoint",
    "unstack_layers",
]
