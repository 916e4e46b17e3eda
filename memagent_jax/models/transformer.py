"""A Qwen/Llama-family decoder-only transformer in Flax NNX, with pure functions at the jit boundary.

The modules (`Transformer`, `Block`, `Attention`, `MLP`, `RMSNorm`) hold the maths; callers use the pure
functions at the bottom of this file, which take the parameters as a plain nested dict of arrays
(the `nnx.to_pure_dict` form) and return arrays:

    params = init_params(config, jax.random.key(0))          # or hf_io.load_hf_params(...)
    logits, cache = forward(params, tokens, positions, token_mask, config=config, cache=cache)

Attention is driven by explicit positions and a token mask rather than by array index, so a
static-shape prompt with pads anywhere (left, right, or in the middle of a template) computes exactly
what the unpadded prompt would:

    query i may see key j  <=>  key_valid[j]  and  key_position[j] <= query_position[i]
                                 (and segment[j] == segment[i] when segment ids are given)

Positions must increase over the real tokens of a row (pads may hold anything).

The attention itself is one of the pure functions of `models/attention.py`, chosen per call by
`config.attention_impl` ('auto' | 'materialized' | 'blockwise' | 'cudnn' | 'splash'; see
`attention.select_implementation`): the [B, T, S] mask is built (once per forward) only for the materialised path;
the blockwise, cuDNN and splash paths get the positions, validity and segment ids (`attention.AttentionKeys`, and
the cache's write index) and never hold [T, S] scores.

Shapes: B batch, T new tokens, S cache slots, D hidden, H query heads, K kv heads, G = H // K,
Dh head dim, F mlp width, L layers, V vocab.

Parameter pytree (L-stacked under 'layers', run by `lax.scan`, so compile time is flat in depth; the decode
layout of `unstack_layers` holds a tuple of L per-layer dicts there instead, run as a Python loop):

    embed            [V, D]
    layers/attn_norm [L, D]            layers/mlp_norm [L, D]
    layers/attn/q_proj [L, D, H, Dh]   layers/attn/k_proj, v_proj [L, D, K, Dh]
    layers/attn/o_proj [L, H, Dh, D]   (+ q_bias [L, H, Dh], k_bias/v_bias [L, K, Dh], o_bias [L, D],
                                          q_norm/k_norm [L, Dh] where the architecture has them)
    layers/mlp/gate_proj, up_proj [L, D, F]   layers/mlp/down_proj [L, F, D]  (+ biases if mlp_bias)
    final_norm       [D]
    lm_head          [D, V]            (absent when embeddings are tied)

The decode layout may add `TIED_HEAD_COPY` [D, V]: a transposed copy of a tied embedding that the logits read
instead (`with_tied_head_copy`), and `LAYER_COPIES`: the tuple of per-layer dicts that `unstack_layers` then
returns instead of slicing the stack again (`with_layer_copies`). Neither is a parameter: they are never trained
or saved, and a forward pass over the stacked layers ignores them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from memagent_jax.models import attention
from memagent_jax.models.config import ModelConfig

Params = dict[str, Any]

_MASK_VALUE = attention.MASK_VALUE
_INIT_STD = 0.02


def _dtype(name: str):
    return jnp.dtype(name)


def is_16bit_float(dtype) -> bool:
    """bf16 or f16: the float types XLA CPU cannot slice without widening them to f32 (see `_to_bits`)."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 2


def _to_bits(a: jax.Array) -> jax.Array:
    """A 16-bit float array as the unsigned integers of its bits (other arrays unchanged).

    XLA CPU cannot slice or dynamic-slice 16-bit floats: it widens the whole array to f32 first (a stacked
    weight, at every call). Slicing the integer view and reading the slice back as floats moves the same bits.
    """
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if is_16bit_float(a.dtype) else a


def _from_bits(a: jax.Array, dtype) -> jax.Array:
    """Inverse of `_to_bits`: the array read back as `dtype`."""
    return jax.lax.bitcast_convert_type(a, dtype) if a.dtype != dtype else a


def product(spec: str, x: jax.Array, w: jax.Array, cdt) -> jax.Array:
    """`jnp.einsum(spec, x, w)` in the compute dtype `cdt`, accumulated in f32 and rounded once to `cdt`.

    Asking for the f32 result explicitly is what lets XLA's CPU backend keep a bf16 product in bf16: a product
    whose result type is bf16 is not one its bf16 kernels take, so XLA widens both operands (the whole weight)
    to f32 first. On GPU and TPU the result is the same as a bf16 product (they accumulate in f32 too).
    """
    if jnp.dtype(cdt).itemsize >= 4:
        return jnp.einsum(spec, x, w.astype(cdt))
    return product_f32(spec, x.astype(cdt), w.astype(cdt)).astype(cdt)


def product_f32(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, x, w)` with an f32 result, for operands already in the compute dtype.

    On CPU, a 16-bit product whose `x` holds a single row (one decode step at batch 1) is computed on two: XLA
    CPU's bf16 kernels take products of 2 rows and more, and for one row it widens the whole weight to f32 first
    (hoisted out of a decode loop, at every call; at Qwen2.5-0.5B's shapes about 0.8 s a generation). The second
    row is zeros and is dropped; the first is the same sum of the same products.
    """
    lhs, rest = spec.split(",")
    rhs, out = rest.split("->")
    letters = lhs.replace("...", "")
    dims = x.shape[x.ndim - len(letters) :]
    contracted = math.prod(n for letter, n in zip(letters, dims, strict=True) if letter in rhs)
    if x.size != contracted or not is_16bit_float(x.dtype) or jax.default_backend() != "cpu":
        return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
    pair = jnp.concatenate([x[None], jnp.zeros_like(x)[None]])  # [2, *x.shape]: the row, then zeros
    pair_axis = next(c for c in "ZYXWV" if c not in spec)
    return jnp.einsum(f"{pair_axis}{lhs},{rhs}->{pair_axis}{out}", pair, w, preferred_element_type=jnp.float32)[0]


# ----------------------------------------------------------------------------------------------- cache


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["k", "v", "positions", "valid", "length"], meta_fields=[]
)
@dataclasses.dataclass
class KVCache:
    """Key/value cache for prefill + incremental decode.

    k, v:       [L, B, K, S, Dh] in the compute dtype (heads-major, so attention needs no transpose); or, in
                the decode loop of the 'unstacked' layout only, tuples of L per-layer [B*K, S, Dh] buffers
                (`split_cache_layers`).
    positions:  [B, S] int32, the RoPE position of the token in each slot.
    valid:      [B, S] bool, whether a slot holds a real token (pads and unwritten slots are False).
    length:     [] int32, the next slot to write; a forward of T tokens writes slots [length, length+T)
                for every row (rows keep their own positions, so rows of different lengths coexist).
    """

    k: jax.Array
    v: jax.Array
    positions: jax.Array
    valid: jax.Array
    length: jax.Array

    @property
    def max_length(self) -> int:
        return self.k[0].shape[1] if self.per_layer else self.k.shape[3]

    @property
    def per_layer(self) -> bool:
        """Whether k and v are tuples of per-layer buffers (`split_cache_layers`)."""
        return isinstance(self.k, tuple)


def init_cache(config: ModelConfig, batch_size: int, max_length: int, dtype: str | None = None) -> KVCache:
    """An empty cache of `max_length` slots per row."""
    dtype = _dtype(dtype or config.compute_dtype)
    shape = (config.num_layers, batch_size, config.num_kv_heads, max_length, config.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        positions=jnp.zeros((batch_size, max_length), jnp.int32),
        valid=jnp.zeros((batch_size, max_length), bool),
        length=jnp.zeros((), jnp.int32),
    )


def split_cache_layers(cache: KVCache) -> KVCache:
    """The cache with k and v as tuples of L per-layer [B*K, S, Dh] buffers (one copy of the cache).

    For the decode loop of the 'unstacked' layout. Reading layer i out of the [L, ...] stack copies that
    layer's slice at every token on XLA CPU (a large share of a bandwidth-bound decode step); with its own
    buffer, each layer writes the new token and attention reads the buffer in place. Batch and KV heads share
    one axis because with a size-1 batch axis XLA CPU duplicates the in-place write (a copy of the buffer for
    the attention read). The decode loop holds this copy and the
    stacked cache it came from: twice the cache's memory while it runs. Undo with `merge_cache_layers`.
    """
    if cache.per_layer:
        return cache
    l, b, kh, sl, dh = cache.k.shape
    return dataclasses.replace(
        cache,
        k=tuple(cache.k[i].reshape(b * kh, sl, dh) for i in range(l)),
        v=tuple(cache.v[i].reshape(b * kh, sl, dh) for i in range(l)),
    )


def merge_cache_layers(per_layer: KVCache, stacked: KVCache, written_from: jax.Array, slots: int) -> KVCache:
    """`per_layer` (from `split_cache_layers(stacked)`) back in the stacked layout.

    Only slots [written_from, written_from + slots) may differ from `stacked` (what a decode loop wrote), so
    those are written into `stacked`'s buffers (in place when `stacked` is dead afterwards) instead of stacking
    every layer again. A window that would pass the end is moved back (XLA clamps it), which only rewrites
    slots that are equal in both.
    """
    if not per_layer.per_layer:
        return per_layer
    slots = min(slots, stacked.max_length)

    def merge(whole, layers):
        new = jnp.stack([jax.lax.dynamic_slice_in_dim(a, written_from, slots, axis=1) for a in layers])
        new = new.reshape(whole.shape[:3] + (slots, whole.shape[-1]))
        return jax.lax.dynamic_update_slice_in_dim(whole, new.astype(whole.dtype), written_from, axis=3)

    if slots == 0:
        return dataclasses.replace(per_layer, k=stacked.k, v=stacked.v)
    return dataclasses.replace(per_layer, k=merge(stacked.k, per_layer.k), v=merge(stacked.v, per_layer.v))


def rewind_cache(cache: KVCache, length: jax.Array | int) -> KVCache:
    """Moves the write index back to `length` and invalidates every slot >= `length` (buffers are kept).

    Used to reuse a prefilled prefix (e.g. chat header + question) for many continuations: the slots
    after the prefix are overwritten by the next forward and hidden from attention until then.
    """
    length = jnp.asarray(length, jnp.int32)
    keep = jnp.arange(cache.max_length, dtype=jnp.int32)[None, :] < length
    return KVCache(k=cache.k, v=cache.v, positions=cache.positions, valid=cache.valid & keep, length=length)


# --------------------------------------------------------------------------------------------- modules


def _normal(rngs: nnx.Rngs, shape, dtype) -> nnx.Param:
    return nnx.Param((jax.random.normal(rngs.params(), shape, jnp.float32) * _INIT_STD).astype(dtype))


def _zeros(shape, dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype))


def _ones(shape, dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, statistics in f32, result in x's dtype times the weight (HF order)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def rotary_embedding(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Applies RoPE (half-rotation layout, as in HF Qwen/Llama).

    x: [B, T, N, Dh]; positions: [B, T] int; inv_freq: [Dh // 2] f32. Returns x's shape and dtype.
    """
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, Dh]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = _ones((dim,), dtype)
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)


class Attention(nnx.Module):
    """Grouped-query self-attention with optional q/k/v bias and per-head q/k RMSNorm."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c, dt = config, _dtype(config.param_dtype)
        self.config = config
        self.q_proj = _normal(rngs, (c.hidden_size, c.num_heads, c.head_dim), dt)
        self.k_proj = _normal(rngs, (c.hidden_size, c.num_kv_heads, c.head_dim), dt)
        self.v_proj = _normal(rngs, (c.hidden_size, c.num_kv_heads, c.head_dim), dt)
        self.o_proj = _normal(rngs, (c.num_heads, c.head_dim, c.hidden_size), dt)
        if c.attention_bias:
            self.q_bias = _zeros((c.num_heads, c.head_dim), dt)
            self.k_bias = _zeros((c.num_kv_heads, c.head_dim), dt)
            self.v_bias = _zeros((c.num_kv_heads, c.head_dim), dt)
        if c.attention_out_bias:
            self.o_bias = _zeros((c.hidden_size,), dt)
        if c.qk_norm:
            self.q_norm = _ones((c.head_dim,), dt)
            self.k_norm = _ones((c.head_dim,), dt)

    def __call__(self, x, positions, inv_freq, keys, kv_cache=None, cache_length=None, layer_index=None):
        """x: [B, T, D]; positions: [B, T]; keys: `attention.AttentionKeys` over the S_keys slots, plus
        `keys.mask` ([B, T, S_keys] bool, built once per forward) when the materialised path runs.

        kv_cache: None; or the whole stacked cache (k, v), each [L, B, K, S, Dh]: this layer's new keys/values
        are written in place at [layer_index, :, :, cache_length] and attention runs over all S slots of
        layer `layer_index` (updating the stacked buffer, rather than slicing it out and stacking it back,
        keeps a decode step from copying the whole cache); or this layer's own buffers (k, v), each
        [B*K, S, Dh] (`split_cache_layers`; layer_index unused), written at [:, cache_length] and read in
        place. Returns (out [B, T, D], updated (k, v) or None).
        """
        c = self.config
        cdt = _dtype(c.compute_dtype)
        q = product("btd,dhk->bthk", x, self.q_proj[...], cdt)
        k = product("btd,dhk->bthk", x, self.k_proj[...], cdt)
        v = product("btd,dhk->bthk", x, self.v_proj[...], cdt)
        if c.attention_bias:
            q = q + self.q_bias[...].astype(cdt)
            k = k + self.k_bias[...].astype(cdt)
            v = v + self.v_bias[...].astype(cdt)
        if c.qk_norm:
            q = rms_norm(q, self.q_norm[...], c.rms_norm_eps)
            k = rms_norm(k, self.k_norm[...], c.rms_norm_eps)
        q = rotary_embedding(q, positions, inv_freq)
        k = rotary_embedding(k, positions, inv_freq)

        # Heads-major layout: attention becomes plain batched matmuls over (batch, kv head).
        k = k.transpose(0, 2, 1, 3)  # [B, K, T, Dh]
        v = v.transpose(0, 2, 1, 3)
        new_cache = None
        if kv_cache is not None:
            cache_k, cache_v = kv_cache
            if cache_k.ndim == 3:  # this layer's own [B*K, S, Dh] buffers: written, then read, in place
                b, kh, t, dh = k.shape
                write = lambda buf, new: jax.lax.dynamic_update_slice(  # noqa: E731
                    buf, new.astype(buf.dtype).reshape(b * kh, t, dh), (0, cache_length, 0)
                )
                new_cache = k, v = write(cache_k, k), write(cache_v, v)
            else:  # the stacked [L, B, K, S, Dh] buffers
                start = (layer_index, 0, 0, cache_length, 0)
                cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype)[None], start)
                cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype)[None], start)
                new_cache = (cache_k, cache_v)
                k = jax.lax.dynamic_index_in_dim(cache_k, layer_index, axis=0, keepdims=False)  # [B, K, S, Dh]
                v = jax.lax.dynamic_index_in_dim(cache_v, layer_index, axis=0, keepdims=False)

        keys, mask = keys
        out = attention.attend(
            q,
            k.astype(cdt),
            v.astype(cdt),
            keys,
            impl=c.attention_impl,
            query_block=c.attention_query_block_size,
            key_block=c.attention_block_size,
            mask=mask,
            cache_length=None if kv_cache is None else cache_length,
        )  # [B, T, H, Dh]
        out = product("bthk,hkd->btd", out, self.o_proj[...], cdt)
        if c.attention_out_bias:
            out = out + self.o_bias[...].astype(cdt)
        return out, new_cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        c, dt = config, _dtype(config.param_dtype)
        self.config = config
        self.gate_proj = _normal(rngs, (c.hidden_size, c.intermediate_size), dt)
        self.up_proj = _normal(rngs, (c.hidden_size, c.intermediate_size), dt)
        self.down_proj = _normal(rngs, (c.intermediate_size, c.hidden_size), dt)
        if c.mlp_bias:
            self.gate_bias = _zeros((c.intermediate_size,), dt)
            self.up_bias = _zeros((c.intermediate_size,), dt)
            self.down_bias = _zeros((c.hidden_size,), dt)

    def __call__(self, x):
        cdt = _dtype(self.config.compute_dtype)
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [B*T, D]: plain 2-D GEMMs (XLA CPU runs the backward ~1.6x faster)
        gate = product("td,df->tf", x, self.gate_proj[...], cdt)
        up = product("td,df->tf", x, self.up_proj[...], cdt)
        if self.config.mlp_bias:
            gate = gate + self.gate_bias[...].astype(cdt)
            up = up + self.up_bias[...].astype(cdt)
        out = product("tf,fd->td", jax.nn.silu(gate) * up, self.down_proj[...], cdt)
        if self.config.mlp_bias:
            out = out + self.down_bias[...].astype(cdt)
        return out.reshape(shape)


class Block(nnx.Module):
    """Pre-norm decoder layer: x + attn(norm(x)); x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        dt = _dtype(config.param_dtype)
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dt)
        self.attn = Attention(config, rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dt)
        self.mlp = MLP(config, rngs)

    def __call__(self, x, positions, inv_freq, keys, kv_cache=None, cache_length=None, layer_index=None):
        attn_out, new_cache = self.attn(
            self.attn_norm(x), positions, inv_freq, keys, kv_cache, cache_length, layer_index
        )
        x = x + attn_out
        x = x + self.mlp(self.mlp_norm(x))
        return x, new_cache


class Transformer(nnx.Module):
    """Embedding -> L scanned `Block`s -> final RMSNorm (-> LM head, tied or not)."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        dt = _dtype(config.param_dtype)
        self.config = config
        self.embed = _normal(rngs, (config.vocab_size, config.hidden_size), dt)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs):
            return Block(config, rngs)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dt)
        if not config.tie_word_embeddings:
            self.lm_head = _normal(rngs, (config.hidden_size, config.vocab_size), dt)

    def hidden_states(
        self, tokens, positions, token_mask, cache: KVCache | None = None, segment_ids=None, unstacked_layers=None
    ):
        """tokens, positions: [B, T] int; token_mask: [B, T] bool -> (hidden [B, T, D], cache).

        unstacked_layers: None (run the stacked `self.layers` with `lax.scan`), or a tuple of L per-layer param
        dicts (see `unstack_layers`), run as a Python loop so every matmul reads its weight array in place
        (`self.layers` then only supplies the block structure).
        """
        c = self.config
        cdt = _dtype(c.compute_dtype)
        positions = positions.astype(jnp.int32)
        token_mask = token_mask.astype(bool)
        inv_freq = jnp.asarray(c.rope.inverse_frequencies(c.head_dim), jnp.float32)
        # Inference on CPU reads 16-bit float weights through a same-width integer view wherever it slices or
        # gathers them: XLA CPU has no 16-bit float dynamic-slice or gather, and would widen the whole array to
        # f32 at every call (the stacked layers: about 0.7 s a call at Qwen2.5-0.5B's shapes in bf16; the
        # embedding: about 0.15 s). Bits pass unchanged; training (no cache) keeps float weights, as the view has
        # no gradient.
        bits_view = cache is not None and jax.default_backend() == "cpu"
        embed = self.embed[...]
        if bits_view:
            x = _from_bits(jnp.take(_to_bits(embed), tokens, axis=0), embed.dtype).astype(cdt)
        else:
            x = jnp.take(embed, tokens, axis=0).astype(cdt)

        if cache is None:
            key_positions, key_valid = positions, token_mask
        else:
            start = (0, cache.length)
            key_positions = jax.lax.dynamic_update_slice(cache.positions, positions, start)
            key_valid = jax.lax.dynamic_update_slice(cache.valid, token_mask, start)
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids are only supported without a KV cache")
        keys = attention.AttentionKeys(positions, key_positions, key_valid, segment_ids, segment_ids)
        path = attention.select_implementation(
            c.attention_impl,
            queries=positions.shape[1],
            keys=key_positions.shape[1],
            dtype=cdt,
            head_dim=c.head_dim,
            query_block=c.attention_query_block_size,
            key_block=c.attention_block_size,
        )
        # The [B, T, S] mask is built once (outside the layer scan) only for the materialised path.
        mask = attention.attention_mask(keys) if path == "materialized" else None

        graphdef, layer_params = nnx.split(self.layers)

        if bits_view:  # the stacked layers' slices through their bits (above)
            layer_dtypes = jax.tree.map(lambda a: a.dtype, layer_params)
            layer_params = jax.tree.map(_to_bits, layer_params)

        def body(carry, layer_inputs):
            x, kv = carry  # kv: the whole stacked cache (k, v), updated in place layer by layer
            params_l, index = layer_inputs
            # Materialise this layer's weight slices before use: on XLA CPU a dynamic-slice fused into a
            # dot falls off the library GEMM path (an MLP about 1.6x slower). No effect on results.
            params_l = jax.lax.optimization_barrier(params_l)
            if bits_view:
                params_l = jax.tree.map(_from_bits, params_l, layer_dtypes)
            block = nnx.merge(graphdef, params_l)
            x, kv = block(x, positions, inv_freq, (keys, mask), kv, None if cache is None else cache.length, index)
            return (x, kv), None

        if c.remat == "full":
            body = jax.checkpoint(body)
        elif c.remat == "dots":
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims)

        carry = (x, None if cache is None else (cache.k, cache.v))
        if cache is not None and cache.per_layer:
            if unstacked_layers is None:
                raise ValueError("a per-layer cache (split_cache_layers) needs unstacked layers (unstack_layers)")
            # Each layer writes and reads its own cache buffers in place (the decode loop's layout).
            new_k, new_v = list(cache.k), list(cache.v)
            for i, params_l in enumerate(unstacked_layers):
                block = nnx.merge(graphdef, params_l)
                x, (new_k[i], new_v[i]) = block(
                    x, positions, inv_freq, (keys, mask), (new_k[i], new_v[i]), cache.length, None
                )
            carry = (x, (tuple(new_k), tuple(new_v)))
        elif unstacked_layers is not None:
            # The stacked cache is written in place at a static layer index (reading the layer back copies
            # its slice; the decode loop avoids that with a per-layer cache, see `split_cache_layers`).
            for i, params_l in enumerate(unstacked_layers):
                block = nnx.merge(graphdef, params_l)
                carry = block(
                    carry[0], positions, inv_freq, (keys, mask), carry[1], None if cache is None else cache.length, i
                )
        elif c.scan_layers:
            layer_index = jnp.arange(c.num_layers, dtype=jnp.int32)
            carry, _ = jax.lax.scan(body, carry, (layer_params, layer_index))
        else:
            for i in range(c.num_layers):
                carry, _ = body(carry, (jax.tree.map(lambda a: a[i], layer_params), i))
        x, new_kv = carry
        x = self.final_norm(x)
        new_cache = None
        if cache is not None:
            t = tokens.shape[1]
            new_cache = KVCache(
                k=new_kv[0], v=new_kv[1], positions=key_positions, valid=key_valid, length=cache.length + t
            )
        return x, new_cache

    def logits(self, hidden):
        """hidden: [..., D] -> f32 logits [..., V]."""
        cdt = _dtype(self.config.compute_dtype)
        if self.config.tie_word_embeddings:
            return product_f32("...d,vd->...v", hidden.astype(cdt), self.embed[...].astype(cdt))
        return _logits_dv(hidden, self.lm_head[...], cdt)

    def __call__(self, tokens, positions, token_mask, cache=None, segment_ids=None):
        hidden, cache = self.hidden_states(tokens, positions, token_mask, cache, segment_ids)
        return self.logits(hidden), cache


# ----------------------------------------------------------------------------------------- pure API


@functools.lru_cache(maxsize=64)
def _graphdef(config: ModelConfig):
    return nnx.graphdef(nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0))))


def _module(params: Params, config: ModelConfig) -> Transformer:
    """The module for `params` in either layout (unstacked: 'layers' holds layer 0, for the structure only)."""
    if TIED_HEAD_COPY in params or LAYER_COPIES in params:
        params = {k: v for k, v in params.items() if k not in (TIED_HEAD_COPY, LAYER_COPIES)}
    if is_unstacked(params):
        params = {**params, "layers": params["layers"][0]}
    return nnx.merge(_graphdef(config), params)


def is_unstacked(params: Params) -> bool:
    """Whether params['layers'] is a tuple of per-layer dicts (`unstack_layers`) rather than [L, ...] arrays."""
    return isinstance(params["layers"], (tuple, list))


def unstack_layers(params: Params) -> Params:
    """The decode layout: params with 'layers' as a tuple of L per-layer dicts (no leading L axis).

    Every other entry (embed, final_norm, lm_head) is shared, not copied. The per-layer arrays are copies of
    the stacked slices, so while both layouts are alive the layer weights take twice their memory (e.g. inside
    a jitted decode program that unstacks its input: one extra copy of the layer weights for the length of the
    program). A model run with these params executes its layers as a Python loop: compile time grows with
    depth, and on XLA CPU each matmul reads its weight in place instead of dynamic-slicing and copying it out
    of the stack (`lax.scan` over [L, ...] weights does that copy at every step). Idempotent; params holding
    `LAYER_COPIES` (`with_layer_copies`) get those in place of the stack, with no copy.
    """
    if is_unstacked(params):
        return params
    if LAYER_COPIES in params:
        rest = {k: v for k, v in params.items() if k != LAYER_COPIES}
        return {**rest, "layers": params[LAYER_COPIES]}
    layers = params["layers"]
    num_layers = jax.tree.leaves(layers)[0].shape[0]
    if jax.default_backend() == "cpu":  # slices of 16-bit floats through their bits (see `_to_bits`)
        take = lambda a, i: _from_bits(_to_bits(a)[i], a.dtype)  # noqa: E731
    else:
        take = lambda a, i: a[i]  # noqa: E731
    per_layer = tuple(jax.tree.map(lambda a, i=i: take(a, i), layers) for i in range(num_layers))
    return {**params, "layers": per_layer}


def abstract_params(config: ModelConfig) -> Params:
    """The parameter pytree as `jax.ShapeDtypeStruct`s (no memory is allocated)."""
    state = nnx.state(nnx.eval_shape(lambda: Transformer(config, nnx.Rngs(0))))
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(state))


def init_params(config: ModelConfig, rng: jax.Array | int = 0, shardings=None) -> Params:
    """Random parameters (normal(0, 0.02) matrices, unit norms, zero biases), as a plain dict.

    `shardings`: optional pytree of `jax.sharding.Sharding` matching the params; the init then runs as
    one jit that materialises each parameter directly in its shards.
    """
    if isinstance(rng, int):
        rng = jax.random.key(rng)

    def make(key):
        return nnx.to_pure_dict(nnx.state(Transformer(config, nnx.Rngs(params=key))))

    return jax.jit(make, out_shardings=shardings)(rng)


def forward(
    params: Params,
    tokens,
    positions,
    token_mask,
    *,
    config: ModelConfig,
    cache: KVCache | None = None,
    segment_ids=None,
):
    """Full forward pass.

    Args:
      params: parameter pytree (see module docstring).
      tokens: [B, T] int token ids.
      positions: [B, T] int RoPE positions (count real tokens only; pads may hold anything).
      token_mask: [B, T] bool, True for real tokens.
      config: the `ModelConfig` (static under jit).
      cache: optional `KVCache`; the T tokens are written at `cache.length` and attend to everything
        valid in the cache up to their own positions.
      segment_ids: optional [B, T] int; tokens only attend within their own segment (packing).
    Returns:
      (logits [B, T, V] f32, updated cache or None).
    """
    hidden, cache = forward_hidden(
        params, tokens, positions, token_mask, config=config, cache=cache, segment_ids=segment_ids
    )
    return logits_from_hidden(params, hidden, config=config), cache


def forward_hidden(
    params: Params,
    tokens,
    positions,
    token_mask,
    *,
    config: ModelConfig,
    cache: KVCache | None = None,
    segment_ids=None,
):
    """Like `forward` but returns the final normed hidden states [B, T, D] instead of logits.

    Use with `logits_from_hidden` to compute logits for a subset of positions (decode) or in chunks
    (training on a large vocabulary) without materialising [B, T, V].
    """
    unstacked = params["layers"] if is_unstacked(params) else None
    return _module(params, config).hidden_states(tokens, positions, token_mask, cache, segment_ids, unstacked)


def logits_from_hidden(params: Params, hidden, *, config: ModelConfig):
    """hidden [..., D] -> f32 logits [..., V] with the (tied or untied) LM head, or the tied head's transposed
    copy where `with_tied_head_copy` made one."""
    if TIED_HEAD_COPY in params:
        return _logits_dv(hidden, params[TIED_HEAD_COPY], _dtype(config.compute_dtype))
    return _module(params, config).logits(hidden)


def _logits_dv(hidden, head, cdt):
    """hidden [..., D] x a head laid out [D, V] (untied `lm_head`, or the tied one's copy) -> f32 [..., V]."""
    return product_f32("...d,dv->...v", hidden.astype(cdt), head.astype(cdt))


# Key of the tied embedding's transposed copy [D, V] in decode-layout params.
TIED_HEAD_COPY = "tied_head_copy"
# Key of the stacked layers' per-layer copies (a tuple of L dicts) kept beside the stack.
LAYER_COPIES = "layer_copies"


def with_layer_copies(params: Params) -> Params:
    """Stacked `params` plus `LAYER_COPIES`: the per-layer arrays `unstack_layers` makes, kept beside the stack
    so that a prefill can run the stacked layers (`lax.scan`) and a decode the per-layer ones without slicing the
    stack again. Costs one more copy of the layer weights for as long as it is held. Idempotent (unstacked
    params: unchanged)."""
    if is_unstacked(params) or LAYER_COPIES in params:
        return params
    return {**params, LAYER_COPIES: unstack_layers(params)["layers"]}


def with_tied_head_copy(params: Params, config: ModelConfig) -> Params:
    """`params` plus `TIED_HEAD_COPY`, the tied embedding transposed to [D, V] and laid out contiguously, for a
    model whose embeddings are tied (others: `params` unchanged). Idempotent.

    The logits of a decode step are [B, D] x the head. Read as [V, D] (the embedding), the product contracts each
    row's minor axis, which XLA CPU runs about 1.9x slower than [D, V] at batch 4 (Qwen2.5-0.5B: 43 against 23 ms
    per step); the copy costs one transpose and V x D more memory for as long as it is held.
    """
    if not config.tie_word_embeddings or TIED_HEAD_COPY in params:
        return params
    return {**params, TIED_HEAD_COPY: jnp.transpose(params["embed"])}


def positions_from_mask(token_mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """Positions that count real tokens only: [B, T] bool -> [B, T] int32 (pads get the previous value).

    offset: scalar or [B] int added to every position (e.g. the number of tokens already in a cache).
    """
    counts = jnp.cumsum(token_mask.astype(jnp.int32), axis=-1) - 1
    offset = jnp.asarray(offset, jnp.int32)
    if offset.ndim == 1:
        offset = offset[:, None]
    return jnp.maximum(counts, 0) + offset
