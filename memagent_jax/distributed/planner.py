"""The planner's arithmetic: bytes per device, FLOPs and step time of a training config on a mesh.

Pure functions of a config and a hardware description (no JAX); `memagent_jax.plan` is the command that prints
them (and re-exports every name here). What they count, phase by phase, and how they mirror the code: see
`memagent_jax.plan`'s docstring.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
from typing import Any, Mapping, Sequence

GiB = 1024**3

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ------------------------------------------------------------------------------------------- hardware


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One accelerator as JAX sees it (one device): HBM bytes, dense bf16 peak FLOP/s, HBM bandwidth (bytes/s)."""

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    description: str


HARDWARE: dict[str, Hardware] = {h.name: h for h in (
    Hardware("tpu-v4", 32 * GiB, 275e12, 1.2e12, "Cloud TPU v4 chip (one megacore device)"),
    Hardware("tpu-v5e", 16 * GiB, 197e12, 0.819e12, "Cloud TPU v5e chip"),
    Hardware("tpu-v5p", 95 * GiB, 459e12, 2.765e12, "Cloud TPU v5p chip (one megacore device)"),
    Hardware("tpu-v6e", 32 * GiB, 918e12, 1.64e12, "Cloud TPU v6e (Trillium) chip"),
    Hardware("h100-80gb", 81559 * 1024**2, 989e12, 3.35e12, "NVIDIA H100 SXM 80GB"),
    Hardware("h200", 143771 * 1024**2, 989e12, 4.8e12, "NVIDIA H200 SXM 141GB"),
    Hardware("a100-80gb", 81920 * 1024**2, 312e12, 2.039e12, "NVIDIA A100 SXM 80GB"),
)}

_ALIASES = {"v4": "tpu-v4", "v5e": "tpu-v5e", "v5litepod": "tpu-v5e", "v5p": "tpu-v5p", "v6e": "tpu-v6e",
            "trillium": "tpu-v6e", "h100": "h100-80gb", "h200-141gb": "h200", "a100": "a100-80gb"}


class PlanError(ValueError):
    """The planner cannot size this config (unknown hardware or preset, bad mesh); the message says what."""


def get_hardware(name: str) -> Hardware:
    key = (name or "").strip().lower()
    key = _ALIASES.get(key, key)
    if key not in HARDWARE:
        raise PlanError(f"unknown hardware {name!r}; known: {', '.join(HARDWARE)}")
    return HARDWARE[key]


# ----------------------------------------------------------------------------------------------- mesh


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """Mesh axis sizes (no -1). `shape` is what `sharding.logical_to_spec` reads from a mesh."""

    data: int
    fsdp: int
    tensor: int

    @property
    def shape(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor

    @property
    def batch_shards(self) -> int:
        """Rows are split over data x fsdp (`sharding.batch_multiple`)."""
        return self.data * self.fsdp

    def __str__(self) -> str:
        return f"data {self.data} x fsdp {self.fsdp} x tensor {self.tensor}"


def resolve_mesh(data: int, fsdp: int, tensor: int, devices: int | None = None) -> MeshShape:
    """Fills a -1 axis from `devices` (as `sharding.make_mesh` does)."""
    sizes = [int(data), int(fsdp), int(tensor)]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise PlanError(f"config.mesh: sizes must be positive with at most one -1, got {sizes}")
    if -1 in sizes:
        if not devices:
            raise PlanError(f"config.mesh {sizes} has a -1 axis: give the device count (--devices N)")
        known = math.prod(s for s in sizes if s != -1)
        if devices % known:
            raise PlanError(f"config.mesh {sizes} does not divide {devices} devices")
        sizes[sizes.index(-1)] = devices // known
    mesh = MeshShape(*sizes)
    if devices and mesh.size != devices:
        raise PlanError(f"config.mesh: data x fsdp x tensor = {sizes} is {mesh.size} devices, not {devices}")
    return mesh


def sharded(n: int, ways: int) -> int:
    """Per-device size of a dimension of n split `ways` ways; replicated (n) when `ways` does not divide it,
    as `sharding.logical_to_spec` does."""
    return n // ways if ways > 1 and n % ways == 0 else n


def local_numel(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: MeshShape,
                rules: Mapping[str, Any] | None = None) -> int:
    """Elements one device holds of an array sharded by logical axes (the real rules, the real fallback)."""
    from memagent_jax.models import sharding

    spec = sharding.logical_to_spec(logical_axes, shape, types.SimpleNamespace(shape=mesh.shape), rules)
    n = 1
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        ways = 1
        if axes is not None:
            for a in ((axes,) if isinstance(axes, str) else axes):
                ways *= mesh.shape[a]
        n *= dim // ways
    return n


# ------------------------------------------------------------------------------------------- params


def param_shapes(mc) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Every parameter leaf of `models.transformer` (path -> shape), written out by hand from the architecture
    (the tests check it against the real `abstract_params`)."""
    v, d, f, l = mc.vocab_size, mc.hidden_size, mc.intermediate_size, mc.num_layers
    h, k, dh = mc.num_heads, mc.num_kv_heads, mc.head_dim
    out: dict[tuple[str, ...], tuple[int, ...]] = {
        ("embed",): (v, d),
        ("final_norm", "weight"): (d,),
        ("layers", "attn_norm", "weight"): (l, d),
        ("layers", "mlp_norm", "weight"): (l, d),
        ("layers", "attn", "q_proj"): (l, d, h, dh),
        ("layers", "attn", "k_proj"): (l, d, k, dh),
        ("layers", "attn", "v_proj"): (l, d, k, dh),
        ("layers", "attn", "o_proj"): (l, h, dh, d),
        ("layers", "mlp", "gate_proj"): (l, d, f),
        ("layers", "mlp", "up_proj"): (l, d, f),
        ("layers", "mlp", "down_proj"): (l, f, d),
    }
    if not mc.tie_word_embeddings:
        out[("lm_head",)] = (d, v)
    if mc.attention_bias:
        out[("layers", "attn", "q_bias")] = (l, h, dh)
        out[("layers", "attn", "k_bias")] = (l, k, dh)
        out[("layers", "attn", "v_bias")] = (l, k, dh)
    if mc.attention_out_bias:
        out[("layers", "attn", "o_bias")] = (l, d)
    if mc.qk_norm:
        out[("layers", "attn", "q_norm")] = (l, dh)
        out[("layers", "attn", "k_norm")] = (l, dh)
    if mc.mlp_bias:
        out[("layers", "mlp", "gate_bias")] = (l, f)
        out[("layers", "mlp", "up_bias")] = (l, f)
        out[("layers", "mlp", "down_bias")] = (l, d)
    return out


def param_count(mc) -> int:
    return sum(math.prod(s) for s in param_shapes(mc).values())


def layer_matmul_params(mc) -> int:
    """Weights of one layer's matmuls (q, k, v, o, gate, up, down): 2 FLOPs per weight per token."""
    d, f, h, k, dh = mc.hidden_size, mc.intermediate_size, mc.num_heads, mc.num_kv_heads, mc.head_dim
    return 2 * d * h * dh + 2 * d * k * dh + 3 * d * f


def matmul_params(mc) -> int:
    """All matmul weights of a full forward at one position: layers + the LM head (D x V, tied or not);
    the embedding lookup is a gather, not a matmul."""
    return mc.num_layers * layer_matmul_params(mc) + mc.hidden_size * mc.vocab_size


def param_bytes_per_device(mc, mesh: MeshShape, dtype: str, *, layers_only: bool = False) -> int:
    """Bytes of one params-shaped tree in `dtype` on one device (params, each AdamW moment, f32 grads, ...);
    layers_only: just the stacked [L, ...] layer weights."""
    from memagent_jax.models.sharding import PARAM_LOGICAL_AXES

    b = DTYPE_BYTES[dtype]
    return sum(local_numel(s, PARAM_LOGICAL_AXES[p], mesh) * b for p, s in param_shapes(mc).items()
               if not layers_only or p[0] == "layers")


def gathered_param_bytes(mc, mesh: MeshShape, dtype: str) -> int:
    """Bytes of the weights one device reads per forward: FSDP shards gathered, tensor shards kept
    (a decode step reads this much from HBM, whatever the batch)."""
    from memagent_jax.models.sharding import PARAM_LOGICAL_AXES

    tensor_only = MeshShape(1, 1, mesh.tensor)
    b = DTYPE_BYTES[dtype]
    return sum(local_numel(s, PARAM_LOGICAL_AXES[p], tensor_only) * b for p, s in param_shapes(mc).items())


# ------------------------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static token layout of the agent's programs (agent/program.py), from the budgets.

    The literal template pieces depend on the tokenizer and wording; the defaults overestimate our templates
    under a Qwen chat template (header + instruction ~90 tokens before the memory, ~50 after).
    """

    question: int = 1024
    memory: int = 1024
    chunk: int = 5000
    answer: int = 1024
    chunks_per_segment: int = 4
    prefix_template: int = 128  # [U0] + [U1]: chat header, instruction, "notes so far" heading
    rest_template: int = 64  # [U2] + [U3]: section heading, closing instruction, assistant header
    final_template: int = 128  # the final prompt's literal pieces

    @property
    def prefix(self) -> int:
        """P0: [U0][question][U1], prefilled once per document."""
        return self.prefix_template + self.question

    @property
    def rest(self) -> int:
        """R: [memory][U2][chunk][U3], prefilled at every chunk step."""
        return self.memory + self.chunk + self.rest_template

    @property
    def update_slots(self) -> int:
        """Slots of the memory-update KV cache: prefix + rest + the new memory."""
        return self.prefix + self.rest + self.memory

    @property
    def final_prompt(self) -> int:
        return self.final_template + self.question + self.memory

    @property
    def final_slots(self) -> int:
        return self.final_prompt + self.answer

    def learn_length(self, multiple: int = 64) -> int:
        """T of the learner's batch: the longest conversation (prompt + response), rounded up as
        `rollout_to_batch` does (worst case: a memory step with every slot used)."""
        longest = max(self.update_slots, self.final_slots)
        return -(-longest // multiple) * multiple

    def chunks(self, doc_tokens: int) -> int:
        return -(-doc_tokens // self.chunk)

    def computed_chunk_steps(self, doc_tokens: int) -> int:
        """Chunk steps the segment program runs (whole segments of `chunks_per_segment`; a step past a
        document's end still prefills, its decode stops at once)."""
        s = self.chunks_per_segment
        return -(-self.chunks(doc_tokens) // s) * s


# ------------------------------------------------------------------------------------------ memory


def _heads_local(mc, tensor: int) -> int:
    """Query heads per device in attention: split over tensor when the KV heads split (scores are laid out
    [B, K, G, T, S] with K over 'tensor'); otherwise assume replicated (conservative)."""
    return mc.num_heads // tensor if tensor > 1 and mc.num_kv_heads % tensor == 0 else mc.num_heads


def kv_cache_bytes(mc, rows: int, slots: int, mesh: MeshShape, dtype: str) -> int:
    """One `KVCache` for `rows` rows in total (padded to the batch shards), per device:
    k and v [L, B, K, S, Dh] (rows over data x fsdp, KV heads over tensor where they divide) in `dtype`, plus
    positions int32 and valid bool [B, S]."""
    kv = local_numel((mc.num_layers, rows, mc.num_kv_heads, slots, mc.head_dim),
                     ("layer", "batch", "kv_heads", "seq", "head_dim"), mesh)
    per_row = local_numel((rows, slots), ("batch", "seq"), mesh)
    return 2 * kv * DTYPE_BYTES[dtype] + per_row * (4 + 1)


# Attention paths (models/attention.py, chosen by ModelConfig.attention_impl; `attention_path` resolves 'auto' for
# the planned hardware: CUDA GPUs -> 'cudnn' where it applies (bf16/f16 ...) else 'blockwise', TPUs -> 'blockwise').
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


def attention_path(mc, platform: str, tokens: int, keys: int) -> str:
    """The attention path ('materialized' | 'blockwise' | 'cudnn') the model takes for `tokens` queries over `keys`
    slots on `platform` ('gpu' | 'tpu' | 'cpu'): `models.attention.select_implementation` with the config's
    attention_impl, compute dtype and block sizes."""
    from memagent_jax.models.attention import select_implementation

    return select_implementation(mc.attention_impl, queries=tokens, keys=keys, dtype=mc.compute_dtype,
                                 head_dim=mc.head_dim, query_block=mc.attention_query_block_size,
                                 key_block=mc.attention_block_size, platform=platform)


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


def platform_of(hw: Hardware) -> str:
    """'tpu' for the TPU entries of HARDWARE, 'gpu' (CUDA) for the others."""
    return "tpu" if hw.name.startswith("tpu") else "gpu"


def layer_activation_bytes(mc, tokens: int, keys: int, tensor: int, compute_bytes: int,
                           path: str = "materialized") -> dict[str, int]:
    """Activation sizes of ONE layer for ONE row of `tokens` queries over `keys` key slots, per device.

    score_elements: the attention scores in memory at once (see the SCORE_BYTES_* / BLOCK_BYTES_*):
           'materialized' H_local x tokens x keys; 'blockwise' H_local x min(tokens, query block) x min(keys, key
           block) (one live block); 'cudnn' 0 (on chip);
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
    out = {"score_elements": h * tokens * keys, "mask": tokens * keys, "flash_forward": 0, "flash_kept": 0,
           "flash_backward": 0, "other": other, "path": path}
    if path == "materialized":
        return out
    if path not in ("blockwise", "cudnn"):
        raise PlanError(f"attention path must be 'materialized', 'blockwise' or 'cudnn', got {path!r}")
    out["score_elements"] = (h * min(tokens, mc.attention_query_block_size) * min(keys, mc.attention_block_size)
                             if path == "blockwise" else 0)
    out["mask"] = 0 if path == "blockwise" else (1 + c) * tokens * keys
    out["flash_forward"] = tokens * (4 * h * dh + 8 * h)
    out["flash_kept"] = tokens * (4 * h * dh + 8 * h + c * h * dh)
    out["flash_backward"] = tokens * (8 * h * dh + 4 * h) + keys * 8 * k * dh
    return out


def working_weight_bytes(mc, tensor: int, param_bytes: int, compute_bytes: int) -> int:
    """Weights in flight: the LM head (or tied embedding) cast to the compute dtype [D, V_local], and two layers'
    weights gathered over fsdp (the one in use and the next), in the param dtype and cast."""
    lm = compute_bytes * mc.hidden_size * sharded(mc.vocab_size, tensor)
    layer = layer_matmul_params(mc) // tensor
    return lm + 2 * layer * (param_bytes + (compute_bytes if compute_bytes != param_bytes else 0))


def learner_activation_bytes(mc, rows: int, length: int, remat: str, tensor: int, compute_bytes: int,
                             logits_chunk: int = 512, platform: str = "cpu") -> dict[str, int]:
    """Peak activation bytes of the backward pass of one micro-batch (`rows` rows of `length` tokens per device).

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
    Blockwise / cuDNN: no scores are kept (remat 'none' keeps `flash_kept` + the cuDNN bias per layer instead of
    14 sc); working = 20 x the live block's elements (blockwise) + flash_forward + flash_backward + the [T, T]
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
        working_attention = (BLOCK_BYTES_WORKING * sc + layer["flash_forward"] + layer["flash_backward"]
                             + layer["mask"])
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
    chunk = min(logits_chunk, t) if logits_chunk > 0 else t
    top = top_mask + 4 * c * t * d + 4 * t * d + 3 * 4 * chunk * v
    out = {"kept_layers": rows * kept, "working_layer": rows * working, "top": rows * top}
    out["total"] = sum(out.values())
    return out


def rollout_activation_bytes(mc, rows: int, layout: Layout, tensor: int, compute_bytes: int,
                             platform: str = "cpu") -> dict[str, int]:
    """Peak activation bytes of the agent's programs for `rows` rows per device (no gradients: one layer's
    temporaries at a time), the largest of

      prefix prefill  P0 tokens over the update cache's slots
      chunk prefill   R tokens (memory + chunk + templates) over the update cache's slots   <- the largest
      final prefill   F tokens over the final cache's slots

    each, per row, on the attention path the model takes there on `platform` (`attention_path`): the scores (8 sc,
    SCORE_BYTES_INFERENCE, materialised; 12 x the live block, BLOCK_BYTES_INFERENCE, blockwise; 0 cuDNN) + the
    [T, S] arrays (`mask`: the bool mask materialised, mask + bias cuDNN, none blockwise) + the flash paths' f32
    accumulator (`flash_forward`) + other (`layer_activation_bytes`) + the residual stream in and out (2 x c T D)
    + one layer's k/v read out of the stacked cache (2 x c K_local S Dh). Decode steps (1 token) are far smaller.
    Plus the segment's inputs and records (chunk ids, rest prompt, responses, log-probs).
    """
    c, d, dh = compute_bytes, mc.hidden_size, mc.head_dim
    k = sharded(mc.num_kv_heads, tensor)
    best: dict[str, Any] = {}
    for name, tokens, keys in (("prefix prefill", layout.prefix, layout.update_slots),
                               ("chunk prefill", layout.rest, layout.update_slots),
                               ("final prefill", layout.final_prompt, layout.final_slots)):
        path = attention_path(mc, platform, tokens, keys)
        layer = layer_activation_bytes(mc, tokens, keys, tensor, c, path)
        per_element = SCORE_BYTES_INFERENCE if path == "materialized" else BLOCK_BYTES_INFERENCE
        scores = per_element * layer["score_elements"]
        total = (scores + layer["mask"] + layer["flash_forward"] + layer["other"] + 2 * c * tokens * d
                 + 2 * c * k * keys * dh)
        if not best or total > best["per_row"]:
            best = {"per_row": total, "scores_per_row": scores, "tokens": tokens, "keys": keys, "program": name,
                    "path": path}
    s = layout.chunks_per_segment
    records = s * (4 * layout.chunk + 5 * layout.rest + 12 * layout.memory)
    return {"program": best["program"], "tokens": best["tokens"], "keys": best["keys"], "path": best["path"],
            "scores": rows * best["scores_per_row"], "total": rows * (best["per_row"] + records)}


def learner_batch_bytes(rows_per_device: int, length: int, *, reference: bool, recompute_old: bool) -> int:
    """The step's conversation batch on one device: tokens int32, token/loss masks bool, old log-probs f32
    (twice: as given and re-laid out into [M, K, mb, T]), plus f32 reference / recomputed log-probs."""
    per_token = 2 * (4 + 1 + 1 + 4) + (4 if reference else 0) + (4 if recompute_old else 0)
    return rows_per_device * (length * per_token + 8)


# ------------------------------------------------------------------------------------------- FLOPs


def forward_flops_per_token(mc, keys: int, *, with_logits: bool = True) -> int:
    """2 x matmul weights + attention 4 x L x H x Dh x keys (QK^T and PV over every key slot: the model
    computes masked slots too); `with_logits=False` leaves out the LM head."""
    weights = mc.num_layers * layer_matmul_params(mc) + (mc.hidden_size * mc.vocab_size if with_logits else 0)
    return 2 * weights + 4 * mc.num_layers * mc.num_heads * mc.head_dim * keys


def learning_flops(mc, tokens: int, length: int, *, remat: str, reference: bool, recompute_old: bool,
                   logits_chunk: int = 512) -> dict[str, int]:
    """FLOPs of one learner step over `tokens` = rows x T (padded: the learner computes every position).

    train:       3 x forward (forward + backward) = 6 x matmul weights + 12 x L x H x Dh x T per token
    remat:       'full' + a forward of the layers (2 x layer weights + 4 L H Dh T), 'dots' + the attention
                 einsums (4 L H Dh T); either way + the LM head (2 D V) when the log-probs are chunked
    reference:   + a forward (KL to the frozen reference: rl.kl_coef > 0)
    old_logprob: + a forward (rl.recompute_old_logprobs)
    """
    fwd = forward_flops_per_token(mc, length)
    attn = 4 * mc.num_layers * mc.num_heads * mc.head_dim * length
    out = {"train": 3 * fwd * tokens}
    recompute = 0
    if remat == "full":
        recompute = forward_flops_per_token(mc, length, with_logits=False)
    elif remat == "dots":
        recompute = attn
    if 0 < logits_chunk < length:
        recompute += 2 * mc.hidden_size * mc.vocab_size
    out["remat"] = recompute * tokens
    out["reference"] = fwd * tokens if reference else 0
    out["old_logprobs"] = fwd * tokens if recompute_old else 0
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
    prefill = (layout.prefix * forward_flops_per_token(mc, su, with_logits=False) + lm
               + steps * (layout.rest * forward_flops_per_token(mc, su, with_logits=False) + lm)
               + layout.final_prompt * forward_flops_per_token(mc, sf, with_logits=False) + lm)
    decode = (chunks * layout.memory * forward_flops_per_token(mc, su)
              + layout.answer * forward_flops_per_token(mc, sf))
    out = {"prefill": trajectories * prefill, "decode": trajectories * decode}
    out["total"] = out["prefill"] + out["decode"]
    return out


def decode_step_seconds(mc, rows_per_device: int, slots: int, mesh: MeshShape, hw: Hardware, param_dtype: str,
                        cache_dtype: str) -> tuple[float, int]:
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


# -------------------------------------------------------------------------------------------- plan


@dataclasses.dataclass
class Plan:
    """Everything the planner computed for one config on one hardware (bytes per device, FLOPs per step)."""

    name: str
    model_name: str
    model: Any  # ModelConfig
    hardware: Hardware
    mesh: MeshShape
    layout: Layout
    settings: dict[str, Any]
    memory: dict[str, int]
    notes: dict[str, str]
    flops: dict[str, int]
    seconds: dict[str, float]
    usable_bytes: int
    fits: bool
    verdict: str
    warnings: list[str]
    rollout_mesh: MeshShape | None = None  # the rollout's mesh (the learner's unless config.mesh.rollout_devices)
    suggestions: list[str] = dataclasses.field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return self.memory["peak"]

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.name, "model": self.model_name, "params": param_count(self.model),
            "hardware": dataclasses.asdict(self.hardware), "devices": self.settings["devices"],
            "mesh": self.mesh.shape, "rollout_mesh": (self.rollout_mesh or self.mesh).shape,
            "layout": dataclasses.asdict(self.layout), "settings": self.settings,
            "memory_bytes": self.memory, "memory_gib": {k: round(v / GiB, 3) for k, v in self.memory.items()},
            "usable_bytes": self.usable_bytes, "usable_gib": round(self.usable_bytes / GiB, 3),
            "flops": self.flops, "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "fits": self.fits, "verdict": self.verdict, "warnings": self.warnings, "suggestions": self.suggestions,
        }


def model_config_from(cfg):
    """(ModelConfig with the config's dtypes and remat, display name): `config.json` of config.model.path when
    that folder exists, else the preset config.model.preset."""
    import os

    from memagent_jax.models import presets
    from memagent_jax.models.config import ModelConfig

    m = cfg.model
    path = m.get("path", "") or ""
    preset = m.get("preset", "") or ""
    if path and os.path.isfile(os.path.join(path, "config.json")):
        mc, name = ModelConfig.from_hf_folder(path), path
    elif preset:
        try:
            mc, name = presets.preset_config(preset), preset
        except KeyError as e:
            raise PlanError(f"config.model.preset: {e.args[0]}") from None
    else:
        raise PlanError("config.model.preset (a models.presets name) or config.model.path (a folder with "
                        "config.json) is needed to size the model")
    options = {}
    if "attention_impl" in m:
        options["attention_impl"] = m.attention_impl or "auto"
    if "attention_block_size" in m:
        options["attention_block_size"] = int(m.attention_block_size)
    if "decode_layout" in m:
        options["decode_layout"] = m.decode_layout or "auto"
    try:
        mc = mc.replace(param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, remat=m.remat, **options)
    except ValueError as e:  # ConfigError: a bad attention_impl / block size
        raise PlanError(f"config.model: {e}") from None
    return mc, name


def layout_from(cfg, **templates) -> Layout:
    a = cfg.agent
    return Layout(question=a.question_tokens, memory=a.memory_tokens, chunk=a.chunk_tokens, answer=a.answer_tokens,
                  chunks_per_segment=a.chunks_per_segment, **templates)


def rollout_batch_size(cfg) -> int:
    """Trajectories per agent call: config.rl.rollout_batch_size when set (> 0), else the whole step."""
    total = cfg.rl.questions_per_step * cfg.rl.group_size
    size = int(cfg.rl.get("rollout_batch_size", 0) or 0)
    return min(size, total) if size > 0 else total


def train_reads_rollout_batch_size() -> bool:
    """Whether train.py runs the rollout in slices of config.rl.rollout_batch_size (it reads the field)."""
    try:
        from memagent_jax import train

        return "rollout_batch_size" in inspect.getsource(train)
    except Exception:  # no source (frozen install): assume it does
        return True


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def rollout_mesh_of(cfg, learner: MeshShape) -> tuple[MeshShape, int]:
    """(rollout mesh, its own device count): config.mesh.rollout_devices > 0 puts the rollout on that many more
    devices (data = rollout_devices / (rollout_fsdp x rollout_tensor)); 0 = the learner's mesh (count 0)."""
    n = int(cfg.mesh.get("rollout_devices", 0) or 0)
    if n <= 0:
        return learner, 0
    f, t = int(cfg.mesh.get("rollout_fsdp", 1) or 1), int(cfg.mesh.get("rollout_tensor", 1) or 1)
    if f < 1 or t < 1 or n % (f * t):
        raise PlanError(f"config.mesh.rollout_fsdp x config.mesh.rollout_tensor = {f} x {t} must divide "
                        f"config.mesh.rollout_devices={n}")
    return MeshShape(n // (f * t), f, t), n


def make_plan(cfg, *, hardware: str | Hardware | None = None, devices: int | None = None, mfu: float = 0.4,
              doc_tokens: int = 32000, usable_fraction: float = 0.9, name: str = "config",
              suggest: bool = True, **templates) -> Plan:
    """Sizes `cfg` (a configs/grpo.py-style ConfigDict) on `hardware` (default: config.hardware).

    devices: the run's device count, needed only when config.mesh has a -1 axis (it includes
    config.mesh.rollout_devices when the rollout has its own devices). `templates`: Layout template sizes.
    """
    hw = hardware if isinstance(hardware, Hardware) else get_hardware(hardware or cfg.get("hardware", "") or "")
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu}")
    if not 0 < usable_fraction <= 1:
        raise PlanError(f"--usable_fraction must be in (0, 1], got {usable_fraction}")
    if doc_tokens <= 0:
        raise PlanError(f"--doc_tokens must be positive, got {doc_tokens}")
    mc, model_name = model_config_from(cfg)
    extra = int(cfg.mesh.get("rollout_devices", 0) or 0)
    mesh = resolve_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices - extra if devices else None)
    rmesh, extra = rollout_mesh_of(cfg, mesh)
    separate = extra > 0
    layout = layout_from(cfg, **templates)
    rl = cfg.rl
    shards = mesh.batch_shards
    pdt, cdt = mc.param_dtype, mc.compute_dtype
    cb = DTYPE_BYTES[cdt]
    reference = rl.kl_coef > 0
    recompute_old = bool(rl.recompute_old_logprobs)

    # Rollout: rows per agent call, padded to the rollout mesh's batch shards (agent.run pads with inactive rows).
    trajectories = rl.questions_per_step * rl.group_size
    per_call = rollout_batch_size(cfg)
    calls = -(-trajectories // per_call)
    call_rows = _round_up(per_call, rmesh.batch_shards)
    rollout_rows = call_rows // rmesh.batch_shards

    # Learner: one row per conversation, padded to rows_multiple = M x (micro-batch rows or batch shards).
    chunks = layout.chunks(doc_tokens)
    conversations = trajectories * (chunks + 1)
    m = rl.num_minibatches
    micro = rl.micro_batch_size or 0
    if micro and micro % shards:
        raise PlanError(f"config.rl.micro_batch_size={micro} must be a multiple of the mesh's batch shards "
                        f"(data x fsdp = {shards})")
    n_rows = _round_up(conversations, m * (micro or shards))
    per_mb = n_rows // m
    micro_rows = micro or per_mb
    k_micro = per_mb // micro_rows
    micro_per_device = micro_rows // shards
    length = layout.learn_length(int(rl.get("length_multiple", 64)))
    # Packed rows (rl.pack_length) hold several conversations each; in the worst case (every conversation at its
    # full budget) they hold one each, as many rows as unpacked, each pack_length long.
    length = max(length, int(rl.get("pack_length", 0)))
    if layout.update_slots > mc.max_position_embeddings or layout.final_slots > mc.max_position_embeddings:
        raise PlanError(f"config.agent budgets need a context of {max(layout.update_slots, layout.final_slots)} "
                        f"tokens, more than the model's max_position_embeddings ({mc.max_position_embeddings})")

    mem: dict[str, int] = {}
    notes: dict[str, str] = {}
    on_rollout = " (rollout devices)" if separate else ""
    p_bytes = param_bytes_per_device(mc, mesh, pdt)
    mem["params"] = p_bytes
    notes["params"] = f"{pdt}, over fsdp x tensor"
    mem["optimizer"] = 2 * p_bytes
    notes["optimizer"] = f"AdamW mu + nu in {pdt} (optax: the params' dtype)"
    mem["reference"] = p_bytes if reference else 0
    notes["reference"] = f"frozen copy for the KL (kl_coef {rl.kl_coef:g})" if reference else "kl_coef = 0"
    mem["rollout_params"] = 2 * param_bytes_per_device(mc, rmesh, pdt) if separate else 0
    notes["rollout_params"] = ("copied from the learner every step (old + new copy)" if separate else
                               "none: the rollout uses the learner's params")
    mem["kv_update"] = kv_cache_bytes(mc, call_rows, layout.update_slots, rmesh, cdt)
    notes["kv_update"] = f"{rollout_rows} rows x {layout.update_slots} slots, {cdt}{on_rollout}"
    mem["kv_final"] = kv_cache_bytes(mc, call_rows, layout.final_slots, rmesh, cdt)
    notes["kv_final"] = f"{rollout_rows} rows x {layout.final_slots} slots, {cdt}{on_rollout}"
    platform = platform_of(hw)
    decode_layout = decode_layout_of(mc, platform)
    if decode_layout == "unstacked":
        # While a decode program runs: per-layer copies of the layer weights, and of the larger KV cache.
        mem["decode_copies"] = (layer_param_bytes_per_device(mc, rmesh, pdt)
                                + max(mem["kv_update"], mem["kv_final"]))
        notes["decode_copies"] = f"decode_layout 'unstacked': per-layer weights ({pdt}) + a second KV cache"
    else:
        mem["decode_copies"] = 0
        notes["decode_copies"] = "decode_layout 'scan': reads the stacked weights and cache in place"
    learner_persistent = mem["params"] + mem["optimizer"] + mem["reference"]
    rollout_persistent = mem["rollout_params"] + mem["kv_update"] + mem["kv_final"]
    mem["persistent"] = learner_persistent if separate else learner_persistent + rollout_persistent
    notes["persistent"] = "learner devices" if separate else ""

    weights_in_flight = working_weight_bytes(mc, rmesh.tensor, DTYPE_BYTES[pdt], cb)
    ro = rollout_activation_bytes(mc, rollout_rows, layout, rmesh.tensor, cb, platform=platform)
    mem["rollout_activations"] = ro["total"] + weights_in_flight + mem["decode_copies"]
    notes["rollout_activations"] = (f"{ro['program']}: {rollout_rows} rows x {ro['tokens']} tokens x "
                                    f"{ro['keys']} keys, {ro['path']} attention (scores {ro['scores'] / GiB:.1f} GiB)")
    mem["rollout_peak"] = (rollout_persistent if separate else mem["persistent"]) + mem["rollout_activations"]
    notes["rollout_peak"] = on_rollout.strip(" ()")

    f32_tree = param_bytes_per_device(mc, mesh, "float32")
    mem["gradients"] = f32_tree + (p_bytes if pdt != "float32" else 0)
    notes["gradients"] = "f32" + (f" (+ the {pdt} gradient before the cast)" if pdt != "float32" else "")
    mem["grad_accumulator"] = f32_tree if k_micro > 1 else 0
    notes["grad_accumulator"] = f"f32, {k_micro} micro-batches" if k_micro > 1 else "no micro-batching"
    mem["learner_batch"] = learner_batch_bytes(n_rows // shards, length, reference=reference,
                                               recompute_old=recompute_old)
    notes["learner_batch"] = f"{n_rows // shards} rows x {length} tokens"
    act = learner_activation_bytes(mc, micro_per_device, length, mc.remat, mesh.tensor, cb, platform=platform)
    mem["learner_activations"] = act["total"] + working_weight_bytes(mc, mesh.tensor, DTYPE_BYTES[pdt], cb)
    notes["learner_activations"] = (f"remat {mc.remat}, {micro_per_device} rows x {length} tokens, "
                                    f"{attention_path(mc, platform, length, length)} attention")
    mem["update_temporaries"] = p_bytes + 2 * p_bytes
    notes["update_temporaries"] = "new params + moments before the finite-check select"
    mem["learner_peak"] = (mem["persistent"] + mem["gradients"] + mem["grad_accumulator"] + mem["learner_batch"]
                           + max(mem["learner_activations"], mem["update_temporaries"]))
    notes["learner_peak"] = "learner devices" if separate else ""
    mem["peak"] = max(mem["rollout_peak"], mem["learner_peak"])

    # FLOPs and time (rollout on the rollout mesh, learning on the learner's; one after the other, as train.py).
    rf = rollout_flops(mc, calls * call_rows, layout, doc_tokens)
    lf = learning_flops(mc, n_rows * length, length, remat=mc.remat, reference=reference,
                        recompute_old=recompute_old)
    seconds: dict[str, float] = {}
    seconds["rollout_prefill"] = rf["prefill"] / (rmesh.size * hw.peak_flops * mfu)
    t_mem, read_mem = decode_step_seconds(mc, rollout_rows, layout.update_slots, rmesh, hw, pdt, cdt)
    t_ans, read_ans = decode_step_seconds(mc, rollout_rows, layout.final_slots, rmesh, hw, pdt, cdt)
    decode_steps = chunks * layout.memory + layout.answer
    seconds["rollout_decode"] = calls * (chunks * layout.memory * t_mem + layout.answer * t_ans)
    seconds["learning"] = lf["total"] / (mesh.size * hw.peak_flops * mfu)
    seconds["step"] = seconds["rollout_prefill"] + seconds["rollout_decode"] + seconds["learning"]
    flops = {"rollout_prefill": rf["prefill"], "rollout_decode": rf["decode"], "learning": lf["total"],
             "learning_train": lf["train"], "learning_remat": lf["remat"], "learning_reference": lf["reference"],
             "learning_old_logprobs": lf["old_logprobs"]}
    flops["total"] = flops["rollout_prefill"] + flops["rollout_decode"] + flops["learning"]

    usable = int(hw.hbm_bytes * usable_fraction)
    fits = mem["peak"] <= usable
    settings = {
        "devices": mesh.size + extra, "rollout_devices": extra, "rollout_mesh": rmesh.shape,
        "trajectories": trajectories, "rollout_batch_size": per_call, "rollout_calls": calls,
        "rollout_rows_per_device": rollout_rows, "chunks": chunks, "doc_tokens": doc_tokens,
        "conversations": conversations, "learner_rows": n_rows, "learn_length": length, "minibatches": m,
        "micro_batches": k_micro, "micro_batch_rows": micro_rows, "micro_rows_per_device": micro_per_device,
        "decode_steps_per_call": decode_steps, "decode_bytes_per_step": read_mem,
        "decode_bytes_per_answer_step": read_ans,
        "fsdp_gather_bytes_per_decode_step": (gathered_param_bytes(mc, rmesh, pdt) - param_bytes_per_device(
            mc, rmesh, pdt) if rmesh.fsdp > 1 else 0),
        "mfu": mfu, "remat": mc.remat, "param_dtype": pdt, "compute_dtype": cdt,
        "attention_impl": mc.attention_impl, "rollout_attention": ro["path"], "decode_layout": decode_layout,
        "learner_attention": attention_path(mc, platform, length, length),
    }
    warnings = _warnings(cfg, mc, per_call, trajectories, mesh.size + extra, hw, calls, templates)
    if fits:
        verdict = f"fits: peak {mem['peak'] / GiB:.1f} GiB of {usable / GiB:.1f} GiB usable per device"
    else:
        if mem["rollout_peak"] >= mem["learner_peak"]:
            what = (f"the rollout ({notes['rollout_activations']}; KV caches "
                    f"{(mem['kv_update'] + mem['kv_final']) / GiB:.1f} GiB)")
            peak = mem["rollout_peak"]
        else:
            what = (f"the learner step (activations {mem['learner_activations'] / GiB:.1f} GiB: "
                    f"{notes['learner_activations']})")
            peak = mem["learner_peak"]
        verdict = f"DOES NOT FIT: {what} needs {peak / GiB:.1f} GiB of {usable / GiB:.1f} GiB per device"
    plan = Plan(name=name, model_name=model_name, model=mc, hardware=hw, mesh=mesh, layout=layout,
                settings=settings, memory=mem, notes=notes, flops=flops, seconds=seconds, usable_bytes=usable,
                fits=fits, verdict=verdict, warnings=warnings, rollout_mesh=rmesh)
    if not fits and suggest:
        plan.suggestions = suggest_fixes(cfg, hw, mesh, devices=mesh.size + extra, mfu=mfu, doc_tokens=doc_tokens,
                                         usable_fraction=usable_fraction, **templates)
        if plan.suggestions:
            plan.verdict += ", try " + plan.suggestions[0]
        else:
            plan.verdict += ", try more devices (a larger slice or more nodes) or smaller budgets"
    return plan


def _warnings(cfg, mc, per_call, trajectories, devices, hw, calls, templates) -> list[str]:
    out = []
    lr = cfg.rl.learning_rate
    if mc.param_dtype != "float32" and lr < 6e-5:
        out.append(f"param_dtype {mc.param_dtype} with learning_rate {lr:g}: AdamW moves a weight by about the "
                   f"learning rate per update, but a {mc.param_dtype} weight of size 0.02 only changes by steps of "
                   f">= 6e-5 (half an ulp), so most updates round away: use --config.model.param_dtype=float32 "
                   f"(master weights) with compute_dtype bfloat16")
    if per_call < trajectories and trajectories % per_call:
        out.append(f"config.rl.rollout_batch_size={per_call} does not divide the {trajectories} trajectories of a "
                   f"step: the last agent call has another batch size (a second compile and a second pair of KV "
                   f"caches, not counted here)")
    if per_call < trajectories and not train_reads_rollout_batch_size():
        whole = make_plan(_with(cfg, **{"rl.rollout_batch_size": 0}), hardware=hw, devices=devices, suggest=False,
                          **templates)
        out.append(f"config.rl.rollout_batch_size={per_call}: this plan runs the rollout in {calls} agent calls, "
                   f"but memagent_jax/train.py does not read that field yet and rolls out all {trajectories} "
                   f"trajectories in one call: {whole.memory['rollout_peak'] / GiB:.0f} GiB per device")
    tensors = {int(cfg.mesh.tensor), int(cfg.mesh.get("rollout_tensor", 1) or 1)
               if int(cfg.mesh.get("rollout_devices", 0) or 0) else int(cfg.mesh.tensor)}
    for t in sorted(tensors):
        if t > 1 and mc.num_kv_heads % t:
            out.append(f"tensor={t} does not divide the {mc.num_kv_heads} KV heads: KV caches and attention are "
                       f"replicated over 'tensor' (this plan assumes so)")
    return out


def _with(cfg, **changes):
    """A copy of cfg with dotted fields changed ('rl.micro_batch_size': 16)."""
    new = cfg.copy_and_resolve_references()
    with new.unlocked():
        for key, value in changes.items():
            node = new
            parts = key.split(".")
            for p in parts[:-1]:
                node = node[p]
            node[parts[-1]] = value
    return new


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def suggest_fixes(cfg, hw: Hardware, mesh: MeshShape, *, devices: int, **kwargs) -> list[str]:
    """Override sets (command-line flags) that make the plan fit on the same devices, the smallest change first:
    remat 'full' (and attention_impl 'auto' when it is 'materialized'); then also one row per device per micro-batch; then also the largest rollout_batch_size (a power
    of two no larger than now) that fits; then the same on meshes with other tensor sizes (the learner's mesh)."""
    trajectories = cfg.rl.questions_per_step * cfg.rl.group_size
    current = rollout_batch_size(cfg)
    base: dict[str, Any] = {} if cfg.model.remat == "full" else {"model.remat": "full"}
    if (cfg.model.get("attention_impl") or "auto") == "materialized":
        base["model.attention_impl"] = "auto"  # no [T, S] scores (blockwise / cuDNN)
    meshes = [(mesh.data, mesh.fsdp, mesh.tensor)] + [(1, mesh.size // t, t) for t in _divisors(mesh.size)
                                                       if t != mesh.tensor and t <= 16]
    candidates: list[dict[str, Any]] = []
    if base:
        candidates.append(dict(base))
    for data, fsdp, tensor in meshes:
        shards = data * fsdp
        change = dict(base)
        if (data, fsdp, tensor) != (mesh.data, mesh.fsdp, mesh.tensor):
            change.update({"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor})
        change["rl.micro_batch_size"] = shards
        candidates.append(dict(change))
        size = 1 << (current.bit_length() - 1)  # the largest power of two <= the current rollout batch
        while size >= 1:
            if trajectories % size == 0:
                candidates.append({**change, "rl.rollout_batch_size": size})
            size //= 2
    for change in candidates:
        try:
            p = make_plan(_with(cfg, **change), hardware=hw, devices=devices, suggest=False, **kwargs)
        except PlanError:
            continue
        if p.fits:
            flags = " ".join(f"--config.{k}={v}" for k, v in change.items() if _differs(cfg, k, v))
            return [flags] if flags else []
    return []


def _differs(cfg, key: str, value) -> bool:
    node = cfg
    for p in key.split("."):
        if p not in node:
            return True
        node = node[p]
    return node != value
