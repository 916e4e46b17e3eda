"""Host-level generation: ragged prompts in, trimmed completions out, one compiled program per shape.

    sampler = Sampler(params, config, mesh=mesh)                        # mesh optional
    result = sampler.generate([[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=32, temperature=0.7,
                                                                    top_p=0.95, stop_token_ids=(2,)), rng=0)
    result.tokens[0]       # list[int], the new ids of row 0 (stop token included, pads removed)

What happens per call: prompts are checked, left-padded to the smallest length bucket that fits the longest
one (powers of two from `min_bucket`, capped by `max_prompt_length`), the batch is padded with inactive rows
to a multiple of the mesh's batch-axis size, and one jitted program runs prefill + the whole decode loop.
The program is compiled once per (bucket, padded batch size, max_new_tokens / stop ids / pad id, config): a new
batch of the same shapes reuses it, whatever its temperature / top-k / top-p (per-row arrays, `RowSampling`). Its KV
cache argument is donated: the returned cache is kept and handed back (donated
again) on the next call of the same shapes, so decode updates one buffer in place and no call allocates a
second cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memagent_jax.models import sharding as sharding_lib
from memagent_jax.models.config import ModelConfig
from memagent_jax.models.transformer import KVCache, init_cache
from memagent_jax.sampling.params import RowSampling, SamplingError, SamplingParams
from memagent_jax.sampling.sampler import InferenceLayout, ParamsAttribute, SampleOutput, prefill_and_decode

__all__ = ["GenerateResult", "Sampler", "generate", "new_cache", "prompt_buckets", "row_keys"]

DEFAULT_MIN_BUCKET = 16


def _program(params, tokens, token_mask, rngs, active, cache, rows, *, config, sampling):
    return prefill_and_decode(params, config, tokens, token_mask, cache, rngs, sampling, active, rows)


#: The compiled generation program: jit over (params, tokens [B, T], token_mask [B, T], rngs [B], active [B], cache,
#: rows: RowSampling [B]) with static (config, sampling: `SamplingParams.static()`); the cache is donated.
#: `_cache_size()` counts compiles.
generate_program = jax.jit(_program, static_argnames=("config", "sampling"), donate_argnames=("cache",))


@functools.lru_cache(maxsize=32)
def _cache_initialiser(config: ModelConfig, batch: int, slots: int, dtype, shardings):
    """A jitted zero-argument function making an empty cache, directly in its shards when given."""
    out = None
    if shardings is not None:
        kv, rows, scalar = shardings
        out = KVCache(k=kv, v=kv, positions=rows, valid=rows, length=scalar)
    return jax.jit(lambda: init_cache(config, batch, slots, dtype), out_shardings=out)


def new_cache(config: ModelConfig, batch: int, slots: int, *, mesh=None, dtype: str | None = None) -> KVCache:
    """An empty KV cache of `slots` slots per row, made directly in its shards when a mesh is given (rows over
    the batch axes, KV heads over 'tensor'); the jitted initialiser is compiled once per shape."""
    shardings = None if mesh is None else sharding_lib.kv_cache_shardings(config, mesh, batch, slots)
    key = None if shardings is None else (shardings.k, shardings.positions, shardings.length)
    return _cache_initialiser(config, batch, slots, dtype, key)()


def prompt_buckets(max_prompt_length: int, min_bucket: int = DEFAULT_MIN_BUCKET) -> tuple[int, ...]:
    """Powers of two from `min_bucket` below `max_prompt_length`, then `max_prompt_length` itself."""
    if max_prompt_length <= 0:
        raise SamplingError(f"max_prompt_length must be positive, got {max_prompt_length}")
    if min_bucket <= 0:
        raise SamplingError(f"min_bucket must be positive, got {min_bucket}")
    out, b = [], min_bucket
    while b < max_prompt_length:
        out.append(b)
        b *= 2
    out.append(max_prompt_length)
    return tuple(out)


def row_keys(rng, batch_size: int) -> jax.Array:
    """[batch_size] typed PRNG keys from: an int seed, one key (row i gets fold_in(key, i), which does not
    depend on the batch size), or already [batch_size] keys (typed, or raw uint32 [batch_size, 2])."""
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        rng = jax.random.key(int(rng))
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.dtype != jnp.uint32 or rng.shape[-1:] != (2,):
            raise SamplingError(f"rng must be an int seed or PRNG key(s), got dtype {rng.dtype} shape {rng.shape}")
        rng = jax.random.wrap_key_data(rng)
    if rng.ndim == 0:
        return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch_size, dtype=jnp.uint32))
    if rng.shape != (batch_size,):
        raise SamplingError(f"rng holds {rng.shape[0]} keys, but there are {batch_size} prompts")
    return rng


@dataclasses.dataclass
class GenerateResult:
    """Per-row results of `Sampler.generate` (B = number of prompts, N = max_new_tokens).

    tokens:            list of B lists of new ids (stop token included, padding removed).
    num_tokens:        [B] int32.
    finished:          [B] bool, the row emitted a stop token.
    logprobs:          [B, N] f32 under the model's unmodified distribution (0 past num_tokens).
    sampling_logprobs: [B, N] f32 under the sampling distribution (0 past num_tokens; 0 for greedy).
    token_array:       [B, N] int32 new ids padded with pad_id.
    bucket:            the prompt length bucket used.
    """

    tokens: list[list[int]]
    num_tokens: np.ndarray
    finished: np.ndarray
    logprobs: np.ndarray
    sampling_logprobs: np.ndarray
    token_array: np.ndarray
    bucket: int

    def row_logprobs(self, row: int) -> np.ndarray:
        return self.logprobs[row, : self.num_tokens[row]]


def _check_prompts(prompts, vocab_size: int) -> list[np.ndarray]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) and not isinstance(prompts, np.ndarray):
        raise SamplingError(f"prompts must be a list of token id lists, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise SamplingError("prompts is empty: give at least one prompt")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)):
            raise SamplingError(f"prompts[{i}] is a string; tokenize it first (token ids are expected)")
        try:
            arr = np.asarray(p)
        except Exception:
            raise SamplingError(f"prompts[{i}] is not a sequence of token ids") from None
        if arr.ndim != 1:
            raise SamplingError(f"prompts[{i}] must be a flat sequence of token ids, got shape {arr.shape}")
        if arr.size == 0:
            raise SamplingError(f"prompts[{i}] is empty: every prompt needs at least one token")
        if not np.issubdtype(arr.dtype, np.integer):
            raise SamplingError(f"prompts[{i}] must hold integer token ids, got dtype {arr.dtype}")
        if arr.min() < 0 or arr.max() >= vocab_size:
            bad = int(arr[(arr < 0) | (arr >= vocab_size)][0])
            raise SamplingError(f"prompts[{i}] holds token id {bad}, outside the vocabulary [0, {vocab_size})")
        out.append(arr.astype(np.int32))
    return out


class Sampler:
    """Batched generation for one model (params + config), optionally on a mesh.

    Args:
      params: the parameter pytree (sharded on `mesh` if one is given, e.g. `load_hf_params(folder, mesh=mesh)`).
      config: its `ModelConfig`.
      mesh: optional ('data', 'fsdp', 'tensor') mesh; batch rows go over data x fsdp, the cache's KV heads
        over tensor where they divide.
      max_prompt_length: the largest bucket (default: config.max_position_embeddings); longer prompts are
        refused.
      min_bucket: the smallest bucket.
      buckets: explicit increasing bucket lengths (overrides the two above).
      cache_dtype: KV cache dtype (default: the compute dtype).
      keep_cache: keep each shape's cache between calls (donated back in); False frees it after each call.
    The programs run `params` in the inference layout (`sampling.sampler.InferenceLayout`), made at the first
    call and held until `params` is assigned new weights.
    """

    params = ParamsAttribute()  # assigning new weights drops the held layout

    def __init__(
        self,
        params,
        config: ModelConfig,
        *,
        mesh=None,
        max_prompt_length: int | None = None,
        min_bucket: int = DEFAULT_MIN_BUCKET,
        buckets: Sequence[int] | None = None,
        cache_dtype: str | None = None,
        keep_cache: bool = True,
    ):
        self._layout = InferenceLayout(config)
        self.params = params
        self.config = config
        self.mesh = mesh
        if buckets is not None:
            buckets = tuple(int(b) for b in buckets)
            if not buckets or any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
                raise SamplingError(f"buckets must be positive and strictly increasing, got {buckets}")
            self.buckets = buckets
        else:
            self.buckets = prompt_buckets(max_prompt_length or config.max_position_embeddings, min_bucket)
        self.cache_dtype = cache_dtype
        self.keep_cache = keep_cache
        self._caches: dict[tuple[int, int, int], KVCache] = {}

    @property
    def max_prompt_length(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, length: int) -> int:
        for b in self.buckets:
            if length <= b:
                return b
        raise SamplingError(
            f"prompt of {length} tokens is longer than the largest bucket ({self.buckets[-1]} "
            f"tokens); raise max_prompt_length or shorten the prompt"
        )

    # ---------------------------------------------------------------------------------- placement

    def _put(self, x, rank: int):
        x = jnp.asarray(x)
        if self.mesh is None:
            return x
        return jax.device_put(x, sharding_lib.batch_sharding(self.mesh, rank, x.shape[0]))

    def _new_cache(self, batch: int, slots: int) -> KVCache:
        return new_cache(self.config, batch, slots, mesh=self.mesh, dtype=self.cache_dtype)

    # ------------------------------------------------------------------------------------ generate

    def generate(self, prompts, sampling: SamplingParams, rng=0, *, per_row=None, return_cache: bool = False):
        """Generates for a batch of prompts of any lengths.

        Args:
          prompts: list of B token id sequences (each non-empty, ids in [0, vocab)).
          sampling: `SamplingParams` (stop ids must include EOS if the model should stop there); its temperature /
            top_k / top_p are every row's unless `per_row` says otherwise.
          rng: int seed, one PRNG key (row i uses fold_in(key, i)), or [B] keys.
          per_row: per-prompt settings: a list of B `SamplingParams` or None (None: `sampling`'s temperature / top_k /
            top_p; only those three fields of an entry are used). One compiled program serves any values.
          return_cache: also return the device `SampleOutput` (with the cache) instead of keeping the cache.
        Returns:
          `GenerateResult` (and the raw `SampleOutput` when return_cache).
        """
        if not isinstance(sampling, SamplingParams):
            raise SamplingError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        sampling.check_vocab(self.config.vocab_size)
        rows = _check_prompts(prompts, self.config.vocab_size)
        n_rows = len(rows)
        keys = row_keys(rng, n_rows)
        if per_row is None:
            per_row = [None] * n_rows
        if isinstance(per_row, SamplingParams) or len(per_row) != n_rows:
            raise SamplingError(f"per_row must be a list of {n_rows} SamplingParams or None, one per prompt")
        bucket = self.bucket_for(max(len(r) for r in rows))
        multiple = sharding_lib.batch_multiple(self.mesh)
        batch = -(-n_rows // multiple) * multiple
        tokens = np.full((batch, bucket), sampling.pad_id, np.int32)
        mask = np.zeros((batch, bucket), bool)
        for i, r in enumerate(rows):  # left padding: every row's last prompt token sits in the last column
            tokens[i, bucket - len(r) :] = r
            mask[i, bucket - len(r) :] = True
        active = np.arange(batch) < n_rows
        if batch > n_rows:  # padding rows reuse row 0's key; they are inactive and produce nothing
            keys = jnp.concatenate([keys, jnp.broadcast_to(keys[:1], (batch - n_rows,))])

        slots = bucket + sampling.max_new_tokens
        shape_key = (bucket, batch, slots)
        cache = self._caches.pop(shape_key, None)
        ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
        with ctx:
            if cache is None:
                cache = self._new_cache(batch, slots)
            out: SampleOutput = generate_program(
                self._layout.get(self.params),
                self._put(tokens, 2),
                self._put(mask, 2),
                self._put(keys, 1),
                self._put(active, 1),
                cache,
                RowSampling(*(self._put(a, 1) for a in RowSampling.build(per_row, sampling, batch=batch))),
                config=self.config,
                sampling=sampling.static(),
            )
        if self.keep_cache and not return_cache:
            self._caches[shape_key] = out.cache
        host = jax.device_get((out.tokens, out.num_tokens, out.finished, out.logprobs, out.sampling_logprobs))
        token_array, num, fin, lp, slp = (np.asarray(a)[:n_rows] for a in host)
        result = GenerateResult(
            tokens=[token_array[i, : num[i]].tolist() for i in range(n_rows)],
            num_tokens=num,
            finished=fin,
            logprobs=lp,
            sampling_logprobs=slp,
            token_array=token_array,
            bucket=bucket,
        )
        return (result, out) if return_cache else result

    def clear_cache(self) -> None:
        """Frees the KV caches kept between calls."""
        self._caches.clear()


def generate(
    params,
    config: ModelConfig,
    prompts,
    sampling: SamplingParams,
    rng=0,
    *,
    mesh=None,
    max_prompt_length: int | None = None,
    min_bucket: int = DEFAULT_MIN_BUCKET,
) -> GenerateResult:
    """One-shot `Sampler(params, config, ...).generate(prompts, sampling, rng)` (the compiled program is shared
    across calls; the cache is not kept)."""
    sampler = Sampler(
        params, config, mesh=mesh, max_prompt_length=max_prompt_length, min_bucket=min_bucket, keep_cache=False
    )
    return sampler.generate(prompts, sampling, rng)
