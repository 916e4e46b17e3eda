"""Checkpoints: round trip onto another mesh, keep-last-N, async save + donation, interrupted saves, resume."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memagent_jax.models import abstract_params
from memagent_jax.models.presets import preset_config
from memagent_jax.models.sharding import make_mesh
from memagent_jax.rl.batch import build_conversation_batch, shuffle_rows
from memagent_jax.rl.learner import Learner, LearnerConfig, OptimizerConfig
from memagent_jax.rl.losses import LossConfig
from memagent_jax.storage.checkpoint import Checkpointer, CheckpointError

CONFIG = preset_config("tiny", vocab_size=128)
LEARNER = LearnerConfig(
    loss=LossConfig(kl_coef=0.0),
    num_minibatches=2,
    logits_chunk_size=0,
    optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=2),
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_params(seed):
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        noise = rng.normal(size=a.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.1 * noise if "norm" in jax.tree_util.keystr(path) else 0.05 * noise, a.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(CONFIG))


def batch_at(position: int, rng_key):
    """The batch a deterministic data iterator yields at `position`, rows shuffled with the run's key."""
    rng = np.random.default_rng(position)
    n = 8
    prompts = [rng.integers(3, 128, size=rng.integers(2, 6)) for _ in range(n)]
    responses = [rng.integers(3, 128, size=rng.integers(1, 5)) for _ in range(n)]
    logps = [-np.log(128) + rng.uniform(-0.3, 0.3, size=len(r)) for r in responses]
    b = build_conversation_batch(prompts, responses, logps, rng.normal(size=n), length_multiple=16)
    seed = int(jax.random.randint(rng_key, (), 0, 2**31 - 1))
    return shuffle_rows(b, seed)


def as_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
    assert len(la) == len(lb)
    for (path, x), y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_round_trip_onto_another_mesh(tmp_path):
    learner = Learner(CONFIG, LEARNER)
    state = learner.init_state(random_params(0))
    state, _ = learner.train_step(state, batch_at(0, jax.random.key(1)))  # non-trivial Adam moments
    saved = as_numpy(state)
    key = jax.random.key(42)
    data_state = {"epoch": 1, "position": 24, "seed": 7, "version": 1}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(1, state, data_state=data_state, rng=key)
        ckpt.wait_until_finished()
        assert ckpt.latest_step() == 1

    # A fresh manager, restoring onto 8 devices (data 2 x fsdp 2 x tensor 2): values and target shardings.
    sharded = Learner(CONFIG, LEARNER, mesh=make_mesh(2, 2, 2))
    target = sharded.abstract_state()
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        restored = ckpt.restore(target)
    assert restored.step == 1 and restored.data_state == data_state
    assert_trees_equal(restored.state, saved)
    for leaf, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(target)):
        assert leaf.sharding == want.sharding
    assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(key))
    assert int(jax.random.randint(restored.rng, (), 0, 1000)) == int(jax.random.randint(key, (), 0, 1000))
    # The restored state trains on the mesh.
    state8, metrics = sharded.train_step(restored.state, batch_at(1, jax.random.key(2)))
    assert np.isfinite(metrics["loss"]) and int(state8.step) == 2


def test_keep_last_n_and_errors(tmp_path):
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3,), jnp.int32)}
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in range(5):
            ckpt.save(
                step,
                jax.tree.map(lambda x: x + step, tree),
                data_state={"position": step},
                rng=jax.random.PRNGKey(step),
            )  # raw uint32 key
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
        restored = ckpt.restore(tree, step=3)
        assert_trees_equal(restored.state, jax.tree.map(lambda x: x + 3, tree))
        assert restored.data_state == {"position": 3}
        np.testing.assert_array_equal(restored.rng, jax.random.PRNGKey(3))
        with pytest.raises(CheckpointError, match="step 1"):
            ckpt.restore(tree, step=1)
        with pytest.raises(CheckpointError, match="already exists"):
            ckpt.save(4, tree)
        with pytest.raises(CheckpointError, match="data_state must be JSON"):
            ckpt.save(5, tree, data_state={"f": object()})
    assert sorted(os.listdir(tmp_path)) == ["3", "4"]
    with pytest.raises(CheckpointError, match="no finished checkpoint"):
        Checkpointer(tmp_path / "empty").restore(tree)


def test_async_save_survives_donation(tmp_path):
    """`save` returns after the device->host copy, so the next train step may donate the state at once."""
    learner = Learner(CONFIG, LEARNER)
    state = learner.init_state(random_params(0))
    state, _ = learner.train_step(state, batch_at(0, jax.random.key(1)))
    saved = as_numpy(state)
    with Checkpointer(tmp_path, async_save=True) as ckpt:
        ckpt.save(1, state)
        state, _ = learner.train_step(state, batch_at(1, jax.random.key(2)))  # donates the saved buffers
        ckpt.wait_until_finished()
        restored = ckpt.restore(learner.abstract_state())
    assert_trees_equal(restored.state, saved)
    assert not np.array_equal(np.asarray(state.params["embed"]), saved.params["embed"])


_INTERRUPTED_SAVE = textwrap.dedent("""
    import asyncio, os, sys, time
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, {repo!r})
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import atomicity
    from memagent_jax.storage.checkpoint import Checkpointer

    directory, marker = sys.argv[1], sys.argv[2]
    ckpt = Checkpointer(directory, async_save=True)
    ckpt.save(1, {{"w": jnp.full((64, 64), 1.0)}}, data_state={{"position": 1}})
    ckpt.wait_until_finished()

    async def hang(self, *args, **kwargs):  # every file of step 2 is written; the commit never happens
        open(marker, "w").close()
        while True:
            await asyncio.sleep(1)

    for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
        cls.finalize = hang
    ckpt.save(2, {{"w": jnp.full((64, 64), 2.0)}}, data_state={{"position": 2}})
    ckpt.wait_until_finished()  # never returns: the parent kills this process
""")


def test_interrupted_save_is_never_picked(tmp_path):
    directory, marker = tmp_path / "ckpt", tmp_path / "in_finalize"
    script = tmp_path / "save.py"
    script.write_text(_INTERRUPTED_SAVE.format(repo=REPO))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(directory), str(marker)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.time() + 120
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"saver exited early:\n{proc.stdout.read().decode()[-3000:]}")
            if time.time() > deadline:
                pytest.fail("saver never reached the commit of step 2")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # killed mid-save
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = [name for name in os.listdir(directory) if name != "1"]
    assert leftovers and all(".orbax-checkpoint-tmp" in name for name in leftovers), leftovers
    # A hand-made, half-written tmp dir of a later step as well.
    partial = directory / "3.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 10)

    target = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
    with Checkpointer(directory) as ckpt:
        assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
        restored = ckpt.restore(target)
        assert restored.step == 1 and restored.data_state == {"position": 1}
        np.testing.assert_array_equal(restored.state["w"], np.full((64, 64), 1.0))
        # The run can continue: step 2 saves cleanly this time.
        ckpt.save(2, {"w": jnp.full((64, 64), 2.0)}, data_state={"position": 2})
        ckpt.wait_until_finished()
        assert ckpt.latest_step() == 2
    assert sorted(os.listdir(directory)) == ["1", "2"]  # the tmp leftovers were cleaned up


def _run(learner, state, rng, start, stop, ckpt=None, save_at=None):
    """Train steps start..stop-1; data position = step; the rng is split once per step (e.g. for shuffling)."""
    history = []
    for position in range(start, stop):
        rng, sub = jax.random.split(rng)
        state, metrics = learner.train_step(state, batch_at(position, sub))
        history.append(
            {k: v for k, v in metrics.items() if k not in ("learner_time_s", "compile_time_s", "tokens_per_s")}
        )
        if ckpt is not None and position + 1 == save_at:
            ckpt.save(position + 1, state, data_state={"position": position + 1}, rng=rng)
    return state, rng, history


def test_resume_matches_uninterrupted_run(tmp_path):
    learner = Learner(CONFIG, LEARNER)
    full_state, _, full_history = _run(learner, learner.init_state(random_params(0)), jax.random.key(0), 0, 4)

    # Run 2 steps, checkpoint, "crash"; a new learner restores and runs the remaining 2.
    first = Learner(CONFIG, LEARNER)
    with Checkpointer(tmp_path) as ckpt:
        _, _, history = _run(first, first.init_state(random_params(0)), jax.random.key(0), 0, 2, ckpt, save_at=2)
    del first
    second = Learner(CONFIG, LEARNER)
    with Checkpointer(tmp_path) as ckpt:
        restored = ckpt.restore(second.abstract_state())
    start = restored.data_state["position"]
    assert start == 2 and int(restored.state.step) == 2
    state, _, rest = _run(second, restored.state, restored.rng, start, 4)
    assert history + rest == full_history
    assert_trees_equal(state, full_state)
