"""The sampler's pure core: token selection, prefill and the `lax.while_loop` decode.

Everything here is a pure function of arrays (plus static `ModelConfig` / `SamplingParams`), so it composes
inside any jitted program, e.g. the memory agent's `lax.scan` over chunks:

    pre = prefill(params, config, tokens, token_mask, cache)                # prompt -> cache + last logits
    out = decode(params, config, pre.cache, pre.last_logits, pre.next_positions, row_keys, sampling, active)

Reusing a prefilled prefix (chat header + question) for many continuations: prefill the prefix once, then
for each continuation rewind the cache to the prefix (`models.rewind_cache`), prefill the rest with
`start_positions=prefix.next_positions`, and decode.

Shapes: B batch rows, T prompt tokens (bucketed), S cache slots, V vocab, N = sampling.max_new_tokens.

Randomness: row b at new-token index n samples with `fold_in(row_keys[b], n)`, and nothing else in the batch
enters that row's draw, so a row's output does not depend on which other rows share its batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from memagent_jax.models.config import ModelConfig
from memagent_jax.models.transformer import (
    KVCache,
    forward_hidden,
    is_unstacked,
    logits_from_hidden,
    merge_cache_layers,
    positions_from_mask,
    split_cache_layers,
    unstack_layers,
)
from memagent_jax.sampling.params import SamplingError, SamplingParams

__all__ = [
    "PrefillOutput",
    "SampleOutput",
    "decode",
    "decode_params",
    "prefill",
    "prefill_and_decode",
    "reset_cache",
    "sample_tokens",
]


class PrefillOutput(NamedTuple):
    """Result of `prefill`.

    last_logits:    [B, V] f32, the logits after each row's last real prompt token (garbage for rows with
                    no real token: mark them inactive in `decode`).
    next_positions: [B] int32, the position of each row's first new token (start + number of real tokens).
    cache:          the `KVCache` with the prompt written at slots [length, length + T).
    """

    last_logits: jax.Array
    next_positions: jax.Array
    cache: KVCache


class SampleOutput(NamedTuple):
    """Result of `decode`.

    tokens:            [B, N] int32 new token ids; `pad_id` after a row's stop token and for inactive rows.
    num_tokens:        [B] int32, new tokens per row, the stop token included (0 for inactive rows).
    finished:          [B] bool, whether the row emitted a stop token (False when it ran out of tokens, and
                       for inactive rows).
    logprobs:          [B, N] f32, log-prob of each new token under the model's unmodified distribution
                       (temperature 1, no top-k/top-p): what RL needs. 0 at padded positions.
    sampling_logprobs: [B, N] f32, log-prob of each new token under the distribution it was drawn from
                       (temperature, top-k, top-p applied; 0 for greedy, a point mass). 0 at padded positions.
    cache:             the `KVCache` after decoding: it holds every new token except each row's last one
                       (which was never fed back), at slots up to `length`; later slots are untouched.
    """

    tokens: jax.Array
    num_tokens: jax.Array
    finished: jax.Array
    logprobs: jax.Array
    sampling_logprobs: jax.Array
    cache: KVCache

    def response_mask(self) -> jax.Array:
        """[B, N] bool, True at the new tokens of each row (the first num_tokens columns)."""
        return jnp.arange(self.tokens.shape[1], dtype=jnp.int32)[None, :] < self.num_tokens[:, None]


# ------------------------------------------------------------------------------------- token selection


# A nucleus (top-p without top-k) is first looked for among the 16 most likely tokens, then the 128 (`lax.top_k`);
# only rows whose nucleus is larger still sort the whole vocabulary. On XLA CPU, for a [256, 1024] batch: top-16
# ~1.3 ms, top-128 ~8 ms, the sort ~45 ms; a trained model's nucleus at top-p 0.95 is mostly one or two tokens.
NUCLEUS_PROBES = (16, 128)


def _candidates(scaled: jax.Array, sampling: SamplingParams):
    """Applies top-k and then top-p (renormalised over the top k) to temperature-scaled logits [B, V].

    Only for top_k > 0 (top-p alone: `_nucleus_pick`). Returns (candidate_logits [B, K] sorted descending, ties
    lower id first, candidate_ids [B, K] int32); candidates cut by top-p hold -inf.
    """
    values, ids = jax.lax.top_k(scaled, sampling.top_k)  # sorted descending, ties: lower id first
    ids = ids.astype(jnp.int32)
    if sampling.top_p < 1.0:
        probs = jax.nn.softmax(values, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly ahead of each candidate
        keep = (before < sampling.top_p).at[:, 0].set(True)
        values = jnp.where(keep, values, -jnp.inf)
    return values, ids


def _row_noise(keys: jax.Array, size: int, dtype) -> jax.Array:
    """[B, size] Gumbel noise, row b drawn with keys[b] (what `jax.random.categorical` adds over `size` classes)."""
    return jax.vmap(lambda k: jax.random.gumbel(k, (size,), dtype))(keys)


def _gumbel_pick(values: jax.Array, noise: jax.Array):
    """Index of the Gumbel-max draw over candidates [B, C] with noise [B, >= C] (the first C columns used):
    the draw of `jax.random.categorical` with the same noise. Returns (index [B] int32, its log-probability
    under the candidates' renormalised distribution [B])."""
    choice = jnp.argmax(values + noise[:, : values.shape[1]], axis=-1).astype(jnp.int32)
    logprob = jnp.take_along_axis(jax.nn.log_softmax(values, axis=-1), choice[:, None], axis=-1)[:, 0]
    return choice, logprob


def _nucleus_pick(scaled: jax.Array, keys: jax.Array, top_p: float, probes: tuple = NUCLEUS_PROBES):
    """Top-p sampling from temperature-scaled logits [B, V] without sorting the vocabulary where possible.

    Every row draws Gumbel noise over the whole vocabulary with its key, laid along the tokens in descending
    order of probability (ties: lower id first), and takes the argmax of candidate logit + noise over its nucleus
    (the most likely tokens while the mass strictly ahead is < top_p; the first always). The nucleus is looked
    for among the `probes[0]` most likely tokens, then `probes[1]`, ... (sizes under half the vocabulary), and a
    row whose nucleus is larger than all of them takes the same draw over the fully sorted vocabulary. A wider
    search runs only when some row needs it, and each row keeps the result of the first search that held its
    nucleus, so its draw depends only on its own logits and key, whichever path its batch mates take.

    Returns (tokens [B] int32, log-probabilities [B] under the renormalised nucleus).
    """
    vocab = scaled.shape[-1]
    noise = _row_noise(keys, vocab, scaled.dtype)  # [B, V]
    log_total = jax.nn.logsumexp(scaled, axis=-1, keepdims=True)  # [B, 1]: mass of the whole vocabulary

    def pick(values, ids):  # values [B, C] sorted descending, ids [B, C]
        probs = jnp.exp(values - log_total)
        mass = jnp.cumsum(probs, axis=-1)
        keep = (mass - probs < top_p).at[:, 0].set(True)  # mass strictly ahead of the candidate < top_p
        choice, logprob = _gumbel_pick(jnp.where(keep, values, -jnp.inf), noise)
        token = jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        return token, logprob, mass[:, -1] >= top_p  # covered: the next candidate would be cut

    def search(sizes: tuple):
        if not sizes:
            iota = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), scaled.shape)
            neg, ids = jax.lax.sort((-scaled, iota), dimension=-1, is_stable=True, num_keys=1)
            return pick(-neg, ids)[:2]
        token, logprob, covered = pick(*jax.lax.top_k(scaled, sizes[0]))

        def wider():
            wide_token, wide_logprob = search(sizes[1:])
            return jnp.where(covered, token, wide_token), jnp.where(covered, logprob, wide_logprob)

        return jax.lax.cond(jnp.all(covered), lambda: (token, logprob), wider)

    return search(tuple(k for k in probes if 2 * k <= vocab))


def sample_tokens(logits: jax.Array, keys: jax.Array, sampling: SamplingParams):
    """Picks one token per row.

    Args:
      logits: [B, V] f32 model logits.
      keys: [B] PRNG keys, one per row (unused when greedy).
      sampling: static `SamplingParams`.
    Returns:
      (tokens [B] int32, logprobs [B] f32 under log_softmax(logits), sampling_logprobs [B] f32 under the
      distribution actually sampled from; 0 for greedy).
    """
    logits = logits.astype(jnp.float32)
    model_logprobs = jax.nn.log_softmax(logits, axis=-1)
    if sampling.greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        picked = jnp.take_along_axis(model_logprobs, tokens[:, None], axis=-1)[:, 0]
        return tokens, picked, jnp.zeros_like(picked)
    scaled = logits / sampling.temperature
    vocab = scaled.shape[-1]
    if 0 < sampling.top_k < vocab:
        values, ids = _candidates(scaled, sampling)
        noise = _row_noise(keys, values.shape[1], scaled.dtype)
        choice, sampled_lp = _gumbel_pick(values, noise)
        tokens = jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
    elif sampling.top_p < 1.0:
        tokens, sampled_lp = _nucleus_pick(scaled, keys, sampling.top_p)
    else:
        tokens, sampled_lp = _gumbel_pick(scaled, _row_noise(keys, vocab, scaled.dtype))
    picked = jnp.take_along_axis(model_logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, picked, sampled_lp


# ------------------------------------------------------------------------------------------- prefill


def reset_cache(cache: KVCache) -> KVCache:
    """The same buffers with nothing valid and the write index at 0 (stale keys/values stay masked)."""
    return KVCache(
        k=cache.k,
        v=cache.v,
        positions=cache.positions,
        valid=jnp.zeros_like(cache.valid),
        length=jnp.zeros_like(cache.length),
    )


def prefill(
    params,
    config: ModelConfig,
    tokens: jax.Array,
    token_mask: jax.Array,
    cache: KVCache,
    positions: jax.Array | None = None,
    start_positions: jax.Array | int = 0,
) -> PrefillOutput:
    """Runs the prompt through the model, writing it into the cache.

    Args:
      params: model parameters.
      config: static `ModelConfig`.
      tokens: [B, T] int prompt ids; pads (anywhere: left, right, inside a template) are masked out.
      token_mask: [B, T] bool, True for real tokens.
      cache: `KVCache` with at least T free slots after `cache.length` (plus N - 1 for the decode).
      positions: optional [B, T] int positions; default counts real tokens from `start_positions`.
      start_positions: scalar or [B] int, the position of each row's first real token when `positions` is
        None (e.g. the `next_positions` of a prefilled prefix).
    Returns:
      `PrefillOutput(last_logits [B, V] f32, next_positions [B] int32, cache)`. Logits are computed only at
      each row's last real token (no [B, T, V] array).
    """
    token_mask = token_mask.astype(bool)
    b, t = tokens.shape
    if positions is None:
        positions = positions_from_mask(token_mask, start_positions)
    positions = positions.astype(jnp.int32)
    hidden, cache = forward_hidden(params, tokens, positions, token_mask, config=config, cache=cache)
    has_any = jnp.any(token_mask, axis=-1)
    last = (t - 1 - jnp.argmax(token_mask[:, ::-1], axis=-1)).astype(jnp.int32)  # last real index per row
    last_hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
    last_logits = logits_from_hidden(params, last_hidden, config=config)
    start = jnp.broadcast_to(jnp.asarray(start_positions, jnp.int32), (b,))
    next_positions = jnp.where(has_any, jnp.take_along_axis(positions, last[:, None], axis=1)[:, 0] + 1, start)
    return PrefillOutput(last_logits.astype(jnp.float32), next_positions, cache)


# -------------------------------------------------------------------------------------------- decode


def decode_params(params, config: ModelConfig):
    """The parameters in the layout the decode loop runs (`config.resolved_decode_layout`).

    'unstacked': `unstack_layers(params)` (idempotent): inside a jitted program this copies the layer weights
    once (one extra copy of the layer weights held while the program runs), so call it once per program,
    outside every loop (`decode` calls it outside its `while_loop`; the agent's segment program calls it outside
    its chunk scan and passes the result down). 'scan': `params` unchanged.
    """
    if config.resolved_decode_layout == "unstacked":
        return unstack_layers(params)
    return params


class _State(NamedTuple):
    step: jax.Array  # [] int32, index of the next token to sample
    last_token: jax.Array  # [B] int32, token sampled at step - 1
    positions: jax.Array  # [B] int32, position of last_token
    done: jax.Array  # [B] bool, row stopped (or inactive): nothing more is recorded for it
    finished: jax.Array  # [B] bool
    num_tokens: jax.Array  # [B] int32
    tokens: jax.Array  # [B, N] int32
    logprobs: jax.Array  # [B, N] f32
    sampling_logprobs: jax.Array  # [B, N] f32
    cache: KVCache


def decode(
    params,
    config: ModelConfig,
    cache: KVCache,
    last_logits: jax.Array,
    next_positions: jax.Array,
    rngs: jax.Array,
    sampling: SamplingParams,
    active: jax.Array | None = None,
) -> SampleOutput:
    """Samples up to N = sampling.max_new_tokens tokens per row in one `lax.while_loop`.

    The loop stops as soon as every row is done (stop token emitted, or inactive) or N tokens were sampled.
    Each iteration feeds every row's previous token through the model with the KV cache (one slot per
    iteration for all rows; rows already done write a masked slot), then samples.

    Args:
      params: model parameters, stacked or unstacked; they are put in the decode layout of
        `config.decode_layout` (see `decode_params`) once, before the loop. In the 'unstacked' layout the KV
        cache is split into per-layer buffers for the loop as well (`split_cache_layers`: one copy of the
        cache per call, where reading a layer out of the stack copied it at every token) and the written slots
        are put back into the stacked cache after it; the returned cache is stacked in both layouts.
      config: static `ModelConfig`.
      cache: `KVCache` holding the prompts; it needs N - 1 free slots after `cache.length` (slots past the
        end would be silently clamped by XLA, so size it accordingly).
      last_logits: [B, V] f32 logits for the first new token (from `prefill`).
      next_positions: [B] int, position of the first new token of each row.
      rngs: [B] PRNG keys (typed `jax.random.key` or raw uint32 [B, 2]); row b uses fold_in(rngs[b], n) for
        token n. Unused when greedy.
      sampling: static `SamplingParams`.
      active: optional [B] bool; inactive rows produce nothing (all pad, num_tokens 0, finished False).
    Returns:
      `SampleOutput` (see its docstring for shapes).
    """
    params = decode_params(params, config)
    stacked_cache = cache
    if is_unstacked(params):
        cache = split_cache_layers(cache)
    b = last_logits.shape[0]
    n = sampling.max_new_tokens
    pad = jnp.int32(sampling.pad_id)
    stop_ids = jnp.asarray(sampling.stop_token_ids, jnp.int32)
    active = jnp.ones((b,), bool) if active is None else active.astype(bool)

    def pick(logits, step):
        if sampling.greedy:
            keys = rngs  # unused
        else:
            keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(rngs, step)
        return sample_tokens(logits, keys, sampling)

    def record(state: _State, picked, cache: KVCache, positions) -> _State:
        token, lp, slp = picked
        alive = ~state.done
        token = jnp.where(alive, token, pad)
        lp = jnp.where(alive, lp, 0.0)
        slp = jnp.where(alive, slp, 0.0)
        col = (0, state.step)
        hit = alive & jnp.any(token[:, None] == stop_ids[None, :], axis=-1) if stop_ids.size else jnp.zeros_like(alive)
        return _State(
            step=state.step + 1,
            last_token=token,
            positions=positions,
            done=state.done | hit,
            finished=state.finished | hit,
            num_tokens=state.num_tokens + alive.astype(jnp.int32),
            tokens=jax.lax.dynamic_update_slice(state.tokens, token[:, None], col),
            logprobs=jax.lax.dynamic_update_slice(state.logprobs, lp[:, None].astype(jnp.float32), col),
            sampling_logprobs=jax.lax.dynamic_update_slice(
                state.sampling_logprobs, slp[:, None].astype(jnp.float32), col
            ),
            cache=cache,
        )

    zeros_f = jnp.zeros((b, n), jnp.float32)
    state = _State(
        step=jnp.zeros((), jnp.int32),
        last_token=jnp.full((b,), pad, jnp.int32),
        positions=next_positions.astype(jnp.int32),
        done=~active,
        finished=jnp.zeros((b,), bool),
        num_tokens=jnp.zeros((b,), jnp.int32),
        tokens=jnp.full((b, n), pad, jnp.int32),
        logprobs=zeros_f,
        sampling_logprobs=zeros_f,
        cache=cache,
    )
    # Token 0 comes from the prefill logits; every later token needs one forward of the previous one.
    state = record(state, pick(last_logits.astype(jnp.float32), state.step), cache, state.positions)

    def cond(s: _State):
        return (s.step < n) & ~jnp.all(s.done)

    def body(s: _State) -> _State:
        alive = ~s.done
        hidden, new_cache = forward_hidden(
            params, s.last_token[:, None], s.positions[:, None], alive[:, None], config=config, cache=s.cache
        )
        logits = logits_from_hidden(params, hidden[:, 0], config=config)
        positions = s.positions + alive.astype(jnp.int32)
        return record(s, pick(logits, s.step), new_cache, positions)

    state = jax.lax.while_loop(cond, body, state)
    # Token n >= 1 was fed back through the model: at most N - 1 slots from the input cache's length.
    out_cache = merge_cache_layers(state.cache, stacked_cache, stacked_cache.length, n - 1)
    return SampleOutput(
        tokens=state.tokens,
        num_tokens=state.num_tokens,
        finished=state.finished,
        logprobs=state.logprobs,
        sampling_logprobs=state.sampling_logprobs,
        cache=out_cache,
    )


def prefill_and_decode(
    params,
    config: ModelConfig,
    tokens: jax.Array,
    token_mask: jax.Array,
    cache: KVCache,
    rngs: jax.Array,
    sampling: SamplingParams,
    active: jax.Array | None = None,
) -> SampleOutput:
    """`prefill` into a reset cache, then `decode`: the whole generation as one pure function.

    tokens / token_mask: [B, T]; cache: any `KVCache` with >= T + N - 1 slots (its contents are discarded,
    its buffers reused); rngs: [B] keys; active: optional [B] bool (rows with no real token are always
    inactive).
    """
    needed = tokens.shape[1] + sampling.max_new_tokens - 1
    if cache.max_length < needed:
        raise SamplingError(
            f"cache has {cache.max_length} slots; a prompt of {tokens.shape[1]} tokens and "
            f"max_new_tokens={sampling.max_new_tokens} need at least {needed}"
        )
    has_any = jnp.any(token_mask.astype(bool), axis=-1)
    active = has_any if active is None else active.astype(bool) & has_any
    pre = prefill(params, config, tokens, token_mask, reset_cache(cache))
    return decode(params, config, pre.cache, pre.last_logits, pre.next_positions, rngs, sampling, active)
