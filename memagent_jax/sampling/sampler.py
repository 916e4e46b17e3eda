"""The sampler's pure core: token selection, prefill and the `lax.while_loop` decode.

Everything here is a pure function of arrays (plus static `ModelConfig` / `SamplingParams`), so it composes
inside any jitted program, e.g. the memory agent's `lax.scan` over chunks:

    pre = prefill(params, config, tokens, token_mask, cache)                # prompt -> cache + last logits
    out = decode(params, config, pre.cache, pre.last_logits, pre.next_positions, row_keys, sampling, active)

Reusing a prefilled prefix (chat header + question) for many continuations: prefill the prefix once, then
for each continuation rewind the cache to the prefix (`models.rewind_cache`), prefill the rest with
`start_positions=prefix.next_positions`, and decode.

Shapes: B batch rows, T prompt tokens (bucketed), S cache slots, V vocab, N = sampling.max_new_tokens.

Settings: `max_new_tokens`, the stop ids and the pad id are static (`SamplingParams`); temperature, top-k and
top-p are per-row arrays (`RowSampling`), so one compiled program serves any mix of them (a greedy row beside
sampled ones takes the argmax, and a row's filters act on that row alone).

Randomness: row b at new-token index n samples with `fold_in(row_keys[b], n)`, and nothing else in the batch
enters that row's draw (neither the other rows' keys nor their settings), so a row's output does not depend on
which other rows share its batch.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from memagent_jax.models.config import ModelConfig
from memagent_jax.models.transformer import (
    TIED_HEAD_COPY,
    KVCache,
    forward_hidden,
    is_16bit_float,
    is_unstacked,
    logits_from_hidden,
    merge_cache_layers,
    positions_from_mask,
    split_cache_layers,
    unstack_layers,
    with_layer_copies,
    with_tied_head_copy,
)
from memagent_jax.sampling.params import RowSampling, SamplingError, SamplingParams

__all__ = [
    "InferenceLayout",
    "ParamsAttribute",
    "PrefillOutput",
    "SampleOutput",
    "decode",
    "decode_params",
    "inference_params",
    "prefill",
    "prefill_and_decode",
    "prefill_params",
    "reset_cache",
    "row_sampling",
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
                       (temperature 1, no top-k/top-p); with `SamplingParams.tempered_logprobs`, under
                       logits / the row's temperature (no top-k/top-p): what GRPO at that temperature needs.
                       0 at padded positions.
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


# A row's kept set (top-k, then top-p) is first looked for among its 16 most likely tokens, then the 128, then the
# 1024 (`lax.top_k`, sizes under half the vocabulary); only rows whose kept set is larger still sort the whole
# vocabulary. On XLA CPU, for a [256, 1024] batch: top-16 ~1.3 ms, top-128 ~8 ms, the sort ~45 ms; a trained model's
# nucleus at top-p 0.95 is mostly one or two tokens.
NUCLEUS_PROBES = (16, 128, 1024)


def row_sampling(sampling: SamplingParams | RowSampling, batch: int) -> RowSampling:
    """The per-row settings as [batch] device arrays: a `RowSampling` as given (cast), or a `SamplingParams`
    broadcast to every row."""
    if isinstance(sampling, SamplingParams):
        return RowSampling(
            jnp.full((batch,), sampling.temperature, jnp.float32),
            jnp.full((batch,), min(sampling.top_k, 2**31 - 1), jnp.int32),
            jnp.full((batch,), sampling.top_p, jnp.float32),
        )
    if not isinstance(sampling, RowSampling):
        raise SamplingError(f"sampling must be a SamplingParams or a RowSampling, got {type(sampling).__name__}")
    rows = RowSampling(
        jnp.asarray(sampling.temperature, jnp.float32),
        jnp.asarray(sampling.top_k, jnp.int32),
        jnp.asarray(sampling.top_p, jnp.float32),
    )
    if any(a.shape != (batch,) for a in rows):
        raise SamplingError(f"row sampling arrays must have shape ({batch},), got {[a.shape for a in rows]}")
    return rows


def first_argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` as int32 (the first index of the maximum; of the first NaN where a row has one),
    computed as a max, then the smallest index holding it: two plain reductions. XLA CPU vectorises those, not
    the fused (value, index) reduction of `argmax`: a [16, 1024] batch of logits took 21 us against 82 us, a
    tenth of a small model's decode step at batch 16. Same result, element for element. x: [..., V] -> [...]."""
    nan = jnp.isnan(x)
    row_has_nan = jnp.any(nan, axis=-1, keepdims=True)  # (XLA CPU's max may skip a NaN: checked apart)
    hit = jnp.where(row_has_nan, nan, x == jnp.max(x, axis=-1, keepdims=True))
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(hit, index, jnp.int32(x.shape[-1])), axis=-1)


def _row_noise(keys: jax.Array, size: int, dtype) -> jax.Array:
    """[B, size] Gumbel noise, row b drawn with keys[b] (what `jax.random.categorical` adds over `size` classes)."""
    return jax.vmap(lambda k: jax.random.gumbel(k, (size,), dtype))(keys)


def _gumbel_pick(values: jax.Array, noise: jax.Array):
    """Index of the Gumbel-max draw over candidates [B, C] with noise [B, >= C] (the first C columns used):
    the draw of `jax.random.categorical` with the same noise. Returns (index [B] int32, its log-probability
    under the candidates' renormalised distribution [B])."""
    choice = first_argmax(values + noise[:, : values.shape[1]])
    logprob = jnp.take_along_axis(jax.nn.log_softmax(values, axis=-1), choice[:, None], axis=-1)[:, 0]
    return choice, logprob


def _filtered_pick(
    scaled: jax.Array,
    noise: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    filtered: jax.Array,
    probes: tuple = NUCLEUS_PROBES,
):
    """Top-k then top-p sampling, each row with its own k and p, from temperature-scaled logits [B, V], without
    sorting the vocabulary where possible.

    Row b's candidates are its tokens in descending order of probability (ties: lower id first); it keeps the first
    k (k = top_k[b], 0 or >= V: all), renormalises them, and keeps of those the ones whose mass strictly ahead is
    < top_p[b] (the first always; top_p 1: all). The draw is the argmax of candidate logit + noise[b, rank] over the
    kept set. The kept set is looked for among the `probes[0]` most likely tokens, then `probes[1]`, ... (sizes
    under half the vocabulary), and a row whose kept set is larger than all of them takes the same draw over the
    fully sorted vocabulary. A wider search runs only when some row needs it, and each row keeps the result of the
    first search that held its kept set, so its draw depends only on its own logits, settings and noise, whichever
    path its batch mates take. Rows not `filtered` count as held (their result is not used).

    Returns (tokens [B] int32, log-probabilities [B] under the renormalised kept set).
    """
    vocab = scaled.shape[-1]
    k_eff = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)  # [B]
    log_total = jax.nn.logsumexp(scaled, axis=-1)  # [B]: mass of the whole vocabulary
    p_off = top_p >= 1.0

    def pick(values, ids):  # values [B, C] sorted descending, ids [B, C]
        c = values.shape[1]
        in_k = jnp.arange(c, dtype=jnp.int32)[None, :] < k_eff[:, None]
        top = jnp.where(in_k, values, -jnp.inf)
        # The renormaliser: the top k's mass when they all are candidates here, else the vocabulary's (k off).
        norm = jnp.where(k_eff <= c, jax.nn.logsumexp(top, axis=-1), log_total)
        probs = jnp.exp(top - norm[:, None])
        mass = jnp.cumsum(probs, axis=-1)
        keep = in_k & (p_off[:, None] | (mass - probs < top_p[:, None]))  # mass strictly ahead < top_p
        keep = keep.at[:, 0].set(True)
        choice, logprob = _gumbel_pick(jnp.where(keep, values, -jnp.inf), noise)
        token = jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        # Held: all k candidates are here, or (k off) the next candidate would be cut by top-p.
        covered = ~filtered | (k_eff <= c) | ((k_eff >= vocab) & ~p_off & (mass[:, -1] >= top_p))
        return token, logprob, covered

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


def sample_tokens(
    logits: jax.Array, keys: jax.Array, sampling: SamplingParams | RowSampling, *, tempered: bool | None = None
):
    """Picks one token per row, each row with its own settings.

    Args:
      logits: [B, V] f32 model logits.
      keys: [B] PRNG keys, one per row (unused by greedy rows).
      sampling: a `RowSampling` of [B] arrays (traced: one compile for any values), or a `SamplingParams` whose
        temperature / top_k / top_p every row uses.
      tempered: the returned logprobs are under log_softmax(logits / the row's temperature) (greedy rows: the
        logits); None: `sampling.tempered_logprobs` (False for a `RowSampling`).
    Returns:
      (tokens [B] int32, logprobs [B] f32 under log_softmax(logits) (or tempered, above), sampling_logprobs [B]
      f32 under the distribution actually sampled from; 0 for greedy rows).

    Paths (each under `lax.cond`, so a batch pays only for what some row needs): every row greedy (temperature 0):
    the argmax alone. Otherwise every non-greedy row draws Gumbel noise over the vocabulary with its key; rows with
    no filter take the argmax of scaled logits + noise (the noise laid along token ids); when some row has a top-k
    or top-p filter, `_filtered_pick` runs (noise laid along the ranks). Greedy rows take the argmax of the logits.
    """
    logits = logits.astype(jnp.float32)
    batch, vocab = logits.shape
    if tempered is None:
        tempered = isinstance(sampling, SamplingParams) and sampling.tempered_logprobs
    model_logprobs = jax.nn.log_softmax(logits, axis=-1)
    greedy_tokens = first_argmax(logits)

    def picked(tokens, logprobs=model_logprobs):
        return jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]

    if isinstance(sampling, SamplingParams) and sampling.greedy:
        return greedy_tokens, picked(greedy_tokens), jnp.zeros((batch,), jnp.float32)
    rows = row_sampling(sampling, batch)
    greedy = rows.temperature <= 0.0

    def only_greedy():
        return greedy_tokens, jnp.zeros((batch,), jnp.float32)

    def sampled():
        scaled = logits / jnp.where(greedy, 1.0, rows.temperature)[:, None]
        noise = _row_noise(keys, vocab, scaled.dtype)
        free_tokens, free_lp = _gumbel_pick(scaled, noise)
        filtered = ~greedy & (((rows.top_k > 0) & (rows.top_k < vocab)) | (rows.top_p < 1.0))

        def with_filters():
            tokens, lp = _filtered_pick(scaled, noise, rows.top_k, rows.top_p, filtered)
            return jnp.where(filtered, tokens, free_tokens), jnp.where(filtered, lp, free_lp)

        tokens, lp = jax.lax.cond(jnp.any(filtered), with_filters, lambda: (free_tokens, free_lp))
        return jnp.where(greedy, greedy_tokens, tokens), jnp.where(greedy, 0.0, lp)

    tokens, sampled_lp = jax.lax.cond(jnp.all(greedy), only_greedy, sampled)
    if tempered:  # the distribution before any top-k / top-p filter, as the learner's (greedy rows: the logits)
        scaled_logprobs = jax.nn.log_softmax(logits / jnp.where(greedy, 1.0, rows.temperature)[:, None], axis=-1)
        return tokens, picked(tokens, scaled_logprobs), sampled_lp
    return tokens, picked(tokens), sampled_lp


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


# The smallest tied head (V x D in the param dtype) that `decode_params` copies on CPU: far above the CPU's caches.
TIED_HEAD_COPY_MIN_BYTES = 16 << 20


def decode_params(params, config: ModelConfig, batch: int = 1, tied_head_copy: bool | None = None):
    """The parameters in the layout the decode loop runs (`config.resolved_decode_layout`).

    'unstacked': `unstack_layers(params)` (idempotent): inside a jitted program this copies the layer weights
    once (one extra copy of the layer weights held while the program runs), so call it once per program,
    outside every loop (`decode` calls it outside its `while_loop`; the agent's segment program calls it outside
    its chunk scan and passes the result down). 'scan': `params` unchanged.

    tied_head_copy: add the tied embedding's transposed copy (`models.transformer.with_tied_head_copy`) that
    every decode step's logits then read; None: on CPU for `batch` (rows per step) of 2 or more and a head (not
    16-bit: see `_copies_tied_head`) of `TIED_HEAD_COPY_MIN_BYTES` or more (one that streams from memory at every
    step, not from cache). There the embedding's layout makes the head ~1.9x slower (Qwen2.5-0.5B at batch 4) and
    a 64-token decode ran 1.19x faster copy included; at batch 1 the head is a matrix-vector product that reads the
    embedding as well in either layout, and the copy did not pay (0.93x). Params holding a copy already
    (`inference_params`) have it used or set aside by the same rule; False: the head reads the embedding.
    """
    if config.resolved_decode_layout == "unstacked":
        params = unstack_layers(params)
    if tied_head_copy is None:
        tied_head_copy = _copies_tied_head(params, batch)
    return with_tied_head_copy(params, config) if tied_head_copy else _without_tied_head_copy(params)


def _without_tied_head_copy(params):
    """`params` without a held copy of the tied head (the head then reads the embedding)."""
    if TIED_HEAD_COPY not in params:
        return params
    return {k: v for k, v in params.items() if k != TIED_HEAD_COPY}


def _copies_tied_head(params, batch: int) -> bool:
    """The rule of `decode_params`. A 16-bit head gets no copy: XLA CPU's bf16 products read the embedding's
    layout as fast as the copy's or faster (Qwen2.5-0.5B's head: 10.7 against 11.3 ms at 4 rows)."""
    embed = params["embed"]
    streamed = embed.size * jnp.dtype(embed.dtype).itemsize >= TIED_HEAD_COPY_MIN_BYTES
    return streamed and batch >= 2 and jax.default_backend() == "cpu" and not is_16bit_float(embed.dtype)


def inference_params(params, config: ModelConfig):
    """`params` with the copies every decode reads made beside them: the per-layer copies of the stacked layers
    where the decode layout is 'unstacked' (`models.transformer.with_layer_copies`), and the tied head's
    transposed copy where `decode_params` makes one from 2 rows up (a batch of 1 leaves it unread, as
    `decode_params` would not make it). The stack stays, so a prefill runs its layer scan as before, and
    `decode_params` of the result takes the copies in place of slicing again: the numbers are those of the
    bare params. Idempotent."""
    if config.resolved_decode_layout == "unstacked":
        params = with_layer_copies(params)
    return with_tied_head_copy(params, config) if _copies_tied_head(params, 2) else params


@functools.partial(jax.jit, static_argnums=1)
def _decode_copies(params, config: ModelConfig) -> dict:
    """The entries `inference_params` adds (the input arrays are not returned: a jitted program would copy them)."""
    return {k: v for k, v in inference_params(params, config).items() if k not in params}


class InferenceLayout:
    """One model's params with the copies its decode reads (`inference_params`), made once per weights.

    A program given bare params makes those copies itself at every call: at Qwen2.5-0.5B's shapes on CPU that is
    about 1 s a call (1.4 GB of layer weights unstacked, the 544 MB tied head transposed), paid at every chunk
    step of an agent and every `generate`. The host-side objects that call the programs (`Sampler`,
    `MemoryAgent`, `DocumentEngine`) hold one of these and pass `get(params)` instead: the copies are made once,
    by a jitted program, and reused while `params` holds the same arrays (another array anywhere in the tree
    makes new ones). The programs compute the same numbers either way.

    Memory: one more copy of the layer weights (and of a large tied head on CPU) for as long as it is held, where
    a call used to hold it for its own length; `release()` drops it (the RL trainer does before each learner
    step).
    """

    def __init__(self, config: ModelConfig):
        self.config = config
        self._source: list | None = None  # the leaves the layout was made from (held: their ids stay theirs)
        self._laid_out = None

    def get(self, params):
        """`params` laid out (the held layout when `params` holds the arrays it was made from)."""
        leaves = jax.tree.leaves(params)
        if self._source is not None and len(leaves) == len(self._source):
            if all(a is b for a, b in zip(leaves, self._source, strict=True)):
                return self._laid_out
        self.release()
        laid_out = {**params, **_decode_copies(params, self.config)}  # laid out already: nothing new, no copy
        self._source, self._laid_out = leaves, laid_out
        return laid_out

    def release(self) -> None:
        """Drops the held layout (the next `get` makes it again)."""
        self._source = self._laid_out = None


class ParamsAttribute:
    """A class's `params` attribute whose owner holds an `InferenceLayout` as `_layout`: assigning new weights
    drops the layout made for the old ones (the next program call makes it again)."""

    def __set_name__(self, owner, name):
        self._slot = "_" + name

    def __get__(self, obj, objtype=None):
        return self if obj is None else getattr(obj, self._slot)

    def __set__(self, obj, params) -> None:
        obj._layout.release()
        setattr(obj, self._slot, params)


def prefill_params(params, laid_out):
    """The params a prefill should run: `laid_out` (the decode layout of `params`, `decode_params`) where its
    layers are unstacked and its weights are 16-bit floats on CPU, else `params`.

    XLA CPU has no 16-bit float dynamic-slice, so a layer scan over stacked bf16 weights would take each layer
    through f32 (see `models.transformer`); the unstacked layers, already made for the decode that follows,
    are read in place (with no copy when `params` holds them: `inference_params`). In f32 the stacked scan stays
    (one compiled layer body: faster to compile).
    """
    if not is_unstacked(laid_out) or jax.default_backend() != "cpu":
        return _without_tied_head_copy(params)
    if not any(is_16bit_float(a.dtype) for a in jax.tree.leaves(laid_out["layers"])):
        return _without_tied_head_copy(params)
    return laid_out


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
    rows: RowSampling | None = None,
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
        token n. Unused by greedy rows.
      sampling: static `SamplingParams`: max_new_tokens, stop ids, pad id and tempered_logprobs; its
        temperature / top_k / top_p are every row's settings when `rows` is None.
      active: optional [B] bool; inactive rows produce nothing (all pad, num_tokens 0, finished False).
      rows: optional `RowSampling` of [B] arrays: each row's temperature / top_k / top_p (traced: pass
        `sampling.static()` as the static settings and one compile serves any values).
    Returns:
      `SampleOutput` (see its docstring for shapes).
    """
    params = decode_params(params, config, last_logits.shape[0])
    stacked_cache = cache
    if is_unstacked(params):
        cache = split_cache_layers(cache)
    b = last_logits.shape[0]
    n = sampling.max_new_tokens
    pad = jnp.int32(sampling.pad_id)
    stop_ids = jnp.asarray(sampling.stop_token_ids, jnp.int32)
    active = jnp.ones((b,), bool) if active is None else active.astype(bool)

    if rows is None and sampling.greedy:
        settings = sampling  # static greedy: the argmax alone, no keys
    else:
        settings = row_sampling(sampling if rows is None else rows, b)

    def pick(logits, step):
        if settings is sampling:
            keys = rngs  # unused
        else:
            keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(rngs, step)
        return sample_tokens(logits, keys, settings, tempered=sampling.tempered_logprobs)

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
    rows: RowSampling | None = None,
) -> SampleOutput:
    """`prefill` into a reset cache, then `decode`: the whole generation as one pure function.

    tokens / token_mask: [B, T]; cache: any `KVCache` with >= T + N - 1 slots (its contents are discarded,
    its buffers reused); rngs: [B] keys; active: optional [B] bool (rows with no real token are always
    inactive); rows: optional per-row settings (see `decode`).
    """
    needed = tokens.shape[1] + sampling.max_new_tokens - 1
    if cache.max_length < needed:
        raise SamplingError(
            f"cache has {cache.max_length} slots; a prompt of {tokens.shape[1]} tokens and "
            f"max_new_tokens={sampling.max_new_tokens} need at least {needed}"
        )
    has_any = jnp.any(token_mask.astype(bool), axis=-1)
    active = has_any if active is None else active.astype(bool) & has_any
    laid_out = decode_params(params, config, tokens.shape[0])
    pre = prefill(prefill_params(params, laid_out), config, tokens, token_mask, reset_cache(cache))
    return decode(laid_out, config, pre.cache, pre.last_logits, pre.next_positions, rngs, sampling, active, rows)
