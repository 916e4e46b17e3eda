"""The GRPO entry point: a run interrupted halfway and resumed equals an uninterrupted run; config errors."""

import json
import os

import jax
import numpy as np
import pytest

from hf_tiny import grpo_cpu_config, make_agent_model_dir
from memagent_jax.agent import AgentSettings
from memagent_jax.models import load_hf_params
from memagent_jax.train import TrainConfigError, train, validate_config


def grpo_config(model_dir, **overrides):
    return grpo_cpu_config(model_dir, **{"rl.learning_rate": 1e-3, **overrides})  # visible movement in 4 steps


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_agent_model_dir(tmp_path_factory.mktemp("train") / "model", seed=2)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_equals_uninterrupted_run(model_dir, tmp_path):
    full = str(tmp_path / "full")
    train(grpo_config(model_dir, steps=4), full)
    split = str(tmp_path / "split")
    train(grpo_config(model_dir, steps=2), split)  # "killed" after step 2 (checkpoint at 2)
    # What a kill later on leaves behind: metrics rows of steps the resumed run repeats (and a torn line), and a
    # half-written export folder. The resumed run keeps one row per step and removes the folder.
    with open(os.path.join(split, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 3, "reward_mean": -1.0}) + "\n" + '{"step": 4, "rew')
    os.makedirs(os.path.join(split, "export.tmp-killed"))
    train(grpo_config(model_dir, steps=4), split)  # restarted: resumes at step 2
    assert not os.path.exists(os.path.join(split, "export.tmp-killed"))
    assert [m["step"] for m in _metrics(split)] == [1, 2, 3, 4]
    settings = AgentSettings.load(os.path.join(full, "export"))  # the export describes its agent
    assert settings.path and settings.budgets.chunk_tokens == 64 and settings.budgets.memory_tokens == 16
    assert (settings.temperature, settings.top_p, settings.training["temperature"]) == (0.7, 0.95, 1.0)
    a, _ = load_hf_params(os.path.join(full, "export"))
    b, _ = load_hf_params(os.path.join(split, "export"))
    initial, _ = load_hf_params(model_dir)
    moved = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, initial)
    assert max(jax.tree.leaves(moved)) > 1e-4  # training changed the params
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6), a, b)
    full_m = {m["step"]: m for m in _metrics(full)}
    split_m = {m["step"]: m for m in _metrics(split)}
    assert sorted(full_m) == [1, 2, 3, 4] and sorted(split_m) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("reward_mean", "accuracy", "loss", "conversations", "memory_response_len"):
            assert full_m[step][key] == pytest.approx(split_m[step][key], abs=1e-6), (step, key)
    for m in full_m.values():
        assert 0.0 <= m["accuracy"] <= 1.0 and m["conversations"] > 0
    assert os.path.isdir(os.path.join(full, "checkpoints"))


def test_config_errors_name_the_field(model_dir, tmp_path):
    with pytest.raises(TrainConfigError, match=r"config\.model\.path: required"):
        validate_config(grpo_config(""), device_count=8)
    with pytest.raises(TrainConfigError, match=r"config\.mesh: data x fsdp x tensor = \[2, 2, 3\] does not match 8"):
        validate_config(grpo_config(model_dir, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 3}), device_count=8)
    with pytest.raises(TrainConfigError, match=r"config\.data\.train_file: .*nope\.jsonl' does not exist"):
        validate_config(grpo_config(model_dir, **{"data.train_file": str(tmp_path / "nope.jsonl")}), device_count=8)
    with pytest.raises(TrainConfigError, match=r"config\.rl\.group_size must be positive"):
        validate_config(grpo_config(model_dir, **{"rl.group_size": 0}), device_count=8)
    with pytest.raises(TrainConfigError, match=r"config\.model\.attention_impl must be one of"):
        validate_config(grpo_config(model_dir, **{"model.attention_impl": "flash"}), device_count=8)
    with pytest.raises(TrainConfigError, match=r"config\.model\.attention_block_size must be an integer >= 1"):
        validate_config(grpo_config(model_dir, **{"model.attention_block_size": 0}), device_count=8)
    from memagent_jax.train import model_options

    cfg = grpo_config(model_dir, **{"model.attention_impl": "blockwise", "model.attention_block_size": 64})
    assert model_options(cfg.model) == {"attention_impl": "blockwise", "attention_block_size": 64,
                                        "decode_layout": "auto"}
    with pytest.raises(TrainConfigError, match=r"config\.model\.decode_layout must be one of"):
        validate_config(grpo_config(model_dir, **{"model.decode_layout": "sideways"}), device_count=8)
