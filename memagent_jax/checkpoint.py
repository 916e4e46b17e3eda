"""Training checkpoints: an Orbax `CheckpointManager` wrapper for the train state, data position and RNG.

One checkpoint per saved step, in `<directory>/<step>/`, holding four Orbax items:

    state   the train state pytree (params, optimiser state, step counters)     StandardSave / StandardRestore
    data    the data-iterator position, a JSON-able dict                         JsonSave / JsonRestore
    rng     {'key_data': uint32 array} of the run's JAX PRNG key (a placeholder if none)  StandardSave / Restore
    meta    {'format', 'step', 'has_rng', 'rng_impl', 'rng_typed'}              JsonSave / JsonRestore

Atomicity comes from Orbax: a save writes into `<step>.orbax-checkpoint-tmp*` and only a finished save is renamed
to `<step>` (with a commit marker). An interrupted save therefore leaves only a tmp directory, which is never
listed as a step: `latest_step()` and `restore()` fall back to the last finished checkpoint. Leftover tmp
directories are removed when the next manager opens the directory.

Async: `save` returns once the arrays are copied off the device (so the state may be donated to the next train
step right away); the files are written in the background. `wait_until_finished()` / `close()` block until all
pending saves are committed. Only the last `max_to_keep` checkpoints are kept.

Restore targets: pass the abstract state (`jax.ShapeDtypeStruct`s with `.sharding`, e.g.
`Learner.abstract_state()`), and each array is read straight into those shardings, on any mesh.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "Restored", "CheckpointError"]

log = logging.getLogger(__name__)

_FORMAT = 1
_ITEMS = ("state", "data", "rng", "meta")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or restored as asked (the message says why)."""


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore` returns.

    step: the checkpoint's step; state: the restored pytree (structure and shardings of the target);
    data_state: the data-iterator position dict; rng: the PRNG key (typed if it was saved typed) or None.
    """

    step: int
    state: Any
    data_state: dict
    rng: jax.Array | None


def _check_json(value, field: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{field} must be JSON-serialisable: {e}") from None


class Checkpointer:
    """Saves and restores (state, data position, RNG) per step in `directory`.

    Args:
      directory: where step folders live (created if missing).
      max_to_keep: keep only the newest N finished checkpoints (None: keep all).
      async_save: write in a background thread (`save` returns after the device-to-host copy).
      save_interval_steps: `save` is a no-op for steps that are not a multiple of this (unless force=True).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save: bool = True,
                 save_interval_steps: int = 1):
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise CheckpointError(f"max_to_keep must be a positive integer or None, got {max_to_keep!r}")
        if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
            raise CheckpointError(f"save_interval_steps must be a positive integer, got {save_interval_steps!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)
        self._closed = False

    # ------------------------------------------------------------------ queries

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None (an interrupted save is never returned)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all finished checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    # ------------------------------------------------------------------ save

    def save(self, step: int, state, *, data_state: dict | None = None, rng: jax.Array | None = None,
             force: bool = False) -> bool:
        """Saves a checkpoint for `step` (async by default). Returns whether a save was started.

        state: any pytree of arrays (the `TrainState`). data_state: a JSON-able dict (the iterator position).
        rng: a JAX PRNG key (typed `jax.random.key` or raw uint32 `PRNGKey`), or None. It is saved as host data
          (the same key on every process of a multi-process run; only the primary process writes it).

        Multi-process runs: every process calls `save` with the same step (the state's arrays are global; each
        process writes its own shards, Orbax coordinates the commit).
        """
        if self._closed:
            raise CheckpointError("save() on a closed Checkpointer")
        step = int(step)
        if step < 0:
            raise CheckpointError(f"step must be >= 0, got {step}")
        data_state = {} if data_state is None else data_state
        if not isinstance(data_state, dict):
            raise CheckpointError(f"data_state must be a dict, got {type(data_state).__name__}")
        _check_json(data_state, "data_state")
        if step in self._manager.all_steps():
            raise CheckpointError(f"a checkpoint for step {step} already exists in {self.directory}")
        meta = {"format": _FORMAT, "step": step, "has_rng": rng is not None, "rng_impl": None, "rng_typed": False}
        rng_item: dict[str, Any] = {"key_data": np.zeros((1,), np.uint32)}  # placeholder (Orbax refuses size 0)
        if rng is not None:
            if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
                meta["rng_typed"] = True
                meta["rng_impl"] = str(jax.random.key_impl(rng))
                rng_item = {"key_data": np.asarray(jax.random.key_data(rng))}
            elif rng.dtype == jnp.uint32:
                rng_item = {"key_data": np.asarray(rng)}
            else:
                raise CheckpointError(f"rng must be a JAX PRNG key, got dtype {rng.dtype}")
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            rng=ocp.args.StandardSave(rng_item),
            meta=ocp.args.JsonSave(meta),
        )
        return bool(self._manager.save(step, args=args, force=force))

    # ------------------------------------------------------------------ restore

    def restore(self, abstract_state, step: int | None = None) -> Restored:
        """Restores `step` (default: the latest finished one) onto the target's structure and shardings.

        abstract_state: pytree of `jax.ShapeDtypeStruct` (with `.sharding` to place the arrays; e.g.
          `Learner.abstract_state()`) or of concrete arrays with the same structure.
        Raises CheckpointError when there is no finished checkpoint (or not that step).
        """
        steps = self.all_steps()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no finished checkpoint in {self.directory}")
        elif int(step) not in steps:
            raise CheckpointError(f"no finished checkpoint for step {step} in {self.directory} (have {steps})")
        step = int(step)
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if meta.get("format") != _FORMAT:
            raise CheckpointError(f"checkpoint {step}: unknown format {meta.get('format')!r} (expected {_FORMAT})")
        target = jax.tree.map(
            lambda a: a if isinstance(a, jax.ShapeDtypeStruct)
            else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), abstract_state)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            data=ocp.args.JsonRestore(),
            rng=ocp.args.StandardRestore(),
        ))
        rng = None
        if meta.get("has_rng"):
            key_data = jnp.asarray(restored.rng["key_data"], jnp.uint32)
            rng = jax.random.wrap_key_data(key_data, impl=meta["rng_impl"]) if meta.get("rng_typed") else key_data
        return Restored(step=step, state=restored.state, data_state=dict(restored.data or {}), rng=rng)

    # ------------------------------------------------------------------ lifetime

    def wait_until_finished(self) -> None:
        """Blocks until every pending async save is committed (and old checkpoints pruned)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases the manager. Idempotent."""
        if not self._closed:
            self._manager.wait_until_finished()
            self._manager.close()
            self._closed = True

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
