"""Where the memory agent's arrays live, and the pool of KV caches its programs reuse.

    placement = Placement(mesh, config)          # mesh: None (one device) or a ('data', 'fsdp', 'tensor') mesh
    with placement.context():
        rows_d = placement.put(rows)             # host rows [n, ...] -> device, rows sharded over data x fsdp
        cache = placement.cache("update", batch, slots)
        ... = program(..., cache)                # the programs donate their cache argument
        placement.give_back("update", batch, new_cache)
        out = placement.get(out_d)               # device -> host NumPy

One `Placement` per agent, shared by the lockstep runner, the text mode and the document engine: a cache given
back by one is taken by the next call of any of them with the same (kind, batch), so one buffer per program shape
lives on the device.

A mesh may span several processes: every process then puts only its own rows (`put` assembles all processes' rows
into one array, process p's rows on its own devices) and `get` returns this process's rows. Batch sizes count
global rows unless named per process.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from memagent_jax.distributed import arrays as multiprocess
from memagent_jax.models import sharding as sharding_lib
from memagent_jax.models.config import ModelConfig
from memagent_jax.sampling.api import new_cache

__all__ = ["Placement"]


class Placement:
    """Device placement of an agent's rows and a pool of its KV caches (see the module docstring).

    Args:
      mesh: None (the default device) or a mesh; rows are sharded over its ('data', 'fsdp') axes.
      config: the model config (the KV caches' layer count, heads, dtype).
    Not thread-safe: one thread drives the agent's programs at a time.
    """

    def __init__(self, mesh, config: ModelConfig):
        self.mesh = mesh
        self.config = config
        self._pool: dict[tuple[str, int], object] = {}

    # ------------------------------------------------------------------------------------ batch shapes

    @property
    def processes(self) -> int:
        """Processes that own devices of the mesh (1 without a mesh)."""
        return multiprocess.mesh_process_count(self.mesh)

    @property
    def spans_processes(self) -> bool:
        """Whether the mesh spans several processes (each process then brings its own rows)."""
        return self.processes > 1

    @property
    def batch_multiple(self) -> int:
        """A batch's global row count is a multiple of this (the mesh's data x fsdp size; 1 without a mesh)."""
        return sharding_lib.batch_multiple(self.mesh)

    def round_batch(self, rows: int) -> int:
        """`rows` rounded up to a multiple of `batch_multiple` (one process's whole batch)."""
        multiple = self.batch_multiple
        return -(-int(rows) // multiple) * multiple

    def process_batch(self, rows: int) -> int:
        """Rows per process of a batch spanning processes: `rows` rounded up to this process's share of the
        batch axes, at least one share (a process without rows still runs the programs)."""
        multiple = multiprocess.process_batch_multiple(self.mesh)
        return max(-(-int(rows) // multiple) * multiple, multiple)

    def max_over_processes(self, values) -> np.ndarray:
        """Elementwise max of the int vector `values` over every process (a collective: every process calls it);
        `values` itself on one process."""
        return multiprocess.process_allgather(np.asarray(values, np.int64)).max(axis=0)

    # ------------------------------------------------------------------------------------ arrays

    def context(self):
        """The context the programs run in: `jax.set_mesh(mesh)`, or nothing without a mesh."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def put(self, x, rank: int | None = None):
        """Host rows [n, ...] -> a device array, rows sharded over the batch axes (`rank`: the rank the sharding
        is built for, default x.ndim; 1 for an array of typed PRNG keys). On a mesh spanning processes, x is this
        process's rows and the result holds every process's rows."""
        if self.spans_processes:
            return multiprocess.put_rows(x, self.mesh, rank)
        x = jnp.asarray(x)
        if self.mesh is None:
            return x
        return jax.device_put(x, sharding_lib.batch_sharding(self.mesh, x.ndim if rank is None else rank, x.shape[0]))

    def get(self, tree):
        """Device results -> host NumPy (a pytree): this process's rows when the mesh spans processes."""
        if self.spans_processes:
            return multiprocess.local_rows(tree, self.mesh)
        return jax.device_get(tree)

    # ------------------------------------------------------------------------------------ cache pool

    def cache(self, kind: str, batch: int, slots: int):
        """A KV cache for program `kind` ('update', 'final', 'text_update', 'text_final') over `batch` global rows:
        the pooled one of that (kind, batch) when there is one (taken out of the pool), else a new empty one of
        `slots` slots per row. A kind's slot count is fixed by the agent's spec, so (kind, batch) names a shape."""
        cache = self._pool.pop((kind, batch), None)
        if cache is not None:
            return cache
        return new_cache(self.config, batch, slots, mesh=self.mesh)

    def give_back(self, kind: str, batch: int, cache) -> None:
        """Pools `cache` (a program's returned cache) for the next `cache(kind, batch, ...)`."""
        self._pool[(kind, batch)] = cache

    def pooled(self) -> list:
        """The caches in the pool now (memory accounting, tests)."""
        return list(self._pool.values())
