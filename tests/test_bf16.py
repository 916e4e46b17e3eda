"""bf16 end to end: logits vs f32 and vs transformers' bf16 model, learner loss / gradient vs f32, the agent in bf16.

Each bound leaves margin over the errors these tiny random checkpoints show (the typical values are in comments).
Numerics in bf16 (`compute_dtype='bfloat16'`): matmuls and the KV cache in bf16; norms, softmax, logits, sampling,
log-probs and the loss in f32; gradients are cast to f32 before accumulation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_tiny import hf_logits, make_agent_model_dir, make_hf_model, save_hf_model
from memagent_jax.agent import AgentBudgets, MemoryAgent
from memagent_jax.data.tokenizer import load_tokenizer
from memagent_jax.models import forward, load_hf_params, positions_from_mask
from memagent_jax.rl.batch import build_conversation_batch
from memagent_jax.rl.learner import Learner, LearnerConfig, OptimizerConfig, accumulate_gradients
from memagent_jax.rl.logprobs import token_logprobs
from memagent_jax.rl.losses import LossConfig


def _load(folder, dtype):
    params, config = load_hf_params(folder, param_dtype=dtype)
    return params, config.replace(compute_dtype=dtype)


def _logits(params, config, tokens):
    t = len(tokens)
    mask = jnp.ones((1, t), bool)
    out, _ = jax.jit(forward, static_argnames="config")(
        params, jnp.asarray(tokens)[None], positions_from_mask(mask), mask, config=config
    )
    return np.asarray(out[0])


# Typical (qwen2 / qwen3 / llama_bias, 48 positions): max abs logit diff ours bf16 vs ours f32 0.014 / 0.021 /
# 0.014, ours bf16 vs transformers bf16 0.015 / 0.017 / 0.012; top-1 agreement with f32 0.979 / 0.979 / 1.0.
LOGIT_BOUND = 0.06
TOP1_AGREEMENT = 0.9


@pytest.mark.parametrize("variant", ["qwen2", "qwen3", "llama_bias"])
def test_bf16_logits_vs_f32_and_transformers(tmp_path, variant):
    model = make_hf_model(variant, seed=21)
    folder = save_hf_model(model, str(tmp_path / variant))
    tokens = np.random.default_rng(0).integers(3, 128, 48)
    ours32 = _logits(*_load(folder, "float32"), tokens)
    params16, config16 = _load(folder, "bfloat16")
    assert {a.dtype for a in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    ours16 = _logits(params16, config16, tokens)
    assert ours16.dtype == np.float32  # logits always f32
    theirs16 = hf_logits(model.to(torch.bfloat16), tokens)
    err_f32 = np.max(np.abs(ours16 - ours32))
    err_torch = np.max(np.abs(ours16 - theirs16))
    top1 = np.mean(ours16.argmax(-1) == ours32.argmax(-1))
    print(f"{variant}: |bf16 - f32| {err_f32:.4f}, |ours bf16 - torch bf16| {err_torch:.4f}, top-1 {top1:.3f}")
    assert 1e-4 < err_f32 < LOGIT_BOUND  # bf16 really ran (nonzero error), and stays close
    assert err_torch < LOGIT_BOUND
    assert top1 >= TOP1_AGREEMENT


# ----------------------------------------------------------------------------------------------- learner

# Typical (GRPO loss, 6 conversations): loss relative diff 3e-4; gradient global relative error
# |g16 - g32| / |g32| = 0.0099 (cosine 0.99995).
LOSS_RTOL = 3e-3
GRAD_RTOL = 0.04


def _conversations(rng, n: int, vocab: int):
    """n random (prompt, response) pairs of a few tokens and old log-probs near uniform for the responses."""
    prompts = [rng.integers(3, vocab, size=rng.integers(4, 12)) for _ in range(n)]
    responses = [rng.integers(3, vocab, size=rng.integers(3, 10)) for _ in range(n)]
    old = [-np.log(vocab) + rng.uniform(-0.3, 0.3, size=len(r)) for r in responses]
    return prompts, responses, old


def test_bf16_learner_loss_and_grads_close_to_f32(tmp_path):
    folder = save_hf_model(make_hf_model("qwen2", seed=22), str(tmp_path / "m"))
    rng = np.random.default_rng(3)
    n, vocab = 6, 128
    prompts, responses, old = _conversations(rng, n, vocab)
    ref = [-np.log(vocab) + rng.uniform(-0.3, 0.3, size=len(r)) for r in responses]
    batch = build_conversation_batch(prompts, responses, old, rng.normal(size=n), ref_logprobs=ref, length_multiple=8)
    config = LearnerConfig(loss=LossConfig(), logits_chunk_size=8)
    out = {}
    for dtype in ("float32", "bfloat16"):
        params, model_config = _load(folder, dtype)
        logp, _ = token_logprobs(
            params, jnp.asarray(batch.tokens), jnp.asarray(batch.token_mask), config=model_config, chunk_size=8
        )
        assert logp.dtype == jnp.float32
        grads, metrics = jax.jit(functools.partial(accumulate_gradients, model_config=model_config, config=config))(
            params, batch
        )
        assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
        assert metrics["loss"].dtype == jnp.float32
        out[dtype] = (float(metrics["loss"]), grads)
    (loss32, g32), (loss16, g16) = out["float32"], out["bfloat16"]
    flat32 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(g32)])
    flat16 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(g16)])
    rel = np.linalg.norm(flat16 - flat32) / np.linalg.norm(flat32)
    cos = flat16 @ flat32 / (np.linalg.norm(flat16) * np.linalg.norm(flat32))
    print(f"loss f32 {loss32:.6f} bf16 {loss16:.6f}; grad rel err {rel:.4f}, cosine {cos:.5f}")
    assert abs(loss16 - loss32) <= LOSS_RTOL * abs(loss32)
    assert 0 < rel < GRAD_RTOL


def test_bf16_params_train_steps_keep_their_dtypes_and_follow_f32(tmp_path):
    # bf16 weights (param_dtype='bfloat16') with several mini-batches: the optimiser's state stays bf16 across the
    # scan over mini-batches (its arithmetic meets f32 gradients), and the update moves the weights the way the
    # f32-weight learner does.
    folder = save_hf_model(make_hf_model("qwen2", seed=23), str(tmp_path / "m"))
    rng = np.random.default_rng(5)
    n = 8
    prompts, responses, old = _conversations(rng, n, vocab=128)
    batch = build_conversation_batch(prompts, responses, old, rng.normal(size=n), length_multiple=8)
    config = LearnerConfig(
        loss=LossConfig(kl_coef=0.0),
        num_minibatches=2,
        logits_chunk_size=8,
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=0),
    )
    moved = {}
    for dtype in ("float32", "bfloat16"):
        params, model_config = _load(folder, dtype)
        initial = [np.asarray(a, np.float32) for a in jax.tree.leaves(params)]  # the learner donates its params
        learner = Learner(model_config, config)
        state = learner.init_state(params)
        for _ in range(2):
            state, metrics = learner.train_step(state, batch)
            assert np.isfinite(metrics["loss"])
        leaves = jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state[1].inner_state[0].mu)
        assert {a.dtype for a in leaves} == {jnp.dtype(dtype)}
        moved[dtype] = np.concatenate(
            [(np.asarray(a, np.float32) - b).ravel() for a, b in zip(jax.tree.leaves(state.params), initial)]
        )
    a, b = moved["bfloat16"], moved["float32"]
    assert np.abs(a).max() > 0
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.9


# ------------------------------------------------------------------------------------------------- agent


@pytest.mark.slow  # two agents compiled (f32, bf16): ~25 s alone on 2 cores
def test_agent_runs_in_bf16_and_agrees_with_f32_where_the_margin_allows(tmp_path):
    folder = make_agent_model_dir(tmp_path / "agent", seed=6, vocab_size=400)
    tokenizer = load_tokenizer(folder)
    budgets = AgentBudgets(question_tokens=24, chunk_tokens=16, memory_tokens=12, answer_tokens=6, chunks_per_segment=2)
    rng = np.random.default_rng(5)
    docs = [rng.integers(3, len(tokenizer), n).astype(np.int32) for n in (20, 40, 50, 33)]
    questions = ["Where is the key?", "Name it.", "What is the code?", "Which river?"]
    results, agents = {}, {}
    for dtype in ("float32", "bfloat16"):
        params, config = _load(folder, dtype)
        agents[dtype] = MemoryAgent(params, config, tokenizer, budgets=budgets, stop_token_ids=())
        results[dtype] = agents[dtype].run(questions, docs, rng=0, record=True)
    caches = agents["bfloat16"].placement.pooled()
    assert caches and all(c.k.dtype == jnp.bfloat16 and c.v.dtype == jnp.bfloat16 for c in caches)
    # Greedy bf16 tokens vs the f32 model teacher-forced on the bf16 run's own prompts: wherever f32's top-2
    # margin exceeds twice the logit bound, the bf16 agent must have picked f32's argmax.
    params32, config32 = _load(folder, "float32")
    convs = [c for conv in results["bfloat16"].conversations for c in conv]
    seqs = [np.concatenate([c.prompt_ids, c.response_ids]) for c in convs]
    width = max(len(q) for q in seqs)
    tokens = np.zeros((len(seqs), width), np.int32)
    mask = np.zeros((len(seqs), width), bool)
    for i, q in enumerate(seqs):  # right-padded: one f32 forward for every conversation
        tokens[i, : len(q)], mask[i, : len(q)] = q, True
    mask = jnp.asarray(mask)
    all_logits, _ = jax.jit(forward, static_argnames="config")(
        params32, jnp.asarray(tokens), positions_from_mask(mask), mask, config=config32
    )
    checked = agree = 0
    for c, logits in zip(convs, np.asarray(all_logits)):
        logits = logits[len(c.prompt_ids) - 1 : len(c.prompt_ids) + len(c.response_ids) - 1]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 2 * LOGIT_BOUND
        checked += int(clear.sum())
        agree += int(np.sum(logits.argmax(-1)[clear] == c.response_ids[clear]))
        # Recorded log-probs are f32 and close to f32's (bf16 compute error only).
        lp32 = np.asarray(jax.nn.log_softmax(logits, axis=-1))[np.arange(len(c.response_ids)), c.response_ids]
        assert c.logprobs.dtype == np.float32
        np.testing.assert_allclose(c.logprobs, lp32, atol=2 * LOGIT_BOUND)
    same = np.mean([a == b for a, b in zip(results["float32"].answer_ids, results["bfloat16"].answer_ids)])
    print(f"clear-margin tokens {checked}, bf16 == f32 argmax on {agree}; identical final answers {same:.2f}")
    assert checked >= 20 and agree == checked


def _compiled_text(fn, *args, **kwargs) -> str:
    return fn.lower(*args, **kwargs).compile().as_text()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA CPU's compiled programs")
def test_cpu_inference_programs_keep_bf16_weights_in_bf16():
    """The compiled prefill and generation programs in bf16 never widen a weight to f32, at batch 2 or 1.

    XLA CPU widens to f32 a bf16 product whose result is bf16, a product of one row, and a dynamic-slice or
    gather of a bf16 array: a layer scan over stacked weights then converted every stacked weight at every
    call, a decode at batch 1 every layer weight, and the embedding lookup the whole embedding. The shapes
    below are unique to the weights (intermediate 176, 3 layers, vocabulary 384), so any f32 array of them in
    the program is such a widening.
    """
    from memagent_jax.models import init_params
    from memagent_jax.models.presets import preset_config
    from memagent_jax.models.transformer import init_cache
    from memagent_jax.sampling.params import SamplingParams
    from memagent_jax.sampling.sampler import prefill, prefill_and_decode

    config = preset_config(
        "tiny",
        vocab_size=384,
        num_layers=3,
        hidden_size=64,
        intermediate_size=176,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        param_dtype="bfloat16",
        compute_dtype="bfloat16",
    )
    params = init_params(config, 0)
    t = 24
    widened = ("f32[3,64,176]", "f32[3,176,64]", "f32[64,176]", "f32[176,64]", "f32[384,64]", "f32[64,384]")
    for batch in (2, 1):
        tokens = jnp.ones((batch, t), jnp.int32)
        mask = jnp.ones((batch, t), bool)
        cache = init_cache(config, batch, t + 8, jnp.bfloat16)

        pre = jax.jit(functools.partial(prefill, config=config))
        text = _compiled_text(pre, params, tokens=tokens, token_mask=mask, cache=cache)
        assert not [s for s in widened if s in text], (batch, [s for s in widened if s in text])

        sampling = SamplingParams(max_new_tokens=4, temperature=0.0)
        gen = jax.jit(lambda p, c, k: prefill_and_decode(p, config, tokens, mask, c, k, sampling))  # noqa: B023
        text = _compiled_text(gen, params, cache, jax.random.split(jax.random.key(0), batch))
        assert not [s for s in widened if s in text], (batch, [s for s in widened if s in text])


def test_bf16_product_rounds_an_f32_accumulation_once():
    """`product` in bf16: within one bf16 step of the exact product of the bf16 operands (float64 reference)."""
    from memagent_jax.models.transformer import product

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(64, 48)) * 0.1, jnp.float32)  # cast to bf16 inside, as a weight would be
    out = jax.jit(lambda a, b: product("td,df->tf", a, b, jnp.bfloat16))(x, w)
    assert out.dtype == jnp.bfloat16
    exact = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.bfloat16), np.float64)
    step = np.abs(exact) * 2.0**-7  # bf16 keeps 8 significant bits: one step is at most |v| * 2^-7
    assert np.all(np.abs(np.asarray(out, np.float64) - exact) <= step + 1e-6)
    # one row (a decode step at batch 1): computed on two rows on CPU, the same bound, and no f32 weight
    one = jax.jit(lambda a, b: product("btd,df->btf", a, b, jnp.bfloat16))
    out1 = one(x[:1, None], w)
    assert out1.shape == (1, 1, 48) and out1.dtype == jnp.bfloat16
    assert np.all(np.abs(np.asarray(out1[0, 0], np.float64) - exact[0]) <= step[0] + 1e-6)
    if jax.default_backend() == "cpu":
        assert "f32[64,48]" not in _compiled_text(one, x[:1, None], w.astype(jnp.bfloat16))
    # f32: the plain product
    out32 = product("td,df->tf", x.astype(jnp.float32), w, jnp.float32)
    np.testing.assert_allclose(np.asarray(out32), np.asarray(x, np.float32) @ np.asarray(w), rtol=1e-5, atol=1e-5)
