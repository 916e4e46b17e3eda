"""Fault injection on training checkpoints: every item a restore uses is verified.

A checkpoint holds the train state (weights, optimiser state), the data position, the RNG state and metadata (step,
RNG kind, the run's metadata such as its config, the manifest of checksums). Each test damages one item of the newest
of three checkpoints the way a bad disk or a stray edit would (a value changed, the files still readable) and checks
that the restore names what was damaged, moves that checkpoint to quarantine and resumes from the previous one.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from memagent_jax.data.iterator import ShardedIterator
from memagent_jax.storage.checkpoint import Checkpointer, CheckpointError

pytestmark = pytest.mark.faults


def _state(step: int):
    """A train-state-shaped pytree: weights, AdamW moments, a step counter."""
    w = jnp.arange(600, dtype=jnp.float32).reshape(6, 100) / 7 + step
    return {
        "params": {"embed": w, "norm": jnp.full((100,), 1.0 + step, jnp.float32)},
        "opt_state": {"mu": {"embed": w / 10, "norm": jnp.full((100,), 0.1 * step)}, "count": jnp.int32(step)},
        "step": jnp.int32(step),
    }


def _target():
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _state(0))


def _data(step: int) -> dict:
    return {"version": 1, "epoch": 0, "position": 8 * step, "seed": 3}


def _meta(step: int) -> dict:
    return {"config": {"seed": 3, "rl.learning_rate": 1e-6}, "step_note": f"saved at {step}"}


def _save_three(directory: str) -> None:
    with Checkpointer(directory, async_save=False) as c:
        for step in (1, 2, 3):
            c.save(step, _state(step), data_state=_data(step), rng=jax.random.key(step), metadata=_meta(step))


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f)


def _rewrite_arrays(step_dir: str, item: str, tree) -> None:
    """Replaces an array item's files with a well-formed save of `tree`: readable, only the values differ."""
    scratch = step_dir + ".scratch"
    with ocp.StandardCheckpointer() as writer:
        writer.save(os.path.join(scratch, item), tree)
    shutil.rmtree(os.path.join(step_dir, item))
    shutil.copytree(os.path.join(scratch, item), os.path.join(step_dir, item))
    shutil.rmtree(scratch)


def _damage_data(step_dir):
    path = os.path.join(step_dir, "data", "metadata")
    _write_json(path, dict(_read_json(path), position=0))  # valid JSON, a plausible position: another batch


def _damage_rng(step_dir):
    other = np.asarray(jax.random.key_data(jax.random.key(99)))
    _rewrite_arrays(step_dir, "rng", {"key_data": other})


def _damage_step(step_dir):
    path = os.path.join(step_dir, "meta", "metadata")
    _write_json(path, dict(_read_json(path), step=2))


def _damage_run_metadata(step_dir):
    path = os.path.join(step_dir, "meta", "metadata")
    meta = _read_json(path)
    meta["metadata"]["config"]["rl.learning_rate"] = 1e-3
    _write_json(path, meta)


def _damage_optimizer_leaf(step_dir):
    state = _state(3)
    state["opt_state"]["mu"]["embed"] = state["opt_state"]["mu"]["embed"].at[2, 7].add(1e-3)
    _rewrite_arrays(step_dir, "state", state)


def _damage_weight_leaf(step_dir):
    state = _state(3)
    state["params"]["norm"] = state["params"]["norm"].at[0].set(0.5)
    _rewrite_arrays(step_dir, "state", state)


DAMAGES = {
    "data position": (_damage_data, r"the data position \(data\) does not match the checksum"),
    "RNG state": (_damage_rng, r"the RNG state \(rng\): leaf \['key_data'\] does not match the checksum"),
    "metadata step": (_damage_step, r"the metadata \(meta: step, .*\) does not match the digest"),
    "run metadata": (_damage_run_metadata, r"the metadata \(meta: .*run metadata.*\) does not match the digest"),
    "optimizer leaf": (_damage_optimizer_leaf, r"leaf \['opt_state'\]\['mu'\]\['embed'\] does not match the checksum"),
    "weight leaf": (_damage_weight_leaf, r"leaf \['params'\]\['norm'\] does not match the checksum"),
}


def _assert_restored(restored, step: int) -> None:
    assert restored.step == step
    for (path, got), want in zip(
        jax.tree_util.tree_flatten_with_path(restored.state)[0], jax.tree.leaves(_state(step))
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=jax.tree_util.keystr(path))
    assert restored.data_state == _data(step)
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(jax.random.key(step)))
    assert restored.metadata == _meta(step)


@pytest.mark.parametrize("what", list(DAMAGES))
def test_damaged_item_of_newest_checkpoint_falls_back(what, tmp_path, caplog):
    directory = str(tmp_path / "ckpt")
    _save_three(directory)
    damage, message = DAMAGES[what]
    damage(os.path.join(directory, "3"))
    with Checkpointer(directory, async_save=False) as c:
        with pytest.raises(CheckpointError, match=r"ckpt/3: " + message):
            c.restore(_target(), step=3)  # an explicit step: verified, no fallback, nothing moved
        assert c.all_steps() == [1, 2, 3]
        restored = c.restore(_target())
        _assert_restored(restored, 2)
        assert [s for s, _ in restored.skipped] == [3] and restored.unverified == []
        assert "ckpt/3: " in restored.skipped[0][1]
        assert c.all_steps() == [1, 2]
        (moved,) = os.listdir(os.path.join(directory, "quarantine"))
        assert moved.startswith("3-")
    warning = next(r.getMessage() for r in caplog.records if "is unusable" in r.getMessage())
    assert "ckpt/3 is unusable" in warning
    assert any(word in warning for word in ("data position", "RNG state", "metadata", "leaf ["))


def test_undamaged_restore_is_exact(tmp_path, caplog):
    directory = str(tmp_path / "ckpt")
    _save_three(directory)
    with Checkpointer(directory, async_save=False) as c:
        restored = c.restore(_target())
        _assert_restored(restored, 3)
        assert restored.skipped == [] and restored.unverified == []
        assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
        for step in (1, 2):
            _assert_restored(c.restore(_target(), step=step), step)
    assert "unusable" not in caplog.text and "not verified" not in caplog.text


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path):
    directory = str(tmp_path / "ckpt")
    _save_three(directory)
    _damage_data(os.path.join(directory, "3"))
    _damage_rng(os.path.join(directory, "2"))
    _damage_step(os.path.join(directory, "1"))
    with Checkpointer(directory, async_save=False) as c:
        with pytest.raises(CheckpointError) as error:
            c.restore(_target())
        text = str(error.value)
        assert "\n" not in text and text.startswith(f"no usable checkpoint in {directory}: ")
        assert "step 3: " in text and "data position" in text
        assert "step 2: " in text and "RNG state" in text
        assert "step 1: " in text and "the metadata (meta: step" in text
        assert c.all_steps() == [1, 2, 3]  # nothing good to resume from: nothing is moved
    assert not os.path.exists(os.path.join(directory, "quarantine"))


def test_damaged_format_field_is_caught(tmp_path):
    """A manifest checkpoint whose format field reads 1 (the manifest-less format) is damaged, not old."""
    directory = str(tmp_path / "ckpt")
    _save_three(directory)
    path = os.path.join(directory, "3", "meta", "metadata")
    _write_json(path, dict(_read_json(path), format=1))
    with Checkpointer(directory, async_save=False) as c:
        restored = c.restore(_target())
    assert restored.step == 2 and "format 1 with a manifest" in restored.skipped[0][1]


def test_copied_step_folder_is_caught(tmp_path):
    """A step folder copied under another step's name: its metadata names the step it was saved at."""
    directory = str(tmp_path / "ckpt")
    _save_three(directory)
    shutil.copytree(os.path.join(directory, "2"), os.path.join(directory, "4"))
    with Checkpointer(directory, async_save=False) as c:
        restored = c.restore(_target())
    _assert_restored(restored, 3)
    assert restored.skipped == [(4, f"{directory}/4: the metadata names step 2, the folder step 4")]


def _as_written_without_manifest(step_dir: str) -> None:
    """Rewrites a checkpoint's metadata as the manifest-less format wrote it: state checksums only."""
    path = os.path.join(step_dir, "meta", "metadata")
    meta = _read_json(path)
    _write_json(
        path,
        {
            "format": 1,
            "step": meta["step"],
            "has_rng": meta["has_rng"],
            "rng_impl": meta["rng_impl"],
            "rng_typed": meta["rng_typed"],
            "checksums": meta["manifest"]["state"],
        },
    )


def test_checkpoint_without_manifest_restores_and_says_what_is_unverified(tmp_path, caplog):
    directory = str(tmp_path / "ckpt")
    _save_three(directory)
    for step in (1, 2, 3):
        _as_written_without_manifest(os.path.join(directory, str(step)))
    _damage_weight_leaf(os.path.join(directory, "3"))  # its weights are still checked
    with Checkpointer(directory, async_save=False) as c:
        restored = c.restore(_target())
    assert restored.step == 2 and [s for s, _ in restored.skipped] == [3]
    assert "leaf ['params']['norm'] does not match the checksum" in restored.skipped[0][1]
    assert restored.unverified == ["data position", "RNG state", "metadata"]
    assert restored.data_state == _data(2) and restored.metadata == {}
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(jax.random.key(2)))
    assert "ckpt/2 was written without a manifest: its data position, RNG state, metadata are not verified" in (
        caplog.text
    )


def test_iterator_state_errors_name_the_entry():
    it = ShardedIterator(list(range(20)), 4, seed=3)
    state = it.get_state()
    for broken, message in [
        ({k: v for k, v in state.items() if k != "position"}, "has no 'position'"),
        (dict(state, position="8"), "position='8', not an integer"),
        (dict(state, epoch=True), "epoch=True, not an integer"),
        (dict(state, shuffle=1), "shuffle=1, not a bool"),
        (dict(state, position=21), "invalid iterator position"),
        (dict(state, seed=4), "seed=4, this iterator has 3"),
        ([state], "must be a dict"),
    ]:
        with pytest.raises(ValueError, match=message):
            it.set_state(broken)
    it.set_state(dict(state, position=8))
    assert next(it) == [int(i) for i in it.host_indices(0)[8:12]]


@pytest.mark.slow
def test_trainer_resumes_from_the_previous_checkpoint_when_the_data_position_is_damaged(tmp_path, capsys):
    """A 3-step run saving every step; then the last checkpoint is lost (a kill before it was written) and step
    2's data position is damaged. The restarted run falls back to step 1 and repeats steps 2 and 3 exactly."""
    from hf_tiny import grpo_cpu_config, make_agent_model_dir
    from memagent_jax.models import load_hf_params
    from memagent_jax.rl.trainer import train

    model_dir = make_agent_model_dir(tmp_path / "model", seed=2)
    cfg = grpo_cpu_config(model_dir, **{"rl.learning_rate": 1e-3, "steps": 3, "checkpoint.every": 1})
    workdir = str(tmp_path / "run")
    train(cfg, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        uninterrupted = {row["step"]: row for row in map(json.loads, f)}
    shutil.move(os.path.join(workdir, "export"), str(tmp_path / "uninterrupted_export"))
    checkpoints = os.path.join(workdir, "checkpoints")
    shutil.rmtree(os.path.join(checkpoints, "3"))
    data = os.path.join(checkpoints, "2", "data", "metadata")
    assert _read_json(data)["position"] > 0
    _damage_data(os.path.join(checkpoints, "2"))
    capsys.readouterr()

    train(cfg, workdir)
    out, err = capsys.readouterr()
    assert "warning: checkpoint step 2 is unusable" in err and "the data position (data) does not match" in err
    assert f"resumed from {checkpoints} at step 1" in out
    assert "note: the config differs" not in err
    assert sorted(os.listdir(checkpoints)) == ["1", "2", "3", "quarantine"]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        resumed = {row["step"]: row for row in map(json.loads, f)}
    assert sorted(resumed) == [1, 2, 3]
    for step in (2, 3):
        for key in ("reward_mean", "accuracy", "loss", "conversations", "memory_response_len"):
            assert resumed[step][key] == pytest.approx(uninterrupted[step][key], abs=1e-6), (step, key)
    a, _ = load_hf_params(str(tmp_path / "uninterrupted_export"))
    b, _ = load_hf_params(os.path.join(workdir, "export"))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6), a, b)
    # A restart whose data does not fit the checkpoint's position (another seed): one error naming the entry.
    other = grpo_cpu_config(model_dir, **{"rl.learning_rate": 1e-3, "steps": 4, "seed": cfg.seed + 1})
    with pytest.raises(
        CheckpointError,
        match=rf"checkpoints/3: its data position does not fit this run's data: "
        rf"iterator state has seed={cfg.seed}, this iterator has {cfg.seed + 1}",
    ):
        train(other, workdir)
