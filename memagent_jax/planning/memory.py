"""Bytes per device: parameter-shaped trees, KV caches, the activations of the learner step and of the agent's
programs (per attention path), the learner's batch and the weights in flight.

Each function mirrors the code it sizes (named in its docstring); change them together.
"""

from __future__ import annotations

import math
from typing import Any

from memagent_jax.planning.errors import PlanError
from memagent_jax.planning.hardware import DTYPE_BYTES
from memagent_jax.planning.mesh import MeshShape, local_numel, sharded
from memagent_jax.planning.shapes import Layout, layer_matmul_params, param_shapes


def param_bytes_per_device(mc, mesh: MeshShape, dtype: str, *, layers_only: bool = False) -> int:
    """Bytes of one params-shaped tree in `dtype` on one device (params, each AdamW moment, f32 grads, ...);
    layers_only: just the stacked [L, ...] layer weights."""
    from memagent_jax.models.sharding import PARAM_LOGICAL_AXES

    b = DTYPE_BYTES[dtype]
    return sum(
        local_numel(s, PARAM_LOGICAL_AXES[p], mesh) * b
        for p, s in param_shapes(mc).items()
        if not layers_only or p[0] == "layers"
    )


def gathered_param_bytes(mc, mesh: MeshShape, dtype: str) -> int:
    """Bytes of the weights one device reads per forward: FSDP shards gathered, tensor shards kept
    (a decode step reads this much from HBM, whatever the batch)."""
    from memagent_jax.models.sharding import PARAM_LOGICAL_AXES

    tensor_only = MeshShape(1, 1, mesh.tensor)
    b = DTYPE_BYTES[dtype]
    return sum(local_numel(s, PARAM_LOGICAL_AXES[p], tensor_only) * b for p, s in param_shapes(mc).items())


def _heads_local(mc, tensor: int) -> int:
    """Query heads per device in attention: split over tensor when the KV heads split (scores are laid out
    [B, K, G, T, S] with K over 'tensor'); otherwise assume replicated (conservative)."""
    return mc.num_heads // tensor if tensor > 1 and mc.num_kv_heads % tensor == 0 else mc.num_heads


def kv_cache_bytes(mc, rows: int, slots: int, mesh: MeshShape, dtype: str) -> int:
    """One `KVCache` for `rows` rows in total (padded to the batch shards), per device:
    k and v [L, B, K, S, Dh] (rows over data x fsdp, KV heads over tensor where they divide) in `dtype`, plus
    positions int32 and valid bool [B, S]."""
    kv = local_numel(
        (mc.num_layers, rows, mc.num_kv_heads, slots, mc.head_dim),
        ("layer", "batch", "kv_heads", "seq", "head_dim"),
        mesh,
    )
    per_row = local_numel((rows, slots), ("batch", "seq"), mesh)
    return 2 * kv * DTYPE_BYTES[dtype] + per_row * (4 + 1)


# Attention paths (models/attention.py, chosen by ModelConfig.attention_impl; `attention_path` resolves 'auto' for
# the planned hardware: CUDA GPUs -> 'cudnn' where it applies (bf16/f16 ...) else 'blockwise', TPUs -> 'splash').
#
# 'materialized': the scores [H_local, T, S] are in memory. Bytes per score element, calibrated against XLA's memory
# analysis of the compiled programs (XLA CPU; tests/test_plan.py keeps the estimates within range of it):
SCORE_BYTES_INFERENCE = 8  # one layer's forward: f32 scores + f32 probabilities (the cast fuses into P @ V)
SCORE_BYTES_KEPT = 14  # remat 'none': what autodiff keeps per layer (softmax output f32, probs, mask select)
SCORE_BYTES_WORKING = 10  # the layer being differentiated: d(probs) in the compute dtype and f32, d(scores) f32
# 'blockwise': one live block [H_local, min(T, query block), min(S, key block)] at a time, forward and backward
# (a custom VJP recomputes each block); nothing of the scores is kept between layers. Bytes per block element,
# calibrated as above (XLA CPU measured 7 to 21 B per element depending on the block size: f32 scores, masked
# scores, exp and compute-dtype probabilities are not all fused inside the loop body; the backward adds dP and dS
# in f32 and dS in the compute dtype):
BLOCK_BYTES_INFERENCE = 12
BLOCK_BYTES_WORKING = 20
# 'cudnn': scores stay in cuDNN's on-chip tiles (0 bytes); the visibility mask [T, S] bool and the additive bias
# cuDNN makes of it (compute dtype) are in memory, shared by the heads, and (remat 'none') the bias is assumed kept
# for the backward of every layer. Both flash paths hold the f32 output accumulator and row statistics per query.
# 'splash' (JAX's Pallas kernel, TPU): no [T, S] array at all; the kernel's live block is one head's
# [block_q, block_kv] (`attention.splash_block_sizes`: multiples of 128) of f32 scores and probabilities (forward)
# plus dP and dS (backward), counted although it sits in VMEM; see `splash_layer_bytes` for the rest.
SPLASH_BLOCK_BYTES_INFERENCE = 8
SPLASH_BLOCK_BYTES_WORKING = 16


def attention_path(mc, platform: str, tokens: int, keys: int) -> str:
    """The attention path ('materialized' | 'blockwise' | 'cudnn') the model takes for `tokens` queries over `keys`
    slots on `platform` ('gpu' | 'tpu' | 'cpu'): `models.attention.select_implementation` with the config's
    attention_impl, compute dtype and block sizes."""
    from memagent_jax.models.attention import select_implementation

    return select_implementation(
        mc.attention_impl,
        queries=tokens,
        keys=keys,
        dtype=mc.compute_dtype,
        head_dim=mc.head_dim,
        query_block=mc.attention_query_block_size,
        key_block=mc.attention_block_size,
        platform=platform,
    )


def decode_layout_of(mc, platform: str) -> str:
    """'scan' or 'unstacked' on the planned platform (ModelConfig.resolved_decode_layout's rule: 'auto' is
    'scan' on TPU, 'unstacked' elsewhere)."""
    layout = getattr(mc, "decode_layout", "auto")
    if layout != "auto":
        return layout
    return "scan" if platform == "tpu" else "unstacked"


def layer_param_bytes_per_device(mc, mesh: MeshShape, dtype: str) -> int:
    """Bytes on one device of the stacked [L, ...] layer weights alone (what the 'unstacked' decode layout copies
    into per-layer arrays for the length of a decode program)."""
    return param_bytes_per_device(mc, mesh, dtype, layers_only=True)


def layer_activation_bytes(
    mc,
    tokens: int,
    keys: int,
    tensor: int,
    compute_bytes: int,
    path: str = "materialized",
    blocks: tuple[int, int] | None = None,
) -> dict[str, int]:
    """Activation sizes of ONE layer for ONE row of `tokens` queries over `keys` key slots, per device.

    score_elements: the attention scores in memory at once (see the SCORE_BYTES_* / BLOCK_BYTES_*):
           'materialized' H_local x tokens x keys; 'blockwise' H_local x min(tokens, query block) x min(keys, key
           block) (one live block; `blocks`, (query block, key block), overrides the config's); 'cudnn' 0 (on chip);
    mask:  bytes of [tokens, keys] arrays: the bool mask (materialised path, built once per forward), the bool mask
           and its compute-dtype bias (cuDNN), none (blockwise: visibility is computed per block);
    flash_forward: the flash paths' f32 output accumulator [H_local x Dh] and row max / sum [2 x H_local] per
           query; flash_kept: what their VJP keeps per layer (f32 output, row statistics, the regrouped q);
    flash_backward: their backward's f32 dQ, dO and row dot (dO . O) per query, f32 dK and dV per key slot;
    other: bytes of the rest, in the compute dtype: x, normed x, x after attention, normed again [D each];
           q, q regrouped, attention output [H_local x Dh each]; k, k transposed, v [K_local x Dh each] (and q, k
           before their RMSNorm with qk_norm); gate, up, silu(gate) * up [F_local each].
    """
    d, dh, c = mc.hidden_size, mc.head_dim, compute_bytes
    h = _heads_local(mc, tensor)
    k = sharded(mc.num_kv_heads, tensor)
    f = sharded(mc.intermediate_size, tensor)
    extra_qk = (h + k) * dh if mc.qk_norm else 0
    other = c * tokens * (4 * d + 3 * h * dh + 3 * k * dh + extra_qk + 3 * f)
    out = {
        "score_elements": h * tokens * keys,
        "mask": tokens * keys,
        "flash_forward": 0,
        "flash_kept": 0,
        "flash_backward": 0,
        "other": other,
        "path": path,
    }
    if path == "materialized":
        return out
    if path == "splash":
        out.update(splash_layer_bytes(mc, tokens, keys, h, k, c))
        return out
    if path not in ("blockwise", "cudnn"):
        raise PlanError(f"attention path must be 'materialized', 'blockwise', 'cudnn' or 'splash', got {path!r}")
    qb, kb = blocks or (mc.attention_query_block_size, mc.attention_block_size)
    out["score_elements"] = h * min(tokens, qb) * min(keys, kb) if path == "blockwise" else 0
    out["mask"] = 0 if path == "blockwise" else (1 + c) * tokens * keys
    out["flash_forward"] = tokens * (4 * h * dh + 8 * h)
    out["flash_kept"] = tokens * (4 * h * dh + 8 * h + c * h * dh)
    out["flash_backward"] = tokens * (8 * h * dh + 4 * h) + keys * 8 * k * dh
    return out


def splash_layer_bytes(mc, tokens: int, keys: int, heads: int, kv_heads: int, c: int) -> dict[str, int]:
    """The splash path's share of `layer_activation_bytes` (one layer, one row, per device; heads / kv_heads: the
    local H and K), with T and S padded to the kernel's blocks (`attention.splash_block_sizes`):

    score_elements: one head's live block, block_q x block_kv (the kernel's grid runs a head at a time);
    mask: 0 (visibility is causal-by-index plus segment ids [T] int32, counted in flash_forward);
    flash_forward: per padded query, the scaled, regrouped, padded q and the output (2 c H Dh), the log-sum-exp
        the kernel writes lane-padded (f32 [H, T, 128]: 512 H) and the segment ids (4); a cached prefill
        (S > T) adds the second call over the earlier slots: its output and log-sum-exp, the f32 merge (8 H Dh),
        and a padded copy of the layer's k and v (2 c K S Dh per padded slot);
    flash_kept: what the kernel's VJP keeps per layer: scaled q and output (2 c H Dh) and the log-sum-exp (4 H);
    flash_backward: dO . O per query (4 H), dQ and dO (2 c H Dh), dK and dV (2 c K Dh per key).
    """
    from memagent_jax.models.attention import splash_block_sizes

    dh = mc.head_dim
    qb, kb = mc.attention_query_block_size, mc.attention_block_size
    bq, bkv = splash_block_sizes(tokens, keys, qb, kb)
    step = math.lcm(*splash_block_sizes(tokens, tokens, qb, kb))  # the new tokens' call pads T to both blocks
    tp = -(-tokens // step) * step
    forward = tp * (2 * c * heads * dh + 512 * heads + 4)
    if keys > tokens:
        sp = -(-keys // bkv) * bkv
        forward += tp * (c * heads * dh + 512 * heads + 8 * heads * dh) + sp * 2 * c * kv_heads * dh
    return {
        "score_elements": bq * bkv,
        "mask": 0,
        "flash_forward": forward,
        "flash_kept": tp * (2 * c * heads * dh + 4 * heads),
        "flash_backward": tp * (4 * heads + 2 * c * heads * dh) + tp * 2 * c * kv_heads * dh,
    }


def working_weight_bytes(mc, tensor: int, param_bytes: int, compute_bytes: int) -> int:
    """Weights in flight: the LM head (or tied embedding) cast to the compute dtype [D, V_local], and two layers'
    weights gathered over fsdp (the one in use and the next), in the param dtype and cast."""
    lm = compute_bytes * mc.hidden_size * sharded(mc.vocab_size, tensor)
    layer = layer_matmul_params(mc) // tensor
    return lm + 2 * layer * (param_bytes + (compute_bytes if compute_bytes != param_bytes else 0))


def learner_activation_bytes(
    mc,
    rows: int,
    length: int,
    remat: str,
    tensor: int,
    compute_bytes: int,
    logits_chunk: int = 512,
    platform: str = "cpu",
    head_positions: int | None = None,
) -> dict[str, int]:
    """Peak activation bytes of the backward pass of one micro-batch (`rows` rows of `length` tokens per device;
    the LM head over `head_positions` of them, the learner's response window, default all).

    The attention path is the one the model takes on `platform` (`attention_path`). Materialised: with
    sc = H_local x T x T score elements and `other` the rest of one layer (`layer_activation_bytes`), per row:
      kept_layers   what the forward keeps for the backward, every layer:
                      remat 'none':  L x (14 sc + other)
                      remat 'full':  L x c T D            (each layer's input x only)
                      remat 'dots':  L x (c T D + 4 T (2D + (H_local + 2 K_local) Dh + 2 F_local))
                                     (x and the weight-matmul outputs q, k, v, o_proj, gate, up, down_proj; the
                                     attention einsums have batch dims and are recomputed; counted at 4 B)
      working       the layer being differentiated: 10 sc + other (remat 'none'), 10 sc + 2 other (recomputed
                    forward + backward temporaries, remat 'full' / 'dots')
      top           attention mask [T, T] bool, embedding output / final norm / hidden (4 x c T D) and the
                    hidden's f32 gradient, one logits chunk of the log-prob computation (logits, probabilities,
                    their gradient: 3 x f32 [chunk, V_local]; chunks are rematerialised one at a time)
    Blockwise / cuDNN / splash: no scores are kept (remat 'none' keeps `flash_kept` + the cuDNN bias per layer
    instead of 14 sc); working = 20 x the live block's elements (blockwise; 16 x one head's block, splash) +
    flash_forward + flash_backward + the [T, T]
    arrays of `mask` + other (x 2 with remat 'full' / 'dots'); top has no [T, T] mask.
    """
    if remat not in ("none", "full", "dots"):
        raise PlanError(f"remat must be 'none', 'full' or 'dots', got {remat!r}")
    c, t, d, dh, l = compute_bytes, length, mc.hidden_size, mc.head_dim, mc.num_layers
    h = _heads_local(mc, tensor)
    k = sharded(mc.num_kv_heads, tensor)
    f = sharded(mc.intermediate_size, tensor)
    v = sharded(mc.vocab_size, tensor)
    path = attention_path(mc, platform, t, t)
    layer = layer_activation_bytes(mc, t, t, tensor, c, path)
    sc, other = layer["score_elements"], layer["other"]
    if path == "materialized":
        kept_attention = SCORE_BYTES_KEPT * sc
        working_attention = SCORE_BYTES_WORKING * sc
        top_mask = layer["mask"]
    else:
        kept_attention = layer["flash_kept"] + (c * t * t if path == "cudnn" else 0)
        per_block = SPLASH_BLOCK_BYTES_WORKING if path == "splash" else BLOCK_BYTES_WORKING
        working_attention = per_block * sc + layer["flash_forward"] + layer["flash_backward"] + layer["mask"]
        top_mask = 0
    if remat == "none":
        kept = l * (kept_attention + other)
        working = working_attention + other
    elif remat == "full":
        kept = l * c * t * d
        working = working_attention + 2 * other
    else:
        kept = l * (c * t * d + 4 * t * (2 * d + (h + 2 * k) * dh + 2 * f))
        working = working_attention + 2 * other
    head = t if head_positions is None else min(head_positions, t)
    chunk = min(logits_chunk, head) if logits_chunk > 0 else head
    top = top_mask + 4 * c * t * d + 4 * t * d + 3 * 4 * chunk * v
    out = {"kept_layers": rows * kept, "working_layer": rows * working, "top": rows * top}
    out["total"] = sum(out.values())
    return out


def rollout_activation_bytes(
    mc, rows: int, layout: Layout, tensor: int, compute_bytes: int, platform: str = "cpu"
) -> dict[str, int]:
    """Peak activation bytes of the agent's programs for `rows` rows per device (no gradients: one layer's
    temporaries at a time), the largest of

      prefix prefill  P0 tokens over the update cache's slots
      chunk prefill   R tokens (memory + chunk + templates) over the update cache's slots   <- the largest
      final prefill   F tokens over the final cache's slots

    each, per row, on the attention path the model takes there on `platform` (`attention_path`). Without
    gradients XLA frees a layer's buffers as soon as they are read, so the peak is the larger of two phases:
      attention  the scores (8 sc, SCORE_BYTES_INFERENCE, materialised; 12 x the live block,
                 BLOCK_BYTES_INFERENCE, blockwise, in the CPU's cache-sized blocks under 'auto'
                 (`attention.cpu_block_sizes`); 8 x one head's block, splash; 0 cuDNN) + the [T, S] arrays (`mask`:
                 the bool mask materialised, mask + bias cuDNN, none blockwise) + the flash paths' f32 accumulator
                 (`flash_forward`) + c T (2 D + 3 H_local Dh + 2 K_local Dh): the residual stream in and out, q,
                 its regrouped copy and the attention output, k and v (and q, k before their RMSNorm with qk_norm)
                 + one layer's k/v read out of the stacked cache (2 x c K_local S Dh);
      MLP        c T (2 D + 3 F_local): the residual stream in and out, gate, up and silu(gate) * up.
    Decode steps (1 token) are far smaller.
    Plus the segment's inputs and records (chunk ids, rest prompt, responses, log-probs).
    """
    c, d, dh = compute_bytes, mc.hidden_size, mc.head_dim
    k = sharded(mc.num_kv_heads, tensor)
    best: dict[str, Any] = {}
    for name, tokens, keys in (
        ("prefix prefill", layout.prefix, layout.update_slots),
        ("chunk prefill", layout.rest, layout.update_slots),
        ("final prefill", layout.final_prompt, layout.final_slots),
    ):
        path = attention_path(mc, platform, tokens, keys)
        blocks = None
        if path == "blockwise" and platform == "cpu" and mc.attention_impl == "auto":
            from memagent_jax.models.attention import cpu_block_sizes

            blocks = cpu_block_sizes(
                rows,
                _heads_local(mc, tensor),
                tokens,
                keys,
                query_block=mc.attention_query_block_size,
                key_block=mc.attention_block_size,
            )
        layer = layer_activation_bytes(mc, tokens, keys, tensor, c, path, blocks)
        per_element = {"materialized": SCORE_BYTES_INFERENCE, "splash": SPLASH_BLOCK_BYTES_INFERENCE}.get(
            path, BLOCK_BYTES_INFERENCE
        )
        scores = per_element * layer["score_elements"]
        h = _heads_local(mc, tensor)
        extra_qk = (h + k) * dh if mc.qk_norm else 0
        attention_phase = (
            scores
            + layer["mask"]
            + layer["flash_forward"]
            + c * tokens * (2 * d + 3 * h * dh + 2 * k * dh + extra_qk)
            + 2 * c * k * keys * dh
        )
        mlp_phase = c * tokens * (2 * d + 3 * sharded(mc.intermediate_size, tensor))
        total = max(attention_phase, mlp_phase)
        if not best or total > best["per_row"]:
            best = {
                "per_row": total,
                "scores_per_row": scores,
                "tokens": tokens,
                "keys": keys,
                "program": name,
                "path": path,
            }
    s = layout.chunks_per_segment
    records = s * (4 * layout.chunk + 5 * layout.rest + 12 * layout.memory)
    return {
        "program": best["program"],
        "tokens": best["tokens"],
        "keys": best["keys"],
        "path": best["path"],
        "scores": rows * best["scores_per_row"],
        "total": rows * (best["per_row"] + records),
    }


def learner_batch_bytes(rows_per_device: int, length: int, *, reference: bool, recompute_old: bool) -> int:
    """The step's conversation batch on one device: tokens int32, token/loss masks bool, old log-probs f32
    (twice: as given and re-laid out into [M, K, mb, T]), plus f32 reference / recomputed log-probs."""
    per_token = 2 * (4 + 1 + 1 + 4) + (4 if reference else 0) + (4 if recompute_old else 0)
    return rows_per_device * (length * per_token + 8)
