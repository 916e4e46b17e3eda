"""Attention kernels of the transformer: pure functions, one semantics, four ways to compute it.

Every function computes grouped-query softmax attention with the model's position-based visibility rule

    query t may see key s  <=>  key_valid[s]  and  key_positions[s] <= query_positions[t]
                                (and key_segments[s] == query_segments[t] when segment ids are given)

  `materialized_attention`  the reference: f32 scores [B, K, G, T, S], masked, softmaxed, then P @ V
                            (the simplest path; memory grows with T x S per head).
  `blockwise_attention`     online ("flash") softmax over key blocks of `key_block` slots and query blocks of
                            `query_block` tokens in `lax.fori_loop`s: the live score block is
                            [B, K, G, query_block, key_block]; a `jax.custom_vjp` backward recomputes each block
                            from the saved row max and row sum, so the backward never holds [T, S] either.
                            Over a KV cache the forward pass skips key blocks no query sees (unwritten slots,
                            the causal future). Pure JAX: CPU, GPU and TPU.
  `cudnn_attention`         `jax.nn.dot_product_attention(implementation='cudnn')` (cuDNN flash attention, GPU
                            only, bf16/f16 only) with our visibility as a boolean mask [B, 1, T, S] (shared by all
                            heads: cuDNN adds it as a bias in the compute dtype; the scores stay on chip).
  `splash_attention`        JAX's splash attention Pallas kernel (TPU; elsewhere in interpret mode): causal by
                            index plus segment ids (pads in a segment of their own), blocks of 128-multiples in
                            VMEM, its own flash backward.

`select_implementation` picks one of them for a config, a shape and the platform; `attend` runs the pick.

Rows with no visible key (pads whose position precedes every valid key, fully padded rows) get the same answer
from every path except cuDNN: the reference replaces masked scores by a large negative constant, so such a
row's softmax is uniform over all S slots and its output is the mean of v over every slot; the blockwise path
keeps that constant for masked slots and reproduces it exactly (when it skips unseen blocks, it gives such a row
the mean of v and the statistics directly). Nothing downstream reads those rows.

Shapes: B batch, T queries, S key slots, H query heads, K kv heads, G = H // K, Dh head dim.
Layouts: q [B, T, H, Dh] (the projections' layout), k and v [B, K, S, Dh] (heads-major, the KV cache's layout),
output [B, T, H, Dh] in q's dtype.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from memagent_jax.models.config import ATTENTION_IMPLS

MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


class AttentionKeys(NamedTuple):
    """What decides visibility, as given to the attention functions (no [T, S] array).

    query_positions: [B, T] int32;  key_positions: [B, S] int32;  key_valid: [B, S] bool;
    query_segments, key_segments: [B, T] / [B, S] int, or None (no packing).
    """

    query_positions: jax.Array
    key_positions: jax.Array
    key_valid: jax.Array
    query_segments: jax.Array | None = None
    key_segments: jax.Array | None = None


def attention_mask(keys: AttentionKeys) -> jax.Array:
    """The full visibility mask [B, T, S] bool (for the materialised path and tests only)."""
    mask = keys.key_valid[:, None, :] & (keys.key_positions[:, None, :] <= keys.query_positions[:, :, None])
    if keys.query_segments is not None:
        mask = mask & (keys.key_segments[:, None, :] == keys.query_segments[:, :, None])
    return mask


# ------------------------------------------------------------------------------------------- reference


def materialized_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention with the whole score matrix in memory (the reference).

    q: [B, T, H, Dh]; k, v: [B, K, S, Dh], or [B*K, S, Dh] (a decode loop's per-layer cache buffers, see
    `transformer.split_cache_layers`); mask: [B, T, S] bool -> [B, T, H, Dh] in q's dtype.
    Scores and softmax in f32; the probabilities are cast to q's dtype for P @ V.
    """
    b, t, h, dh = q.shape
    merged = k.ndim == 3  # one batch axis B*K: no size-1 axis for XLA to drop when B == 1
    kh = k.shape[0] // b if merged else k.shape[1]
    g = h // kh
    cdt = q.dtype
    qg = q.reshape(b, t, kh, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, dh)  # [B, K, G*T, Dh]
    if merged:
        qg = qg.reshape(b * kh, g * t, dh)
    lead = "n" if merged else "bk"
    scores = jnp.einsum(f"{lead}qd,{lead}sd->{lead}qs", qg, k.astype(cdt), preferred_element_type=jnp.float32)
    scores = scores.reshape(b, kh, g, t, -1) * (dh**-0.5)  # [B, K, G, T, S]
    scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(cdt).reshape(qg.shape[:-1] + (-1,))
    out = jnp.einsum(f"{lead}qs,{lead}sd->{lead}qd", probs, v.astype(cdt))  # [B, K, G*T, Dh] (or [B*K, ...])
    return out.reshape(b, kh, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


# ------------------------------------------------------------------------------------------- blockwise


def _visible(keys: AttentionKeys, q_start, q_size: int, k_start, k_size: int) -> jax.Array:
    """Visibility of a block of queries [q_start, q_start + q_size) over keys [k_start, k_start + k_size):
    [B, q_size, 1, k_size] bool (the 1 broadcasts over the G query heads of a KV head)."""
    qpos = jax.lax.dynamic_slice_in_dim(keys.query_positions, q_start, q_size, axis=1)
    kpos = jax.lax.dynamic_slice_in_dim(keys.key_positions, k_start, k_size, axis=1)
    kval = jax.lax.dynamic_slice_in_dim(keys.key_valid, k_start, k_size, axis=1)
    vis = kval[:, None, :] & (kpos[:, None, :] <= qpos[:, :, None])  # [B, q, s]
    if keys.query_segments is not None:
        qseg = jax.lax.dynamic_slice_in_dim(keys.query_segments, q_start, q_size, axis=1)
        kseg = jax.lax.dynamic_slice_in_dim(keys.key_segments, k_start, k_size, axis=1)
        vis = vis & (kseg[:, None, :] == qseg[:, :, None])
    return vis[:, :, None, :]


def _block_scores(q_blk, k, keys, q_start, q_size, k_start, k_size, masked=True):
    """Masked scaled scores of one block, f32 [B, K, q_size, G, k_size], and the visibility broadcast to it
    (masked=False: a block every query sees whole; the scores as they are, and no visibility).

    q_blk: [B, K, q_size, G, Dh] (already sliced); k: [B, K, S, Dh] (sliced here)."""
    b, kh, tq, g, dh = q_blk.shape
    k_blk = jax.lax.dynamic_slice_in_dim(k, k_start, k_size, axis=2).astype(q_blk.dtype)
    s = jnp.einsum("bkqd,bksd->bkqs", q_blk.reshape(b, kh, tq * g, dh), k_blk, preferred_element_type=jnp.float32)
    s = s.reshape(b, kh, tq, g, k_size) * (dh**-0.5)
    if not masked:
        return s, None
    vis = _visible(keys, q_start, q_size, k_start, k_size)[:, None]  # [B, 1, q, 1, s]
    return jnp.where(vis, s, MASK_VALUE), vis


def _block_kind(keys: AttentionKeys, q_start, q_size: int, k_start, k_size: int) -> jax.Array:
    """[] int32: 0 when no query of the block sees any of its keys, 1 when every query sees every key (all valid,
    none after the block's earliest query), 2 otherwise. Without segments it compares each row's earliest and
    latest query position with its keys ([B, q] and [B, s] work instead of the [B, q, s] visibility); with
    segments: 0 or 2, from the visibility."""
    if keys.query_segments is not None:
        return jnp.where(jnp.any(_visible(keys, q_start, q_size, k_start, k_size)), 2, 0).astype(jnp.int32)
    qpos = jax.lax.dynamic_slice_in_dim(keys.query_positions, q_start, q_size, axis=1)
    kpos = jax.lax.dynamic_slice_in_dim(keys.key_positions, k_start, k_size, axis=1)
    kval = jax.lax.dynamic_slice_in_dim(keys.key_valid, k_start, k_size, axis=1)
    seen = jnp.any(kval & (kpos <= jnp.max(qpos, axis=1)[:, None]))
    whole = jnp.all(kval & (kpos <= jnp.min(qpos, axis=1)[:, None]))
    return jnp.where(seen, jnp.where(whole, 1, 2), 0).astype(jnp.int32)


def _over_blocks(total: int, block: int, body, carry):
    """Runs body(start, size, carry) -> carry over [0, total) in blocks of `block` (a fori_loop over the whole
    blocks, then the remainder as one static-size step)."""
    full, rest = divmod(total, block)
    if full == 1:
        carry = body(0, block, carry)
    elif full > 1:
        carry = jax.lax.fori_loop(0, full, lambda i, c: body(i * block, block, c), carry)
    if rest:
        carry = body(full * block, rest, carry)
    return carry


def _forward(q, k, v, keys, query_block, key_block, skip_unseen=False):
    """Online softmax. q: [B, K, T, G, Dh]; k, v: [B, K, S, Dh]. skip_unseen: skip (`lax.switch`) each key block
    that no query of the block sees (inference over a KV cache: the unwritten slots and the causal future), and
    leave the mask out of a block every query sees whole.

    Returns out f32 [B, K, T, G, Dh], row max and row sum f32 [B, K, T, G]."""
    b, kh, t, g, dh = q.shape
    s_total = k.shape[2]
    cdt = q.dtype
    # What a query that sees no key gets (see below): once for the call, not per query block.
    v_mean = jnp.mean(v.astype(jnp.float32), axis=2)[:, :, None, None, :] if skip_unseen else None  # [B, K, 1, 1, Dh]

    def query_step(q_start, q_size, bufs):
        out_buf, max_buf, sum_buf = bufs
        q_blk = jax.lax.dynamic_slice_in_dim(q, q_start, q_size, axis=2)

        def compute(k_start, k_size, state, masked=True):
            row_max, row_sum, acc = state
            s, _ = _block_scores(q_blk, k, keys, q_start, q_size, k_start, k_size, masked)
            new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
            p = jnp.exp(s - new_max[..., None])  # [B, K, q, G, s]
            rescale = jnp.exp(row_max - new_max)
            v_blk = jax.lax.dynamic_slice_in_dim(v, k_start, k_size, axis=2).astype(cdt)
            pv = jnp.einsum(
                "bkqs,bksd->bkqd",
                p.astype(cdt).reshape(b, kh, q_size * g, k_size),
                v_blk,
                preferred_element_type=jnp.float32,
            ).reshape(b, kh, q_size, g, dh)
            return new_max, row_sum * rescale + jnp.sum(p, axis=-1), acc * rescale[..., None] + pv

        def key_step(k_start, k_size, state):
            if not skip_unseen:
                return compute(k_start, k_size, state)
            # For a row that sees some key elsewhere, an unseen block's terms are exp(MASK_VALUE - max) = 0 and
            # its rescale 1: skipping it changes nothing. A block seen whole needs no mask.
            branches = (
                lambda st: st,
                lambda st: compute(k_start, k_size, st, masked=False),
                lambda st: compute(k_start, k_size, st),
            )
            return jax.lax.switch(_block_kind(keys, q_start, q_size, k_start, k_size), branches, state)

        init = (
            jnp.full((b, kh, q_size, g), -jnp.inf, jnp.float32),
            jnp.zeros((b, kh, q_size, g), jnp.float32),
            jnp.zeros((b, kh, q_size, g, dh), jnp.float32),
        )
        row_max, row_sum, acc = _over_blocks(s_total, key_block, key_step, init)
        if skip_unseen:
            # A query that sees no key at all gets what the reference's softmax over all-masked scores gives: equal
            # weights on every slot (the mean of v), with the matching statistics.
            blind = row_max <= MASK_VALUE
            out = jnp.where(blind[..., None], v_mean, acc / jnp.where(blind, 1.0, row_sum)[..., None])
            row_max = jnp.where(blind, MASK_VALUE, row_max)
            row_sum = jnp.where(blind, float(s_total), row_sum)
        else:
            out = acc / row_sum[..., None]
        return (
            jax.lax.dynamic_update_slice_in_dim(out_buf, out, q_start, axis=2),
            jax.lax.dynamic_update_slice_in_dim(max_buf, row_max, q_start, axis=2),
            jax.lax.dynamic_update_slice_in_dim(sum_buf, row_sum, q_start, axis=2),
        )

    bufs = (
        jnp.zeros((b, kh, t, g, dh), jnp.float32),
        jnp.zeros((b, kh, t, g), jnp.float32),
        jnp.zeros((b, kh, t, g), jnp.float32),
    )
    return _over_blocks(t, query_block, query_step, bufs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, keys, query_block, key_block, skip_unseen):
    out, _, _ = _forward(q, k, v, keys, query_block, key_block, skip_unseen)
    return out.astype(q.dtype)


def _flash_fwd(q, k, v, keys, query_block, key_block, skip_unseen):
    out, row_max, row_sum = _forward(q, k, v, keys, query_block, key_block, skip_unseen)
    # Residuals: inputs, the f32 output and the row statistics: O(T x H x Dh + S x K x Dh), no [T, S].
    return out.astype(q.dtype), (q, k, v, keys, out, row_max, row_sum)


def _flash_bwd(query_block, key_block, skip_unseen, residuals, d_out):
    """Recomputes each block's probabilities p = exp(s - max) / sum and applies the softmax backward
    ds = p (dp - sum(d_out * out)), masked slots getting no gradient (as `jnp.where` gives the reference). Every
    block is visited (skip_unseen only changes the forward pass: a `lax.cond` per block here made XLA CPU keep
    several times the backward's temporaries)."""
    del skip_unseen
    q, k, v, keys, out, row_max, row_sum = residuals
    b, kh, t, g, dh = q.shape
    s_total = k.shape[2]
    cdt = q.dtype
    d_out = d_out.astype(jnp.float32)
    delta = jnp.sum(d_out * out, axis=-1)  # [B, K, T, G]
    scale = dh**-0.5

    def query_step(q_start, q_size, bufs):
        dq_buf, dk_acc, dv_acc = bufs
        q_blk = jax.lax.dynamic_slice_in_dim(q, q_start, q_size, axis=2)
        do_blk = jax.lax.dynamic_slice_in_dim(d_out, q_start, q_size, axis=2)  # [B, K, q, G, Dh] f32
        m_blk = jax.lax.dynamic_slice_in_dim(row_max, q_start, q_size, axis=2)
        l_blk = jax.lax.dynamic_slice_in_dim(row_sum, q_start, q_size, axis=2)
        dl_blk = jax.lax.dynamic_slice_in_dim(delta, q_start, q_size, axis=2)
        do_c = do_blk.astype(cdt).reshape(b, kh, q_size * g, dh)
        q_flat = q_blk.reshape(b, kh, q_size * g, dh)

        def key_step(k_start, k_size, state):
            dq, dk_acc, dv_acc = state
            s, vis = _block_scores(q_blk, k, keys, q_start, q_size, k_start, k_size)
            p = jnp.exp(s - m_blk[..., None]) / l_blk[..., None]  # [B, K, q, G, s] f32
            p_flat = p.astype(cdt).reshape(b, kh, q_size * g, k_size)
            v_blk = jax.lax.dynamic_slice_in_dim(v, k_start, k_size, axis=2).astype(cdt)
            k_blk = jax.lax.dynamic_slice_in_dim(k, k_start, k_size, axis=2).astype(cdt)
            dv = jnp.einsum("bkqs,bkqd->bksd", p_flat, do_c, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkqd,bksd->bkqs", do_c, v_blk, preferred_element_type=jnp.float32)
            ds = p * (dp.reshape(p.shape) - dl_blk[..., None])
            ds = jnp.where(vis, ds, 0.0) * scale
            ds_flat = ds.astype(cdt).reshape(b, kh, q_size * g, k_size)
            dq = dq + jnp.einsum("bkqs,bksd->bkqd", ds_flat, k_blk, preferred_element_type=jnp.float32).reshape(
                dq.shape
            )
            dk = jnp.einsum("bkqs,bkqd->bksd", ds_flat, q_flat, preferred_element_type=jnp.float32)
            dk_acc = jax.lax.dynamic_update_slice_in_dim(
                dk_acc, jax.lax.dynamic_slice_in_dim(dk_acc, k_start, k_size, axis=2) + dk, k_start, axis=2
            )
            dv_acc = jax.lax.dynamic_update_slice_in_dim(
                dv_acc, jax.lax.dynamic_slice_in_dim(dv_acc, k_start, k_size, axis=2) + dv, k_start, axis=2
            )
            return dq, dk_acc, dv_acc

        dq0 = jnp.zeros((b, kh, q_size, g, dh), jnp.float32)
        dq, dk_acc, dv_acc = _over_blocks(s_total, key_block, key_step, (dq0, dk_acc, dv_acc))
        return jax.lax.dynamic_update_slice_in_dim(dq_buf, dq, q_start, axis=2), dk_acc, dv_acc

    bufs = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dq, dk, dv = _over_blocks(t, query_block, query_step, bufs)
    d_keys = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), keys)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_keys


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    keys: AttentionKeys,
    *,
    query_block: int = 512,
    key_block: int = 512,
    skip_unseen_blocks: bool = False,
) -> jax.Array:
    """Online-softmax attention over blocks, never holding more than one [B, K, G, query_block, key_block]
    score block (forward and backward).

    q: [B, T, H, Dh]; k, v: [B, K, S, Dh]; keys: `AttentionKeys` ([B, T] / [B, S] positions, validity, optional
    segments). query_block, key_block: block sizes in tokens / slots (need not divide T / S; a remainder block
    runs as its own step). skip_unseen_blocks: the forward pass skips each key block that no query of its query
    block sees (a KV cache's unwritten slots, the causal future of a prefill) and computes a block every query sees
    whole without the mask; `attend` sets it for calls over a cache. Returns [B, T, H, Dh] in q's dtype; equals
    `materialized_attention` with `attention_mask(keys)` up to f32 rounding, fully masked rows included.
    """
    b, t, h, dh = q.shape
    kh = k.shape[1]
    g = h // kh
    if query_block <= 0 or key_block <= 0:
        raise ValueError(f"block sizes must be positive, got query_block={query_block}, key_block={key_block}")
    keys = AttentionKeys(*(None if a is None else jnp.asarray(a) for a in keys))
    qg = q.reshape(b, t, kh, g, dh).transpose(0, 2, 1, 3, 4)  # [B, K, T, G, Dh]: a query block is contiguous
    out = _flash(qg, k, v, keys, int(query_block), int(key_block), bool(skip_unseen_blocks))
    return out.transpose(0, 2, 1, 3, 4).reshape(b, t, h, dh)


# ------------------------------------------------------------------------------------------- cuDNN


def _is_cuda() -> bool:
    try:
        if jax.default_backend() != "gpu":
            return False
        return "cuda" in jax.devices()[0].client.platform_version.lower()
    except Exception:  # no GPU client, or an unexpected backend: never pick cuDNN
        return False


def cudnn_supports(dtype, head_dim: int, queries: int, keys: int) -> bool:
    """Whether cuDNN flash attention takes this call (shape and dtype only; the platform is checked apart):
    bf16 / f16, head dim a multiple of 8 and <= 128 (the limit before Hopper; conservative), an even number of
    queries and key slots (cuDNN's rule for a bias in training), and more than one query (decode stays on the
    simple path)."""
    return (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and head_dim % 8 == 0
        and head_dim <= 128
        and queries > 1
        and queries % 2 == 0
        and keys % 2 == 0
    )


def cudnn_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, keys: AttentionKeys, *, implementation: str = "cudnn"
) -> jax.Array:
    """`jax.nn.dot_product_attention` with our visibility as an explicit mask.

    q: [B, T, H, Dh]; k, v: [B, K, S, Dh] (transposed here to its [B, S, K, Dh]); keys: `AttentionKeys`.
    The mask [B, 1, T, S] bool is shared by all heads (cuDNN turns it into an additive bias in the compute
    dtype: 2 bytes per query-key pair per row, instead of ~8-14 bytes per pair per head for the materialised
    scores). GQA is native (K kv heads, H query heads). `implementation='xla'` runs the same call through XLA's
    materialised reference (the tests use it to check this plumbing on CPU). Returns [B, T, H, Dh] in q's dtype.
    """
    kt = k.astype(q.dtype).transpose(0, 2, 1, 3)  # [B, S, K, Dh]
    vt = v.astype(q.dtype).transpose(0, 2, 1, 3)
    mask = attention_mask(keys)[:, None]  # [B, 1, T, S]
    return jax.nn.dot_product_attention(q, kt, vt, mask=mask, scale=q.shape[-1] ** -0.5, implementation=implementation)


# ------------------------------------------------------------------------------------------- splash (TPU)

SPLASH_LANES = 128  # TPU lanes: splash's block sizes (and so the padded lengths) are multiples of 128
_PAD_SEGMENT = int(np.iinfo(np.int32).min)  # the segment of pad tokens (a value no packed row uses)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def splash_block_sizes(queries: int, keys: int, query_block: int, key_block: int) -> tuple[int, int]:
    """The splash kernel's (block_q, block_kv) for T queries over S slots: the configured block sizes rounded up
    to a multiple of 128 (a TPU constraint) and capped at the padded lengths."""
    bq = min(_round_up(query_block, SPLASH_LANES), _round_up(queries, SPLASH_LANES))
    bkv = min(_round_up(key_block, SPLASH_LANES), _round_up(keys, SPLASH_LANES))
    return bq, bkv


def _splash_call(q, k, v, q_seg, kv_seg, *, causal: bool, block_q: int, block_kv: int, residuals: bool, interpret):
    """JAX's splash kernel (`make_splash_mqa_single_device`: the G query heads of one KV head over that head's
    keys), vmapped over batch and KV heads. q: [B, K, G, T, Dh] (already scaled); k, v: [B, K, S, Dh];
    q_seg, kv_seg: [B, T] / [B, S] int32 (query t sees key s only where they are equal, and s <= t when
    causal). T and S must be multiples of block_q and block_kv. Returns out [B, K, G, T, Dh] (and, with
    residuals, the f32 log-sum-exp [B, K, G, T])."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    g, t = q.shape[2], q.shape[3]
    s = k.shape[2]
    one = sa.CausalMask((t, s)) if causal else sa.FullMask((t, s))
    blocks = sa.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    kernel = sa.make_splash_mqa_single_device(
        sa.MultiHeadMask([one] * g),
        block_sizes=blocks,
        save_residuals=residuals,
        mask_value=MASK_VALUE,
        interpret=interpret,
    )

    def per_row(q_r, k_r, v_r, qs, ks):
        seg = sa.SegmentIds(qs, ks)
        return jax.vmap(lambda a, b, c: kernel(a, b, c, seg))(q_r, k_r, v_r)

    return jax.vmap(per_row)(q, k, v, q_seg, kv_seg)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    keys: AttentionKeys,
    *,
    cache_length: jax.Array | int | None = None,
    query_block: int = 512,
    key_block: int = 512,
    interpret: bool | None = None,
) -> jax.Array:
    """Attention through JAX's splash kernel (`jax.experimental.pallas.ops.tpu.splash_attention`).

    q: [B, T, H, Dh]; k, v: [B, K, S, Dh]; keys: `AttentionKeys`. Returns [B, T, H, Dh] in q's dtype.

    Splash's masks are static (causal by index) plus segment ids, so our position rule is expressed that way,
    which holds because positions increase over the real tokens of a row (in a packed row, within a segment):
      no cache (cache_length None, S == T: the learner and cache-less forwards): causal by index, and segment
        ids = the packed segments (0 without packing) with every pad in a segment of its own kind (a pad then sees
        only pads, itself included, so no row is empty and nothing real sees a pad);
      a cache (cache_length: the traced write index; the new tokens' keys are slots [cache_length,
        cache_length + T)): the new tokens among themselves as above (slots sliced out of k, v) and, in a second
        call, the queries over the slots before cache_length (no causal mask; a slot is seen where it is valid),
        the two merged by their log-sum-exp. A row with no valid earlier slot gets weight ~0 from that call.
    Pads and rows nothing reads (pad queries) may differ from `blockwise_attention`'s; every real query's output
    and the gradients through real queries are equal up to rounding.

    Lengths are padded up to the blocks of `splash_block_sizes` (padded positions are pads). GQA: the G query
    heads of a KV head run as one MQA call (vmapped over batch and KV heads). interpret: run the Pallas kernels
    in interpret mode (default: when the backend is not a TPU; slow, for checks).
    """
    b, t, h, dh = q.shape
    kh = k.shape[1]
    g = h // kh
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    keys = AttentionKeys(*(None if a is None else jnp.asarray(a) for a in keys))
    q_valid = (
        keys.key_valid if cache_length is None else jax.lax.dynamic_slice_in_dim(keys.key_valid, cache_length, t, 1)
    )
    seg = jnp.zeros((b, t), jnp.int32) if keys.query_segments is None else keys.query_segments.astype(jnp.int32)
    seg = jnp.where(q_valid, seg, _PAD_SEGMENT)
    bq, bkv = splash_block_sizes(t, t, query_block, key_block)
    tp = _round_up(t, np.lcm(bq, bkv))
    qg = (q * jnp.asarray(dh**-0.5, q.dtype)).reshape(b, t, kh, g, dh).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, Dh]
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, tp - t), (0, 0)))
    seg_p = jnp.pad(seg, ((0, 0), (0, tp - t)), constant_values=_PAD_SEGMENT)
    if cache_length is None:
        k_new, v_new = k, v
    else:
        k_new, v_new = (jax.lax.dynamic_slice_in_dim(a, cache_length, t, 2) for a in (k, v))
    k_new, v_new = (jnp.pad(a.astype(q.dtype), ((0, 0), (0, 0), (0, tp - t), (0, 0))) for a in (k_new, v_new))
    common = dict(block_q=bq, interpret=interpret)
    if cache_length is None:
        out = _splash_call(qg, k_new, v_new, seg_p, seg_p, causal=True, block_kv=bkv, residuals=False, **common)
    else:
        out_new, (lse_new,) = _splash_call(
            qg, k_new, v_new, seg_p, seg_p, causal=True, block_kv=bkv, residuals=True, **common
        )
        s = k.shape[2]
        _, bkv_old = splash_block_sizes(t, s, query_block, key_block)
        sp = _round_up(s, bkv_old)
        earlier = keys.key_valid & (jnp.arange(s, dtype=jnp.int32)[None, :] < cache_length)
        kv_seg = jnp.pad(jnp.where(earlier, 0, 1), ((0, 0), (0, sp - s)), constant_values=1)
        k_old, v_old = (jnp.pad(a.astype(q.dtype), ((0, 0), (0, 0), (0, sp - s), (0, 0))) for a in (k, v))
        out_old, (lse_old,) = _splash_call(
            qg, k_old, v_old, jnp.zeros_like(seg_p), kv_seg, causal=False, block_kv=bkv_old, residuals=True, **common
        )
        lse = jnp.logaddexp(lse_new, lse_old)
        out = out_new.astype(jnp.float32) * jnp.exp(lse_new - lse)[..., None]
        out = (out + out_old.astype(jnp.float32) * jnp.exp(lse_old - lse)[..., None]).astype(q.dtype)
    out = out[:, :, :, :t]  # [B, K, G, T, Dh]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


# ------------------------------------------------------------------------------------------- selection


def select_implementation(
    impl: str,
    *,
    queries: int,
    keys: int,
    dtype,
    head_dim: int,
    query_block: int = 512,
    key_block: int = 512,
    platform: str | None = None,
) -> str:
    """The path one attention call takes: 'materialized' | 'blockwise' | 'cudnn' | 'splash'.

    impl: the config's `attention_impl`. queries, keys: T and S of the call. query_block, key_block: the
    blockwise path's block sizes. platform: 'cpu' | 'gpu' | 'tpu' (default: jax.default_backend(); a 'gpu'
    given by name counts as CUDA, the default one is checked).

      decode (T == 1)  'materialized' whatever impl says: [B, H, 1, S] is one row, not T x S (JAX's paged /
                       ragged decode kernels take a valid prefix per row, our cache has pads inside it).
      'cudnn'          cuDNN where it applies (CUDA GPU, `cudnn_supports`), else 'blockwise'.
      'splash'         JAX's splash kernel on every platform (off TPU in Pallas interpret mode: slow, for checks).
      'auto'           TPU: 'splash';  GPU: as 'cudnn';  CPU: 'materialized' when the call is one block
                       (T <= query_block and S <= key_block: the same live scores, one loop less), else
                       'blockwise' (on CPU it is as fast or faster from 512 x 512 up and takes 2-6x less
                       time at 4096 x 4096; benchmarks/bench_attention.py measures it); over a KV cache
                       `attend` runs it in blocks sized to the CPU's cache (`cpu_block_sizes`).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if queries == 1:
        return "materialized"
    if impl in ("materialized", "blockwise", "splash"):
        return impl
    if platform is None:
        platform = jax.default_backend()
        on_cuda = _is_cuda()
    else:
        on_cuda = platform == "gpu"
    if impl == "cudnn" or platform == "gpu":
        if on_cuda and cudnn_supports(dtype, head_dim, queries, keys):
            return "cudnn"
        return "blockwise"
    if platform == "tpu":
        return "splash"
    if platform == "cpu" and queries <= query_block and keys <= key_block:
        return "materialized"
    return "blockwise"


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    keys: AttentionKeys,
    *,
    impl: str,
    query_block: int = 512,
    key_block: int = 512,
    mask: jax.Array | None = None,
    cache_length: jax.Array | int | None = None,
) -> jax.Array:
    """Runs the path `select_implementation` picks for this call. q: [B, T, H, Dh]; k, v: [B, K, S, Dh] (or
    [B*K, S, Dh], see `materialized_attention`); mask: an already built `attention_mask(keys)` for the
    materialised path (built here when None); cache_length: where this call's tokens were written in a KV cache
    (None without a cache; the splash path needs it)."""
    path = select_implementation(
        impl,
        queries=q.shape[1],
        keys=k.shape[-2],
        dtype=q.dtype,
        head_dim=q.shape[-1],
        query_block=query_block,
        key_block=key_block,
    )
    if path == "materialized":
        return materialized_attention(q, k, v, attention_mask(keys) if mask is None else mask)
    if k.ndim == 3:  # the other paths take [B, K, S, Dh]
        k, v = (a.reshape(q.shape[0], -1, *a.shape[1:]) for a in (k, v))
    if path == "cudnn":
        return cudnn_attention(q, k, v, keys)
    if path == "splash":
        return splash_attention(q, k, v, keys, cache_length=cache_length, query_block=query_block, key_block=key_block)
    over_cache = cache_length is not None
    if over_cache and impl == "auto" and jax.default_backend() == "cpu":
        query_block, key_block = cpu_block_sizes(
            q.shape[0], q.shape[2], q.shape[1], k.shape[-2], query_block=query_block, key_block=key_block
        )
    return blockwise_attention(
        q, k, v, keys, query_block=query_block, key_block=key_block, skip_unseen_blocks=over_cache
    )


# Live f32 score block the blockwise path aims for on CPU: about one core's L2 cache (1 MiB on AMD Zen 4/5, 2 MiB on
# Intel Sapphire Rapids), so a block's scores, probabilities and running sums are reused from cache instead of
# streaming through memory between the fused ops of a block.
CPU_SCORE_BLOCK_BYTES = 1 << 20


def cpu_block_sizes(
    batch: int, heads: int, queries: int, keys: int, *, query_block: int = 512, key_block: int = 512
) -> tuple[int, int]:
    """(query_block, key_block) of the blockwise path on CPU under 'auto' for calls over a KV cache (the agent's
    prefills): the configured sizes shrunk until one block's f32 scores for the whole batch,
    batch x heads x query_block x key_block x 4 bytes, fit `CPU_SCORE_BLOCK_BYTES`. Keys go in blocks of 256 (128
    where even 32 queries would not fit), queries in the largest power of two from 16 up that fits. On XLA CPU a
    [B, K, 512, G, 512] score block streams through memory between its fused ops; sized to the cache, the prefill
    of a 600-token chunk step ran 1.3x faster at batch 4 and 16 on the tiny shape, and within 1.1x at batch 1 and at
    Qwen2.5-0.5B's widths (`benchmarks/bench_attention.py --cpu-blocks` measures it).
    Never larger than the configured sizes or the call."""
    key_block = max(1, min(key_block, keys, 256))
    per_query = batch * heads * key_block * 4
    if CPU_SCORE_BLOCK_BYTES // per_query < 32 and key_block > 128:
        key_block = 128
        per_query = batch * heads * key_block * 4
    fit = max(16, CPU_SCORE_BLOCK_BYTES // per_query)
    block = 16
    while block * 2 <= fit and block * 2 <= 512:
        block *= 2
    return max(1, min(query_block, queries, block)), key_block


def score_block_elements(queries: int, keys: int, path: str, query_block: int, key_block: int) -> int:
    """Score elements per head of the largest live block: T x S materialised, min(T, query_block) x
    min(S, key_block) blockwise (cuDNN's tiles are on chip: counted as blockwise), splash's (128-multiple)
    blocks (`splash_block_sizes`)."""
    if path == "materialized":
        return queries * keys
    if path == "splash":
        bq, bkv = splash_block_sizes(queries, keys, query_block, key_block)
        return bq * bkv
    return min(queries, query_block) * min(keys, key_block)


__all__ = [
    "ATTENTION_IMPLS",
    "AttentionKeys",
    "MASK_VALUE",
    "attend",
    "attention_mask",
    "blockwise_attention",
    "cudnn_attention",
    "cudnn_supports",
    "materialized_attention",
    "score_block_elements",
    "select_implementation",
    "cpu_block_sizes",
    "splash_attention",
    "splash_block_sizes",
]
