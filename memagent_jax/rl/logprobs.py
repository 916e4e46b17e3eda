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

Response window: a learner needs the log-probs of the response tokens only, a short run at the end of each
conversation's real tokens (`rl.batch`). With `response_start` ([B], the position of each row's first response token)
and a static `response_window` W, the LM head, its logsumexp and the entropy run over the W positions from there
instead of all T: for a memory update's row (thousands of prompt tokens, a memory of hundreds) that is most of the
head's work, and the head is the model's widest product. The values in the window are those of the whole-row
computation; positions outside it get 0.
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


def _predicted_stats(params, hidden, targets, *, config, chunk_size, with_entropy, temperature):
    """hidden [B, L, D], targets [B, L] -> (log-prob [B, L], entropy [B, L]) of each target under the distribution
    its hidden state predicts, `chunk_size` positions of logits at a time (rematerialised when more than one)."""

    def stats(p, h, y):
        return _chunk_stats(p, h, y, config=config, with_entropy=with_entropy, temperature=temperature)

    b, length = targets.shape
    if chunk_size <= 0 or chunk_size >= length:
        # One chunk: the logits are materialised anyway; no point recomputing them in the backward pass.
        return stats(params, hidden, targets)
    stats = jax.checkpoint(stats)  # keep one chunk's logits alive at a time, in the backward pass too
    c = chunk_size
    n = -(-length // c)
    pad = n * c - length
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hs = hidden.reshape(b, n, c, hidden.shape[-1]).swapaxes(0, 1)  # [n, B, c, D]
    ys = targets.reshape(b, n, c).swapaxes(0, 1)  # [n, B, c]

    def body(_, xs):
        return None, stats(params, *xs)

    _, (lp, en) = jax.lax.scan(body, None, (hs, ys))
    return lp.swapaxes(0, 1).reshape(b, n * c)[:, :length], en.swapaxes(0, 1).reshape(b, n * c)[:, :length]


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
    response_start=None,
    response_window: int = 0,
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
      response_start: optional [B] int, each row's first response token (with `response_window` > 0).
      response_window: static W; with `response_start`, only positions response_start .. response_start + W - 1
        of each row get their log-prob and entropy (the head runs on [B, W] hidden states instead of [B, T]); the
        rest are 0. 0: every position.
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

    def stats(h, y):
        return _predicted_stats(
            params, h, y, config=config, chunk_size=chunk_size, with_entropy=with_entropy, temperature=temperature
        )

    if response_start is not None and 0 < response_window < t:
        # Row b's window predicts tokens start_b .. start_b + W - 1 from the hidden states one position earlier.
        start = jnp.asarray(response_start, jnp.int32).reshape(b, 1)
        source = start - 1 + jnp.arange(response_window, dtype=jnp.int32)[None, :]  # [B, W]
        hidden = jnp.take_along_axis(hidden, jnp.clip(source, 0, t - 1)[..., None], axis=1)  # [B, W, D]
        targets = jnp.take_along_axis(tokens, jnp.clip(source + 1, 0, t - 1), axis=1).astype(jnp.int32)
        logp_w, ent_w = stats(hidden, targets)  # [B, W]
        # Back to [B, T]: position p holds window slot p - start_b where that slot exists (and p >= 1).
        slot = jnp.arange(t, dtype=jnp.int32)[None, :] - start  # [B, T]
        inside = (slot >= 0) & (slot < response_window) & (jnp.arange(t)[None, :] >= 1)
        slot = jnp.clip(slot, 0, response_window - 1)
        logprobs = jnp.where(inside, jnp.take_along_axis(logp_w, slot, axis=1), 0.0)
        entropy = jnp.where(inside, jnp.take_along_axis(ent_w, slot, axis=1), 0.0)
        return logprobs, entropy
    # The hidden state at t predicts token t + 1; the last position predicts nothing (its target is a dummy 0).
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros((b, 1), tokens.dtype)], axis=1).astype(jnp.int32)
    logp_next, ent_next = stats(hidden, targets)
    zeros = jnp.zeros((b, 1), jnp.float32)
    logprobs = jnp.concatenate([zeros, logp_next[:, :-1]], axis=1)
    entropy = jnp.concatenate([zeros, ent_next[:, :-1]], axis=1)
    return logprobs, entropy
