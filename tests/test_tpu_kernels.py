"""JAX's TPU attention kernels (models/attention.py `splash_attention`) against the blockwise path, run in
Pallas interpret mode on CPU: outputs and gradients w.r.t. q, k and v with pads, packed rows (segment ids), GQA
(4 query heads over 2 KV heads) and causal masking; the cached prefill (new tokens after a prefix in the
cache); the model with attention_impl='splash'.

Shapes are tiny, but splash's blocks are multiples of 128 (the kernel's lane width, checked in interpret mode
too): lengths of 200 run as 256 with 128 x 128 blocks (two query blocks, two key blocks, the padding masked).
Tolerance: 2e-5 x the reference's scale, f32 throughout (the two paths differ only in summation order and in
where the 1/sqrt(Dh) scale is applied)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memagent_jax.models import ModelConfig, forward, init_cache, init_params, positions_from_mask
from memagent_jax.models import attention as A

TOL = 2e-5
B, T, H, KH, DH = 2, 200, 4, 2, 16
BLOCK = 128


def _close(got, want, tol=TOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.max(np.abs(want))))
    err = float(np.max(np.abs(got - want)))
    assert err <= tol * scale, (err, scale)


def _self_case(seed, segments):
    """q/k/v of T tokens; row 0 with left pads and pads in the middle, row 1 with right pads; packed rows
    (three segments per row, positions restarting per segment) when `segments`."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, H, DH)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(B, KH, T, DH)).astype(np.float32))
    v = jnp.asarray(rng.normal(size=(B, KH, T, DH)).astype(np.float32))
    valid = np.ones((B, T), bool)
    valid[0, :9] = False
    valid[0, 120:140] = False
    valid[1, -30:] = False
    if segments:
        seg = np.zeros((B, T), np.int32)
        seg[:, 70:] = 1
        seg[:, 150:] = 2
        pos = np.zeros((B, T), np.int32)
        for r in range(B):
            for s in range(3):
                m = valid[r] & (seg[r] == s)
                pos[r, seg[r] == s] = np.maximum(np.cumsum(m[seg[r] == s]) - 1, 0)
        keys = A.AttentionKeys(
            jnp.asarray(pos), jnp.asarray(pos), jnp.asarray(valid), jnp.asarray(seg), jnp.asarray(seg)
        )
    else:
        pos = np.stack([np.maximum(np.cumsum(r) - 1, 0) for r in valid]).astype(np.int32)
        keys = A.AttentionKeys(jnp.asarray(pos), jnp.asarray(pos), jnp.asarray(valid))
    return q, k, v, keys, jnp.asarray(valid)


@pytest.mark.parametrize("segments", [False, True])
def test_splash_equals_blockwise_outputs_and_gradients(segments):
    """Every real query's output, and the gradients w.r.t. q, k, v of a loss over the real queries (what the
    learner differentiates: nothing reads a pad's output)."""
    q, k, v, keys, valid = _self_case(0, segments)
    w = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, H, DH)).astype(np.float32))
    w = jnp.where(valid[:, :, None, None], w, 0.0)

    def run(fn):
        def loss(q, k, v):
            return jnp.sum(fn(q, k, v) * w)

        out = fn(q, k, v)
        grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        return out, grads

    splash = lambda q, k, v: A.splash_attention(q, k, v, keys, query_block=BLOCK, key_block=BLOCK)  # noqa: E731
    block = lambda q, k, v: A.blockwise_attention(q, k, v, keys, query_block=64, key_block=48)  # noqa: E731
    got, got_grads = run(splash)
    want, want_grads = run(block)
    real = np.asarray(valid)
    _close(np.asarray(got)[real], np.asarray(want)[real])
    for g, r in zip(got_grads, want_grads):
        _close(g, r)
    assert np.all(np.isfinite(np.asarray(got)))  # pad rows see themselves: no empty softmax


def test_splash_cached_prefill_equals_blockwise():
    """New tokens written at a (traced) index after a prefix with pads in a cache of 256 slots: the two-call
    merge (new tokens causal + the earlier slots) equals blockwise attention over all the cache's slots."""
    rng = np.random.default_rng(2)
    s, p, t = 256, 70, 100
    q = jnp.asarray(rng.normal(size=(B, t, H, DH)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(B, KH, s, DH)).astype(np.float32))
    v = jnp.asarray(rng.normal(size=(B, KH, s, DH)).astype(np.float32))
    valid = np.zeros((B, s), bool)
    valid[:, : p + t] = True
    valid[0, :12] = False  # left-padded prefix
    valid[1, p + 40 : p + 50] = False  # pads among the new tokens
    valid[1, :p] = False  # row 1: no earlier slot at all
    kpos = np.stack([np.maximum(np.cumsum(r) - 1, 0) for r in valid]).astype(np.int32)
    keys = A.AttentionKeys(jnp.asarray(kpos[:, p : p + t]), jnp.asarray(kpos), jnp.asarray(valid))

    @jax.jit
    def both(q, k, v, keys, length):
        got = A.splash_attention(q, k, v, keys, cache_length=length, query_block=BLOCK, key_block=BLOCK)
        return got, A.blockwise_attention(q, k, v, keys, query_block=64, key_block=64)

    got, want = both(q, k, v, keys, jnp.int32(p))
    real = valid[:, p : p + t]
    _close(np.asarray(got)[real], np.asarray(want)[real])


def test_splash_pads_lengths_to_the_block():
    """T = 200 with blocks of 128 runs as 256 (blocks divide the padded length); a block size that is not a
    multiple of 128 is rounded up to one (the TPU constraint), capped at the padded length."""
    assert A.splash_block_sizes(200, 200, 128, 128) == (128, 128)
    assert A.splash_block_sizes(200, 200, 512, 512) == (256, 256)
    assert A.splash_block_sizes(1000, 3000, 100, 700) == (128, 768)
    q, k, v, keys, valid = _self_case(3, False)
    got = A.splash_attention(q, k, v, keys, query_block=100, key_block=60)  # 128 x 128 blocks
    want = A.materialized_attention(q, k, v, A.attention_mask(keys))
    real = np.asarray(valid)
    _close(np.asarray(got)[real], np.asarray(want)[real])


def test_auto_picks_splash_on_tpu_only():
    sel = A.select_implementation
    kw = dict(queries=2048, keys=2048, dtype=jnp.bfloat16, head_dim=128)
    assert sel("auto", platform="tpu", **kw) == "splash"
    assert sel("auto", platform="tpu", queries=64, keys=64, dtype=jnp.float32, head_dim=8) == "splash"
    assert sel("auto", platform="cpu", **kw) == "blockwise"
    assert sel("auto", platform="gpu", **kw) == "cudnn"
    assert sel("splash", platform="cpu", **kw) == "splash"  # explicit: interpret mode off TPU
    assert sel("splash", platform="tpu", queries=1, keys=2048, dtype=jnp.bfloat16, head_dim=128) == "materialized"
    assert A.score_block_elements(2048, 2048, "splash", 512, 512) == 512 * 512
    assert A.score_block_elements(100, 3000, "splash", 512, 512) == 128 * 512


MODEL = ModelConfig(
    model_type="qwen2",
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    attention_bias=True,
    attention_block_size=128,
    attention_query_block_size=128,
)


@pytest.mark.slow  # three compiled programs in interpret mode: ~30 s on 2 cores
def test_model_splash_prefill_into_cache_then_decode():
    """The model with attention_impl='splash' (the dispatch passes the cache's write index): a prefix, then a
    chunk after it, then decode steps, equal to 'blockwise' at every real token."""
    params = init_params(MODEL, 1)
    rng = np.random.default_rng(4)
    b, t0, t1 = 2, 40, 60
    toks0 = jnp.asarray(rng.integers(0, 97, (b, t0)).astype(np.int32))
    toks1 = jnp.asarray(rng.integers(0, 97, (b, t1)).astype(np.int32))
    m0 = jnp.ones((b, t0), bool).at[0, :5].set(False)
    m1 = jnp.ones((b, t1), bool).at[1, 20:25].set(False)
    p0 = positions_from_mask(m0)
    p1 = positions_from_mask(m1, offset=jnp.sum(m0, axis=1, keepdims=True))
    outs = {}
    for impl in ("blockwise", "splash"):
        cfg = MODEL.replace(attention_impl=impl)
        step = jax.jit(lambda p, tk, ps, m, c, cfg=cfg: forward(p, tk, ps, m, config=cfg, cache=c))
        l0, cache = step(params, toks0, p0, m0, init_cache(cfg, b, 128))
        l1, cache = step(params, toks1, p1, m1, cache)
        l2, _ = step(params, toks1[:, :1], p1[:, -1:] + 1, jnp.ones((b, 1), bool), cache)
        outs[impl] = (np.asarray(l0)[np.asarray(m0)], np.asarray(l1)[np.asarray(m1)], np.asarray(l2))
    for got, want in zip(outs["splash"], outs["blockwise"]):
        _close(got, want)
