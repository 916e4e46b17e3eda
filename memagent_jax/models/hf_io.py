"""Hugging Face checkpoint I/O: load a local HF folder onto a mesh, export params back to one.

Loading streams tensor by tensor from memory-mapped safetensors files: each HF tensor is read,
checked against the shape the config implies, re-laid out, cast, and placed straight onto its target
sharding; L-stacked parameters are filled one layer at a time in place on device. Host memory peaks
at about one tensor. Pickle checkpoints (`*.bin`, `*.pt`) are refused: safetensors only.

Export gathers one tensor at a time, writes sharded safetensors + `model.safetensors.index.json` +
`config.json` into a temporary folder and renames it into place, so a crash never leaves a
half-written model where a finished one is expected. Only process 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from memagent_jax.models import sharding as sharding_lib
from memagent_jax.models import transformer
from memagent_jax.models.config import ModelConfig
from memagent_jax.models.safetensors_io import CheckpointError, SafetensorsError, SafetensorsFile, write_safetensors

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "generation_config.json",
)


class NonFiniteWeightsError(CheckpointError):
    """A weight tensor holds NaN or inf values; `tensor` names it, `count` says how many values."""

    def __init__(self, message: str, tensor: str = "", count: int = 0):
        super().__init__(message)
        self.tensor = tensor
        self.count = count


@jax.jit
def _nonfinite_count(x: jax.Array) -> jax.Array:
    """[] int32: how many values of x are NaN or +-inf (one fused reduction, on x's devices)."""
    return jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)


def _check_finite(checks: list[tuple[str, str, jax.Array]], folder: str, dtype) -> None:
    """Raises NonFiniteWeightsError for the first tensor whose non-finite count is not 0.

    checks: (HF tensor name, its file, the device count from `_nonfinite_count`); fetched together at the end
    of loading, so the checks never stall the host between tensors."""
    counts = jax.device_get([c for _, _, c in checks])
    bad = [(name, path, int(n)) for (name, path, _), n in zip(checks, counts) if int(n)]
    if bad:
        name, path, n = bad[0]
        more = f" (and {len(bad) - 1} more tensors, e.g. {[b[0] for b in bad[1:4]]})" if len(bad) > 1 else ""
        raise NonFiniteWeightsError(
            f"{path}: tensor {name!r} holds {n} non-finite values (NaN or inf) as {np.dtype(dtype).name}{more}; "
            f"a model with such weights answers nothing useful. Pass allow_nonfinite=True "
            f"(--allow-nonfinite-weights / config allow_nonfinite_weights=True) to load it anyway",
            name,
            n,
        )


# ------------------------------------------------------------------------------------ name mapping


@dataclasses.dataclass(frozen=True)
class _Spec:
    """How one of our params maps onto HF tensors.

    path: our params path; hf_name: HF tensor name (with `{i}` for the layer index when per_layer);
    hf_shape: the HF tensor shape; to_ours / to_hf convert one (per-layer) tensor between layouts.
    """

    path: tuple[str, ...]
    hf_name: str
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    per_layer: bool


def _identity(x):
    return x


def _param_specs(config: ModelConfig) -> list[_Spec]:
    """The mapping table for a config (only the params this architecture has)."""
    c = config
    d, f, h, k, dh, v = (c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size)

    def proj_in(out_heads):  # HF Linear [heads*Dh, D] -> ours [D, heads, Dh]
        return (lambda w: w.T.reshape(d, out_heads, dh)), (lambda w: w.reshape(d, out_heads * dh).T)

    def bias(out_heads):  # [heads*Dh] -> [heads, Dh]
        return (lambda b: b.reshape(out_heads, dh)), (lambda b: b.reshape(out_heads * dh))

    transpose = (lambda w: w.T, lambda w: w.T)
    plain = (_identity, _identity)
    pre = "model.layers.{i}."
    specs = [
        (("embed",), "model.embed_tokens.weight", (v, d), plain, False),
        (("final_norm", "weight"), "model.norm.weight", (d,), plain, False),
        (("layers", "attn_norm", "weight"), pre + "input_layernorm.weight", (d,), plain, True),
        (("layers", "mlp_norm", "weight"), pre + "post_attention_layernorm.weight", (d,), plain, True),
        (("layers", "attn", "q_proj"), pre + "self_attn.q_proj.weight", (h * dh, d), proj_in(h), True),
        (("layers", "attn", "k_proj"), pre + "self_attn.k_proj.weight", (k * dh, d), proj_in(k), True),
        (("layers", "attn", "v_proj"), pre + "self_attn.v_proj.weight", (k * dh, d), proj_in(k), True),
        (
            ("layers", "attn", "o_proj"),
            pre + "self_attn.o_proj.weight",
            (d, h * dh),
            (lambda w: w.T.reshape(h, dh, d), lambda w: w.reshape(h * dh, d).T),
            True,
        ),
        (("layers", "mlp", "gate_proj"), pre + "mlp.gate_proj.weight", (f, d), transpose, True),
        (("layers", "mlp", "up_proj"), pre + "mlp.up_proj.weight", (f, d), transpose, True),
        (("layers", "mlp", "down_proj"), pre + "mlp.down_proj.weight", (d, f), transpose, True),
    ]
    if not c.tie_word_embeddings:
        specs.append((("lm_head",), "lm_head.weight", (v, d), transpose, False))
    if c.attention_bias:
        specs += [
            (("layers", "attn", "q_bias"), pre + "self_attn.q_proj.bias", (h * dh,), bias(h), True),
            (("layers", "attn", "k_bias"), pre + "self_attn.k_proj.bias", (k * dh,), bias(k), True),
            (("layers", "attn", "v_bias"), pre + "self_attn.v_proj.bias", (k * dh,), bias(k), True),
        ]
    if c.attention_out_bias:
        specs.append((("layers", "attn", "o_bias"), pre + "self_attn.o_proj.bias", (d,), plain, True))
    if c.qk_norm:
        specs += [
            (("layers", "attn", "q_norm"), pre + "self_attn.q_norm.weight", (dh,), plain, True),
            (("layers", "attn", "k_norm"), pre + "self_attn.k_norm.weight", (dh,), plain, True),
        ]
    if c.mlp_bias:
        specs += [
            (("layers", "mlp", "gate_bias"), pre + "mlp.gate_proj.bias", (f,), plain, True),
            (("layers", "mlp", "up_bias"), pre + "mlp.up_proj.bias", (f,), plain, True),
            (("layers", "mlp", "down_bias"), pre + "mlp.down_proj.bias", (d,), plain, True),
        ]
    return [_Spec(path, name, shape, conv[0], conv[1], per_layer) for path, name, shape, conv, per_layer in specs]


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ------------------------------------------------------------------------------------------ loading


def find_weight_files(folder: str) -> dict[str, SafetensorsFile]:
    """Maps every tensor name to its open safetensors file; clear errors for missing/pickle/bad index."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder {folder!r} does not exist or is not a directory")
    index_path = os.path.join(folder, INDEX_FILE)
    single_path = os.path.join(folder, SINGLE_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index (needs 'weight_map'): {e}") from None
        except OSError as e:
            raise CheckpointError(f"{index_path}: cannot be read ({e.strerror or e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
        opened: dict[str, SafetensorsFile] = {}
        by_name: dict[str, SafetensorsFile] = {}
        for name, shard in weight_map.items():
            if shard not in opened:
                shard_path = os.path.join(folder, shard)
                if not os.path.isfile(shard_path):
                    raise CheckpointError(
                        f"{index_path}: names shard {shard!r} (for tensor {name!r}), but {shard_path} does not exist"
                    )
                opened[shard] = SafetensorsFile(shard_path)
            if name not in opened[shard]:
                raise CheckpointError(f"{index_path}: says tensor {name!r} is in {shard!r}, but that file lacks it")
            by_name[name] = opened[shard]
        return by_name
    if os.path.isfile(single_path):
        f = SafetensorsFile(single_path)
        return {name: f for name in f.names()}
    pickles = sorted(n for n in os.listdir(folder) if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle weight files found ({', '.join(pickles)}); memagent-jax loads safetensors "
            f"only and never unpickles. Convert once with transformers: "
            f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)"
        )
    raise CheckpointError(f"{folder}: no {SINGLE_FILE} or {INDEX_FILE} found")


def _read_checked(files: dict[str, SafetensorsFile], name: str, expected_shape: tuple[int, ...]) -> np.ndarray:
    if name not in files:
        raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
    f = files[name]
    shape = f.shape(name)
    if tuple(shape) != tuple(expected_shape):
        raise CheckpointError(
            f"{f.path}: tensor {name!r} has shape {tuple(shape)}, but config.json implies {tuple(expected_shape)}"
        )
    return f.read(name)


def _to_device(host: np.ndarray, sharding) -> jax.Array:
    """Places a host array on a (possibly multi-process) sharding; each process supplies its shards."""
    if sharding is None:
        return jnp.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _set_layer(stacked: jax.Array, layer: jax.Array, value: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, value, layer, axis=0)


def load_hf_params(
    folder: str,
    config: ModelConfig | None = None,
    *,
    mesh=None,
    rules=None,
    param_dtype: str | None = None,
    progress: bool = False,
    allow_nonfinite: bool = False,
) -> tuple[dict, ModelConfig]:
    """Loads a local HF checkpoint folder into our params pytree.

    Args:
      folder: folder with config.json and model.safetensors (or sharded files + index).
      config: optional config (default: read from folder/config.json).
      mesh: optional `jax.sharding.Mesh` ('data', 'fsdp', 'tensor'); params go straight to their shards.
      rules: optional logical-axis rules (default `sharding.DEFAULT_RULES`).
      param_dtype: cast params to this dtype (default: the checkpoint's dtype).
      progress: log one line per tensor group.
      allow_nonfinite: load tensors holding NaN / inf (after the cast to the param dtype) instead of raising
        `NonFiniteWeightsError` naming the first such tensor (each tensor is checked on its devices while
        loading: one fused reduction per tensor).
    Returns:
      (params, config) where config.param_dtype is the loaded dtype.
    """
    folder = os.fspath(folder)
    if config is None:
        config = ModelConfig.from_hf_folder(folder)
    if param_dtype is not None:
        config = config.replace(param_dtype=param_dtype)
    files = find_weight_files(folder)
    abstract = transformer.abstract_params(config)
    shardings = sharding_lib.param_shardings(abstract, mesh, rules) if mesh is not None else None
    target_dtype = np.dtype(jnp.dtype(config.param_dtype))
    specs = _param_specs(config)
    used: set[str] = set()
    params: dict = {}
    checks: list[tuple[str, str, jax.Array]] = []
    start = time.time()
    for spec in specs:
        struct = _get(abstract, spec.path)
        sharding = _get(shardings, spec.path) if shardings is not None else None
        if not spec.per_layer:
            host = spec.to_ours(_read_checked(files, spec.hf_name, spec.hf_shape)).astype(target_dtype)
            value = _to_device(host, sharding)
            if not allow_nonfinite:
                checks.append((spec.hf_name, files[spec.hf_name].path, _nonfinite_count(value)))
            _set(params, spec.path, value)
            used.add(spec.hf_name)
            continue
        layer_sharding = None
        if sharding is not None:
            layer_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
        # The layer index is traced: one compile per tensor kind, not one per layer.
        set_layer = jax.jit(_set_layer, donate_argnums=0, out_shardings=sharding)
        stacked = jax.jit(lambda: jnp.zeros(struct.shape, struct.dtype), out_shardings=sharding)()
        for i in range(config.num_layers):
            name = spec.hf_name.format(i=i)
            host = spec.to_ours(_read_checked(files, name, spec.hf_shape)).astype(target_dtype)
            value = _to_device(host, layer_sharding)
            if not allow_nonfinite:
                checks.append((name, files[name].path, _nonfinite_count(value)))
            stacked = set_layer(stacked, jnp.int32(i), value)
            used.add(name)
        _set(params, spec.path, stacked)
        if progress:
            log.info("loaded %s (%d layers) after %.1fs", "/".join(spec.path), config.num_layers, time.time() - start)
    if checks:
        _check_finite(checks, folder, target_dtype)
    ignored = sorted(set(files) - used)
    if ignored:
        log.info("%s: ignored %d tensors not used by this architecture (e.g. %s)", folder, len(ignored), ignored[:3])
    return params, config


# ------------------------------------------------------------------------------------------ export


def _fetch(array: jax.Array) -> np.ndarray:
    """One (possibly multi-process) array to host numpy, on every process."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _hf_tensors(params: dict, config: ModelConfig, dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    for spec in _param_specs(config):
        value = _get(params, spec.path)
        if spec.per_layer:
            for i in range(config.num_layers):
                yield spec.hf_name.format(i=i), np.ascontiguousarray(spec.to_hf(_fetch(value[i])).astype(dtype))
        else:
            yield spec.hf_name, np.ascontiguousarray(spec.to_hf(_fetch(value)).astype(dtype))


def _hf_layout(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for spec in _param_specs(config):
        if spec.per_layer:
            out += [(spec.hf_name.format(i=i), spec.hf_shape) for i in range(config.num_layers)]
        else:
            out.append((spec.hf_name, spec.hf_shape))
    return out


def save_hf_checkpoint(
    params: dict,
    config: ModelConfig,
    out_dir: str,
    *,
    dtype: str | None = None,
    base_folder: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    extra_files: dict[str, str] | None = None,
) -> str:
    """Exports params as a Hugging Face folder loadable by `AutoModelForCausalLM.from_pretrained`.

    Args:
      params: our params pytree (may be sharded, even across processes).
      config: the model config.
      out_dir: destination folder; replaced atomically if it exists.
      dtype: weight dtype in the files (default: config.param_dtype).
      base_folder: an HF folder whose config.json fields are kept (dtype updated) and whose tokenizer /
        generation-config files are copied, so the export is a complete, servable model.
      max_shard_bytes: split weights into files of at most about this size (always with an index).
      extra_files: {file name: text content} written alongside.
    Returns:
      out_dir.
    """
    from memagent_jax.models.config import canonical_dtype

    dtype_name = canonical_dtype(dtype or config.param_dtype)
    np_dtype = np.dtype(jnp.dtype(dtype_name))
    layout = _hf_layout(config)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in layout:
        nbytes = int(np.prod(shape)) * np_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    file_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    is_writer = jax.process_index() == 0

    hf_config = config.to_hf_dict(dtype=dtype_name)
    if base_folder is not None:
        base_config_path = os.path.join(base_folder, "config.json")
        if os.path.isfile(base_config_path):
            with open(base_config_path, encoding="utf-8") as f:
                base = json.load(f)
            base.update({k: hf_config[k] for k in ("dtype", "architectures")})
            base.pop("torch_dtype", None)
            hf_config = base

    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    tmp_dir = None
    if is_writer:
        os.makedirs(parent, exist_ok=True)
        clean_stale_exports(out_dir)
        tmp_dir = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    tensors = _hf_tensors(params, config, np_dtype)  # every process gathers (collectives), process 0 writes
    weight_map: dict[str, str] = {}
    total = 0
    for shard, file_name in zip(shards, file_names):
        specs = [(name, shape, np_dtype) for name, shape in shard]
        chunk = ((name, next(tensors)[1]) for name, _ in shard)
        if is_writer:
            write_safetensors(os.path.join(tmp_dir, file_name), specs, chunk)
        else:
            for _ in chunk:
                pass
        for name, shape in shard:
            weight_map[name] = file_name
            total += int(np.prod(shape)) * np_dtype.itemsize
    if not is_writer:
        return out_dir

    with open(os.path.join(tmp_dir, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2)
    if base_folder is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(base_folder, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(tmp_dir, name))
    for name, text in (extra_files or {}).items():
        with open(os.path.join(tmp_dir, name), "w", encoding="utf-8") as f:
            f.write(text)
    _replace_dir(tmp_dir, out_dir)
    return out_dir


def clean_stale_exports(out_dir: str) -> list[str]:
    """Removes what an interrupted export of `out_dir` left beside it (`<name>.tmp-*` folders being written,
    `<name>.old-*` folders being swapped out); returns the removed paths. Called at the start of every export
    (and by train at start-up), so a kill during an export leaves nothing behind for long. Do not run two
    exports to the same folder at once."""
    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.dirname(out_dir), os.path.basename(out_dir)
    removed = []
    if not os.path.isdir(parent):
        return removed
    for entry in sorted(os.listdir(parent)):
        if entry.startswith((name + ".tmp-", name + ".old-")):
            path = os.path.join(parent, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    if removed:
        log.warning("removed %d leftover folder(s) of an interrupted export: %s", len(removed), removed)
    return removed


def _replace_dir(src: str, dst: str) -> None:
    """Moves a finished folder into place; an existing destination is swapped out, then removed."""
    old = None
    if os.path.exists(dst):
        old = dst + f".old-{os.getpid()}"
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


__all__ = [
    "CheckpointError",
    "NonFiniteWeightsError",
    "SafetensorsError",
    "clean_stale_exports",
    "find_weight_files",
    "load_hf_params",
    "save_hf_checkpoint",
]
