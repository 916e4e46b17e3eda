"""Model configuration: the architecture facts read from a Hugging Face `config.json`.

`ModelConfig` is a frozen (hashable) dataclass so it can be a static argument of `jax.jit`.
It covers the decoder-only Qwen/Llama family:

  * ``qwen2`` (Qwen2 / Qwen2.5): q/k/v projections with bias;
  * ``qwen3``: per-head RMSNorm on q and k, no bias;
  * ``llama`` (Llama 2/3, incl. Llama 3 rope scaling): optional ``attention_bias`` / ``mlp_bias``.

Both config dialects are read: transformers 5 (``dtype``, ``rope_parameters``) and the older one
(``torch_dtype``, ``rope_theta`` + ``rope_scaling``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from memagent_jax.errors import UserError

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# models/attention.py's ATTENTION_IMPLS (repeated here: this module imports no JAX).
ATTENTION_IMPLS = ("auto", "materialized", "blockwise", "cudnn", "splash")
DECODE_LAYOUTS = ("auto", "scan", "unstacked")

_HF_ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}

_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
}


class ConfigError(UserError):
    """A model config is missing a field, has a bad value, or names an unsupported architecture."""


def canonical_dtype(name: str | Any, *, field: str = "dtype") -> str:
    """Returns 'float32' / 'bfloat16' / 'float16' for any common spelling (or a numpy/jax dtype)."""
    if not isinstance(name, str):
        name = np.dtype(name).name
    key = name.lower().replace("torch.", "").replace("jnp.", "")
    if key not in _DTYPE_NAMES:
        raise ConfigError(f"{field}: unsupported dtype {name!r}; use one of float32, bfloat16, float16")
    return _DTYPE_NAMES[key]


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters.

    rope_type: 'default' | 'linear' | 'llama3'.
    theta: base of the inverse frequencies.
    factor: scaling factor ('linear', 'llama3').
    low_freq_factor, high_freq_factor, original_max_position_embeddings: 'llama3' only.
    """

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inverse_frequencies(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies `[head_dim // 2]` (float64 on host; the model casts to f32)."""
        exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        if self.rope_type == "default":
            return inv_freq
        if self.rope_type == "linear":
            return inv_freq / self.factor
        if self.rope_type == "llama3":
            # Llama 3.1 scheme: leave high frequencies alone, divide low frequencies by `factor`,
            # and blend smoothly in between (wavelength measured against the original context).
            old_len = self.original_max_position_embeddings
            low_freq_wavelen = old_len / self.low_freq_factor
            high_freq_wavelen = old_len / self.high_freq_factor
            wavelen = 2.0 * math.pi / inv_freq
            scaled = np.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
            smooth = (old_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            blended = (1.0 - smooth) * scaled / self.factor + smooth * scaled
            is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
            return np.where(is_medium, blended, scaled)
        raise ConfigError(f"rope type {self.rope_type!r} not supported (supported: {SUPPORTED_ROPE_TYPES})")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer of the Qwen/Llama family.

    Shapes used throughout the model code:
      D = hidden_size, F = intermediate_size, L = num_layers, H = num_heads,
      K = num_kv_heads, Dh = head_dim, V = vocab_size.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (always True for qwen2)
    attention_out_bias: bool = False  # bias on o_proj (llama with attention_bias=True)
    mlp_bias: bool = False
    qk_norm: bool = False  # qwen3
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # Numerics: params are stored in `param_dtype`, matmuls run in `compute_dtype`;
    # norms, softmax and logits are always f32.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    # Activation rematerialisation of the layer scan: 'none' | 'full' | 'dots'.
    remat: str = "none"
    # Run layers with `lax.scan` (compile time flat in depth). False unrolls them (debugging, baselines).
    scan_layers: bool = True
    # Attention kernel (models/attention.py): 'auto' | 'materialized' | 'blockwise' | 'cudnn'. 'auto' = cuDNN
    # flash attention on CUDA GPUs where it applies (bf16/f16), blockwise on TPU (and on GPU otherwise), and on
    # CPU materialised when a call fits one block (T <= query block and S <= key block), blockwise above.
    # Not part of the checkpoint: never written to config.json.
    attention_impl: str = "auto"
    # Blockwise attention: key slots and query tokens per block (need not divide S / T).
    attention_block_size: int = 512
    attention_query_block_size: int = 512
    # Layer layout of the per-token decode loop (runtime choice only: never written to config.json):
    #   'scan'      - the decode step scans the stacked [L, ...] weights like prefill does;
    #   'unstacked' - the decode program splits the weights into L per-layer arrays once, outside its loops,
    #                 and runs the layers as a Python loop, so every matmul reads its weight in place, and each
    #                 decode loop gives every layer its own KV-cache buffers (costs one extra copy of the layer
    #                 weights, held by the sampler or agent between calls, and of the KV cache while a decode
    #                 loop runs);
    #   'auto'      - 'unstacked' on CPU and GPU, 'scan' on TPU (see `resolved_decode_layout`).
    decode_layout: str = "auto"

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        object.__setattr__(self, "param_dtype", canonical_dtype(self.param_dtype, field="param_dtype"))
        object.__setattr__(self, "compute_dtype", canonical_dtype(self.compute_dtype, field="compute_dtype"))
        if self.remat not in ("none", "full", "dots"):
            raise ConfigError(f"remat must be 'none', 'full' or 'dots', got {self.remat!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"attention_impl must be one of {', '.join(repr(a) for a in ATTENTION_IMPLS)}, "
                f"got {self.attention_impl!r}"
            )
        for name in ("attention_block_size", "attention_query_block_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.rope.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope type {self.rope.rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if self.decode_layout not in DECODE_LAYOUTS:
            raise ConfigError(
                f"decode_layout must be one of {', '.join(repr(v) for v in DECODE_LAYOUTS)}, got {self.decode_layout!r}"
            )

    @property
    def resolved_decode_layout(self) -> str:
        """'scan' or 'unstacked': what `decode_layout` means here ('auto' looks at JAX's default backend).

        'auto' = 'unstacked' on CPU and GPU, 'scan' on TPU.
          * CPU: in a scanned decode step XLA dynamic-slices and copies every weight matrix out of the
            [L, ...] stack before its dot, and each layer's KV cache out of the stacked cache, so a
            bandwidth-bound step reads those twice and writes them once. 'unstacked' gives each layer its own
            weight arrays (`unstack_layers`) and its own cache buffers for the decode loop
            (`split_cache_layers`), so every dot reads in place (benchmarks/bench_agent.py compares the two).
            The costs: one extra copy of the layer weights in memory (made once per weights and held between
            calls by `Sampler` / `MemoryAgent`: `sampling.sampler.InferenceLayout`), a second copy
            of the KV cache while a decode loop runs, and a compile time that grows with depth (the decode step
            is unrolled over layers).
          * GPU: the same copies appear in the scanned decode loop, and 'unstacked' avoids them
            (benchmarks/bench_gpu.py compares the two). The copies cost device memory (a 7B model in bf16:
            ~13 GB of layer weights, divided by the rollout mesh's sharding); the planner counts them ('decode
            copies') and every shipped GPU config fits with them. Set 'scan' where memory is short.
          * TPU: 'scan'. A leading-axis slice of a contiguous stack can be read in place by TPU
            matmuls; set 'unstacked' when the decode HLO on the target shows the weight copies (`copy` /
            `dynamic-slice` of weight shapes in the while body) and memory allows.
        """
        if self.decode_layout != "auto":
            return self.decode_layout
        import jax  # deferred: this module is imported by JAX-free tools (the planner)

        return "scan" if jax.default_backend() == "tpu" else "unstacked"

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, f, h, k, dh, v = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.vocab_size,
        )
        attn = d * h * dh + 2 * d * k * dh + h * dh * d
        if self.attention_bias:
            attn += h * dh + 2 * k * dh
        if self.attention_out_bias:
            attn += d
        if self.qk_norm:
            attn += 2 * dh
        mlp = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * d
        total = self.num_layers * per_layer + v * d + d
        if not self.tie_word_embeddings:
            total += d * v
        return total

    # ------------------------------------------------------------------ HF dialects

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json", **overrides) -> ModelConfig:
        """Builds a config from a parsed HF `config.json` dict; `source` names it in errors."""

        def need(key: str):
            if key not in hf or hf[key] is None:
                raise ConfigError(f"{source}: required field {key!r} is missing")
            return hf[key]

        model_type = hf.get("model_type")
        if model_type is None:
            raise ConfigError(f"{source}: required field 'model_type' is missing")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        head_dim = hf.get("head_dim") or hidden // heads
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        if hf.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported (full attention only)")
        eos = hf.get("eos_token_id")
        eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        attention_bias = bool(hf.get("attention_bias", False))
        kwargs = dict(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(hf, source),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True if model_type == "qwen2" else attention_bias,
            attention_out_bias=model_type == "llama" and attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)) if model_type == "llama" else False,
            qk_norm=model_type == "qwen3",
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
            param_dtype=canonical_dtype(dtype, field=f"{source}: dtype"),
            compute_dtype=canonical_dtype(dtype, field=f"{source}: dtype"),
        )
        kwargs.update(overrides)
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_hf_folder(cls, folder: str | os.PathLike, **overrides) -> ModelConfig:
        """Reads `<folder>/config.json`; clear errors for a missing folder/file or bad JSON."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"model folder {folder!r} does not exist or is not a directory")
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: config.json is missing (expected a Hugging Face model folder)")
        try:
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(hf, dict):
            raise ConfigError(f"{path}: expected a JSON object at top level")
        return cls.from_hf_dict(hf, source=path, **overrides)

    def to_hf_dict(self, *, dtype: str | None = None) -> dict[str, Any]:
        """A transformers-5 style `config.json` dict describing this architecture."""
        rope: dict[str, Any] = {"rope_type": self.rope.rope_type, "rope_theta": self.rope.theta}
        if self.rope.rope_type in ("linear", "llama3"):
            rope["factor"] = self.rope.factor
        if self.rope.rope_type == "llama3":
            rope.update(
                low_freq_factor=self.rope.low_freq_factor,
                high_freq_factor=self.rope.high_freq_factor,
                original_max_position_embeddings=self.rope.original_max_position_embeddings,
            )
        eos: Any = list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0]
        hf: dict[str, Any] = {
            "architectures": [_HF_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_parameters": rope,
            # Old-dialect keys too, so older transformers/serving engines read the same rope.
            "rope_theta": self.rope.theta,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos if self.eos_token_ids else None,
            "pad_token_id": self.pad_token_id,
            "dtype": dtype or self.param_dtype,
            "use_cache": True,
        }
        if self.model_type == "llama":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = self.mlp_bias
        if self.model_type == "qwen3":
            hf["attention_bias"] = False
        if self.model_type in ("qwen2", "qwen3"):
            hf["use_sliding_window"] = False
        return hf


def _rope_from_hf(hf: dict[str, Any], source: str) -> RopeConfig:
    """Reads rope settings from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (older)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]  # per-layer-type form
    merged: dict[str, Any] = {}
    if isinstance(params, dict):
        merged.update(params)
    scaling = hf.get("rope_scaling")
    if isinstance(scaling, dict):
        for key, value in scaling.items():
            merged.setdefault(key, value)
    theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope type {rope_type!r} (rope_parameters/rope_scaling) is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    kwargs: dict[str, Any] = dict(rope_type=rope_type, theta=float(theta))
    if rope_type in ("linear", "llama3"):
        if "factor" not in merged:
            raise ConfigError(f"{source}: rope type {rope_type!r} needs a 'factor'")
        kwargs["factor"] = float(merged["factor"])
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in merged:
                raise ConfigError(f"{source}: rope type 'llama3' needs {key!r}")
        kwargs["low_freq_factor"] = float(merged["low_freq_factor"])
        kwargs["high_freq_factor"] = float(merged["high_freq_factor"])
        kwargs["original_max_position_embeddings"] = int(merged["original_max_position_embeddings"])
    return RopeConfig(**kwargs)
