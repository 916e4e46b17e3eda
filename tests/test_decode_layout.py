"""Decode layouts: 'unstacked' (per-layer weight arrays) vs 'scan' (stacked weights in a layer scan).

Both must sample the same tokens with the same log-probs (the maths is the same; only the weight layout
differs), the whole agent must give the same answers and traces, and the compiled decode loop of 'unstacked'
must read its weights in place (no slice or copy of a weight-shaped array inside the while body), where
'scan' slices every weight matrix out of the stack at every step.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_tiny import make_agent_model_dir, make_hf_model, save_hf_model
from memagent_jax.agent import AgentBudgets, MemoryAgent
from memagent_jax.data.tokenizer import load_tokenizer
from memagent_jax.models import ConfigError, ModelConfig, init_cache, init_params, load_hf_params, unstack_layers
from memagent_jax.models.presets import preset_config
from memagent_jax.models.transformer import forward
from memagent_jax.sampling import SamplingParams
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
    for sampling in (SamplingParams(max_new_tokens=9, temperature=0.0),
                     SamplingParams(max_new_tokens=9, temperature=1.0, top_p=0.9)):
        outs = {layout: _generate(params, config.replace(decode_layout=layout), tokens, mask, sampling, 1)
                for layout in LAYOUTS}
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
    budgets = AgentBudgets(question_tokens=24, chunk_tokens=16, memory_tokens=10, answer_tokens=6,
                           chunks_per_segment=2)
    rng = np.random.default_rng(2)
    docs = [rng.integers(3, len(agent_setup["tokenizer"]), n).astype(np.int32) for n in (40, 75)]
    questions = ["Where is the key?", "Name it."]
    sampling = SamplingParams(temperature=1.0)  # sampled (greedy is covered by test_layouts_decode_identically)
    results = {}
    for layout in LAYOUTS:
        agent = MemoryAgent(agent_setup["params"], agent_setup["config"].replace(decode_layout=layout),
                            agent_setup["tokenizer"], budgets=budgets, memory_sampling=sampling)
        results[layout] = agent.run(questions, docs, rng=11, trace=True, record=True)
    a, b = results["scan"], results["unstacked"]
    assert a.answer_ids == b.answer_ids and a.answers == b.answers
    assert a.traces == b.traces and sum(len(t) for t in a.traces) == 3 + 5
    for conv_a, conv_b in zip(a.conversations, b.conversations):
        assert len(conv_a) == len(conv_b)
        for x, y in zip(conv_a, conv_b):
            np.testing.assert_array_equal(x.response_ids, y.response_ids)
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------------- HLO


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, current = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head:
            current = comps.setdefault(head.group(1), [])
        elif current is not None and line.strip() not in ("", "}"):
            current.append(line.strip())
    return comps


def _reachable(comps, root):
    seen, stack = set(), [root]
    while stack:
        name = stack.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for line in comps[name]:
            for m in re.finditer(r"(?:body|condition|calls|to_apply|branch_computations)=\{?([%\w.\-, ]+)", line):
                stack += [n.strip().lstrip("%") for n in m.group(1).split(",")]
    return seen


_SLICE_RE = re.compile(r"%?[\w.\-]+ = \w+\[([\d,]*)\](?:\{[^}]*\})? (dynamic-slice|slice|copy)\(")


def _own_slices_per_while(hlo: str) -> list[list[tuple[str, tuple[int, ...]]]]:
    """For each while loop: (op, result shape) of the slices / copies in its body, fusions included but nested
    while loops excluded (they are listed as loops of their own)."""
    comps = _computations(hlo)
    out = []
    for lines in list(comps.values()):
        for line in lines:
            if " while(" not in line:
                continue
            seen, stack, found = set(), [re.search(r"body=%?([\w.\-]+)", line).group(1)], []
            while stack:
                name = stack.pop()
                if name in seen or name not in comps:
                    continue
                seen.add(name)
                for inner in comps[name]:
                    m = _SLICE_RE.match(inner)
                    if m:
                        found.append((m.group(2), tuple(int(d) for d in m.group(1).split(",") if d)))
                    if " while(" in inner:
                        continue
                    for m in re.finditer(r"(?:calls|to_apply|branch_computations)=\{?([%\w.\-, ]+)", inner):
                        stack += [n.strip().lstrip("%") for n in m.group(1).split(",")]
            out.append(found)
    return out


def _sliced_shapes_in_while_bodies(hlo: str) -> list[tuple[int, ...]]:
    """Result shapes of every dynamic-slice / slice / copy inside any while body (fusions included)."""
    comps = _computations(hlo)
    bodies = [re.search(r"body=%?([\w.\-]+)", line).group(1)
              for lines in comps.values() for line in lines if " while(" in line]
    shapes = []
    for name in set().union(*(_reachable(comps, b) for b in bodies)):
        for line in comps[name]:
            m = re.match(r"%?[\w.\-]+ = \w+\[([\d,]*)\](?:\{[^}]*\})? (dynamic-slice|slice|copy)\(", line)
            if m:
                shapes.append(tuple(int(d) for d in m.group(1).split(",") if d))
    return shapes


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_loop_reads_weights_in_place(layout):
    # Distinct sizes so no cache or activation shape equals a weight shape.
    config = preset_config("tiny", num_layers=3, hidden_size=96, intermediate_size=160, num_heads=6, num_kv_heads=2,
                           head_dim=16, vocab_size=200, decode_layout=layout)
    params = init_params(config, 0)
    weight_shapes = {tuple(a.shape[1:]) for path, a in jax.tree_util.tree_leaves_with_path(params["layers"])
                     if str(path[-1].key).endswith("_proj")}
    assert len(weight_shapes) == 5  # q, k/v, o, gate/up, down
    sampling = SamplingParams(max_new_tokens=4, temperature=0.0)
    cache = init_cache(config, 2, 12)
    pre = jax.jit(prefill, static_argnames="config")(params, config, jnp.ones((2, 8), jnp.int32),
                                                     jnp.ones((2, 8), bool), cache)
    keys = jax.random.split(jax.random.key(0), 2)
    run = jax.jit(decode, static_argnames=("config", "sampling"))
    hlo = run.lower(params, config, pre.cache, pre.last_logits, pre.next_positions, keys,
                    sampling).compile().as_text()
    sliced = {s[1:] if s[:1] == (1,) else s for s in _sliced_shapes_in_while_bodies(hlo)}
    hits = weight_shapes & sliced
    if layout == "scan":
        assert len(hits) == len(weight_shapes), hits  # every weight matrix sliced out per step
    else:
        assert not hits, f"weights sliced/copied inside the decode loop: {hits}"


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_loop_reads_the_kv_cache_in_place(layout, batch):
    """'unstacked' gives each layer its own cache buffer for the decode loop (`split_cache_layers`): no slice or
    copy of a layer's cache inside the loop, at batch 1 too (where a [B, K, S, Dh] buffer got its in-place
    write duplicated); 'scan' slices each layer's cache out of the [L, ...] stack at every token."""
    config = preset_config("tiny", num_layers=3, hidden_size=96, intermediate_size=160, num_heads=6, num_kv_heads=2,
                           head_dim=16, vocab_size=200, decode_layout=layout)
    params = init_params(config, 0)
    slots = 37  # no weight or activation has this size
    cache = init_cache(config, batch, slots)
    pre = jax.jit(prefill, static_argnames="config")(params, config, jnp.ones((batch, 8), jnp.int32),
                                                     jnp.ones((batch, 8), bool), cache)
    run = jax.jit(decode, static_argnames=("config", "sampling"))
    hlo = run.lower(params, config, pre.cache, pre.last_logits, pre.next_positions,
                    jax.random.split(jax.random.key(0), batch),
                    SamplingParams(max_new_tokens=6, temperature=0.0)).compile().as_text()
    cache_sized = [s for s in _sliced_shapes_in_while_bodies(hlo) if slots in s and np.prod(s) >= slots * 16]
    if layout == "scan":
        assert cache_sized, "expected the scanned decode step to slice each layer's cache out of the stack"
    else:
        assert not cache_sized, f"KV-cache buffers sliced/copied inside the decode loop: {cache_sized}"


def test_unstacked_decode_returns_the_stacked_cache_it_would_have_written():
    """The per-layer cache of the 'unstacked' decode loop is put back into the stacked layout: the same cache as
    'scan' returns, including when the loop stops early and when it uses every free slot."""
    config = preset_config("tiny", vocab_size=64, num_layers=2, hidden_size=32, intermediate_size=48,
                           num_heads=4, num_kv_heads=2, head_dim=8)
    params = init_params(config, 3)
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(3, 64, (2, 6)), jnp.int32)
    mask = jnp.asarray([[1] * 6, [0, 0, 1, 1, 1, 1]], bool)
    stop = tuple(range(3, 64, 2))  # about half of the vocabulary stops a row: the loop ends early
    for sampling in (SamplingParams(max_new_tokens=5, temperature=0.0),
                     SamplingParams(max_new_tokens=5, temperature=1.0, stop_token_ids=stop)):
        outs = {}
        for layout in LAYOUTS:
            cfg = config.replace(decode_layout=layout)
            cache = init_cache(cfg, 2, 6 + sampling.max_new_tokens - 1)  # exactly the slots decode needs
            cache = jax.tree.map(lambda a: a + 7 if a.dtype == jnp.float32 else a, cache)  # stale data
            pre = prefill(params, cfg, tokens, mask, cache)
            outs[layout] = decode(params, cfg, pre.cache, pre.last_logits, pre.next_positions,
                                  jax.random.split(jax.random.key(4), 2), sampling)
        a, b = outs["scan"], outs["unstacked"]
        np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
        assert not isinstance(b.cache.k, tuple)
        for field in ("k", "v", "positions", "valid", "length"):
            np.testing.assert_allclose(np.asarray(getattr(a.cache, field)), np.asarray(getattr(b.cache, field)),
                                       atol=1e-6, rtol=0, err_msg=field)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_segment_program_unstacks_once_outside_its_loops(layout):
    """The agent's segment program: prefill keeps its layer scan (weights dynamic-sliced per layer, as they must
    be), and with 'unstacked' the per-layer split happens once, outside the chunk scan and the decode loop:
    no loop body holds a static slice of a weight, and only the prefill's layer scan slices weights."""
    from memagent_jax.agent import program
    from memagent_jax.agent.templates import FINAL_SLOTS, UPDATE_SLOTS, AgentPrompts, PromptLayout

    config = preset_config("tiny", num_layers=3, hidden_size=96, intermediate_size=160, num_heads=6, num_kv_heads=2,
                           head_dim=16, vocab_size=200, decode_layout=layout)
    params = init_params(config, 0)
    weights = {tuple(a.shape[1:]) for path, a in jax.tree_util.tree_leaves_with_path(params["layers"])
               if str(path[-1].key).endswith("_proj")}

    budgets = AgentBudgets(question_tokens=8, chunk_tokens=24, memory_tokens=12, answer_tokens=4, chunks_per_segment=2)
    prompts = AgentPrompts(update=PromptLayout(pieces=((3, 4), (5,), (6, 7), (8,)), slots=UPDATE_SLOTS),
                           final=PromptLayout(pieces=((3,), (4,), (5,)), slots=FINAL_SLOTS), initial_memory=(9, 10))
    spec = program.AgentSpec(config=config, budgets=budgets, prompts=prompts,
                             memory_sampling=SamplingParams(max_new_tokens=12, temperature=0.0),
                             answer_sampling=SamplingParams(max_new_tokens=4, temperature=0.0))
    b, s = 1, budgets.chunks_per_segment
    args = (params, spec, init_cache(config, b, spec.update_cache_slots), jnp.zeros((b,), jnp.int32),
            jnp.zeros((b, budgets.memory_tokens), jnp.int32), jnp.zeros((b,), jnp.int32),
            jnp.zeros((b, s, budgets.chunk_tokens), jnp.int32), jnp.zeros((b, s), jnp.int32),
            jax.random.split(jax.random.key(0), b), jnp.int32(0))
    hlo = program.segment_program.lower(*args).compile().as_text()
    per_loop = [{(op, shape[1:] if shape[:1] == (1,) else shape) for op, shape in found}
                for found in _own_slices_per_while(hlo)]
    loops_slicing_weights = [found for found in per_loop if any(shape in weights for _, shape in found)]
    static_in_loops = [shape for found in per_loop for op, shape in found if op == "slice" and shape in weights]
    if layout == "scan":
        assert len(loops_slicing_weights) == 2  # the prefill's and the decode step's layer scans
    else:
        assert len(loops_slicing_weights) == 1, loops_slicing_weights  # the prefill's layer scan only
        assert not static_in_loops, static_in_loops  # the unstacking was not sunk into a loop
