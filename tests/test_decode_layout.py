"""Decode layouts: 'unstacked' (per-layer weight arrays) vs 'scan' (stacked weights in a layer scan).

Both must sample the same tokens with the same log-probs (the maths is the same; only the weight layout
differs), the whole agent must give the same answers and traces, and the decode loop of 'unstacked' must take
its weights and KV cache as per-layer arrays that its body reads in place (no weight- or cache-shaped slice in
any loop of the program's jaxpr), where 'scan' slices every weight matrix and each layer's cache out of the stack
at every step.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from hf_tiny import make_agent_model_dir, make_hf_model, save_hf_model
from memagent_jax.agent import AgentBudgets, MemoryAgent
from memagent_jax.data.tokenizer import load_tokenizer
from memagent_jax.models import (
    ConfigError,
    ModelConfig,
    abstract_params,
    init_cache,
    init_params,
    load_hf_params,
    unstack_layers,
)
from memagent_jax.models.presets import preset_config
from memagent_jax.models.transformer import forward
from memagent_jax.sampling import SamplingParams
from memagent_jax.sampling.params import RowSampling
from memagent_jax.sampling.sampler import decode, prefill, prefill_and_decode

LAYOUTS = ("scan", "unstacked")


def _generate(params, config, tokens, mask, sampling, seed):
    cache = init_cache(config, tokens.shape[0], tokens.shape[1] + sampling.max_new_tokens)
    keys = jax.random.split(jax.random.key(seed), tokens.shape[0])
    fn = jax.jit(prefill_and_decode, static_argnames=("config", "sampling"))
    return fn(params, config, tokens, mask, cache, keys, sampling)


@pytest.mark.parametrize("variant", ["qwen2", "qwen3", "llama_bias"])  # GQA + qkv bias / qk_norm / o & mlp bias
def test_layouts_decode_identically(tmp_path, variant):
    folder = save_hf_model(make_hf_model(variant, seed=5), str(tmp_path / variant))
    params, config = load_hf_params(folder)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, (3, 7)), jnp.int32)
    mask = jnp.asarray([[1] * 7, [0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]], bool)  # left/right pads
    for sampling in (
        SamplingParams(max_new_tokens=9, temperature=0.0),
        SamplingParams(max_new_tokens=9, temperature=1.0, top_p=0.9),
    ):
        outs = {
            layout: _generate(params, config.replace(decode_layout=layout), tokens, mask, sampling, 1)
            for layout in LAYOUTS
        }
        a, b = outs["scan"], outs["unstacked"]
        np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
        np.testing.assert_array_equal(np.asarray(a.num_tokens), np.asarray(b.num_tokens))
        np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(a.cache.k), np.asarray(b.cache.k), atol=1e-5, rtol=0)
        # Independent reference: the recorded log-probs are those of a full teacher-forced forward (rows 0 and 1,
        # whose last prompt token is the prompt's last column).
        full = jnp.concatenate([tokens, a.tokens], axis=1)
        full_mask = jnp.concatenate([mask, a.response_mask()], axis=1)
        pos = jnp.maximum(jnp.cumsum(full_mask, axis=1) - 1, 0)
        logits, _ = forward(params, full, pos, full_mask, config=config)
        lp = jax.nn.log_softmax(logits[:, 6:-1], axis=-1)
        want = jnp.take_along_axis(lp, a.tokens[:, :, None], axis=-1)[..., 0] * a.response_mask()
        np.testing.assert_allclose(np.asarray(b.logprobs)[:2], np.asarray(want)[:2], atol=1e-4, rtol=0)


def test_unstack_layers_forward_equals_stacked():
    config = preset_config("tiny", num_layers=3)
    params = init_params(config, 1)
    per_layer = unstack_layers(params)
    assert len(per_layer["layers"]) == 3 and unstack_layers(per_layer) is per_layer
    np.testing.assert_array_equal(per_layer["layers"][2]["mlp"]["up_proj"], params["layers"]["mlp"]["up_proj"][2])
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) + 3
    mask = jnp.ones((2, 6), bool)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    want, _ = forward(params, tokens, pos, mask, config=config)
    got, _ = forward(per_layer, tokens, pos, mask, config=config)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_tied_head_copy_gives_the_same_logits_and_tokens(tmp_path, monkeypatch):
    """A tied model's decode reads the embedding's transposed copy (`with_tied_head_copy`, by default on CPU from
    2 rows up, for a head too large for the caches):
    logits within f32 rounding of the embedding's, the same greedy tokens and log-probs as decode without it; an
    untied model gets nothing added, and the copy is never a parameter (forward ignores it)."""
    from memagent_jax.models.transformer import TIED_HEAD_COPY, logits_from_hidden, with_tied_head_copy
    from memagent_jax.sampling import sampler

    folder = save_hf_model(make_hf_model("qwen2_tied", seed=3), str(tmp_path / "tied"))
    params, config = load_hf_params(folder)
    assert config.tie_word_embeddings
    copied = with_tied_head_copy(params, config)
    assert copied[TIED_HEAD_COPY].shape == (config.hidden_size, config.vocab_size)
    np.testing.assert_array_equal(np.asarray(copied[TIED_HEAD_COPY]), np.asarray(params["embed"]).T)
    assert with_tied_head_copy(copied, config) is copied
    assert TIED_HEAD_COPY not in sampler.decode_params(params, config, 3)  # a head this small stays in cache
    monkeypatch.setattr(sampler, "TIED_HEAD_COPY_MIN_BYTES", 0)  # as if it streamed from memory
    assert TIED_HEAD_COPY in sampler.decode_params(params, config, 3)  # CPU, 2 rows or more: on by default
    assert TIED_HEAD_COPY not in sampler.decode_params(params, config, 1)
    assert TIED_HEAD_COPY not in sampler.decode_params(params, config, 3, tied_head_copy=False)
    held = sampler.inference_params(params, config)  # the copy held for every batch: batch 1 leaves it unread
    assert sampler.decode_params(held, config, 3)[TIED_HEAD_COPY] is held[TIED_HEAD_COPY]
    assert TIED_HEAD_COPY not in sampler.decode_params(held, config, 1)
    assert TIED_HEAD_COPY not in sampler.prefill_params(held, sampler.decode_params(held, config, 3))
    untied_config = preset_config("tiny", tie_word_embeddings=False)
    untied = init_params(untied_config, 0)
    assert with_tied_head_copy(untied, untied_config) is untied

    hidden = jnp.asarray(np.random.default_rng(1).normal(size=(3, config.hidden_size)), jnp.float32)
    np.testing.assert_allclose(
        np.asarray(logits_from_hidden(copied, hidden, config=config)),
        np.asarray(logits_from_hidden(params, hidden, config=config)),
        atol=1e-5,
        rtol=0,
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (3, 7)), jnp.int32)
    mask = jnp.ones((3, 7), bool)
    pos = jnp.broadcast_to(jnp.arange(7), (3, 7))
    np.testing.assert_allclose(
        np.asarray(forward(copied, tokens, pos, mask, config=config)[0]),
        np.asarray(forward(params, tokens, pos, mask, config=config)[0]),
        atol=1e-5,
        rtol=0,
    )
    sampling = SamplingParams(max_new_tokens=9, temperature=0.0)
    with_copy = _generate(params, config, tokens, mask, sampling, 1)
    monkeypatch.setattr(sampler, "with_tied_head_copy", lambda p, c: p)  # (another config: a fresh trace)
    without = _generate(params, config.replace(decode_layout="unstacked"), tokens, mask, sampling, 1)
    np.testing.assert_array_equal(np.asarray(with_copy.tokens), np.asarray(without.tokens))
    np.testing.assert_allclose(np.asarray(with_copy.logprobs), np.asarray(without.logprobs), atol=1e-5, rtol=0)


def test_decode_layout_config_validation_and_export():
    config = preset_config("tiny")
    assert config.decode_layout == "auto" and config.resolved_decode_layout == "unstacked"  # CPU, tiny layers too
    assert preset_config("qwen2.5-0.5b-instruct").resolved_decode_layout == "unstacked"
    assert config.replace(decode_layout="unstacked").resolved_decode_layout == "unstacked"
    with pytest.raises(ConfigError, match="decode_layout"):
        config.replace(decode_layout="unrolled")
    assert "decode_layout" not in config.replace(decode_layout="scan").to_hf_dict()
    assert ModelConfig.from_hf_dict(config.to_hf_dict()).decode_layout == "auto"


# ------------------------------------------------------------------------------------------ whole agent


@pytest.fixture(scope="module")
def agent_setup(tmp_path_factory):
    folder = make_agent_model_dir(tmp_path_factory.mktemp("layout") / "model", seed=4, vocab_size=400)
    params, config = load_hf_params(folder)
    return dict(tokenizer=load_tokenizer(folder), params=params, config=config)


def test_agent_identical_with_both_layouts(agent_setup):
    budgets = AgentBudgets(question_tokens=24, chunk_tokens=16, memory_tokens=10, answer_tokens=6, chunks_per_segment=2)
    rng = np.random.default_rng(2)
    docs = [rng.integers(3, len(agent_setup["tokenizer"]), n).astype(np.int32) for n in (40, 75)]
    questions = ["Where is the key?", "Name it."]
    sampling = SamplingParams(temperature=1.0)  # sampled (greedy is covered by test_layouts_decode_identically)
    results = {}
    for layout in LAYOUTS:
        agent = MemoryAgent(
            agent_setup["params"],
            agent_setup["config"].replace(decode_layout=layout),
            agent_setup["tokenizer"],
            budgets=budgets,
            memory_sampling=sampling,
        )
        results[layout] = agent.run(questions, docs, rng=11, trace=True, record=True)
    a, b = results["scan"], results["unstacked"]
    assert a.answer_ids == b.answer_ids and a.answers == b.answers
    assert a.traces == b.traces and sum(len(t) for t in a.traces) == 3 + 5
    for conv_a, conv_b in zip(a.conversations, b.conversations):
        assert len(conv_a) == len(conv_b)
        for x, y in zip(conv_a, conv_b):
            np.testing.assert_array_equal(x.response_ids, y.response_ids)
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5, rtol=0)


def test_agent_and_sampler_make_the_decode_copies_once_per_weights(agent_setup):
    """The decode's per-layer copies (`InferenceLayout`) are made at the first run and reused while the weights
    stay; new weights or `release_layout` drop them; params handed over with them are run as they are (no copy);
    and every sampled token and log-prob is bit for bit the one an agent making the copies at every call gets."""
    from memagent_jax.models.transformer import LAYER_COPIES, is_unstacked
    from memagent_jax.sampling import Sampler
    from memagent_jax.sampling.sampler import inference_params

    params, config = agent_setup["params"], agent_setup["config"].replace(decode_layout="unstacked")
    budgets = AgentBudgets(question_tokens=24, chunk_tokens=16, memory_tokens=10, answer_tokens=6, chunks_per_segment=2)
    rng = np.random.default_rng(3)
    docs = [rng.integers(3, len(agent_setup["tokenizer"]), n).astype(np.int32) for n in (40, 20, 75)]
    questions = ["Where is the key?", "Name it.", "Which door?"]
    sampling = SamplingParams(temperature=1.0)

    def agent_for(p):
        return MemoryAgent(p, config, agent_setup["tokenizer"], budgets=budgets, memory_sampling=sampling)

    agent = agent_for(params)
    first = agent.run(questions, docs, rng=1, record=True)
    held = agent._layout._laid_out
    assert held is not None and LAYER_COPIES in held and is_unstacked({"layers": held[LAYER_COPIES]})
    assert all(a is b for a, b in zip(jax.tree.leaves(held["layers"]), jax.tree.leaves(params["layers"])))
    assert agent.run(questions, docs, rng=1).answer_ids == first.answer_ids
    assert agent._layout._laid_out is held  # the second run made none

    per_call = agent_for(params)
    per_call._run_params = lambda: per_call.params  # bare params: the programs copy at every call
    bare = per_call.run(questions, docs, rng=1, record=True)
    assert bare.answer_ids == first.answer_ids and sum(len(c) for c in first.conversations) == 3 + 2 + 5 + 3
    for conv_a, conv_b in zip(first.conversations, bare.conversations):
        for x, y in zip(conv_a, conv_b, strict=True):
            np.testing.assert_array_equal(x.response_ids, y.response_ids)
            np.testing.assert_array_equal(x.logprobs, y.logprobs)

    agent.release_layout()
    assert agent._layout._laid_out is None
    agent.run(questions, docs, rng=1)
    remade = agent._layout._laid_out
    assert remade is not None and remade is not held
    agent.params = jax.tree.map(lambda a: a + 0, params)  # new arrays, same values
    assert agent._layout._laid_out is None
    assert agent.run(questions, docs, rng=1).answer_ids == first.answer_ids
    assert agent._layout._laid_out is not remade

    laid_out = jax.jit(inference_params, static_argnums=1)(params, config)
    given = agent_for(laid_out)
    assert given.run(questions, docs, rng=1).answer_ids == first.answer_ids
    kept = given._layout._laid_out
    assert all(a is b for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(laid_out), strict=True))

    sampler = Sampler(params, config, max_prompt_length=32, keep_cache=False)
    prompts = [rng.integers(3, config.vocab_size, 9).astype(np.int32)]
    out = sampler.generate(prompts, SamplingParams(max_new_tokens=5, temperature=0.0))
    held = sampler._layout._laid_out
    again = sampler.generate(prompts, SamplingParams(max_new_tokens=5, temperature=0.0))
    assert sampler._layout._laid_out is held and LAYER_COPIES in held
    assert again.tokens == out.tokens


# ------------------------------------------------------------------------------ loop structure (jaxpr)

_SLICING = frozenset({"dynamic_slice", "slice", "gather", "copy", "copy_p"})


@dataclasses.dataclass
class _Loop:
    kind: str  # 'while' | 'scan'
    operands: list[tuple[int, ...]]  # shapes of the loop's operands (consts and carry; a scan's xs too)
    sliced: list[tuple[str, tuple[int, ...]]]  # (how, shape) of every array the body takes out of a bigger one


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for j in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(j, jax_core.ClosedJaxpr):
                yield j.jaxpr
            elif isinstance(j, jax_core.Jaxpr):
                yield j


def _loops(jaxpr, out: list[_Loop] | None = None, sliced: list | None = None) -> list[_Loop]:
    """Every `while` / `scan` of `jaxpr`, with what its body slices per iteration: ('xs', shape) for a scan's
    per-iteration slice of its inputs, else the slicing primitive and its result shape. Non-loop sub-jaxprs (jit,
    remat, cond) are walked into; a nested loop is a loop of its own (its slices are not its parent's)."""
    out = [] if out is None else out
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("while", "scan"):
            loop = _Loop(name, [tuple(v.aval.shape) for v in eqn.invars], [])
            if name == "scan":
                n = eqn.params["num_consts"] + eqn.params["num_carry"]
                loop.sliced += [("xs", tuple(v.aval.shape[1:])) for v in eqn.invars[n:]]
            out.append(loop)
            for sub in _sub_jaxprs(eqn):
                _loops(sub, out, loop.sliced)
            continue
        if sliced is not None and name in _SLICING:
            sliced += [(name, tuple(v.aval.shape)) for v in eqn.outvars]
        for sub in _sub_jaxprs(eqn):
            _loops(sub, out, sliced)
    return out


def _drop_unit_lead(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[1:] if shape[:1] == (1,) else shape


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_loop_reads_weights_in_place(layout):
    # Distinct sizes so no cache or activation shape equals a weight shape.
    config = preset_config(
        "tiny",
        num_layers=3,
        hidden_size=96,
        intermediate_size=160,
        num_heads=6,
        num_kv_heads=2,
        head_dim=16,
        vocab_size=200,
        decode_layout=layout,
    )
    params = abstract_params(config)  # shapes only: the programs are traced, not run
    weight_shapes = {
        tuple(a.shape[1:])
        for path, a in jax.tree_util.tree_leaves_with_path(params["layers"])
        if str(path[-1].key).endswith("_proj")
    }
    assert len(weight_shapes) == 5  # q, k/v, o, gate/up, down
    sampling = SamplingParams(max_new_tokens=4, temperature=0.0)
    cache = init_cache(config, 2, 12)
    pre = jax.eval_shape(
        lambda p, t, m, c: prefill(p, config, t, m, c),
        params,
        jnp.ones((2, 8), jnp.int32),
        jnp.ones((2, 8), bool),
        cache,
    )
    keys = jax.random.split(jax.random.key(0), 2)
    run = jax.jit(decode, static_argnames=("config", "sampling"))
    loops = _loops(run.trace(params, config, pre.cache, pre.last_logits, pre.next_positions, keys, sampling).jaxpr)
    sliced = {_drop_unit_lead(shape) for loop in loops for _, shape in loop.sliced}
    hits = weight_shapes & sliced
    if layout == "scan":
        assert len(hits) == len(weight_shapes), hits  # every weight matrix sliced out of the stack per step
    else:
        assert not hits, f"weights sliced inside the decode loop: {hits}"


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_loop_reads_the_kv_cache_in_place(layout, batch):
    """'unstacked' gives each layer its own cache buffer for the decode loop (`split_cache_layers`): the loop
    carries 2 L buffers [B*K, S, Dh] (batch and KV heads on one axis, at batch 1 too) and slices no cache; 'scan'
    carries the stacked [L, B, K, S, Dh] cache and slices each layer's cache out of it at every token."""
    config = preset_config(
        "tiny",
        num_layers=3,
        hidden_size=96,
        intermediate_size=160,
        num_heads=6,
        num_kv_heads=2,
        head_dim=16,
        vocab_size=200,
        decode_layout=layout,
    )
    params = abstract_params(config)
    slots = 37  # no weight or activation has this size
    cache = init_cache(config, batch, slots)
    pre = jax.eval_shape(
        lambda p, t, m, c: prefill(p, config, t, m, c),
        params,
        jnp.ones((batch, 8), jnp.int32),
        jnp.ones((batch, 8), bool),
        cache,
    )
    run = jax.jit(decode, static_argnames=("config", "sampling"))
    loops = _loops(
        run.trace(
            params,
            config,
            pre.cache,
            pre.last_logits,
            pre.next_positions,
            jax.random.split(jax.random.key(0), batch),
            SamplingParams(max_new_tokens=6, temperature=0.0),
        ).jaxpr
    )
    (loop,) = [loop for loop in loops if loop.kind == "while"]
    stacked, per_layer = (3, batch, 2, slots, 16), (batch * 2, slots, 16)
    cache_sized = [s for lp in loops for _, s in lp.sliced if slots in s and np.prod(s) >= slots * 16]
    if layout == "scan":
        assert loop.operands.count(stacked) == 2 and per_layer not in loop.operands
        assert cache_sized, "expected the scanned decode step to slice each layer's cache out of the stack"
    else:
        assert loop.operands.count(per_layer) == 2 * 3 and stacked not in loop.operands, loop.operands
        assert not cache_sized, f"KV-cache buffers sliced inside the decode loop: {cache_sized}"


def test_unstacked_decode_returns_the_stacked_cache_it_would_have_written():
    """The per-layer cache of the 'unstacked' decode loop is put back into the stacked layout: the same cache as
    'scan' returns, including when the loop stops early and when it uses every free slot."""
    config = preset_config(
        "tiny",
        vocab_size=64,
        num_layers=2,
        hidden_size=32,
        intermediate_size=48,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
    )
    params = init_params(config, 3)
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(3, 64, (2, 6)), jnp.int32)
    mask = jnp.asarray([[1] * 6, [0, 0, 1, 1, 1, 1]], bool)
    stop = tuple(range(3, 64, 2))  # about half of the vocabulary stops a row: the loop ends early
    for sampling in (
        SamplingParams(max_new_tokens=5, temperature=0.0),
        SamplingParams(max_new_tokens=5, temperature=1.0, stop_token_ids=stop),
    ):
        outs = {}
        for layout in LAYOUTS:
            cfg = config.replace(decode_layout=layout)
            cache = init_cache(cfg, 2, 6 + sampling.max_new_tokens - 1)  # exactly the slots decode needs
            cache = jax.tree.map(lambda a: a + 7 if a.dtype == jnp.float32 else a, cache)  # stale data
            pre = prefill(params, cfg, tokens, mask, cache)
            outs[layout] = decode(
                params,
                cfg,
                pre.cache,
                pre.last_logits,
                pre.next_positions,
                jax.random.split(jax.random.key(4), 2),
                sampling,
            )
        a, b = outs["scan"], outs["unstacked"]
        np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
        assert not isinstance(b.cache.k, tuple)
        for field in ("k", "v", "positions", "valid", "length"):
            np.testing.assert_allclose(
                np.asarray(getattr(a.cache, field)),
                np.asarray(getattr(b.cache, field)),
                atol=1e-6,
                rtol=0,
                err_msg=field,
            )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_segment_program_unstacks_once_outside_its_loops(layout):
    """The agent's segment program: prefill keeps its layer scan (weights dynamic-sliced per layer, as they must
    be), and with 'unstacked' the per-layer split happens once, outside the chunk scan and the decode loop:
    no loop body holds a static slice of a weight, and only the prefill's layer scan slices weights."""
    from memagent_jax.agent import program
    from memagent_jax.agent.templates import FINAL_SLOTS, UPDATE_SLOTS, AgentPrompts, PromptLayout

    config = preset_config(
        "tiny",
        num_layers=3,
        hidden_size=96,
        intermediate_size=160,
        num_heads=6,
        num_kv_heads=2,
        head_dim=16,
        vocab_size=200,
        decode_layout=layout,
    )
    params = abstract_params(config)
    weights = {
        tuple(a.shape[1:])
        for path, a in jax.tree_util.tree_leaves_with_path(params["layers"])
        if str(path[-1].key).endswith("_proj")
    }

    budgets = AgentBudgets(question_tokens=8, chunk_tokens=24, memory_tokens=12, answer_tokens=4, chunks_per_segment=2)
    prompts = AgentPrompts(
        update=PromptLayout(pieces=((3, 4), (5,), (6, 7), (8,)), slots=UPDATE_SLOTS),
        final=PromptLayout(pieces=((3,), (4,), (5,)), slots=FINAL_SLOTS),
        initial_memory=(9, 10),
    )
    spec = program.AgentSpec(
        config=config,
        budgets=budgets,
        prompts=prompts,
        memory_sampling=SamplingParams(max_new_tokens=12, temperature=0.0),
        answer_sampling=SamplingParams(max_new_tokens=4, temperature=0.0),
    )
    b, s = 1, budgets.chunks_per_segment
    args = (
        params,
        spec,
        init_cache(config, b, spec.update_cache_slots),
        jnp.zeros((b,), jnp.int32),
        jnp.zeros((b, budgets.memory_tokens), jnp.int32),
        jnp.zeros((b,), jnp.int32),
        jnp.zeros((b, s, budgets.chunk_tokens), jnp.int32),
        jnp.zeros((b, s), jnp.int32),
        jax.random.split(jax.random.key(0), b),
        jnp.int32(0),
        RowSampling.build([None] * b, spec.memory_sampling),  # each row's sampling settings, [B] arrays
    )
    per_loop = [
        {(how, _drop_unit_lead(shape)) for how, shape in loop.sliced}
        for loop in _loops(program.segment_program.trace(*args).jaxpr)
    ]
    loops_slicing_weights = [found for found in per_loop if any(shape in weights for _, shape in found)]
    static_in_loops = [shape for found in per_loop for how, shape in found if how != "xs" and shape in weights]
    if layout == "scan":
        assert len(loops_slicing_weights) == 2  # the prefill's and the decode step's layer scans
    else:
        assert len(loops_slicing_weights) == 1, loops_slicing_weights  # the prefill's layer scan only
        assert not static_in_loops, static_in_loops  # the unstacking happens outside every loop
