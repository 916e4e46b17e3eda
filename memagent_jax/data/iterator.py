"""A host-sharded batch iterator over any random-access source, with an exactly restorable position.

The source is anything with ``len`` and integer indexing: a :class:`~memagent_jax.data.formats.
MemAgentFile`, a :class:`~memagent_jax.data.synthetic.SyntheticDataset`, an ArrayRecord data
source from :mod:`memagent_jax.data.tfds_builder`, a list.

Order: epoch ``e`` visits the records in the permutation ``numpy.random.default_rng([seed, e])``
(or in file order when ``shuffle=False``).  Host ``p`` of ``P`` takes every ``P``-th element of that
order starting at ``p``, after cutting the order to a multiple of ``P``, so every host has the same
number of records and batches per epoch (hosts step in lock-step, as SPMD training needs).

Position: ``(epoch, position)``, where ``position`` counts records already taken by this host in
this epoch.  It is the same on every host, so one saved state serves all of them.  The state is a
small JSON-serialisable dict (:meth:`ShardedIterator.get_state`); restoring it
(:meth:`ShardedIterator.set_state`, in any process) continues with exactly the batches that would
have come next.  Nothing here imports JAX: pass ``jax.process_index()`` / ``jax.process_count()``
from the caller.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["ShardedIterator"]

_STATE_VERSION = 1


class ShardedIterator(Iterator[list]):
    """Batches of ``batch_size`` records of this host's shard, epoch after epoch.

    Args:
      source: random-access records (``len`` and ``source[i]``).
      batch_size: records per batch on this host.
      seed: seed of the per-epoch permutations.
      shuffle: permute each epoch (else file order).
      process_index, process_count: this host and the number of hosts.
      num_epochs: stop after this many epochs (``None``: never stop).
      drop_remainder: drop the last, short batch of each epoch (keeps shapes static).
      transform: applied to every record as it is read (e.g. tokenisation).
    """

    def __init__(
        self,
        source: Sequence[Any],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        num_epochs: int | None = None,
        drop_remainder: bool = True,
        transform: Callable[[Any], Any] | None = None,
    ):
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} out of range for process_count {process_count}")
        self.source = source
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.num_epochs = num_epochs
        self.drop_remainder = bool(drop_remainder)
        self.transform = transform
        self.num_records = len(source)
        self.per_host = self.num_records // self.process_count
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.num_records} records over {self.process_count} hosts give no full batch of {self.batch_size}"
            )
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch on every host."""
        if self.drop_remainder:
            return self.per_host // self.batch_size
        return -(-self.per_host // self.batch_size)

    def host_indices(self, epoch: int) -> np.ndarray:
        """Source indices this host visits in ``epoch``, in order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_records)
        else:
            order = np.arange(self.num_records)
        return order[: self.per_host * self.process_count][self.process_index :: self.process_count]

    def _indices(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order = self.host_indices(self.epoch)
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> ShardedIterator:
        return self

    def __next__(self) -> list:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        limit = self.steps_per_epoch * self.batch_size if self.drop_remainder else self.per_host
        if self.position >= limit:
            self.epoch += 1
            self.position = 0
            return self.__next__()
        idx = self._indices()[self.position : min(self.position + self.batch_size, limit)]
        batch = [self.source[int(i)] for i in idx]
        if self.transform is not None:
            batch = [self.transform(r) for r in batch]
        self.position += len(idx)
        return batch

    # -- state -------------------------------------------------------------------------------------

    def get_state(self) -> dict:
        """The position as a JSON-serialisable dict (identical on every host)."""
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_records": self.num_records,
            "process_count": self.process_count,
        }

    def set_state(self, state: dict) -> None:
        """Restore a position saved by :meth:`get_state` (possibly in another process).

        The seed, shuffling, record count and host count must match the saved ones (otherwise the
        order would differ and the position would be meaningless): a mismatch, a missing or ill-typed
        entry, or a position outside the epoch raises ``ValueError`` naming the entry.  The batch size
        may differ; the position is counted in records.
        """
        if not isinstance(state, dict):
            raise ValueError(f"iterator state must be a dict, got {type(state).__name__}")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported iterator state version {state.get('version')!r}")
        for key, kind in (
            ("seed", int),
            ("shuffle", bool),
            ("num_records", int),
            ("process_count", int),
            ("epoch", int),
            ("position", int),
        ):
            if key not in state:
                raise ValueError(f"iterator state has no {key!r}")
            value = state[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(
                    f"iterator state has {key}={value!r}, not {'a bool' if kind is bool else 'an integer'}"
                )
        for key in ("seed", "shuffle", "num_records", "process_count"):
            if state[key] != getattr(self, key):
                raise ValueError(f"iterator state has {key}={state[key]!r}, this iterator has {getattr(self, key)!r}")
        epoch, position = state["epoch"], state["position"]
        if epoch < 0 or not 0 <= position <= self.per_host:
            raise ValueError(f"invalid iterator position epoch={epoch} position={position}")
        self.epoch, self.position = epoch, position

    def state_json(self) -> str:
        return json.dumps(self.get_state(), sort_keys=True)

    def restore_json(self, text: str) -> None:
        self.set_state(json.loads(text))
