"""The capacity planner: its arithmetic against hand computations and the real model / sharding / cache code, the
shipped scale-out configs (valid, and they fit their hardware), a config that does not fit, and the CLI."""

import contextlib
import importlib.util
import io
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from memagent_jax import plan, planning
from memagent_jax.models import presets, sharding
from memagent_jax.models.config import ModelConfig
from memagent_jax.models.transformer import abstract_params
from memagent_jax.rl.recipe import validate_config

ROOT = os.path.join(os.path.dirname(__file__), "..")
SCALE_CONFIGS = ["qwen2_5_7b_hotpotqa.py", "qwen2_5_14b_hotpotqa.py", "qwen3_8b_hotpotqa.py", "qwen3_4b_hotpotqa.py"]


def load_config_module(name):
    return importlib.import_module(f"memagent_jax.configs.{name[:-3]}")


TINY = presets.preset_config("tiny")
# Hand-built: llama with every optional bias, untied head, head_dim independent of the width.
LLAMA_BIAS = ModelConfig(
    model_type="llama",
    vocab_size=96,
    hidden_size=48,
    intermediate_size=80,
    num_layers=3,
    num_heads=6,
    num_kv_heads=3,
    head_dim=10,
    attention_bias=True,
    attention_out_bias=True,
    mlp_bias=True,
    tie_word_embeddings=False,
)
QWEN3_SMALL = presets.preset_config(
    "qwen3-8b",
    num_layers=2,
    hidden_size=64,
    intermediate_size=96,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    vocab_size=128,
)


def _flat(tree):
    return {
        tuple(getattr(k, "key", k) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


# ------------------------------------------------------------------------------------ params


@pytest.mark.parametrize("mc", [TINY, LLAMA_BIAS, QWEN3_SMALL], ids=["tiny", "llama-bias", "qwen3"])
def test_param_shapes_are_the_models(mc):
    real = {k: tuple(v.shape) for k, v in _flat(abstract_params(mc)).items()}
    assert planning.param_shapes(mc) == real
    assert planning.param_count(mc) == mc.num_params()


def test_param_count_of_tiny_by_hand_and_init():
    # embed 512 x 64; per layer q/o 64*4*16 each, k/v 64*2*16 each, biases 64 + 32 + 32, mlp 3 * 64 * 128,
    # two norms 2 * 64; final norm 64; tied head.
    per_layer = 2 * 4096 + 2 * 2048 + 64 + 32 + 32 + 3 * 64 * 128 + 2 * 64
    assert planning.param_count(TINY) == 512 * 64 + 2 * per_layer + 64 == 107072
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(TINY))) == 107072
    # matmul weights at one position: layers (q, k, v, o, gate, up, down) + the (tied) LM head
    assert planning.matmul_params(TINY) == 2 * (2 * 4096 + 2 * 2048 + 3 * 64 * 128) + 64 * 512


def test_param_bytes_per_device_by_hand():
    mesh = planning.MeshShape(data=1, fsdp=2, tensor=2)
    # per-device elements: embed [V/t, D/f], norms replicated, q/o [L, D/f, H/t, Dh], k/v [L, D/f, K/t, Dh],
    # biases [L, H/t or K/t, Dh], gate/up [L, D/f, F/t], down [L, F/t, D/f]
    elements = (
        256 * 32
        + 64
        + 2 * 128
        + 2 * (2 * 32 * 2 * 16)
        + 2 * (2 * 32 * 1 * 16)
        + 2 * 2 * 16
        + 2 * (2 * 16)
        + 3 * (2 * 32 * 64)
    )
    assert elements == 27072
    assert planning.param_bytes_per_device(TINY, mesh, "float32") == 4 * elements
    assert planning.param_bytes_per_device(TINY, mesh, "bfloat16") == 2 * elements
    # 2 KV heads on tensor=4: replicated over 'tensor' (the sharding module's fallback)
    wide = planning.MeshShape(1, 2, 4)
    assert planning.local_numel((2, 64, 2, 16), ("layer", "embed", "kv_heads", "head_dim"), wide) == 2 * 32 * 2 * 16
    assert planning.local_numel((2, 64, 4, 16), ("layer", "embed", "q_heads", "head_dim"), wide) == 2 * 32 * 1 * 16


@pytest.mark.parametrize("sizes", [(2, 2, 2), (1, 4, 2), (1, 2, 4), (1, 8, 1)])
def test_param_bytes_match_real_shardings(sizes):
    mesh = sharding.make_mesh(*sizes)
    for mc in (TINY, LLAMA_BIAS, QWEN3_SMALL):
        ap = abstract_params(mc)
        shardings = sharding.param_shardings(ap, mesh)
        real = sum(
            math.prod(s.shard_shape(a.shape)) * 4 for a, s in zip(jax.tree.leaves(ap), jax.tree.leaves(shardings))
        )
        assert planning.param_bytes_per_device(mc, planning.MeshShape(*sizes), "float32") == real


# ------------------------------------------------------------------------------------ KV cache


def test_kv_cache_bytes_by_hand_and_real_cache():
    from memagent_jax.sampling.api import new_cache

    mesh = planning.MeshShape(1, 2, 2)
    # 8 rows over 2 batch shards = 4 per device; 2 KV heads over tensor 2 = 1; k and v [L, 4, 1, 100, 16] bf16,
    # positions int32 + valid bool [4, 100]
    expected = 2 * (2 * 4 * 1 * 100 * 16) * 2 + 4 * 100 * 5
    assert planning.kv_cache_bytes(TINY, 8, 100, mesh, "bfloat16") == expected == 53200
    cache = new_cache(TINY, 8, 100, mesh=sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4]), dtype="bfloat16")
    device = jax.devices()[0]
    real = sum(
        s.data.nbytes
        for leaf in jax.tree.leaves(cache)
        if leaf.ndim
        for s in leaf.addressable_shards
        if s.device == device
    )
    assert real == expected


def test_layout_of_the_reference_budgets():
    lay = planning.Layout()
    assert (lay.prefix, lay.rest, lay.update_slots) == (1024 + 128, 1024 + 5000 + 64, 1152 + 6088 + 1024)
    assert (lay.final_prompt, lay.final_slots) == (128 + 1024 + 1024, 2176 + 1024)
    assert lay.learn_length() == 8320  # 8264 rounded up to 64
    assert lay.chunks(32000) == 7 and lay.computed_chunk_steps(32000) == 8  # 2 segments of 4
    assert lay.chunks(28000) == 6


# ------------------------------------------------------------------------------------ FLOPs


def test_learning_flops_by_hand():
    t, rows = 1024, 6
    mm = 2 * (2 * 4096 + 2 * 2048 + 3 * 64 * 128) + 64 * 512  # layers + tied LM head
    attn = 4 * 2 * 4 * 16 * t  # 4 x L x H x Dh x T
    fwd = 2 * mm + attn
    f = planning.learning_flops(TINY, rows * t, t, remat="full", reference=True, recompute_old=False)
    assert f["train"] == 3 * fwd * rows * t
    layers_fwd = 2 * (mm - 64 * 512) + attn
    assert f["remat"] == (layers_fwd + 2 * 64 * 512) * rows * t  # layers recomputed + logits chunks recomputed
    assert f["reference"] == fwd * rows * t and f["old_logprobs"] == 0
    assert f["total"] == f["train"] + f["remat"] + f["reference"]
    none = planning.learning_flops(TINY, rows * t, t, remat="none", reference=False, recompute_old=True, logits_chunk=0)
    assert none["remat"] == 0 and none["reference"] == 0 and none["old_logprobs"] == fwd * rows * t
    # The LM head on a 64-position response window per row, the layers on every position.
    w = planning.learning_flops(TINY, rows * t, t, remat="full", reference=True, recompute_old=False, head_positions=64)
    windowed_fwd = layers_fwd * rows * t + 2 * 64 * 512 * rows * 64
    assert w["train"] == 3 * windowed_fwd and w["reference"] == windowed_fwd
    assert w["remat"] == layers_fwd * rows * t  # one logits chunk: nothing recomputed


def test_rollout_flops_by_hand():
    lay = planning.Layout(
        question=8,
        memory=4,
        chunk=16,
        answer=2,
        chunks_per_segment=2,
        prefix_template=3,
        rest_template=5,
        final_template=6,
    )
    su, sf = 3 + 8 + 4 + 16 + 5 + 4, 6 + 8 + 4 + 2
    layers = 2 * 2 * (2 * 4096 + 2 * 2048 + 3 * 64 * 128)  # 2 FLOPs x 2 layers' matmul weights
    lm = 64 * 512
    per_key = 4 * 2 * 4 * 16  # 4 x L x H x Dh

    def prefill_flops(tokens, keys):  # every token through the layers, logits of the last one only
        return tokens * (layers + per_key * keys) + 2 * lm

    doc = 40  # 3 chunks of 16 -> 2 segments of 2 -> 4 computed chunk steps
    prefill = prefill_flops(11, su) + 4 * prefill_flops(25, su) + prefill_flops(18, sf)
    decode = 3 * 4 * (layers + 2 * lm + per_key * su) + 2 * (layers + 2 * lm + per_key * sf)
    f = planning.rollout_flops(TINY, 10, lay, doc)
    assert f["prefill"] == 10 * prefill and f["decode"] == 10 * decode


# ------------------------------------------------------------------------------------ activations


@pytest.mark.parametrize("tensor", [1, 2])
def test_learner_activations_by_tensor_inventory(tensor):
    """The learner's activation bytes (materialised attention, remat 'full') against an inventory of the tensors
    they stand for, each with its shape and dtype: what the forward keeps, the layer being differentiated, and the
    arrays around the layer stack. With tensor = 2 the heads (2 KV heads divide it), the MLP width and the vocabulary
    are split, the model width is not."""
    mc = TINY  # D 64, F 128, 4 query heads over 2 KV heads of 16, V 512, 2 layers
    rows, t, chunk = 3, 256, 128
    d, layers = mc.hidden_size, mc.num_layers
    heads, kv, dh = mc.num_heads // tensor, mc.num_kv_heads // tensor, mc.head_dim
    f, v = mc.intermediate_size // tensor, mc.vocab_size // tensor
    bf16, f32, boolean = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32), jnp.dtype(bool)

    def size(dtype, *shape):
        return dtype.itemsize * math.prod(shape)

    # One layer's forward values besides the scores, in the compute dtype (one row).
    layer = sum(
        size(bf16, *shape)
        for shape in [
            (t, d),
            (t, d),
            (t, d),
            (t, d),  # x, attn_norm(x), x + attention, mlp_norm(x + attention)
            (t, heads, dh),
            (t, kv, heads // kv, dh),
            (t, heads, dh),  # q, q grouped by KV head, attention output
            (t, kv, dh),
            (kv, dh, t),
            (t, kv, dh),  # k, k transposed, v
            (t, f),
            (t, f),
            (t, f),  # gate, up, silu(gate) * up
        ]
    )
    scores = (heads, t, t)
    # The softmax's backward: d(probs) in the compute dtype and in f32, d(scores) in f32.
    softmax_backward = size(bf16, *scores) + size(f32, *scores) + size(f32, *scores)
    expected = {
        "kept_layers": layers * size(bf16, t, d),  # remat 'full' keeps each layer's input only
        "working_layer": softmax_backward + 2 * layer,  # the recomputed forward and the backward's temporaries
        "top": (
            size(boolean, t, t)  # the attention mask
            + 4 * size(bf16, t, d)  # embedding output, last layer's output, final norm, hidden
            + size(f32, t, d)  # the hidden's gradient
            + 3 * size(f32, chunk, v)
        ),  # one log-prob chunk: logits, probabilities, their gradient
    }
    act = planning.learner_activation_bytes(mc, rows, t, "full", tensor, bf16.itemsize, logits_chunk=chunk)
    assert {key: act[key] for key in expected} == {key: rows * value for key, value in expected.items()}
    assert act["total"] == rows * sum(expected.values())
    with pytest.raises(planning.PlanError, match="remat"):
        planning.learner_activation_bytes(mc, 1, t, "some", 1, 2)


@pytest.mark.slow  # five compiles: ~25 s on an idle 2-core machine
@pytest.mark.parametrize("remat", ["none", "full"])
def test_learner_activations_per_row_and_layer_track_xla(remat):
    """What one more row (and, remat 'none', one more layer) of a learner step adds to XLA's temporaries (CPU) against
    what it adds to the planner's activation bytes: within [0.6, 1.5]. The differences leave out everything that
    does not grow with the rows (params, gradients, weights in flight), so they test the activation formula alone,
    with no constant of it repeated here."""
    from memagent_jax.rl.logprobs import token_logprobs

    t, chunk = 256, 128

    def model(layers):
        return ModelConfig(
            model_type="qwen2",
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_layers=layers,
            num_heads=8,
            num_kv_heads=2,
            head_dim=16,
            attention_bias=True,
            param_dtype="float32",
            compute_dtype="bfloat16",
            remat=remat,
            attention_impl="materialized",
        )

    def xla_temp_bytes(mc, rows, window=0):
        def loss(p, tok, mask):
            kw = dict(response_start=jnp.full((rows,), t - window), response_window=window) if window else {}
            lp, ent = token_logprobs(p, tok, mask, config=mc, chunk_size=chunk, with_entropy=True, **kw)
            return jnp.sum(lp) + jnp.sum(ent)

        spec = jax.ShapeDtypeStruct((rows, t), jnp.int32), jax.ShapeDtypeStruct((rows, t), bool)
        compiled = jax.jit(jax.grad(loss)).lower(abstract_params(mc), *spec).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    def planned(mc, rows, window=None):
        return planning.learner_activation_bytes(mc, rows, t, remat, 1, 2, logits_chunk=chunk, head_positions=window)[
            "total"
        ]

    two = model(2)
    base = xla_temp_bytes(two, 2)
    per_row = (xla_temp_bytes(two, 4) - base) / 2
    assert 0.6 < per_row / ((planned(two, 4) - planned(two, 2)) / 2) < 1.5, (per_row, planned(two, 1))
    # The LM head on a 32-position response window.
    per_row = (xla_temp_bytes(two, 4, 32) - xla_temp_bytes(two, 2, 32)) / 2
    expected = (planned(two, 4, 32) - planned(two, 2, 32)) / 2
    assert 0.6 < per_row / expected < 1.5, (per_row, expected)
    if remat == "none":  # every layer keeps its scores and activations for the backward
        four = model(4)
        per_layer = (xla_temp_bytes(four, 2) - base) / 2
        expected = (planned(four, 2) - planned(two, 2)) / 2
        assert 0.6 < per_layer / expected < 1.5, (per_layer, expected)


def _assert_estimates_track_xla(mc, rows: int, t: int, prefix_template: int) -> dict:
    """The planner's estimates against XLA's own buffer assignment of the compiled programs (CPU): within [0.6, 1.5]
    of it for a learner step of `rows` x `t` tokens (chunked log-probs) and for the prefill of a chunk step of `t`
    tokens over `t + prefix_template` cache slots. Returns the rollout estimate."""
    from memagent_jax.models.transformer import init_cache
    from memagent_jax.rl.logprobs import token_logprobs
    from memagent_jax.sampling.sampler import prefill

    ap = abstract_params(mc)

    def loss(p, tok, mask):
        lp, ent = token_logprobs(p, tok, mask, config=mc, chunk_size=128, with_entropy=True)
        return jnp.sum(lp) + jnp.sum(ent)

    spec = jax.ShapeDtypeStruct((rows, t), jnp.int32), jax.ShapeDtypeStruct((rows, t), bool)
    learn = jax.jit(jax.grad(loss)).lower(ap, *spec).compile().memory_analysis()
    grads = planning.param_bytes_per_device(mc, planning.MeshShape(1, 1, 1), "float32")
    act = planning.learner_activation_bytes(mc, rows, t, "full", 1, 2, logits_chunk=128)
    est = act["total"] + planning.working_weight_bytes(mc, 1, 4, 2) + grads
    assert 0.6 < learn.temp_size_in_bytes / est < 1.5, (learn.temp_size_in_bytes, est)

    lay = planning.Layout(
        question=1, memory=1, chunk=t - 2, answer=1, prefix_template=prefix_template, rest_template=0, final_template=1
    )  # rest = t tokens over t + prefix_template slots
    cache = jax.eval_shape(lambda: init_cache(mc, rows, lay.update_slots))
    tok = jax.ShapeDtypeStruct((rows, lay.rest), jnp.int32), jax.ShapeDtypeStruct((rows, lay.rest), bool)
    fill = jax.jit(lambda p, a, b, kv: prefill(p, mc, a, b, kv), donate_argnums=(3,))
    roll = fill.lower(ap, *tok, cache).compile().memory_analysis()
    ro = planning.rollout_activation_bytes(mc, rows, lay, 1, 2)
    est = ro["total"] + planning.working_weight_bytes(mc, 1, 4, 2)
    assert 0.6 < roll.temp_size_in_bytes / est < 1.5, (roll.temp_size_in_bytes, est)
    return ro


@pytest.mark.slow  # two compiles: ~5 s on an idle 2-core machine
def test_estimates_track_xla_memory_analysis():
    """The activation estimates against XLA's memory analysis: a learner step (remat full, chunked log-probs) and a
    chunk-step prefill, 512 tokens (the prefill: 512 tokens over 768 slots)."""
    mc = ModelConfig(
        model_type="qwen2",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=8,
        num_kv_heads=2,
        head_dim=16,
        attention_bias=True,
        param_dtype="float32",
        compute_dtype="bfloat16",
        remat="full",
    )
    _assert_estimates_track_xla(mc, rows=2, t=512, prefix_template=254)


def test_blockwise_activation_formula_by_hand():
    mc = TINY.replace(attention_impl="blockwise", attention_block_size=100, attention_query_block_size=60)
    c, t = 2, 256
    layer = planning.layer_activation_bytes(mc, t, 300, 1, c, "blockwise")
    assert layer["score_elements"] == 4 * 60 * 100  # H x query block x key block, not H x T x S
    assert layer["mask"] == 0
    assert layer["flash_forward"] == t * (4 * 4 * 16 + 8 * 4)
    assert layer["flash_backward"] == t * (8 * 4 * 16 + 4 * 4) + 300 * 8 * 2 * 16
    mat = planning.layer_activation_bytes(mc, t, 300, 1, c)
    assert mat["score_elements"] == 4 * t * 300 and mat["mask"] == t * 300 and mat["other"] == layer["other"]
    cudnn = planning.layer_activation_bytes(mc, t, 300, 1, c, "cudnn")
    assert cudnn["score_elements"] == 0 and cudnn["mask"] == (1 + c) * t * 300
    # the learner on the blockwise path: no [T, T] mask on top, 20 B per block element in the working layer
    act = planning.learner_activation_bytes(mc, 1, t, "full", 1, c, logits_chunk=256, platform="tpu")
    sq = planning.layer_activation_bytes(mc, t, t, 1, c, "blockwise")
    assert act["working_layer"] == (
        20 * sq["score_elements"] + sq["flash_forward"] + sq["flash_backward"] + 2 * sq["other"]
    )
    assert act["top"] == 4 * c * t * 64 + 4 * t * 64 + 12 * 256 * 512
    with pytest.raises(planning.PlanError, match="attention path"):
        planning.layer_activation_bytes(mc, t, t, 1, c, "flash")


def test_splash_activation_formula_by_hand():
    """The splash path (TPU 'auto'): no [T, S] array, one head's 128-multiple block, the lane-padded
    log-sum-exp; a cached prefill (S > T) adds the second call over the earlier slots and the padded k/v copy."""
    mc = TINY.replace(attention_impl="splash", attention_block_size=100, attention_query_block_size=200)
    c, t, s = 2, 300, 700
    h, k, dh = mc.num_heads, mc.num_kv_heads, mc.head_dim
    tp, sp = 512, 768  # blocks 256 x 128: T padded to 512 (lcm 256); S to 768
    self_attn = planning.layer_activation_bytes(mc, t, t, 1, c, "splash")
    assert self_attn["score_elements"] == 256 * 128 and self_attn["mask"] == 0
    tp_self = 512  # T = 300 with block_q 256
    assert self_attn["flash_forward"] == tp_self * (2 * c * h * dh + 512 * h + 4)
    assert self_attn["flash_kept"] == tp_self * (2 * c * h * dh + 4 * h)
    assert self_attn["flash_backward"] == tp_self * (4 * h + 2 * c * h * dh + 2 * c * k * dh)
    cached = planning.layer_activation_bytes(mc, t, s, 1, c, "splash")
    assert (
        cached["flash_forward"]
        == tp * (2 * c * h * dh + 512 * h + 4) + tp * (c * h * dh + 512 * h + 8 * h * dh) + sp * 2 * c * k * dh
    )
    materialized = planning.layer_activation_bytes(mc, t, s, 1, c, "materialized")
    assert cached["flash_forward"] + 8 * cached["score_elements"] < 8 * materialized["score_elements"]
    act = planning.learner_activation_bytes(mc, 1, t, "full", 1, c, logits_chunk=256, platform="tpu")
    blockwise = planning.learner_activation_bytes(
        mc.replace(attention_impl="blockwise"), 1, t, "full", 1, c, logits_chunk=256, platform="tpu"
    )
    working = 16 * 256 * 128 + self_attn["flash_forward"] + self_attn["flash_backward"] + 2 * self_attn["other"]
    assert act["working_layer"] == working and act["top"] == blockwise["top"]  # no [T, T] mask on top either
    with pytest.raises(planning.PlanError, match="'splash'"):
        planning.layer_activation_bytes(mc, t, t, 1, c, "paged")


def test_attention_path_follows_config_and_hardware():
    mc = presets.preset_config("qwen2.5-7b-instruct").replace(compute_dtype="bfloat16")
    assert planning.attention_path(mc, "tpu", 8320, 8320) == "splash"
    assert planning.attention_path(mc, "cpu", 8320, 8320) == "blockwise"
    assert planning.attention_path(mc, "gpu", 8320, 8320) == "cudnn"
    assert planning.attention_path(mc.replace(compute_dtype="float32"), "gpu", 8320, 8320) == "blockwise"
    assert planning.attention_path(mc.replace(attention_impl="materialized"), "tpu", 8320, 8320) == "materialized"
    assert planning.attention_path(mc, "tpu", 1, 8320) == "materialized"  # decode
    assert (
        planning.platform_of(planning.get_hardware("v5p")) == "tpu"
        and planning.platform_of(planning.get_hardware("h100")) == "gpu"
    )
    cfg = load_config_module("qwen2_5_7b_hotpotqa.py").get_config("v5p-128")
    auto = planning.make_plan(cfg)
    assert (auto.settings["rollout_attention"], auto.settings["learner_attention"]) == ("splash", "splash")
    cfg.model.attention_impl = "materialized"
    mat = planning.make_plan(cfg)
    assert mat.settings["learner_attention"] == "materialized"
    # the rollout's chunk prefill: 6088 tokens x 8264 slots of materialised scores vs one 512 x 512 block
    assert mat.memory["rollout_activations"] > 4 * auto.memory["rollout_activations"]
    cfg.model.attention_impl = "flash"
    with pytest.raises(planning.PlanError, match="attention_impl"):
        planning.make_plan(cfg)
    gpu = planning.make_plan(load_config_module("qwen2_5_7b_hotpotqa.py").get_config("8xh100"))
    assert gpu.settings["learner_attention"] == "cudnn"


def test_old_logprob_pass_counted_only_with_several_updates_per_step():
    """The reference recipe (16 updates per step) recomputes the old log-probs in a forward pass of their own; with
    one update per step the loss reads its own log-probs, so the plan counts no such pass."""
    cfg = load_config_module("qwen2_5_7b_hotpotqa.py").get_config("8xh100")
    several = planning.make_plan(cfg).flops
    assert cfg.rl.recompute_old_logprobs and several["learning_old_logprobs"] == several["learning_reference"] > 0
    cfg.rl.num_minibatches = 1
    one = planning.make_plan(cfg).flops
    assert one["learning_old_logprobs"] == 0
    assert one["learning"] == several["learning"] - several["learning_old_logprobs"]


@pytest.mark.slow  # four compiles: ~15 s on an idle 2-core machine
@pytest.mark.parametrize("block", [128, 256])
def test_blockwise_estimates_track_xla_memory_analysis(block):
    """The blockwise path's estimates against XLA's buffer assignment (CPU), as for the materialised path: a
    learner step (remat full, chunked log-probs) and a chunk-step prefill, 1024 tokens (the prefill over 1536
    slots), blocks of 128 / 256."""
    mc = ModelConfig(
        model_type="qwen2",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=8,
        num_kv_heads=2,
        head_dim=16,
        attention_bias=True,
        param_dtype="float32",
        compute_dtype="bfloat16",
        remat="full",
        attention_impl="blockwise",
        attention_block_size=block,
        attention_query_block_size=block,
    )
    assert _assert_estimates_track_xla(mc, rows=2, t=1024, prefix_template=510)["path"] == "blockwise"


# ------------------------------------------------------------------------------------ shipped configs


CASES = [(name, arg) for name in SCALE_CONFIGS for arg in load_config_module(name).HARDWARE]


@pytest.mark.parametrize("name,arg", CASES, ids=[f"{n[:-3]}:{a}" for n, a in CASES])
def test_shipped_config_is_valid_and_fits(name, arg):
    cfg = load_config_module(name).get_config(arg)
    assert cfg.model.preset in presets.PRESETS and cfg.model.path == ""
    planning.get_hardware(cfg.hardware)
    devices = cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor
    validate_config(cfg, device_count=devices, check_files=False)
    # the reference recipe
    rl, agent = cfg.rl, cfg.agent
    assert (rl.group_size, rl.num_minibatches, rl.learning_rate, rl.kl_coef) == (16, 16, 1e-6, 0.001)
    assert (rl.clip_low, rl.clip_high, rl.dual_clip) == (0.2, 0.2, 3.0)
    assert rl.questions_per_step == (256 if "14b" in name else 128)
    assert (agent.question_tokens, agent.chunk_tokens, agent.memory_tokens, agent.answer_tokens) == (
        1024,
        5000,
        1024,
        1024,
    )
    assert (cfg.model.param_dtype, cfg.model.compute_dtype, cfg.model.remat) == ("float32", "bfloat16", "full")
    trajectories = rl.questions_per_step * rl.group_size
    assert trajectories % rl.rollout_batch_size == 0 and rl.micro_batch_size == cfg.mesh.data * cfg.mesh.fsdp
    p = planning.make_plan(cfg, name=f"{name}:{arg}")
    assert p.fits, p.verdict
    assert p.verdict.startswith("fits")
    assert p.memory["peak"] <= 0.8 * p.usable_bytes  # the configs keep a 20% margin
    assert not [w for w in p.warnings if "param_dtype" in w or "does not divide" in w]
    # arg names the device count: v5p-N = N / 2 chips, KxhNNN = K GPUs
    expected = int(arg.split("-")[1]) // 2 if arg.startswith("v5p") else int(arg.split("x")[0])
    assert devices == expected


def test_unknown_hardware_argument_is_an_error():
    with pytest.raises(ValueError, match="known: v5p-64"):
        load_config_module("qwen2_5_7b_hotpotqa.py").get_config("v4-8")


def test_config_that_does_not_fit_says_so():
    cfg = load_config_module("qwen2_5_14b_hotpotqa.py").get_config("v5p-128")
    cfg.mesh.fsdp, cfg.rl.micro_batch_size = 1, 1  # 8 devices
    p = planning.make_plan(cfg, hardware="tpu-v5e")
    assert not p.fits
    assert p.verdict.startswith("DOES NOT FIT: ")
    assert "GiB of 14.4 GiB per device" in p.verdict and ", try " in p.verdict
    assert p.memory["peak"] > 14.4 * planning.GiB


def test_suggestions_make_it_fit():
    cfg = load_config_module("qwen2_5_7b_hotpotqa.py").get_config("v5p-128")
    cfg.rl.rollout_batch_size = 0  # the whole step's rollout in one call: far too big with materialised scores
    cfg.model.remat = "none"
    cfg.model.attention_impl = "materialized"
    p = planning.make_plan(cfg)
    assert not p.fits and p.suggestions
    flags = dict(f[len("--config.") :].split("=") for f in p.suggestions[0].split())
    assert flags["model.attention_impl"] == "auto"
    fixed = cfg.copy_and_resolve_references()
    fixed.model.remat = flags.pop("model.remat", fixed.model.remat)
    fixed.model.attention_impl = flags.pop("model.attention_impl")
    for key, value in flags.items():
        section, field = key.split(".")
        fixed[section][field] = int(value)
    assert planning.make_plan(fixed).fits


def test_rollout_on_its_own_devices():
    """config.mesh.rollout_devices > 0 (train.py's separate rollout mesh): KV caches, rollout activations and a
    params copy (old + new) on the rollout devices, the optimiser state on the learner's."""
    cfg = load_config_module("qwen2_5_7b_hotpotqa.py").get_config("v5p-128")
    cfg.mesh.fsdp, cfg.rl.micro_batch_size = 8, 8  # learner: 32 devices
    cfg.mesh.rollout_devices, cfg.mesh.rollout_fsdp, cfg.mesh.rollout_tensor = 32, 2, 4
    cfg.rl.rollout_batch_size = 128  # 16 rows per rollout device
    p = planning.make_plan(cfg)
    rmesh = planning.MeshShape(4, 2, 4)
    assert p.rollout_mesh == rmesh and p.settings["devices"] == 64
    mc = p.model
    assert p.memory["rollout_params"] == 2 * planning.param_bytes_per_device(mc, rmesh, "float32")
    assert p.memory["kv_update"] == planning.kv_cache_bytes(mc, 128, p.layout.update_slots, rmesh, "bfloat16")
    assert p.memory["persistent"] == p.memory["params"] + p.memory["optimizer"] + p.memory["reference"]
    assert p.memory["rollout_peak"] == (
        p.memory["rollout_params"] + p.memory["kv_update"] + p.memory["kv_final"] + p.memory["rollout_activations"]
    )
    assert p.fits
    cfg.mesh.rollout_fsdp = 3
    with pytest.raises(planning.PlanError, match="must divide config.mesh.rollout_devices=32"):
        planning.make_plan(cfg)


def test_bf16_params_with_tiny_learning_rate_warns():
    cfg = load_config_module("qwen3_4b_hotpotqa.py").get_config("v5p-64")
    cfg.model.param_dtype = "bfloat16"
    p = planning.make_plan(cfg)
    assert any("half an ulp" in w for w in p.warnings)


def test_bad_hardware_and_mesh_are_errors():
    cfg = load_config_module("qwen3_8b_hotpotqa.py").get_config("v5p-64")
    with pytest.raises(planning.PlanError, match="unknown hardware 'tpu-v9'"):
        planning.make_plan(cfg, hardware="tpu-v9")
    cfg.mesh.fsdp = -1
    with pytest.raises(planning.PlanError, match="--devices"):
        planning.make_plan(cfg)
    assert planning.make_plan(cfg, devices=32).mesh == planning.MeshShape(1, 4, 8)


# ------------------------------------------------------------------------------------ CLI


def _run_main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = plan.main(["plan"] + argv)
    return code, out.getvalue(), err.getvalue()


def test_cli_json_and_overrides():
    config = os.path.join(ROOT, "configs", "qwen2_5_7b_hotpotqa.py") + ":8xh100"
    code, out, _ = _run_main([f"--config={config}", "--json", "--mfu=0.5"])
    assert code == 0
    data = json.loads(out)
    assert data["fits"] and data["devices"] == 8 and data["hardware"]["name"] == "h100-80gb"
    assert data["settings"]["mfu"] == 0.5 and data["memory_bytes"]["peak"] <= data["usable_bytes"]
    code, out, _ = _run_main([f"--config={config}", "--config.rl.rollout_batch_size=0"])
    assert code == 1 and "verdict: DOES NOT FIT: the rollout" in out


def test_cli_errors():
    config = os.path.join(ROOT, "configs", "grpo.py")
    code, _, err = _run_main([f"--config={config}:cpu", "--hardware=tpu-v4", "--devices=8"])
    assert code == 2 and "config.model.preset" in err
    code, out, _ = _run_main([f"--config={config}:cpu", "--config.model.preset=tiny", "--hardware=v4", "--devices=8"])
    assert code == 0 and "verdict: fits" in out
    code, _, err = _run_main(
        [
            f"--config={config}:cpu",
            "--config.model.preset=tiny",
            "--hardware=v4",
            "--devices=8",
            "--config.rl.group_size=0",
        ]
    )
    assert code == 2 and "config.rl.group_size must be positive" in err
    code, _, err = _run_main([f"--config={config}:cpu", "--config.model.preset=tiny", "--hardware=v4"])
    assert code == 2 and "--devices" in err
    code, _, err = _run_main(["--hardware=v4"])
    assert code == 2 and "--config is required" in err


def test_cli_subprocess():
    env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "memagent_jax.plan", "--config", "configs/qwen3_8b_hotpotqa.py:v5p-128"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "memory per device" in result.stdout and "verdict: fits" in result.stdout


def test_unstacked_decode_layout_counts_its_copies():
    """decode_layout 'unstacked' ('auto' on GPUs, measured faster there) holds per-layer copies of the layer
    weights and a second KV cache while a decode program runs; 'scan' (set by hand, or 'auto' on TPUs) copies
    nothing."""
    from memagent_jax.models.sharding import PARAM_LOGICAL_AXES

    cfg = load_config_module("qwen2_5_7b_hotpotqa.py").get_config("8xh100")
    unstacked = planning.make_plan(cfg)
    cfg.model.decode_layout = "scan"
    scan = planning.make_plan(cfg)
    assert scan.settings["decode_layout"] == "scan" and unstacked.settings["decode_layout"] == "unstacked"
    mc = presets.preset_config("qwen2.5-7b-instruct")
    assert planning.decode_layout_of(mc, "gpu") == "unstacked" and planning.decode_layout_of(mc, "tpu") == "scan"
    assert planning.decode_layout_of(mc.replace(decode_layout="scan"), "gpu") == "scan"
    assert scan.memory["decode_copies"] == 0
    mc, rmesh = unstacked.model, unstacked.rollout_mesh
    pdt = mc.param_dtype
    # The layer weights: every param but the embedding, the final norm (and an untied head).
    outside = sum(
        planning.local_numel(shape, PARAM_LOGICAL_AXES[path], rmesh) * planning.DTYPE_BYTES[pdt]
        for path, shape in planning.param_shapes(mc).items()
        if path[0] != "layers"
    )
    weights = planning.param_bytes_per_device(mc, rmesh, pdt) - outside
    assert weights > outside  # a 7B model's layers outweigh its embedding
    kv = max(unstacked.memory["kv_update"], unstacked.memory["kv_final"])
    assert unstacked.memory["decode_copies"] == weights + kv
    assert unstacked.memory["rollout_peak"] - scan.memory["rollout_peak"] == weights + kv
    assert "decode copies" in planning.format_plan(unstacked) and "decode copies" not in planning.format_plan(scan)


def test_row_compaction_counts_half_an_update_cache_where_rows_are_not_sharded():
    """With the 'scan' decode layout a compacting chunk step holds the gathered rows' KV cache (at most half the
    rows) beside the whole one; rows sharded over data x fsdp are never gathered."""
    cfg = load_config_module("qwen2_5_7b_hotpotqa.py").get_config("8xh100")
    cfg.model.decode_layout = "scan"
    sharded = planning.make_plan(cfg)
    assert sharded.rollout_mesh.batch_shards > 1 and sharded.memory["decode_copies"] == 0
    cfg.mesh.fsdp, cfg.mesh.tensor = 1, 8
    whole = planning.make_plan(cfg)
    assert whole.rollout_mesh.batch_shards == 1
    mc, rmesh, slots = whole.model, whole.rollout_mesh, whole.layout.update_slots
    rows = whole.memory["kv_update"] // planning.kv_cache_bytes(mc, 1, slots, rmesh, mc.compute_dtype)
    half = planning.kv_cache_bytes(mc, -(-rows // 2), slots, rmesh, mc.compute_dtype)
    assert rows > 1 and whole.memory["decode_copies"] == half


def test_learn_length_follows_rl_length_multiple():
    cfg = load_config_module("qwen2_5_7b_hotpotqa.py").get_config("8xh100")
    cfg.rl.length_multiple = 64
    at64 = planning.make_plan(cfg).settings["learn_length"]
    cfg.rl.length_multiple = 1000
    at1000 = planning.make_plan(cfg).settings["learn_length"]
    assert at64 % 64 == 0 and at1000 % 1000 == 0 and at64 <= at1000 < at64 + 1000


def test_learn_length_follows_rl_pack_length():
    cfg = load_config_module("qwen2_5_7b_hotpotqa.py").get_config("8xh100")
    unpacked = planning.make_plan(cfg).settings["learn_length"]
    cfg.rl.pack_length = unpacked // 2  # shorter than a full conversation: rows grow to it
    assert planning.make_plan(cfg).settings["learn_length"] == unpacked
    cfg.rl.pack_length = 2 * unpacked  # worst case: one full-budget conversation per packed row
    assert planning.make_plan(cfg).settings["learn_length"] == 2 * unpacked
