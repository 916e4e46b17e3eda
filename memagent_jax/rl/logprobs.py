"""Per-token log-probs (and entropies) of a batch of sequences under the model, without a full [B, T, V] logits.

`token_logprobs` runs `forward_hidden` once, then walks the sequence in chunks of `chunk_size` positions: each
chunk's logits [B, c, V] are made by `logits_from_hidden`, reduced to the target token's log-prob (logit minus
an exact logsumexp over the whole vocabulary) and the entropy, and dropped. With more than one chunk the chunk
function is rematerialised (`jax.checkpoint`), so the backward pass also holds one chunk's logits at a time (at
the cost of recomputing the LM-head matmul). The result is
the same as `log_softmax(forward(...))` gathered at the targets (chunking only changes what is kept in memory).

Temperature: with `temperature` T != 1 the distribution is softmax(logits / T), as verl computes the log-probs and
the entropy of a policy sampled at temperature T (top-k / top-p are not applied). T = 1 leaves the logits untouched.

Alignment: the output at position t is log p(tokens[t] | tokens[:t]), predicted by the hidden state at t - 1;
position 0 gets 0 (nothing predicts it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from memagent_jax.models.config import ModelConfig
from memagent_jax.models.transformer import forward_hidden, logits_from_hidden, positions_from_mask

__all__ = ["token_logprobs"]


def _chunk_stats(params, hidden, targets, *, config: ModelConfig, with_entropy: bool, temperature: float = 1.0):
    """hidden [B, c, D], targets [B, c] -> (log-prob of each target [B, c], entropy [B, c] or zeros), both under
    softmax(logits / temperature)."""
    logits = logits_from_hidden(params, hidden, config=config)  # [B, c, V] f32
    if temperature != 1.0:
        logits = logits / jnp.float32(temperature)
    lse = jax.nn.logsumexp(logits, axis=-1)
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    # A masked sum (rather than a gather) keeps a vocabulary-sharded logits array sharded.
    target_logit = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
    logp = target_logit - lse
    if with_entropy:
        probs = jnp.exp(logits - lse[..., None])
        entropy = lse - jnp.sum(probs * logits, axis=-1)
    else:
        entropy = jnp.zeros_like(logp)
    return logp, entropy


def token_logprobs(
    params,
    tokens,
    token_mask,
    *,
    config: ModelConfig,
    positions=None,
    chunk_size: int = 512,
    with_entropy: bool = False,
    segment_ids=None,
    temperature: float = 1.0,
):
    """Log-prob of every token given its prefix, and optionally the entropy of the predicting distribution.

    Args:
      params: model parameters.
      tokens: [B, T] int token ids; token_mask: [B, T] bool real tokens.
      config: the model's `ModelConfig` (its `remat` setting applies to the layer scan).
      positions: [B, T] int, default `positions_from_mask(token_mask)`.
      chunk_size: positions per logits chunk (0 or >= T: one chunk).
      with_entropy: also return the entropy of the distribution that predicts each token.
      segment_ids: optional [B, T] int (packed rows): tokens attend only within their own segment; `positions`
        should then restart at each segment (`rl.batch.segment_positions`). A segment's first token gets the
        meaningless "prediction" of the previous segment's last token (never a response token).
      temperature: T > 0 (static): log-probs and entropy of softmax(logits / T), the distribution a rollout at
        temperature T samples from before any top-k / top-p filter (1: the model's own).
    Returns:
      (logprobs [B, T] f32, entropy [B, T] f32): logprobs[:, t] = log p(tokens[:, t] | tokens[:, :t]) for t >= 1,
      entropy[:, t] = H(p(. | tokens[:, :t])); both 0 at t = 0 (and meaningless at pad positions).
    """
    if positions is None:
        positions = positions_from_mask(token_mask)
    hidden, _ = forward_hidden(
        params, tokens, positions, token_mask, config=config, segment_ids=segment_ids
    )  # [B, T, D]
    b, t = tokens.shape
    # The hidden state at t predicts token t + 1; the last position predicts nothing (its target is a dummy 0).
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1).astype(jnp.int32)

    def stats(p, h, y):
        return _chunk_stats(p, h, y, config=config, with_entropy=with_entropy, temperature=temperature)

    if chunk_size <= 0 or chunk_size >= t:
        # One chunk: the logits are materialised anyway; no point recomputing them in the backward pass.
        logp_next, ent_next = stats(params, hidden, targets)
    else:
        stats = jax.checkpoint(stats)  # keep one chunk's logits alive at a time, in the backward pass too
        c = chunk_size
        n = -(-t // c)
        pad = n * c - t
        if pad:
            hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
            targets = jnp.pad(targets, ((0, 0), (0, pad)))
        hs = hidden.reshape(b, n, c, hidden.shape[-1]).swapaxes(0, 1)  # [n, B, c, D]
        ys = targets.reshape(b, n, c).swapaxes(0, 1)  # [n, B, c]

        def body(_, xs):
            return None, stats(params, *xs)

        _, (lp, en) = jax.lax.scan(body, None, (hs, ys))
        logp_next = lp.swapaxes(0, 1).reshape(b, n * c)[:, :t]
        ent_next = en.swapaxes(0, 1).reshape(b, n * c)[:, :t]
    zeros = jnp.zeros((b, 1), jnp.float32)
    logprobs = jnp.concatenate([zeros, logp_next[:, :-1]], axis=1)
    entropy = jnp.concatenate([zeros, ent_next[:, :-1]], axis=1)
    return logprobs, entropy
