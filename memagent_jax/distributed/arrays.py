"""Arrays of a multi-process (multi-host) run: rows in and out, small collectives, copies between meshes.

In a multi-process run (one process per host) every process holds only its own rows of a row-sharded array: the
rows on its addressable devices. Host inputs are assembled from every process's rows (`put_rows`), and results are
read back per process (`local_rows`), since a non-fully-addressable array cannot be fetched whole. With one
process both are plain device_put / device_get. The mesh axis rules themselves (`batch_sharding`,
`batch_multiple`) live with the model's sharding rules in `models.sharding`.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from memagent_jax.models.sharding import MeshError, batch_multiple, batch_sharding

__all__ = [
    "copy_to",
    "is_multiprocess",
    "local_rows",
    "mesh_process_count",
    "process_allgather",
    "process_batch_multiple",
    "process_max",
    "put_rows",
]


def mesh_process_count(mesh: Mesh | None) -> int:
    """How many processes own devices of `mesh` (1 without a mesh)."""
    if mesh is None:
        return 1
    return len({d.process_index for d in mesh.devices.flat})


def is_multiprocess(mesh: Mesh | None) -> bool:
    """Whether `mesh` spans devices of more than one process."""
    return mesh_process_count(mesh) > 1


def process_batch_multiple(mesh: Mesh | None) -> int:
    """Rows each process supplies must be a multiple of this: its share of the mesh's batch shards."""
    total, procs = batch_multiple(mesh), mesh_process_count(mesh)
    if total % procs:
        raise MeshError(
            f"the mesh's batch axes (data x fsdp = {total}) must be a multiple of its {procs} processes, "
            f"so that every process holds whole rows"
        )
    return total // procs


def process_max(value: int) -> int:
    """The largest `value` over all processes (a small collective; every process must call it)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def process_allgather(value) -> np.ndarray:
    """[process_count, ...]: every process's host `value` (same shape everywhere), on every process."""
    value = np.asarray(value)
    if jax.process_count() == 1:
        return value[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value))


def put_rows(x, mesh: Mesh, rank: int | None = None) -> jax.Array:
    """This process's host rows [n, ...] -> one array of all processes' rows, row-sharded over the batch axes.

    One process: `device_put` (global rows = n). Several: every process passes the same n; global rows =
    n x processes, process p's rows land on its own devices (`jax.make_array_from_process_local_data`).
    Typed PRNG key arrays are moved as their key data.
    """
    x = x if isinstance(x, jax.Array) else np.asarray(x)
    rank = x.ndim if rank is None else rank
    procs = mesh_process_count(mesh)
    if procs == 1:
        x = jax.numpy.asarray(x)
        return jax.device_put(x, batch_sharding(mesh, rank, x.shape[0]))
    if jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(x)
        data = put_rows(np.asarray(jax.random.key_data(x)), mesh)
        return _wrap_keys(impl, data.sharding)(data)
    x = np.asarray(x)
    sharding = batch_sharding(mesh, rank, x.shape[0] * procs)
    return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * procs,) + x.shape[1:])


_WRAPPERS: dict = {}


def _wrap_keys(impl, sharding):
    key = (str(impl), sharding)
    if key not in _WRAPPERS:
        spec = P(*sharding.spec[:1])
        _WRAPPERS[key] = jax.jit(
            lambda d: jax.random.wrap_key_data(d, impl=impl), out_shardings=NamedSharding(sharding.mesh, spec)
        )
    return _WRAPPERS[key]


def local_rows(x, mesh: Mesh | None = None):
    """This process's rows of a row-sharded array (or pytree of them) as NumPy: the inverse of `put_rows`.

    A fully addressable array (one process) is fetched whole, and so is a 0-d (replicated) one. Otherwise the
    array is first resharded onto the batch sharding of `mesh` (default: its own sharding's mesh; a no-op when
    it already is), then this process's row blocks are joined.
    """

    def one(a):
        if not isinstance(a, jax.Array) or a.is_fully_addressable or a.ndim == 0:
            return np.asarray(jax.device_get(a))
        target = batch_sharding(mesh if mesh is not None else a.sharding.mesh, a.ndim, a.shape[0])
        if not a.sharding.is_equivalent_to(target, a.ndim):
            a = jax.device_put(a, target)
        blocks = {}
        for shard in a.addressable_shards:
            start = shard.index[0].start or 0
            if start not in blocks:
                blocks[start] = np.asarray(shard.data)
        return np.concatenate([blocks[k] for k in sorted(blocks)], axis=0)

    return jax.tree.map(one, x)


def _norm(index, shape) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(d)[:2]) if isinstance(s, slice) else slice(s, s + 1) for s, d in zip(index, shape))


def _local_source(x: jax.Array, index, shape):
    """A (single-device array, relative index) of this process's shards of `x` that contains `index`, or None."""
    want = _norm(index, shape)
    for shard in x.addressable_shards:
        have = _norm(shard.index, shape)
        if all(h.start <= w.start and w.stop <= h.stop for h, w in zip(have, want)):
            rel = tuple(slice(w.start - h.start, w.stop - h.start) for h, w in zip(have, want))
            return shard.data, rel
    return None


def copy_to(tree, shardings):
    """`jax.device_put(tree, shardings)` that also works between disjoint device sets of a multi-process run
    (e.g. the learner's params onto a separate rollout mesh), which JAX's device_put refuses there.

    Multi-process: each target shard is copied from a shard of the same process that contains it (device to
    device, no host round trip). A leaf some process cannot serve locally (its source is sharded across
    processes differently from the target) is gathered onto every host first (`process_allgather`): correct,
    but it moves the whole leaf through host memory; prefer learner layouts whose per-process shards cover the
    rollout's (e.g. a data-parallel or process-local fsdp learner mesh).
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    leaves, treedef = jax.tree.flatten(tree)
    targets = treedef.flatten_up_to(shardings)
    plans = []
    for x, target in zip(leaves, targets):
        needed = target.addressable_devices_indices_map(x.shape)
        sources = {d: _local_source(x, idx, x.shape) for d, idx in needed.items()}
        plans.append((needed, sources))
    missing = np.array([any(src is None for src in s.values()) for _, s in plans], np.int64)
    missing = process_allgather(missing).max(axis=0) if len(missing) else missing
    out = []
    for x, target, (needed, sources), gather in zip(leaves, targets, plans, missing):
        if gather:
            from jax.experimental import multihost_utils

            host = np.asarray(multihost_utils.process_allgather(x, tiled=True))
            arrays = [jax.device_put(host[idx], d) for d, idx in needed.items()]
        else:
            arrays = [jax.device_put(data[rel], d) for d, (data, rel) in sources.items()]
        out.append(jax.make_array_from_single_device_arrays(x.shape, target, arrays))
    return jax.tree.unflatten(treedef, out)
