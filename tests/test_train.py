"""The GRPO entry point: a run interrupted halfway and resumed equals an uninterrupted run; config errors."""

import json
import os

import jax
import numpy as np
import pytest

from hf_tiny import grpo_cpu_config, make_agent_model_dir
from memagent_jax.agent import AgentSettings
from memagent_jax.models import load_hf_params
from memagent_jax.rl.recipe import TrainConfigError, validate_config
from memagent_jax.rl.trainer import train


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


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.path": ""}, r"config\.model\.path: required"),
        (
            {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 3},
            r"config\.mesh: data x fsdp x tensor = \[2, 2, 3\] does not match 8",
        ),
        ({"data.train_file": "{tmp}/nope.jsonl"}, r"config\.data\.train_file: .*nope\.jsonl' does not exist"),
        ({"rl.group_size": 0}, r"config\.rl\.group_size must be positive"),
        ({"model.attention_impl": "flash"}, r"config\.model\.attention_impl must be one of"),
        ({"model.attention_block_size": 0}, r"config\.model\.attention_block_size must be an integer >= 1"),
        ({"model.decode_layout": "sideways"}, r"config\.model\.decode_layout must be one of"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_config_errors_name_the_field(overrides, message, model_dir, tmp_path):
    overrides = {k: v.replace("{tmp}", str(tmp_path)) if isinstance(v, str) else v for k, v in overrides.items()}
    with pytest.raises(TrainConfigError, match=message):
        validate_config(grpo_config(model_dir, **overrides), device_count=8)


def test_model_options_carry_the_kernel_and_layout(model_dir):
    from memagent_jax.rl.recipe import model_options

    cfg = grpo_config(model_dir, **{"model.attention_impl": "blockwise", "model.attention_block_size": 64})
    assert model_options(cfg.model) == {
        "attention_impl": "blockwise",
        "attention_block_size": 64,
        "decode_layout": "auto",
    }


def _fake_rollout(rewards):
    """A Rollout of Q questions x G trajectories with the given [Q, G] rewards (one empty conversation each)."""
    from memagent_jax.agent import AgentResult
    from memagent_jax.rl.rollout import Rollout

    rewards = np.asarray(rewards, np.float32)
    n = rewards.size
    result = AgentResult(
        answers=[""] * n,
        answer_ids=[[]] * n,
        finished=[True] * n,
        num_chunks=[1] * n,
        conversations=[[] for _ in range(n)],
    )
    return Rollout(
        records=[None] * rewards.shape[0],
        group_size=rewards.shape[1],
        agent_result=result,
        rewards=rewards,
        accuracy=rewards,
        rollout_seconds=1.0,
        reward_seconds=0.0,
    )


def test_dynamic_sampling_draws_until_the_step_has_signal():
    from memagent_jax.rl.trainer import sample_step

    batches = [
        [[1, 1], [0, 1], [0, 0]],  # one group with signal (question 1)
        [[1, 0], [1, 1], [0, 1]],  # two more (questions 3 and 5)
        [[0, 1], [1, 0], [1, 0]],
    ]
    drawn = []

    def roll_out(draw):
        drawn.append(draw)
        return _fake_rollout(batches[draw])

    # Off: the first batch as it is, every group kept.
    rollout, keep, draws = sample_step(roll_out, dynamic_sampling=False, max_batches=3, groups_wanted=3)
    assert keep is None and draws == 1 and rollout.rewards.shape == (3, 2) and drawn == [0]
    # On: batches are drawn until 3 groups have signal; exactly those 3 are kept, in draw order.
    drawn.clear()
    rollout, keep, draws = sample_step(roll_out, dynamic_sampling=True, max_batches=3, groups_wanted=3)
    assert draws == 2 and drawn == [0, 1] and rollout.rewards.shape == (6, 2)
    assert keep.tolist() == [False, True, False, True, False, True]
    assert rollout.rollout_seconds == 2.0
    # Wanting fewer: the surplus group of the same draw is left out.
    drawn.clear()
    _, keep, draws = sample_step(roll_out, dynamic_sampling=True, max_batches=3, groups_wanted=2)
    assert draws == 2 and keep.tolist() == [False, True, False, True, False, False]
    # The draws run out: what has signal is kept (fewer groups than wanted).
    drawn.clear()
    _, keep, draws = sample_step(roll_out, dynamic_sampling=True, max_batches=1, groups_wanted=3)
    assert draws == 1 and keep.tolist() == [False, True, False]


def test_dynamic_sampling_run_trains_on_a_static_shape(model_dir, tmp_path):
    workdir = str(tmp_path / "ds")
    train(grpo_config(model_dir, steps=2, **{"rl.dynamic_sampling": True, "rl.max_sampling_batches": 3}), workdir)
    rows = _metrics(workdir)
    per_step = grpo_config(model_dir).rl.questions_per_step
    assert [m["step"] for m in rows] == [1, 2]
    for m in rows:
        assert 1 <= m["sampling_batches"] <= 3 and m["groups"] == per_step * m["sampling_batches"]
        assert m["kept_groups"] <= per_step
        if m["kept_groups"] < per_step:  # stopped early only with a full step
            assert m["sampling_batches"] == 3
    with pytest.raises(TrainConfigError, match=r"config\.rl\.max_sampling_batches must be an integer >= 1"):
        validate_config(grpo_config(model_dir, **{"rl.max_sampling_batches": 0}), device_count=1)
    with pytest.raises(TrainConfigError, match=r"config\.rl\.length_multiple must be an integer >= 1"):
        validate_config(grpo_config(model_dir, **{"rl.length_multiple": 0}), device_count=1)


def test_packed_run_trains_on_fewer_padded_tokens(model_dir, tmp_path):
    """rl.pack_length: the same two steps as one conversation per row, on packed learner rows (same rollouts, so
    the same conversations and response tokens; fewer rows), and its config errors."""
    plain, packed = str(tmp_path / "plain"), str(tmp_path / "packed")
    train(grpo_config(model_dir, steps=2), plain)
    train(grpo_config(model_dir, steps=2, **{"rl.pack_length": 256}), packed)
    a, b = _metrics(plain), _metrics(packed)
    for x, y in zip(a, b):
        assert y["conversations"] == x["conversations"] and y["response_tokens"] == x["response_tokens"]
        assert y["real_tokens"] == x["real_tokens"]
    # Step 1 starts from the same params: its rollout and loss are the same whether or not the rows are packed.
    assert b[0]["reward_mean"] == a[0]["reward_mean"]
    np.testing.assert_allclose(b[0]["loss"], a[0]["loss"], rtol=1e-4, atol=1e-6)
    with pytest.raises(TrainConfigError, match=r"config\.rl\.pack_length must be an integer >= 0"):
        validate_config(grpo_config(model_dir, **{"rl.pack_length": -1}), device_count=1)
    with pytest.raises(TrainConfigError, match=r"config\.rl\.pack_length > 0 needs config\.rl\.aggregation"):
        validate_config(
            grpo_config(model_dir, **{"rl.pack_length": 64, "rl.aggregation": "seq-mean-token-mean"}), device_count=1
        )
