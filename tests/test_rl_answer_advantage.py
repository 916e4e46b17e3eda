"""The final answer's advantage in multi-conversation GRPO (`rollout_to_batch(answer_advantage=)`,
config.rl.answer_advantage), and the drift it removes.

A memory agent's answer step copies the word its notes hold and closes the box. When the notes are wrong, any answer
scores 0: the trajectory's negative advantage then says nothing about the answer step, yet under "shared" it pushes
down what the answer step did, "\\boxed{ W}" for the wrong word W. A word that the failed trajectories keep copying
has its closing token pushed down, and the stop token takes its place (the main job saw P("}" | " Ul") fall from
0.94 to 0.23 on one seed, answers left as "\\boxed{ Ul"). The second test reproduces that with the real learner on a
tiny model: under "shared" the closing token after that word loses probability, under "positive" it gains.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memagent_jax.agent.types import AgentResult, Conversation
from memagent_jax.models import forward, positions_from_mask
from memagent_jax.models.presets import preset_config
from memagent_jax.rl.advantages import group_advantages
from memagent_jax.rl.learner import Learner, LearnerConfig, OptimizerConfig
from memagent_jax.rl.losses import LossConfig
from memagent_jax.rl.rollout import Rollout, rollout_to_batch
from memagent_jax.rl.warm_start import sft_learner_config

CONFIG = preset_config("tiny", vocab_size=64)
CLOSE, STOP = 3, 4  # "}" and the stop token
NOTES, ANSWER = 10, 11  # the memory prompt's and the final prompt's first token
WRONG = 30  # the look-alike's word the failed trajectories noted


def _rollout(answer_words, group_size=4, failed_per_group=2):
    """One group per answer word: `failed_per_group` trajectories noted WRONG (reward 0), the others the answer
    (reward 1). Each trajectory: a memory step writing its noted word, then the final step "<word> } <stop>"."""
    conversations, rewards = [], []
    for word in answer_words:
        for g in range(group_size):
            noted = WRONG if g < failed_per_group else word
            conversations.append(
                [
                    Conversation("memory", 0, np.array([NOTES, 5, noted]), np.array([noted, STOP]), np.zeros(2)),
                    Conversation("final", 0, np.array([ANSWER, noted]), np.array([noted, CLOSE, STOP]), np.zeros(3)),
                ]
            )
            rewards.append(float(noted == word))
    q = len(answer_words)
    n = q * group_size
    result = AgentResult(
        answers=[""] * n, answer_ids=[[]] * n, finished=[True] * n, num_chunks=[1] * n, conversations=conversations
    )
    rewards = np.asarray(rewards, np.float32).reshape(q, group_size)
    return Rollout([], group_size, result, rewards, rewards.copy(), 0.0, 0.0)


def test_positive_answer_advantage_zeroes_only_the_failed_trajectories_answers():
    rollout = _rollout([20, 21])
    advantages = np.asarray(group_advantages(rollout.rewards))  # +-0.5
    shared, _ = rollout_to_batch(rollout, advantages, answer_advantage="shared")
    positive, stats = rollout_to_batch(rollout, advantages, answer_advantage="positive")
    want_shared = np.repeat(advantages.reshape(-1), 2)  # every conversation carries its trajectory's advantage
    np.testing.assert_array_equal(shared.advantages, want_shared)
    want_positive = want_shared.copy()
    want_positive[1::2] = np.maximum(want_positive[1::2], 0.0)  # the final answers (every second row)
    np.testing.assert_array_equal(positive.advantages, want_positive)
    assert (positive.advantages[0::2] < 0).sum() == 4  # the failed memory steps keep their negative advantage
    np.testing.assert_array_equal(positive.loss_mask, shared.loss_mask)  # the answers' tokens still count (KL)
    assert stats["conversations"] == 16
    with pytest.raises(ValueError, match="answer_advantage must be one of"):
        rollout_to_batch(rollout, advantages, answer_advantage="none")


def _closing_probability(params, word: int) -> float:
    ids = jnp.asarray([[ANSWER, word, word]])
    mask = jnp.ones_like(ids, bool)
    logits, _ = forward(params, ids, positions_from_mask(mask), mask, config=CONFIG)
    return float(jax.nn.softmax(logits[0, -1].astype(jnp.float32))[CLOSE])


@pytest.fixture(scope="module")
def warm_learner():
    """A tiny model taught the steps first (every conversation of the rollout reinforced: a stand-in for the warm
    start's SFT), so that the answer step copies and closes the box with high probability, as in the main job."""
    from memagent_jax.models import init_params

    learner = Learner(
        CONFIG,
        LearnerConfig(
            loss=LossConfig(kind="grpo", kl_coef=0.0),
            optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0),
            recompute_old_logprobs=True,
        ),
    )
    rollout = _rollout(list(range(40, 52)))
    teach, _ = rollout_to_batch(rollout, np.ones(rollout.rewards.shape, np.float32), length_multiple=8)
    teacher = Learner(CONFIG, sft_learner_config(learning_rate=1e-2, updates=30, updates_per_call=1))
    state = teacher.init_state(init_params(CONFIG, jax.random.key(0)))
    for _ in range(30):
        state, _ = teacher.train_step(state, teach)
    return learner, jax.device_get(state.params), rollout


@pytest.mark.parametrize("mode", ["shared", "positive"])
def test_failed_trajectories_push_down_the_closing_token_only_when_their_answers_share_the_advantage(
    warm_learner, mode
):
    """Twelve groups, each half failed with WRONG noted. Three GRPO steps: under "shared" P("}" | WRONG) falls at
    every step (0.90 -> 0.60 when written), under "positive" it ends no lower than it started (only the successes'
    answers are reinforced, and those close the box too; the failed memory steps still move shared weights)."""
    learner, params, rollout = warm_learner
    state = learner.init_state(params)
    start = _closing_probability(learner.policy_params(state), WRONG)
    assert start > 0.8  # the taught answer step closes the box
    batch, _ = rollout_to_batch(
        rollout, np.asarray(group_advantages(rollout.rewards)), answer_advantage=mode, length_multiple=8
    )
    figures = [start]
    for _ in range(3):
        state, _ = learner.train_step(state, batch)
        figures.append(_closing_probability(learner.policy_params(state), WRONG))
    if mode == "shared":
        assert (np.diff(figures) < 0).all() and figures[-1] < 0.8 * start, figures
    else:
        assert figures[-1] >= start, figures
