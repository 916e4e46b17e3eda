"""FLOPs of a step (the learner's forward + backward and recompute, the agent's prefills and decodes) and the
time of one decode step (HBM-bound or compute-bound, whichever is slower)."""

from __future__ import annotations

from memagent_jax.planning.hardware import DTYPE_BYTES, Hardware
from memagent_jax.planning.memory import gathered_param_bytes
from memagent_jax.planning.mesh import MeshShape, sharded
from memagent_jax.planning.shapes import Layout, layer_matmul_params


def forward_flops_per_token(mc, keys: int, *, with_logits: bool = True) -> int:
    """2 x matmul weights + attention 4 x L x H x Dh x keys (QK^T and PV over every key slot: the model
    computes masked slots too); `with_logits=False` leaves out the LM head."""
    weights = mc.num_layers * layer_matmul_params(mc) + (mc.hidden_size * mc.vocab_size if with_logits else 0)
    return 2 * weights + 4 * mc.num_layers * mc.num_heads * mc.head_dim * keys


def learning_flops(
    mc,
    tokens: int,
    length: int,
    *,
    remat: str,
    reference: bool,
    recompute_old: bool,
    logits_chunk: int = 512,
    head_positions: int | None = None,
) -> dict[str, int]:
    """FLOPs of one learner step over `tokens` = rows x T (padded: the layers compute every position; the LM head
    only `head_positions` of each row, the learner's response window, default all T).

    train:       3 x forward (forward + backward) = 6 x matmul weights + 12 x L x H x Dh x T per token
    remat:       'full' + a forward of the layers (2 x layer weights + 4 L H Dh T), 'dots' + the attention
                 einsums (4 L H Dh T); either way + the LM head (2 D V) when the log-probs are chunked
    reference:   + a forward (KL to the frozen reference: rl.kl_coef > 0)
    old_logprob: + a forward (rl.recompute_old_logprobs with more than one update per step)
    """
    rows = tokens // length
    head_positions = length if head_positions is None else min(head_positions, length)
    head = 2 * mc.hidden_size * mc.vocab_size * rows * head_positions
    fwd = forward_flops_per_token(mc, length, with_logits=False) * tokens + head
    attn = 4 * mc.num_layers * mc.num_heads * mc.head_dim * length
    out = {"train": 3 * fwd}
    recompute = 0
    if remat == "full":
        recompute = forward_flops_per_token(mc, length, with_logits=False) * tokens
    elif remat == "dots":
        recompute = attn * tokens
    if 0 < logits_chunk < head_positions:
        recompute += head
    out["remat"] = recompute
    out["reference"] = fwd if reference else 0
    out["old_logprobs"] = fwd if recompute_old else 0
    out["total"] = sum(out.values())
    return out


def rollout_flops(mc, trajectories: int, layout: Layout, doc_tokens: int) -> dict[str, int]:
    """FLOPs of the agent for `trajectories` rows (padded rows included), as computed:

    prefill: prefix (P0 tokens) + every computed chunk step (R tokens) over the update slots, the final prompt
             over the final slots, one logits row per prefill;
    decode:  M tokens per real chunk step over the update slots, A answer tokens over the final slots
             (worst case: every generation runs to its budget).
    """
    lm = 2 * mc.hidden_size * mc.vocab_size
    su, sf = layout.update_slots, layout.final_slots
    steps = layout.computed_chunk_steps(doc_tokens)
    chunks = layout.chunks(doc_tokens)
    prefill = (
        layout.prefix * forward_flops_per_token(mc, su, with_logits=False)
        + lm
        + steps * (layout.rest * forward_flops_per_token(mc, su, with_logits=False) + lm)
        + layout.final_prompt * forward_flops_per_token(mc, sf, with_logits=False)
        + lm
    )
    decode = chunks * layout.memory * forward_flops_per_token(mc, su) + layout.answer * forward_flops_per_token(mc, sf)
    out = {"prefill": trajectories * prefill, "decode": trajectories * decode}
    out["total"] = out["prefill"] + out["decode"]
    return out


def decode_step_seconds(
    mc, rows_per_device: int, slots: int, mesh: MeshShape, hw: Hardware, param_dtype: str, cache_dtype: str
) -> tuple[float, int]:
    """(seconds, bytes read) of one decode step on one device: max(HBM bytes / bandwidth, FLOPs / peak).

    Bytes: the weights (tensor shard, FSDP-gathered, in the param dtype: the model casts per layer) + the
    device's whole KV cache (attention reads every slot) + the logits row [rows, V_local] f32.
    """
    weights = gathered_param_bytes(mc, mesh, param_dtype)
    kv_heads = sharded(mc.num_kv_heads, mesh.tensor)
    kv = 2 * mc.num_layers * rows_per_device * kv_heads * slots * mc.head_dim * DTYPE_BYTES[cache_dtype]
    logits = rows_per_device * sharded(mc.vocab_size, mesh.tensor) * 4
    read = weights + kv + logits
    flops = rows_per_device * forward_flops_per_token(mc, slots) / mesh.tensor
    return max(read / hw.hbm_bandwidth, flops / hw.peak_flops), read
