"""Architecture presets (shapes only) for common checkpoints, as HF `config.json` dicts.

Weights always come from a user-given local folder; a preset lets configs, the planner and the
benchmarks reason about a model's shapes without any download. `preset_config(name)` returns a
`ModelConfig`; `PRESETS[name]` the HF-style dict (what the checkpoint's config.json says).
"""

from __future__ import annotations

from memagent_jax.models.config import ModelConfig


def _qwen2(hidden, inter, layers, heads, kv, vocab, tied, max_pos=32768):
    return dict(
        model_type="qwen2",
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        hidden_act="silu",
        bos_token_id=151643,
        eos_token_id=151645,
        dtype="bfloat16",
    )


def _qwen3(hidden, inter, layers, heads, kv, tied):
    return dict(
        model_type="qwen3",
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=tied,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        hidden_act="silu",
        bos_token_id=151643,
        eos_token_id=151645,
        dtype="bfloat16",
    )


PRESETS: dict[str, dict] = {
    "qwen2.5-0.5b-instruct": _qwen2(896, 4864, 24, 14, 2, 151936, True),
    "qwen2.5-1.5b-instruct": _qwen2(1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-3b-instruct": _qwen2(2048, 11008, 36, 16, 2, 151936, True),
    "qwen2.5-7b-instruct": _qwen2(3584, 18944, 28, 28, 4, 152064, False),
    "qwen2.5-14b-instruct": _qwen2(5120, 13824, 48, 40, 8, 152064, False),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, 8, True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, 8, False),
    # A tiny Qwen2-architecture model for tests, demos and CPU runs.
    "tiny": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        hidden_act="silu",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dtype="float32",
    ),
}


def preset_config(name: str, **overrides) -> ModelConfig:
    """The `ModelConfig` of a preset; `overrides` replace ModelConfig fields (e.g. num_layers=2)."""
    key = name.lower()
    if key not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return ModelConfig.from_hf_dict(PRESETS[key], source=f"preset {key}", **overrides)
