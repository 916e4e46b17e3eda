"""Tiny random Hugging Face checkpoints built in-process (transformers + save_pretrained), for tests.

Every parameter (norm weights and biases included) is perturbed with seeded noise so that a loader
that drops or transposes any tensor gives visibly different logits.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers

TINY_SHAPES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)

VARIANTS = {
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False, rope_theta=10000.0),
    "qwen2_tied": dict(model_type="qwen2", tie_word_embeddings=True, rope_theta=1000000.0),
    # head_dim (24) != hidden / heads (16)
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=False, head_dim=24, rope_theta=1000000.0),
    "llama3": dict(
        model_type="llama",
        tie_word_embeddings=False,
        head_dim=16,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama_bias": dict(
        model_type="llama",
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    ),
}

_CONFIG_CLASSES = {
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "llama": transformers.LlamaConfig,
}


def make_hf_model(variant: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny f32 random model of the given variant (eval mode)."""
    spec = dict(VARIANTS[variant])
    model_type = spec.pop("model_type")
    rope_theta = spec.pop("rope_theta", None)
    kwargs = dict(TINY_SHAPES, **spec, **overrides)
    if rope_theta is not None and "rope_parameters" not in kwargs:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    kwargs.setdefault("eos_token_id", 2)
    kwargs.setdefault("bos_token_id", 1)
    kwargs.setdefault("pad_token_id", 0)
    config = _CONFIG_CLASSES[model_type](**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def save_hf_model(model, folder: str, **save_kwargs) -> str:
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder, **save_kwargs)
    return folder


def hf_logits(model, tokens: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
    """Logits of one unpadded sequence: tokens [T] -> [T, V] (numpy f32)."""
    ids = torch.tensor(np.asarray(tokens)[None], dtype=torch.long)
    kwargs = {}
    if positions is not None:
        kwargs["position_ids"] = torch.tensor(np.asarray(positions)[None], dtype=torch.long)
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits[0].float().numpy()


def make_agent_model_dir(folder, variant: str = "qwen2_tied", seed: int = 0, vocab_size: int = 420) -> str:
    """A tiny random model with a small trained tokenizer (chat template included) in one HF folder.

    The tokenizer is trained on the synthetic-task corpus plus the agent's default prompt texts.
    """
    import itertools

    from memagent_jax.agent import AgentTemplates
    from memagent_jax.data.synthetic import tokenizer_corpus
    from memagent_jax.data.tokenizer import load_tokenizer, train_tokenizer

    t = AgentTemplates()
    texts = itertools.chain(
        tokenizer_corpus(num_samples=8, num_tokens=200), [t.memory_update, t.final_answer, t.initial_memory]
    )
    train_tokenizer(texts, folder, vocab_size=vocab_size)
    save_hf_model(make_hf_model(variant, seed=seed, vocab_size=len(load_tokenizer(folder))), str(folder))
    return str(folder)


def task_tokenizer_and_prompts(folder):
    """A 1,024-token tokenizer trained on the synthetic-task corpus and the default prompts (saved to `folder`),
    and the default templates' `AgentPrompts` for it: (tokenizer, prompts)."""
    from memagent_jax.agent import AgentTemplates
    from memagent_jax.agent.templates import AgentPrompts
    from memagent_jax.data.synthetic import tokenizer_corpus
    from memagent_jax.data.tokenizer import load_tokenizer, train_tokenizer

    t = AgentTemplates()
    train_tokenizer(
        list(tokenizer_corpus(num_samples=4)) + [t.memory_update, t.final_answer] * 4, folder, vocab_size=1024
    )
    tokenizer = load_tokenizer(folder)
    return tokenizer, AgentPrompts.build(tokenizer, t)


# The test tokenizer of `make_agent_model_dir` (~420 tokens, trained on the default wording) needs more room than
# the main job's budgets that configs/grpo.py:cpu carries ("No notes yet." alone is 10 of its tokens): tests that
# train with the cpu variant and this tokenizer use these settings (the default wording, the multihop task).
TEST_AGENT_SETTINGS = {
    "agent.question_tokens": 64,
    "agent.chunk_tokens": 64,
    "agent.memory_tokens": 16,
    "agent.answer_tokens": 8,
    "agent.memory_update": "",
    "agent.final_answer": "",
    "agent.initial_memory": "",
    "data.synthetic_task": "multihop_qa",
    "data.synthetic_tokens": 384,
}


def grpo_cpu_config(model_dir, **overrides):
    """configs/grpo.py:cpu for `model_dir` with TEST_AGENT_SETTINGS, then `overrides` ({'rl.group_size': 2, ...})."""
    from memagent_jax.configs import grpo

    cfg = grpo.get_config("cpu")
    cfg.model.path = str(model_dir)
    for key, value in {**TEST_AGENT_SETTINGS, **overrides}.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def agent_flags_for_tests() -> list[str]:
    """TEST_AGENT_SETTINGS as command-line flags of `python -m memagent_jax.train --config configs/grpo.py:cpu`."""
    return [f"--config.{key}={value}" for key, value in TEST_AGENT_SETTINGS.items()]


# answer's flags for small budgets that fit the tiny models (question 32, chunk 24, memory 16, answer 6 tokens), with
# the progress bar off: the command line the answer and fault tests share.
SMALL_ANSWER_FLAGS = [
    "--agent.question_tokens",
    "32",
    "--agent.chunk_tokens",
    "24",
    "--agent.memory_tokens",
    "16",
    "--agent.answer_tokens",
    "6",
    "--agent.chunks_per_segment",
    "2",
    "--no-progress",
]
