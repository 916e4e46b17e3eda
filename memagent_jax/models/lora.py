"""LoRA adapters on the transformer's projections, with qwix's LoRA rule and einsum arithmetic.

Each targeted weight W (one of the attention q/k/v/o and MLP gate/up/down projections, stacked over the L layers)
gets a pair of adapters A (fan-in, qwix's `LoraRule.lora_a_initializer`: He-uniform) and B (fan-out, zeros), with
the shapes and the einsum that `qwix.LoraProvider` derives from the weight's einsum. The adapted weight is

    W' = W + (alpha / rank) * einsum(A, B)            (so W' == W at initialisation: B is zero)

Why a params transform rather than `qwix.apply_lora_to_model`: qwix's interception creates the adapters lazily as
attributes of the module that calls the einsum, on the first call. Our model runs its layers as a `lax.scan` over
[L, ...] stacked weights, each step merging a throwaway `Block` from one layer's slice (`transformer.hidden_states`);
adapters created there are attributes of that per-step block, never stacked, and the call fails inside the scan
(the probe: `qwix.apply_lora_to_model(Transformer(...), qwix.LoraProvider(module_path='.*', rank=2, alpha=2.0), ...)`
raises IndexError in `lax.scan`, and IndexError on a 0-d slice with `scan_layers=False`). So the adapters here are
a plain pytree beside the params, with qwix's shapes (`_parse_einsum_str_for_lora`) and rule, and every forward
path (scan, unstacked decode, KV cache) is unchanged: it runs on `merge(params, adapters)`.

Adapter pytree (f32): {'layers': {'attn': {'q_proj': {'a': [L, D, r], 'b': [L, r, H, Dh]}, ...},
                                  'mlp': {'gate_proj': {'a': [L, D, r], 'b': [L, r, F]}, ...}}}
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memagent_jax import settings
from memagent_jax.models.config import ModelConfig

# target name -> (module, the einsum the model computes with that weight, per layer)
TARGETS: dict[str, tuple[str, str]] = {
    "q_proj": ("attn", "btd,dhk->bthk"),
    "k_proj": ("attn", "btd,dhk->bthk"),
    "v_proj": ("attn", "btd,dhk->bthk"),
    "o_proj": ("attn", "bthk,hkd->btd"),
    "gate_proj": ("mlp", "bd,df->bf"),
    "up_proj": ("mlp", "bd,df->bf"),
    "down_proj": ("mlp", "bf,fd->bd"),
}
ALL_TARGETS = tuple(TARGETS)
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LoraConfigError(settings.SettingError):
    """A `config.lora` setting is invalid; the message names the field."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank: adapter rank (0: LoRA off, full fine-tuning).   alpha: scale numerator (the update is alpha / rank).
    targets: regular expressions over the projection names (`ALL_TARGETS`); each must match at least one.
    dropout: must be 0 (no dropout on the adapter input).   save_adapters: also write the adapters alone at export.
    seed: the adapters' initialisation seed."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = ALL_TARGETS
    dropout: float = 0.0
    save_adapters: bool = False
    seed: int = 0

    def __post_init__(self):
        err = LoraConfigError
        settings.integer("rank", self.rank, minimum=0, error=err)
        settings.real("alpha", self.alpha, low=0, low_open=True, error=err)
        settings.real(
            "dropout", self.dropout, low=0, high=0, allowed="0 (adapter dropout is not implemented)", error=err
        )
        settings.boolean("save_adapters", self.save_adapters, error=err)
        settings.integer("seed", self.seed, minimum=0, error=err)
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets:
            raise err.at("targets", f"must name at least one of {', '.join(ALL_TARGETS)}")
        for pattern in targets:
            try:
                compiled = re.compile(str(pattern))
            except re.error as e:
                raise err.at("targets", f"has a bad regular expression {pattern!r}: {e}") from None
            if not any(compiled.fullmatch(name) for name in ALL_TARGETS):
                raise err.at("targets", f"{pattern!r} matches none of {', '.join(ALL_TARGETS)}")
        object.__setattr__(self, "targets", targets)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    @property
    def target_names(self) -> tuple[str, ...]:
        """The projections adapted, in `ALL_TARGETS` order."""
        return tuple(n for n in ALL_TARGETS if any(re.fullmatch(p, n) for p in self.targets))

    def rule(self):
        """The `qwix.LoraRule` of these settings (module_path: the targets as one regular expression)."""
        import qwix

        return qwix.LoraRule(
            module_path="|".join(f"(?:{p})" for p in self.targets), rank=self.rank, alpha=float(self.alpha)
        )


def lora_config(section, path: str = "config.lora", *, error: type[ValueError] = settings.ConfigError) -> LoraConfig:
    """The validated `LoraConfig` of a config section (None or missing: LoRA off); errors name `path.<field>`."""
    if section is None:
        return LoraConfig()
    return settings.build(LoraConfig, section, path, error=error)


def _shapes(weight_shape, einsum: str, rank: int):
    """(a_shape, b_shape, merge einsum 'a,b->w') of one layer's weight, as qwix's LoraProvider.einsum derives them."""
    from qwix._src.providers.lora import _parse_einsum_str_for_lora

    lhs = einsum.split(",")[0]
    lhs_shape = (1,) * len(lhs)
    a_shape, b_shape, lora_eq, _, _ = _parse_einsum_str_for_lora(lhs_shape, tuple(weight_shape), einsum, rank)
    _, a_str, b_str = lora_eq.split("->")[0].split(",")
    w_str = einsum.split("->")[0].split(",")[1]
    return a_shape, b_shape, f"{a_str},{b_str}->{w_str}"


def _layer_weight(params, name):
    module, _ = TARGETS[name]
    return params["layers"][module][name]


def init_adapters(params, model_config: ModelConfig, config: LoraConfig, key: jax.Array | None = None):
    """Fresh adapters (f32) for `params` (arrays or `jax.ShapeDtypeStruct`s, the stacked layout)."""
    if key is None:
        key = jax.random.key(config.seed)
    rule = config.rule()
    out: dict = {}
    for i, name in enumerate(config.target_names):
        module, eq = TARGETS[name]
        w = _layer_weight(params, name)
        layers = w.shape[0]
        a_shape, b_shape, _ = _shapes(w.shape[1:], eq, config.rank)
        keys = jax.random.split(jax.random.fold_in(key, i), layers)
        a = jax.vmap(lambda k, s=a_shape: rule.lora_a_initializer(k, s, jnp.float32))(keys)
        b = jnp.zeros((layers,) + tuple(b_shape), jnp.float32)
        out.setdefault(module, {})[name] = {"a": a, "b": b}
    return {"layers": out}


def abstract_adapters(abstract_params, model_config: ModelConfig, config: LoraConfig):
    return jax.eval_shape(lambda: init_adapters(abstract_params, model_config, config, jax.random.key(0)))


def merge(params, adapters, config: LoraConfig):
    """params with every adapted weight replaced by W + scale * A.B (in W's dtype); differentiable in adapters."""
    layers = dict(params["layers"])
    for module, named in adapters["layers"].items():
        sub = dict(layers[module])
        for name, ab in named.items():
            w = sub[name]
            _, _, eq = _shapes(w.shape[1:], TARGETS[name][1], config.rank)
            delta = jax.vmap(lambda a, b, eq=eq: jnp.einsum(eq, a, b))(ab["a"], ab["b"])
            sub[name] = (w.astype(jnp.float32) + config.scale * delta).astype(w.dtype)
        layers[module] = sub
    return {**params, "layers": layers}


def num_adapter_params(model_config: ModelConfig, config: LoraConfig) -> int:
    """Adapter parameters over all layers (0 when LoRA is off)."""
    if not config.enabled:
        return 0
    c = model_config
    per_layer = 0
    dims = {
        "q_proj": (c.hidden_size, c.num_heads * c.head_dim),
        "k_proj": (c.hidden_size, c.num_kv_heads * c.head_dim),
        "v_proj": (c.hidden_size, c.num_kv_heads * c.head_dim),
        "o_proj": (c.num_heads * c.head_dim, c.hidden_size),
        "gate_proj": (c.hidden_size, c.intermediate_size),
        "up_proj": (c.hidden_size, c.intermediate_size),
        "down_proj": (c.intermediate_size, c.hidden_size),
    }
    for name in config.target_names:
        fan_in, fan_out = dims[name]
        per_layer += config.rank * (fan_in + fan_out)
    return per_layer * c.num_layers


# ------------------------------------------------------------------------------------------- export

_HF_MODULE = {"attn": "self_attn", "mlp": "mlp"}


def save_adapters(adapters, model_config: ModelConfig, config: LoraConfig, folder: str) -> str:
    """Writes the adapters alone in PEFT's layout: adapter_model.safetensors (lora_A [r, in], lora_B [out, r] per
    layer and projection, HF names) + adapter_config.json (r, lora_alpha, target_modules). Returns the folder."""
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    host = jax.device_get(adapters)
    tensors = {}
    for module, named in host["layers"].items():
        for name, ab in named.items():
            a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
            layers = a.shape[0]
            a2 = a.reshape(layers, -1, config.rank)  # [L, in, r]
            b2 = b.reshape(layers, config.rank, -1)  # [L, r, out]
            for i in range(layers):
                prefix = f"base_model.model.model.layers.{i}.{_HF_MODULE[module]}.{name}"
                tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a2[i].T)
                tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b2[i].T)
    save_file(tensors, os.path.join(folder, ADAPTER_FILE))
    meta = {
        "peft_type": "LORA",
        "r": config.rank,
        "lora_alpha": float(config.alpha),
        "lora_dropout": 0.0,
        "target_modules": list(config.target_names),
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "model_type": model_config.model_type,
    }
    with open(os.path.join(folder, ADAPTER_CONFIG), "w") as f:
        json.dump(meta, f, indent=2)
    return folder


def load_adapters(folder: str) -> tuple[dict[str, Any], dict]:
    """(tensors by name, adapter_config) of a `save_adapters` folder."""
    from safetensors.numpy import load_file

    with open(os.path.join(folder, ADAPTER_CONFIG)) as f:
        meta = json.load(f)
    return load_file(os.path.join(folder, ADAPTER_FILE)), meta
