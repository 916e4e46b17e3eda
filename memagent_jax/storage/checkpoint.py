"""Training checkpoints: an Orbax `CheckpointManager` wrapper for the train state, data position and RNG.

One checkpoint per saved step, in `<directory>/<step>/`, holding four Orbax items:

    state   the train state pytree (params, optimiser state, step counters)     StandardSave / StandardRestore
    data    the data-iterator position, a JSON-able dict                         JsonSave / JsonRestore
    rng     {'key_data': uint32 array} of the run's JAX PRNG key (a placeholder if none)  StandardSave / Restore
    meta    {'format', 'step', 'has_rng', 'rng_impl', 'rng_typed', 'metadata', 'manifest', 'digest'}
                                                                                 JsonSave / JsonRestore

Atomicity comes from Orbax: a save writes into `<step>.orbax-checkpoint-tmp*` and only a finished save is renamed
to `<step>` (with a commit marker). An interrupted save therefore leaves only a tmp directory, which is never
listed as a step: `latest_step()` and `restore()` fall back to the last finished checkpoint. Leftover tmp
directories are removed when the next manager opens the directory.

Async: `save` returns once the arrays are copied off the device (so the state may be donated to the next train
step right away); the files are written in the background. `wait_until_finished()` / `close()` block until all
pending saves are committed. Only the last `max_to_keep` checkpoints are kept.

Restore targets: pass the abstract state (`jax.ShapeDtypeStruct`s with `.sharding`, e.g.
`Learner.abstract_state()`), and each array is read straight into those shardings, on any mesh.

Verification. `save` refuses a state holding NaN / inf (CheckpointError naming the step and the leaf; nothing is
written and no older checkpoint is pruned) and writes, inside `meta` (so it is committed with the checkpoint, by the
same atomic rename), a manifest covering every item a restore uses:

    manifest.state   {leaf path: checksum} of every train-state leaf (weights, optimiser state, counters)
    manifest.rng     {leaf path: checksum} of the RNG item
    manifest.data    sha256 of the canonical JSON (sorted keys, no spaces) of the data position
    digest           sha256 of the canonical JSON of the rest of `meta` (format, step, RNG kind, the caller's
                     `metadata` such as a config fingerprint, and the manifest itself)

A leaf checksum is a position-weighted sum of its bits mod 2^32: any single flipped bit changes it. Every restore
reads the metadata first and checks its digest and that its step is the folder's, then reads the items and checks
that the state's leaves have the target's shapes and dtypes, every value is finite, and every item matches the
manifest, before anything is returned. With `restore()` (no step given) a checkpoint failing any check is reported
(a warning naming the step and the item at fault, and `Restored.skipped`), moved to
`<directory>/quarantine/<step>-<time>` (so the step can be saved again) and the next older one is tried: the run
resumes from the newest good checkpoint. When none passes, a CheckpointError names every step and why.

Checkpoints written before the manifest (`format` 1) still restore: their state leaves are checked against the
checksums they carry, and `Restored.unverified` names the items nothing covers (data position, RNG state,
metadata); a warning says so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from memagent_jax.errors import UserError

__all__ = ["Checkpointer", "Restored", "CheckpointError"]

log = logging.getLogger(__name__)

_FORMAT = 2  # 2: meta carries the manifest and its digest; 1: state checksums only (still restored)
_FORMATS = (1, 2)
_ITEMS = ("state", "data", "rng", "meta")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be saved or restored as asked (the message says why)."""


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore` returns.

    step: the checkpoint's step; state: the restored pytree (structure and shardings of the target);
    data_state: the data-iterator position dict; rng: the PRNG key (typed if it was saved typed) or None;
    metadata: the dict given to `save(metadata=...)` ({} if none);
    skipped: [(step, why)] of the newer checkpoints that failed verification (now in quarantine);
    unverified: the items no checksum covered (a checkpoint written before the manifest), else [].
    """

    step: int
    state: Any
    data_state: dict
    rng: jax.Array | None
    metadata: dict = dataclasses.field(default_factory=dict)
    skipped: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    unverified: list[str] = dataclasses.field(default_factory=list)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """[] uint32: sum over the values of (their bits as uint32) x (2 * flat index + 1) x 0x9E3779B1, mod 2^32.

    Integer addition is associative, so the sum is the same for every sharding and reduction order; the weights
    are odd, so flipping any one bit changes the sum."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        size = jnp.dtype(x.dtype).itemsize
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(size)
        if unsigned is None:  # 8-byte values (x64): two uint32 words each
            bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        else:
            bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    flat = bits.reshape(-1)
    index = jnp.arange(flat.shape[0], dtype=jnp.uint32)
    weights = (index * jnp.uint32(2) + jnp.uint32(1)) * jnp.uint32(0x9E3779B1)
    return jnp.sum(flat * weights, dtype=jnp.uint32)


@jax.jit
def _leaf_stats(leaves):
    """Per array leaf: (non-finite value count [] int32, checksum [] uint32)."""
    out = []
    for x in leaves:
        bad = (
            jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)
            if jnp.issubdtype(x.dtype, jnp.inexact)
            else jnp.zeros((), jnp.int32)
        )
        out.append((bad, _leaf_checksum(x)))
    return out


def tree_stats(tree) -> dict[str, tuple[int, int]]:
    """{leaf path: (non-finite values, checksum)} of every array leaf of `tree` (one jitted pass, on the arrays'
    own devices; the host gets two integers per leaf)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    items = [
        (jax.tree_util.keystr(path), leaf)
        for path, leaf in flat
        if hasattr(leaf, "dtype") and hasattr(leaf, "shape") and not jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    ]
    if not items:
        return {}
    stats = jax.device_get(
        _leaf_stats([jnp.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf for _, leaf in items])
    )
    return {path: (int(bad), int(checksum)) for (path, _), (bad, checksum) in zip(items, stats)}


def _nonfinite_message(stats: dict[str, tuple[int, int]]) -> str | None:
    bad = [(path, n) for path, (n, _) in stats.items() if n]
    if not bad:
        return None
    more = f" and {len(bad) - 1} more leaves" if len(bad) > 1 else ""
    return f"leaf {bad[0][0]} holds {bad[0][1]} non-finite values (NaN / inf){more}"


def _check_json(value, field: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{field} must be JSON-serialisable: {e}") from None


def _canonical_sha256(value) -> str:
    """sha256 (hex) of `value`'s canonical JSON: sorted keys, no spaces, after a JSON round trip (so tuples and
    lists, or int and str keys, hash as they will be read back)."""
    value = json.loads(json.dumps(value))
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _meta_digest(meta: dict) -> str:
    return _canonical_sha256({k: v for k, v in meta.items() if k != "digest"})


def _leaf_checksums(stats: dict[str, tuple[int, int]]) -> dict[str, int]:
    return {path: checksum for path, (_, checksum) in stats.items()}


def _compare_checksums(where: str, item: str, saved, stats: dict[str, tuple[int, int]]) -> None:
    """Every leaf of `stats` must match its checksum in `saved`, and every leaf of `saved` must be there.

    item: how messages name the item ('' for the train state, whose leaf paths name themselves)."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where}: the manifest has no checksums for {item.rstrip(': ') or 'the train state'}")
    for path, (_, checksum) in stats.items():
        if path not in saved:
            raise CheckpointError(f"{where}: {item}leaf {path} has no checksum in the manifest")
        if int(saved[path]) != checksum:
            raise CheckpointError(
                f"{where}: {item}leaf {path} does not match the checksum written when it was saved "
                f"(the files changed on disk)"
            )
    missing = sorted(set(saved) - set(stats))
    if missing:
        raise CheckpointError(f"{where}: {item}leaf {missing[0]} of the manifest was not restored")


class Checkpointer:
    """Saves and restores (state, data position, RNG) per step in `directory`.

    Args:
      directory: where step folders live (created if missing).
      max_to_keep: keep only the newest N finished checkpoints (None: keep all).
      async_save: write in a background thread (`save` returns after the device-to-host copy).
      save_interval_steps: `save` is a no-op for steps that are not a multiple of this (unless force=True).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        save_interval_steps: int = 1,
    ):
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

    def save(
        self,
        step: int,
        state,
        *,
        data_state: dict | None = None,
        rng: jax.Array | None = None,
        metadata: dict | None = None,
        force: bool = False,
    ) -> bool:
        """Saves a checkpoint for `step` (async by default). Returns whether a save was started.

        state: any pytree of arrays (the `TrainState`). data_state: a JSON-able dict (the iterator position).
        metadata: a JSON-able dict kept with the checkpoint and covered by its digest (e.g. a config
          fingerprint); `Restored.metadata` on restore.
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
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict):
            raise CheckpointError(f"metadata must be a dict, got {type(metadata).__name__}")
        _check_json(metadata, "metadata")
        if step in self._manager.all_steps():
            raise CheckpointError(f"a checkpoint for step {step} already exists in {self.directory}")
        if not force and not self._manager.should_save(step):
            return False
        stats = tree_stats(state)
        problem = _nonfinite_message(stats)
        if problem is not None:  # checked before anything is written: no save, no pruning of a good checkpoint
            raise CheckpointError(
                f"step {step}: refusing to save a non-finite state ({problem}); the checkpoints "
                f"already in {self.directory} are kept"
            )
        meta = {
            "format": _FORMAT,
            "step": step,
            "has_rng": rng is not None,
            "rng_impl": None,
            "rng_typed": False,
            "metadata": json.loads(json.dumps(metadata)),
        }
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
        meta["manifest"] = {
            "state": _leaf_checksums(stats),
            "rng": _leaf_checksums(tree_stats(rng_item)),
            "data": _canonical_sha256(data_state),
        }
        meta["digest"] = _meta_digest(meta)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            rng=ocp.args.StandardSave(rng_item),
            meta=ocp.args.JsonSave(meta),
        )
        return bool(self._manager.save(step, args=args, force=force))

    # ------------------------------------------------------------------ restore

    def restore(self, abstract_state, step: int | None = None, *, fallback: bool | None = None) -> Restored:
        """Restores `step` (default: the newest good one) onto the target's structure and shardings, verified.

        abstract_state: pytree of `jax.ShapeDtypeStruct` (with `.sharding` to place the arrays; e.g.
          `Learner.abstract_state()`) or of concrete arrays with the same structure.
        fallback: when a checkpoint fails verification (unreadable or damaged metadata, unreadable arrays, shapes or
          dtypes other than the target's, non-finite values, any item that does not match the manifest), warn,
          move it to `<directory>/quarantine/` and try the next older one. Default: on when `step` is None, off
          for an explicit step.
        Raises CheckpointError naming the checkpoint's folder when there is no finished checkpoint (or not that
        step), or when none passes verification.
        """
        steps = self.all_steps()
        if step is not None and int(step) not in steps:
            raise CheckpointError(f"no finished checkpoint for step {step} in {self.directory} (have {steps})")
        if not steps:
            raise CheckpointError(f"no finished checkpoint in {self.directory}")
        fallback = step is None if fallback is None else fallback
        candidates = [int(step)] if step is not None else sorted(steps, reverse=True)
        if step is not None and fallback:
            candidates += [s for s in sorted(steps, reverse=True) if s < int(step)]
        skipped: list[tuple[int, str]] = []
        for candidate in candidates:
            try:
                restored = self._restore_verified(abstract_state, candidate)
            except CheckpointError as e:
                if not fallback:
                    raise
                log.warning("checkpoint %s is unusable, trying an older one: %s", self._step_dir(candidate), e)
                skipped.append((candidate, str(e)))
                continue
            if skipped:
                self._quarantine([s for s, _ in skipped])
            if restored.unverified:
                log.warning(
                    "checkpoint %s was written without a manifest: its %s are not verified",
                    self._step_dir(candidate),
                    ", ".join(restored.unverified),
                )
            restored.skipped = skipped
            return restored
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: " + "; ".join(f"step {s}: {why}" for s, why in skipped)
        )

    def state_shapes(self, step: int) -> dict[str, tuple[int, ...]] | None:
        """{leaf path (`jax.tree_util.keystr`, e.g. "['params']['embed']"): shape} of a checkpoint's saved train
        state, from Orbax's metadata (no array is read); None when that metadata cannot be read (`restore` then
        reports what is wrong with the checkpoint)."""
        try:
            from etils import epath

            tree = ocp.StandardCheckpointHandler().metadata(epath.Path(self._step_dir(int(step))) / "state")
            tree = getattr(tree, "tree", tree)
            leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
            return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves} or None
        except Exception:  # noqa: BLE001 - a damaged or foreign checkpoint: restore's verification says why
            return None

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _read_meta(self, step: int) -> dict:
        """The checkpoint's metadata, checked (format; for a manifest checkpoint its digest and step) before any
        other item is read."""
        where = self._step_dir(step)
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # noqa: BLE001 - JSONDecodeError, FileNotFoundError, Orbax errors: all mean unusable
            raise CheckpointError(
                f"{where}: cannot read the checkpoint's metadata ({os.path.join(where, 'meta')}): "
                f"{type(e).__name__}: {e}"
            ) from None
        if not isinstance(meta, dict) or meta.get("format") not in _FORMATS:
            got = meta.get("format") if isinstance(meta, dict) else meta
            raise CheckpointError(f"{where}: unknown checkpoint format {got!r} (expected one of {list(_FORMATS)})")
        if meta["format"] == 1:
            if "manifest" in meta or "digest" in meta:  # format 1 never had these: the format field was damaged
                raise CheckpointError(
                    f"{where}: the metadata (meta: step, RNG kind, manifest) is damaged: format 1 with a manifest"
                )
            return meta
        if meta.get("digest") != _meta_digest(meta):
            raise CheckpointError(
                f"{where}: the metadata (meta: step, RNG kind, run metadata, manifest) does not match the digest "
                f"written when it was saved (the files changed on disk)"
            )
        if meta.get("step") != step:
            raise CheckpointError(f"{where}: the metadata names step {meta.get('step')!r}, the folder step {step}")
        if not isinstance(meta.get("manifest"), dict):
            raise CheckpointError(f"{where}: the metadata has no manifest")
        return meta

    def _restore_verified(self, abstract_state, step: int) -> Restored:
        where = self._step_dir(step)
        meta = self._read_meta(step)
        manifest = meta.get("manifest")
        target = jax.tree.map(
            lambda a: (
                a
                if isinstance(a, jax.ShapeDtypeStruct)
                else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None))
            ),
            abstract_state,
        )
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target),
                    data=ocp.args.JsonRestore(),
                    rng=ocp.args.StandardRestore(),
                ),
            )
        except Exception as e:  # noqa: BLE001 - a damaged array file or a tree that does not fit the target
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CheckpointError(f"{where}: cannot be restored: {type(e).__name__}: {first}") from None
        want = jax.tree_util.tree_flatten_with_path(target)[0]
        got = jax.tree_util.tree_flatten_with_path(restored.state)[0]
        if len(want) != len(got):
            raise CheckpointError(f"{where}: the state has {len(got)} arrays, the target {len(want)}")
        for (path, w), (_, g) in zip(want, got):
            if tuple(g.shape) != tuple(w.shape) or jnp.dtype(g.dtype) != jnp.dtype(w.dtype):
                raise CheckpointError(
                    f"{where}: leaf {jax.tree_util.keystr(path)} has shape {tuple(g.shape)} "
                    f"{jnp.dtype(g.dtype).name}, expected {tuple(w.shape)} {jnp.dtype(w.dtype).name}"
                )
        stats = tree_stats(restored.state)
        problem = _nonfinite_message(stats)
        if problem is not None:
            raise CheckpointError(f"{where}: {problem}")
        data_state = restored.data
        unverified: list[str] = []
        if manifest is None:  # format 1: the state's checksums only
            saved = meta.get("checksums")
            if isinstance(saved, dict):
                for path, (_, checksum) in stats.items():
                    if path in saved and int(saved[path]) != checksum:
                        raise CheckpointError(
                            f"{where}: leaf {path} does not match the checksum written when it was "
                            f"saved (the files changed on disk)"
                        )
            else:
                unverified.append("train state")
            unverified += ["data position", "RNG state", "metadata"]
        else:
            _compare_checksums(where, "", manifest.get("state"), stats)
            _compare_checksums(where, "the RNG state (rng): ", manifest.get("rng"), tree_stats(restored.rng))
            if _canonical_sha256(data_state) != manifest.get("data"):
                raise CheckpointError(
                    f"{where}: the data position (data) does not match the checksum written when it was saved "
                    f"(the files changed on disk)"
                )
        rng = None
        if meta.get("has_rng"):
            key_data = jnp.asarray(restored.rng["key_data"], jnp.uint32)
            try:
                rng = jax.random.wrap_key_data(key_data, impl=meta["rng_impl"]) if meta.get("rng_typed") else key_data
            except Exception as e:  # noqa: BLE001 - an unverified (format 1) RNG kind or key that does not fit
                raise CheckpointError(
                    f"{where}: the RNG state (rng) cannot be rebuilt: {type(e).__name__}: {e}"
                ) from None
        if data_state is not None and not isinstance(data_state, dict):
            raise CheckpointError(f"{where}: the data position is a {type(data_state).__name__}, not a JSON object")
        metadata = meta.get("metadata") or {}
        return Restored(
            step=step,
            state=restored.state,
            data_state=dict(data_state or {}),
            rng=rng,
            metadata=dict(metadata) if isinstance(metadata, dict) else {},
            unverified=unverified,
        )

    def _quarantine(self, steps: list[int]) -> None:
        """Moves unusable step folders to <directory>/quarantine/<step>-<unix time> (process 0) and rescans."""
        if jax.process_index() == 0:
            folder = os.path.join(self.directory, "quarantine")
            os.makedirs(folder, exist_ok=True)
            for step in steps:
                src = self._step_dir(step)
                if os.path.isdir(src):
                    dst = os.path.join(folder, f"{step}-{int(time.time())}")
                    os.replace(src, dst)
                    log.warning("moved the unusable checkpoint %s to %s", src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("memagent_checkpoint_quarantine")
        self._manager.reload()

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

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
