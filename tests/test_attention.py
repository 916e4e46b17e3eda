"""Attention paths (models/attention.py): blockwise and the cuDNN call's plumbing against the materialised
reference and a plain NumPy softmax; the model and the agent with each path; the config switch; XLA memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memagent_jax.models import ConfigError, ModelConfig, forward, init_cache, init_params, positions_from_mask
from memagent_jax.models import attention as A
from memagent_jax.models.config import ATTENTION_IMPLS

TOL = 1e-5


def _close(got, want, tol=TOL):
    """Max abs difference within tol x the reference's scale."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.max(np.abs(want))))
    err = float(np.max(np.abs(got - want)))
    assert err <= tol * scale, (err, scale)


def _case(seed, b=3, t=37, s=53, h=6, kh=2, dh=8, segments=False, self_attention=False):
    """Random q/k/v and visibility: valid keys with pads anywhere (left, middle, right), a fully padded row,
    queries whose position precedes every valid key (no visible key)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, h, dh)).astype(np.float32)
    k = rng.normal(size=(b, kh, s, dh)).astype(np.float32)
    v = rng.normal(size=(b, kh, s, dh)).astype(np.float32)
    if self_attention:
        assert s == t
        valid = np.ones((b, t), bool)
        valid[0, :5] = False  # left pads
        valid[0, t // 2 : t // 2 + 4] = False  # pads in the middle
        valid[1, -7:] = False  # right pads
        valid[-1] = False  # a fully padded row
        pos = np.stack([np.maximum(np.cumsum(r) - 1, 0) for r in valid]).astype(np.int32)
        keys = A.AttentionKeys(jnp.asarray(pos), jnp.asarray(pos), jnp.asarray(valid))
        if segments:
            seg = np.sort(rng.integers(0, 3, (b, t)), axis=1).astype(np.int32)
            keys = keys._replace(query_segments=jnp.asarray(seg), key_segments=jnp.asarray(seg))
        return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), keys
    valid = rng.random((b, s)) < 0.7
    valid[0, :6] = False
    valid[0, -5:] = False
    valid[-1] = False  # fully padded row: every query sees nothing
    kpos = rng.integers(0, 60, (b, s)).astype(np.int32)
    qpos = rng.integers(-5, 60, (b, t)).astype(np.int32)  # some precede every key
    keys = A.AttentionKeys(jnp.asarray(qpos), jnp.asarray(kpos), jnp.asarray(valid))
    if segments:
        keys = keys._replace(
            query_segments=jnp.asarray(rng.integers(0, 2, (b, t)).astype(np.int32)),
            key_segments=jnp.asarray(rng.integers(0, 2, (b, s)).astype(np.int32)),
        )
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), keys


def _numpy_attention(q, k, v, mask):
    """Plain NumPy softmax attention, float64, with the reference's rule for rows with no visible key."""
    q, k, v, mask = (np.asarray(a, np.float64) if a.dtype != bool else np.asarray(a) for a in (q, k, v, mask))
    b, t, h, dh = q.shape
    kh = k.shape[1]
    out = np.zeros((b, t, h, dh))
    for head in range(h):
        kv = head // (h // kh)
        s = np.einsum("btd,bsd->bts", q[:, :, head], k[:, kv]) / np.sqrt(dh)
        s = np.where(mask, s, A.MASK_VALUE)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, :, head] = np.einsum("bts,bsd->btd", p, v[:, kv])
    return out


def test_reference_equals_numpy():
    q, k, v, keys = _case(0, b=2, t=9, s=11)
    mask = A.attention_mask(keys)
    assert not np.asarray(mask)[-1].any()  # the fully padded row
    _close(A.materialized_attention(q, k, v, mask), _numpy_attention(q, k, v, mask))
    # a row with no visible key is the mean of v over every slot, as the reference's softmax gives it
    want = np.repeat(np.asarray(v)[-1].mean(axis=1), 3, axis=0)  # [H, Dh] (G = 3)
    _close(np.asarray(A.materialized_attention(q, k, v, mask))[-1, 0], want)


@pytest.mark.parametrize("blocks", [(16, 10), (5, 7), (64, 64), (1, 53), (37, 1)])
@pytest.mark.parametrize("segments", [False, True])
@pytest.mark.parametrize("skip", [False, True])
def test_blockwise_equals_reference(blocks, segments, skip):
    q, k, v, keys = _case(1, segments=segments)
    want = A.materialized_attention(q, k, v, A.attention_mask(keys))
    got = A.blockwise_attention(q, k, v, keys, query_block=blocks[0], key_block=blocks[1], skip_unseen_blocks=skip)
    _close(got, want)
    _close(got, _numpy_attention(q, k, v, A.attention_mask(keys)))


def _cache_case(seed, b=3, t=20, s=96, written=40, h=4, kh=2, dh=8, blind_row=True):
    """A prefill over a KV cache: each row has `written` slots filled, its last t being this call's tokens
    (causal among them), the rest of the cache unwritten; row 0 left-padded, the last row fully padded (unless
    not blind_row)."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, h, dh)).astype(np.float32)
    k = rng.normal(size=(b, kh, s, dh)).astype(np.float32)
    v = rng.normal(size=(b, kh, s, dh)).astype(np.float32)
    valid = np.zeros((b, s), bool)
    valid[:, :written] = True
    valid[0, :7] = False
    valid[-1] = valid[-1] & (not blind_row)
    kpos = np.stack([np.maximum(np.cumsum(r) - 1, 0) for r in valid]).astype(np.int32)
    qpos = kpos[:, written - t : written]
    keys = A.AttentionKeys(jnp.asarray(qpos), jnp.asarray(kpos), jnp.asarray(valid))
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), keys


def test_skipping_unseen_blocks_over_a_cache():
    """With most key blocks unwritten or in the causal future, skipping them gives the reference's output (the
    fully padded row included: the mean of v) and the reference's gradients (the backward visits every block);
    the forward program holds a conditional per key block only when asked to skip."""
    q, k, v, keys = _cache_case(4)
    mask = A.attention_mask(keys)
    assert not np.asarray(mask)[:, :, 48:].any()  # whole key blocks of 16 that no query sees
    want = A.materialized_attention(q, k, v, mask)
    for qb, kb in ((8, 16), (4, 5), (20, 96)):
        got = jax.jit(
            lambda q, k, v, qb=qb, kb=kb: A.blockwise_attention(
                q, k, v, keys, query_block=qb, key_block=kb, skip_unseen_blocks=True
            )
        )(q, k, v)
        _close(got, want)
    _close(np.asarray(got)[-1], np.repeat(np.asarray(v)[-1].mean(axis=1)[None], q.shape[1], axis=0).repeat(2, 1))

    def blocks_8x16(q, k, v, skip=True):
        return A.blockwise_attention(q, k, v, keys, query_block=8, key_block=16, skip_unseen_blocks=skip)

    def program(skip):
        return str(jax.make_jaxpr(lambda q: blocks_8x16(q, k, v, skip))(q))

    assert "cond[" in program(True) and "cond[" not in program(False)
    w = jnp.asarray(np.random.default_rng(5).normal(size=q.shape).astype(np.float32))

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.tanh(fn(q, k, v)) * w)

    ref = jax.grad(loss(lambda q, k, v: A.materialized_attention(q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss(blocks_8x16), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, ref):
        _close(g, r)


@pytest.mark.parametrize("segments", [False, True])
def test_blockwise_gradients_equal_reference(segments):
    q, k, v, keys = _case(2, t=29, s=29, h=4, kh=1, segments=segments, self_attention=True)
    w = jnp.asarray(np.random.default_rng(9).normal(size=q.shape).astype(np.float32))

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.tanh(fn(q, k, v)) * w)

    ref = jax.grad(loss(lambda q, k, v: A.materialized_attention(q, k, v, A.attention_mask(keys))), argnums=(0, 1, 2))(
        q, k, v
    )
    for qb, kb in ((8, 6), (29, 29), (3, 100)):
        got = jax.jit(
            jax.grad(
                loss(lambda q, k, v: A.blockwise_attention(q, k, v, keys, query_block=qb, key_block=kb)),
                argnums=(0, 1, 2),
            )
        )(q, k, v)
        for g, r in zip(got, ref):
            _close(g, r)


def test_decode_one_query_over_a_cache():
    q, k, v, keys = _case(3, t=1, s=40)
    want = A.materialized_attention(q, k, v, A.attention_mask(keys))
    _close(A.blockwise_attention(q, k, v, keys, query_block=4, key_block=16), want)
    assert A.select_implementation("blockwise", queries=1, keys=40, dtype=jnp.float32, head_dim=8) == "materialized"


def test_bf16_blockwise_close_to_reference():
    q, k, v, keys = _case(4)
    q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
    want = A.materialized_attention(q, k, v, A.attention_mask(keys)).astype(jnp.float32)
    got = A.blockwise_attention(q, k, v, keys, query_block=16, key_block=10)
    assert got.dtype == jnp.bfloat16
    _close(got.astype(jnp.float32), want, tol=2e-2)


# ------------------------------------------------------------------------------------------- selection / cuDNN


def test_selection_rules():
    sel = A.select_implementation
    f32, bf16 = jnp.float32, jnp.bfloat16
    # CPU (this machine): never cuDNN; 'auto' is materialised for one block, blockwise above
    assert jax.default_backend() == "cpu"
    for impl in ("auto", "cudnn", "blockwise"):
        assert sel(impl, queries=2048, keys=2048, dtype=bf16, head_dim=64) == "blockwise"
    assert sel("auto", queries=512, keys=512, dtype=f32, head_dim=64) == "materialized"
    assert sel("auto", queries=512, keys=513, dtype=f32, head_dim=64) == "blockwise"
    assert sel("auto", queries=100, keys=100, dtype=f32, head_dim=64, query_block=64) == "blockwise"
    assert sel("materialized", queries=4096, keys=4096, dtype=f32, head_dim=64) == "materialized"
    # decode is materialised whatever the setting
    for impl in ATTENTION_IMPLS:
        assert sel(impl, queries=1, keys=4096, dtype=bf16, head_dim=64) == "materialized"
    # named platforms: GPU takes cuDNN where it applies, else blockwise; TPU splash
    gpu = dict(platform="gpu", head_dim=64)
    assert sel("auto", queries=2048, keys=2048, dtype=bf16, **gpu) == "cudnn"
    assert sel("cudnn", queries=2048, keys=2048, dtype=jnp.float16, **gpu) == "cudnn"
    assert sel("auto", queries=2048, keys=2048, dtype=f32, **gpu) == "blockwise"  # f32: no cuDNN
    assert sel("auto", queries=2047, keys=2048, dtype=bf16, **gpu) == "blockwise"  # odd T
    assert sel("auto", queries=2048, keys=2048, dtype=bf16, platform="gpu", head_dim=100) == "blockwise"
    assert sel("auto", queries=2048, keys=2048, dtype=bf16, platform="tpu", head_dim=64) == "splash"
    assert sel("cudnn", queries=2048, keys=2048, dtype=bf16, platform="tpu", head_dim=64) == "blockwise"
    assert sel("auto", queries=64, keys=64, dtype=bf16, platform="tpu", head_dim=64) == "splash"
    with pytest.raises(ValueError, match="attention_impl"):
        sel("flash", queries=2, keys=2, dtype=f32, head_dim=8)


@pytest.mark.parametrize("segments", [False, True])
def test_block_kind_against_the_visibility(segments):
    """`_block_kind` against the brute-force visibility of every block pair: 0 exactly when no query of the block
    sees a key of it, 1 only when every query sees every key (blocks of written slots before the new tokens, in a
    batch without a blind row), else 2."""
    cases = [_cache_case(7), _cache_case(7, blind_row=False), _case(8)] if not segments else [_case(8, segments=True)]
    kinds = set()
    for q, k, v, keys in cases:
        vis = np.asarray(A.attention_mask(keys))  # [B, T, S]
        t, s = vis.shape[1:]
        for q0 in range(0, t, 4):
            for k0 in range(0, s, 8):
                qs, ks = min(4, t - q0), min(8, s - k0)
                kind = int(A._block_kind(keys, q0, qs, k0, ks))
                block = vis[:, q0 : q0 + qs, k0 : k0 + ks]
                assert (kind == 0) == (not block.any()), (q0, k0)
                assert kind != 1 or block.all(), (q0, k0)
                kinds.add(kind)
    assert kinds == ({0, 1, 2} if not segments else {0, 2})


def test_cpu_block_sizes_fit_the_cache_budget():
    """On CPU, 'auto' runs calls over a KV cache in blocks whose f32 scores for the whole batch fit about one L2
    cache; never above the configured sizes or the call, never below 16 queries."""
    budget = A.CPU_SCORE_BLOCK_BYTES
    for b, h, t, s in [(1, 4, 600, 728), (4, 4, 600, 728), (16, 4, 600, 728), (4, 14, 600, 728), (64, 14, 4096, 4096)]:
        qb, kb = A.cpu_block_sizes(b, h, t, s)
        assert 16 <= qb <= min(512, t) and qb & (qb - 1) == 0
        assert kb in (128, 256)
        assert b * h * qb * kb * 4 <= budget or qb == 16, (b, h, qb, kb)
        assert qb == 512 or b * h * (2 * qb) * kb * 4 > budget  # the next power of two would not fit
    assert A.cpu_block_sizes(1, 4, 600, 728) == (256, 256)
    assert A.cpu_block_sizes(16, 4, 600, 728) == (32, 128)
    assert A.cpu_block_sizes(1, 1, 600, 728, query_block=64, key_block=100) == (64, 100)
    assert A.cpu_block_sizes(1, 1, 40, 50) == (40, 50)


def test_attend_over_a_cache_on_cpu(monkeypatch):
    """`attend` on CPU: a call over a KV cache (cache_length given) skips unseen blocks, and under 'auto' runs in
    `cpu_block_sizes`; an explicit 'blockwise' keeps the configured blocks; a call without a cache (the learner)
    keeps both as configured. The result equals the reference every way."""
    seen = []
    real = A.blockwise_attention

    def spy(q, k, v, keys, *, query_block, key_block, skip_unseen_blocks):
        seen.append((query_block, key_block, skip_unseen_blocks))
        return real(q, k, v, keys, query_block=query_block, key_block=key_block, skip_unseen_blocks=skip_unseen_blocks)

    monkeypatch.setattr(A, "blockwise_attention", spy)
    monkeypatch.setattr(A, "CPU_SCORE_BLOCK_BYTES", 3 * 4 * 16 * 32 * 4)  # this batch: blocks of 16 x 32
    q, k, v, keys = _cache_case(6, t=70, s=90, written=80)
    want = A.materialized_attention(q, k, v, A.attention_mask(keys))
    for impl in ("auto", "blockwise"):
        _close(A.attend(q, k, v, keys, impl=impl, query_block=64, key_block=64, cache_length=10), want)
    _close(A.attend(q, k, v, keys, impl="auto", query_block=64, key_block=64), want)
    assert seen == [(16, 64, True), (64, 64, True), (64, 64, False)]


@pytest.mark.parametrize("segments", [False, True])
def test_cudnn_call_plumbing_through_xla(segments):
    """The exact `jax.nn.dot_product_attention` call of the cuDNN path, run by its XLA implementation on CPU,
    equals the reference (GQA, masks with pads anywhere, rows with no visible key)."""
    q, k, v, keys = _case(5, segments=segments)
    want = A.materialized_attention(q, k, v, A.attention_mask(keys))
    _close(A.cudnn_attention(q, k, v, keys, implementation="xla"), want)


def test_attend_on_cpu_never_calls_cudnn(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("cuDNN path reached on CPU")

    monkeypatch.setattr(A, "cudnn_attention", boom)
    q, k, v, keys = _case(6)
    q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
    for impl in ("auto", "cudnn"):
        A.attend(q, k, v, keys, impl=impl, query_block=16, key_block=16)


# ------------------------------------------------------------------------------------------- config


def test_config_switch_validation_and_replace():
    base = ModelConfig(
        model_type="qwen2",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    assert base.attention_impl == "auto" and base.attention_block_size == 512
    with pytest.raises(ConfigError, match="attention_impl must be one of"):
        base.replace(attention_impl="flash")
    with pytest.raises(ConfigError, match="attention_block_size must be a positive integer"):
        base.replace(attention_block_size=0)
    with pytest.raises(ConfigError, match="attention_query_block_size"):
        base.replace(attention_query_block_size=-4)
    c = base.replace(attention_impl="blockwise", attention_block_size=128)
    assert (c.attention_impl, c.attention_block_size) == ("blockwise", 128)
    c2 = c.replace(remat="full")
    assert (c2.attention_impl, c2.attention_block_size, c2.remat) == ("blockwise", 128, "full")
    assert hash(c) != hash(base) and c == base.replace(attention_impl="blockwise", attention_block_size=128)
    hf = c.to_hf_dict()
    assert not [key for key in hf if "attention_impl" in key or "block" in key]
    # a config read back from config.json gets the default switch, and an override applies
    assert ModelConfig.from_hf_dict(hf).attention_impl == "auto"
    assert ModelConfig.from_hf_dict(hf, attention_impl="materialized").attention_impl == "materialized"
    assert {f.name for f in dataclasses.fields(ModelConfig)} >= {
        "attention_impl",
        "attention_block_size",
        "attention_query_block_size",
    }


# ------------------------------------------------------------------------------------------- whole model

MODEL = ModelConfig(
    model_type="qwen2",
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=6,
    num_kv_heads=2,
    head_dim=8,
    attention_bias=True,
    attention_block_size=7,
    attention_query_block_size=5,
)


def _impl(config, impl):
    return config.replace(attention_impl=impl)


def test_model_with_cache_prefill_then_decode():
    params = init_params(MODEL, 1)
    rng = np.random.default_rng(0)
    b, t = 3, 19
    tokens = jnp.asarray(rng.integers(0, 97, (b, t)).astype(np.int32))
    mask = np.ones((b, t), bool)
    mask[0, :4] = False
    mask[1, 8:11] = False
    mask[2, -3:] = False
    mask = jnp.asarray(mask)
    pos = positions_from_mask(mask)
    decode_tokens = [jnp.asarray(rng.integers(0, 97, (b, 1)).astype(np.int32)) for _ in range(4)]
    outs = {}
    for impl in ("materialized", "blockwise"):
        cfg = _impl(MODEL, impl)
        step = jax.jit(lambda p, tk, ps, m, c, cfg=cfg: forward(p, tk, ps, m, config=cfg, cache=c))
        logits, cache = step(params, tokens, pos, mask, init_cache(cfg, b, 30))
        outs[impl] = [logits]
        for i, tok in enumerate(decode_tokens):
            logits, cache = step(params, tok, pos[:, -1:] + 1 + i, jnp.ones((b, 1), bool), cache)
            outs[impl].append(logits)
    for got, want in zip(outs["blockwise"], outs["materialized"]):
        _close(got, want)


def test_model_packed_rows_with_segment_ids():
    params = init_params(MODEL, 2)
    rng = np.random.default_rng(1)
    b, t = 2, 23
    tokens = jnp.asarray(rng.integers(0, 97, (b, t)).astype(np.int32))
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1).astype(np.int32))
    mask = jnp.ones((b, t), bool).at[1, -4:].set(False)
    pos = positions_from_mask(mask)
    want, _ = forward(params, tokens, pos, mask, config=_impl(MODEL, "materialized"), segment_ids=seg)
    got, _ = forward(params, tokens, pos, mask, config=_impl(MODEL, "blockwise"), segment_ids=seg)
    _close(got, want)


@pytest.mark.slow  # four compiled gradients: ~20 s on 2 cores
def test_learner_loss_gradients_through_the_model():
    from memagent_jax.rl.logprobs import token_logprobs

    params = init_params(MODEL, 3)
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, 97, (2, 17)).astype(np.int32))
    mask = jnp.ones((2, 17), bool).at[0, :3].set(False)

    def loss(p, cfg):
        lp, _ = token_logprobs(p, tokens, mask, config=cfg, chunk_size=8)
        return jnp.sum(jnp.where(mask, lp, 0.0)) / 30.0

    for remat in ("none", "full"):
        ref = jax.grad(loss)(params, _impl(MODEL, "materialized").replace(remat=remat))
        got = jax.grad(loss)(params, _impl(MODEL, "blockwise").replace(remat=remat))
        for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(ref)):
            _close(g, r)


@pytest.mark.slow  # two agent compiles: ~20 s on 2 cores
def test_agent_answers_identical_with_both_paths(tmp_path):
    from hf_tiny import make_agent_model_dir
    from memagent_jax.agent import AgentBudgets, MemoryAgent
    from memagent_jax.data.tokenizer import load_tokenizer
    from memagent_jax.models import load_hf_params

    folder = make_agent_model_dir(tmp_path / "model", seed=3, vocab_size=400)
    tokenizer = load_tokenizer(folder)
    params, config = load_hf_params(folder)
    budgets = AgentBudgets(question_tokens=24, chunk_tokens=16, memory_tokens=12, answer_tokens=6, chunks_per_segment=2)
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, len(tokenizer), n).astype(np.int32) for n in (9, 40)]
    questions = ["Where is the key?", "Which river flows past the old mill?"]
    answers = {}
    for impl in ("materialized", "blockwise"):
        cfg = config.replace(attention_impl=impl, attention_block_size=16, attention_query_block_size=8)
        agent = MemoryAgent(params, cfg, tokenizer, budgets=budgets)
        result = agent.run(questions, docs, rng=0, record=True)
        answers[impl] = (result.answer_ids, [[c.response_ids.tolist() for c in conv] for conv in result.conversations])
    assert answers["blockwise"] == answers["materialized"]


# ------------------------------------------------------------------------------------------- memory


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_is_several_times_smaller():
    """XLA's buffer assignment at T = S = 2048 (tiny width): the blockwise forward and its gradient need several
    times less temporary memory than the materialised ones (no [T, S] scores, in the backward either)."""
    b, t, h, kh, dh = 1, 2048, 4, 2, 16
    q = jax.ShapeDtypeStruct((b, t, h, dh), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, kh, t, dh), jnp.float32)
    pos = jax.ShapeDtypeStruct((b, t), jnp.int32)
    valid = jax.ShapeDtypeStruct((b, t), bool)

    def fwd(impl):
        def f(q, k, v, pos, valid):
            keys = A.AttentionKeys(pos, pos, valid)
            if impl == "materialized":
                return A.materialized_attention(q, k, v, A.attention_mask(keys))
            return A.blockwise_attention(q, k, v, keys, query_block=256, key_block=256)

        return f

    def grad(impl):
        f = fwd(impl)
        return jax.grad(lambda q, k, v, p, m: jnp.sum(f(q, k, v, p, m) ** 2), argnums=(0, 1, 2))

    scores = h * t * t * 4  # one f32 [H, T, S]
    for make, ratio in ((fwd, 4), (grad, 4)):
        mat = _temp_bytes(make("materialized"), q, kv, kv, pos, valid)
        blk = _temp_bytes(make("blockwise"), q, kv, kv, pos, valid)
        assert mat >= scores  # the reference does hold the scores
        assert blk * ratio <= mat, (make.__name__, blk, mat)
        assert blk < scores / 4, (make.__name__, blk)


def test_blockwise_on_a_sharded_mesh_equals_unsharded():
    """Rows over data x fsdp, heads over tensor (8 CPU devices): the blockwise model's logits and gradients
    equal the unsharded materialised ones."""
    from memagent_jax.models import sharding as sharding_lib

    assert jax.device_count() == 8
    config = MODEL.replace(attention_impl="blockwise")
    params = init_params(config, 4)
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, 97, (4, 21)).astype(np.int32))
    mask = jnp.ones((4, 21), bool).at[1, :5].set(False).at[2, 9:12].set(False)
    pos = positions_from_mask(mask)

    def loss(p, t, q, m, cfg):
        logits, _ = forward(p, t, q, m, config=cfg)
        return jnp.sum(jnp.where(m[..., None], jnp.tanh(logits), 0.0))

    want_loss, want_grads = jax.value_and_grad(loss)(params, tokens, pos, mask, _impl(MODEL, "materialized"))
    mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
    sharded = jax.device_put(params, sharding_lib.param_shardings(params, mesh))
    batch = sharding_lib.batch_sharding(mesh, rank=2, batch_size=4)
    fn = jax.jit(jax.value_and_grad(lambda p, t, q, m: loss(p, t, q, m, config)))
    with jax.set_mesh(mesh):
        got_loss, got_grads = fn(sharded, *(jax.device_put(a, batch) for a in (tokens, pos, mask)))
    _close(got_loss, want_loss)
    for g, r in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        _close(g, r)
