"""A first look at the model stack on CPU, no downloads.

Creates a tiny random Qwen2-architecture checkpoint, writes it as a Hugging Face folder, loads it back
through the real safetensors loader, runs a padded batch of prompts through the jitted forward pass,
continues each prompt greedily with the KV cache, and checks that the cached decode reproduces the
full forward pass. Prints what it computed.

    python -m memagent_jax.demo [--workdir workdir/demo] [--new-tokens 12]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from memagent_jax.models import (forward, init_cache, init_params, load_hf_params, positions_from_mask,
                                 save_hf_checkpoint)
from memagent_jax.models.presets import preset_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="workdir/demo")
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    config = preset_config("tiny")
    print(f"[1/4] tiny {config.model_type} model: {config.num_layers} layers, width {config.hidden_size}, "
          f"{config.num_heads} heads / {config.num_kv_heads} kv heads, vocab {config.vocab_size}, "
          f"{config.num_params():,} params")
    folder = os.path.join(args.workdir, "tiny-random-hf")
    t0 = time.time()
    save_hf_checkpoint(init_params(config, args.seed), config, folder)
    params, config = load_hf_params(folder)
    print(f"[2/4] wrote and reloaded HF checkpoint {folder} ({sorted(os.listdir(folder))}) in {time.time() - t0:.2f}s")

    rng = np.random.default_rng(args.seed)
    lengths = [5, 9, 3]
    width = max(lengths) + args.new_tokens
    tokens = np.zeros((len(lengths), max(lengths)), np.int32)
    mask = np.zeros_like(tokens, bool)
    for row, n in enumerate(lengths):  # left padding
        tokens[row, -n:] = rng.integers(3, config.vocab_size, n)
        mask[row, -n:] = True
    positions = positions_from_mask(jnp.asarray(mask))

    step = jax.jit(lambda p, t, q, m, c: forward(p, t, q, m, config=config, cache=c))
    t0 = time.time()
    logits, cache = step(params, tokens, positions, mask, init_cache(config, len(lengths), width))
    jax.block_until_ready(logits)
    print(f"[3/4] prefill of a padded batch {tokens.shape} (real lengths {lengths}): logits {logits.shape}, "
          f"compile+run {time.time() - t0:.2f}s")

    generated = []
    next_pos = np.asarray(positions)[:, -1] + 1
    last = np.asarray(logits[:, -1])
    for i in range(args.new_tokens):
        nxt = last.argmax(-1).astype(np.int32)
        generated.append(nxt)
        logits, cache = step(params, nxt[:, None], (next_pos + i)[:, None], np.ones((len(lengths), 1), bool), cache)
        last = np.asarray(logits[:, -1])
    generated = np.stack(generated, axis=1)

    # The cached decode must equal one full forward over prompt + continuation.
    full_tokens = np.concatenate([tokens, generated], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(generated, bool)], axis=1)
    full_logits, _ = jax.jit(lambda p, t, q, m: forward(p, t, q, m, config=config))(
        params, full_tokens, positions_from_mask(jnp.asarray(full_mask)), full_mask)
    full_greedy = np.asarray(full_logits).argmax(-1)[:, max(lengths) - 1:-1]
    agree = (full_greedy == generated).mean()
    print("[4/4] greedy continuations (token ids):")
    for row, n in enumerate(lengths):
        print(f"      prompt {tokens[row, -n:].tolist()} -> {generated[row].tolist()}")
    print(f"      cached decode vs full forward argmax agreement: {agree:.0%}")
    return 0 if agree == 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
