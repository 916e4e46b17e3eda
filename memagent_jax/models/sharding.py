"""Device mesh and logical-axis sharding rules.

Every parameter dimension carries a *logical* axis name (`PARAM_LOGICAL_AXES`); a rules table maps
logical names onto the mesh axes ('data', 'fsdp', 'tensor'):

    logical axis   default mesh axis   what it is
    vocab          tensor              vocabulary rows of the embedding / LM head columns
    embed          fsdp                the model width D (FSDP: params split across the fsdp axis)
    q_heads        tensor              query heads (Megatron-style tensor parallelism)
    kv_heads       tensor              key/value heads
    mlp            tensor              the MLP width F
    layer, head_dim, norm  (replicated)
    batch          (data, fsdp)        activations: batch rows over data and fsdp

A dimension that the mesh axis size does not divide (e.g. 2 KV heads on tensor=4) is replicated on
that axis instead, so any checkpoint loads on any mesh; `describe_sharding` reports such fallbacks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from memagent_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: dict[str, Any] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layer": None,
    "head_dim": None,
    "norm": None,
    "batch": ("data", "fsdp"),
    "seq": None,
}

# Logical axes of each parameter leaf, keyed by its path in the params dict.
PARAM_LOGICAL_AXES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("embed",): ("vocab", "embed"),
    ("final_norm", "weight"): ("norm",),
    ("lm_head",): ("embed", "vocab"),
    ("layers", "attn_norm", "weight"): ("layer", "norm"),
    ("layers", "mlp_norm", "weight"): ("layer", "norm"),
    ("layers", "attn", "q_proj"): ("layer", "embed", "q_heads", "head_dim"),
    ("layers", "attn", "k_proj"): ("layer", "embed", "kv_heads", "head_dim"),
    ("layers", "attn", "v_proj"): ("layer", "embed", "kv_heads", "head_dim"),
    ("layers", "attn", "o_proj"): ("layer", "q_heads", "head_dim", "embed"),
    ("layers", "attn", "q_bias"): ("layer", "q_heads", "head_dim"),
    ("layers", "attn", "k_bias"): ("layer", "kv_heads", "head_dim"),
    ("layers", "attn", "v_bias"): ("layer", "kv_heads", "head_dim"),
    ("layers", "attn", "o_bias"): ("layer", "norm"),
    ("layers", "attn", "q_norm"): ("layer", "head_dim"),
    ("layers", "attn", "k_norm"): ("layer", "head_dim"),
    ("layers", "mlp", "gate_proj"): ("layer", "embed", "mlp"),
    ("layers", "mlp", "up_proj"): ("layer", "embed", "mlp"),
    ("layers", "mlp", "down_proj"): ("layer", "mlp", "embed"),
    ("layers", "mlp", "gate_bias"): ("layer", "mlp"),
    ("layers", "mlp", "up_bias"): ("layer", "mlp"),
    ("layers", "mlp", "down_bias"): ("layer", "norm"),
}


class MeshError(UserError):
    """The requested mesh does not match the available devices."""


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; one axis may be -1 to take the remaining devices.

    Uses Auto axis types (GSPMD propagates shardings; no `out_sharding` needed on every op).
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise MeshError("at most one mesh axis may be -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if known <= 0 or len(devices) % known:
            raise MeshError(f"mesh axes {dict(zip(MESH_AXES, sizes))} do not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if any(s <= 0 for s in sizes):
        raise MeshError(f"mesh axis sizes must be positive, got {dict(zip(MESH_AXES, sizes))}")
    if math.prod(sizes) != len(devices):
        raise MeshError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
            f"but {len(devices)} are available"
        )
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # non-TPU topologies or odd device counts: plain reshape
        grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _axis_size(mesh: Mesh, mesh_axes) -> int:
    if mesh_axes is None:
        return 1
    if isinstance(mesh_axes, str):
        mesh_axes = (mesh_axes,)
    return math.prod(mesh.shape[a] for a in mesh_axes)


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Mapping[str, Any] | None = None
) -> P:
    """PartitionSpec for one array: each logical axis -> its mesh axis, or None where it does not divide.

    A mesh axis is used at most once per array (the first dimension that claims it wins).
    """
    rules = DEFAULT_RULES if rules is None else rules
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        mesh_axes = rules.get(name) if name is not None else None
        if mesh_axes is not None:
            axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
            axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
            if axes and dim % _axis_size(mesh, axes) == 0:
                used.update(axes)
                spec.append(axes[0] if len(axes) == 1 else axes)
                continue
        spec.append(None)
    return P(*spec)


def _path_key(path) -> tuple[str, ...]:
    return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def param_logical_axes(params) -> Any:
    """Pytree (same structure as params) of logical-axis tuples."""

    def axes(path, leaf):
        key = _path_key(path)
        if key not in PARAM_LOGICAL_AXES:
            raise KeyError(f"no logical axes registered for parameter {'/'.join(key)}")
        names = PARAM_LOGICAL_AXES[key]
        if len(names) != len(leaf.shape):
            raise ValueError(f"parameter {'/'.join(key)} has rank {len(leaf.shape)}, axes {names}")
        return names

    return jax.tree_util.tree_map_with_path(axes, params)


def param_shardings(params, mesh: Mesh, rules: Mapping[str, Any] | None = None) -> Any:
    """Pytree of `NamedSharding` for a params (or abstract params) pytree."""

    def sharding(path, leaf):
        names = PARAM_LOGICAL_AXES[_path_key(path)]
        return NamedSharding(mesh, logical_to_spec(names, leaf.shape, mesh, rules))

    param_logical_axes(params)  # validates every leaf first, with a clear error
    return jax.tree_util.tree_map_with_path(sharding, params)


def batch_sharding(
    mesh: Mesh, rank: int, batch_size: int | None = None, rules: Mapping[str, Any] | None = None
) -> NamedSharding:
    """Sharding for a [batch, ...] activation/input array of the given rank (batch over data x fsdp)."""
    names = ("batch",) + (None,) * (rank - 1)
    shape = (batch_size if batch_size is not None else _axis_size(mesh, ("data", "fsdp")),) + (1,) * (rank - 1)
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def describe_sharding(params, mesh: Mesh, rules: Mapping[str, Any] | None = None) -> list[str]:
    """Human-readable lines: each param's shape, logical axes and resulting PartitionSpec."""
    lines = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = _path_key(path)
        names = PARAM_LOGICAL_AXES[key]
        spec = logical_to_spec(names, leaf.shape, mesh, rules)
        lines.append(f"{'/'.join(key):32s} {str(tuple(leaf.shape)):26s} {str(names):44s} {spec}")
    return lines


def kv_cache_shardings(config, mesh: Mesh, batch: int, slots: int, rules: Mapping[str, Any] | None = None):
    """A `KVCache` of `NamedSharding`s: rows over the batch axes, KV heads over 'tensor' where they divide."""
    from memagent_jax.models.transformer import KVCache

    kv_shape = (config.num_layers, batch, config.num_kv_heads, slots, config.head_dim)
    kv = NamedSharding(mesh, logical_to_spec(("layer", "batch", "kv_heads", "seq", "head_dim"), kv_shape, mesh, rules))
    rows = NamedSharding(mesh, logical_to_spec(("batch", "seq"), (batch, slots), mesh, rules))
    return KVCache(k=kv, v=kv, positions=rows, valid=rows, length=NamedSharding(mesh, P()))


def batch_multiple(mesh: Mesh | None) -> int:
    """Batch sizes must be a multiple of this to shard rows over ('data', 'fsdp')."""
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
