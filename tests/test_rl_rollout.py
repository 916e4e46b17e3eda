"""Bounded rollouts (rl.rollout_batch_size): continuous batching over rollout_batch_size row slots gives exactly
the trajectories, and the rewards, of one lockstep call over all of them."""

import concurrent.futures
import dataclasses

import numpy as np
import pytest

from hf_tiny import make_agent_model_dir
from memagent_jax.agent import AgentBudgets, MemoryAgent
from memagent_jax.data.records import QARecord
from memagent_jax.data.tokenizer import load_tokenizer
from memagent_jax.models import load_hf_params
from memagent_jax.rl.rollout import collect_rollouts, collect_rollouts_in_slices
from memagent_jax.sampling import SamplingParams


class WholeAnswerScorer:
    """A scorer (`RewardScorer`'s submit / close) that rewards an answer whose whole text is one of the ground
    truths: the verifier's styles read a \\boxed{} answer, which a tiny random model never writes."""

    def submit(self, responses, truths) -> concurrent.futures.Future:
        rewards = np.array([float(r in t) for r, t in zip(responses, truths)], np.float32)
        future = concurrent.futures.Future()
        future.set_result((rewards, rewards.copy()))
        return future

    def close(self) -> None:
        pass


def test_bounded_rollout_equals_one_call(tmp_path):
    folder = make_agent_model_dir(tmp_path / "model", "qwen2_tied", seed=0)
    params, config = load_hf_params(folder)
    tok = load_tokenizer(folder)
    agent = MemoryAgent(
        params,
        config,
        tok,
        budgets=AgentBudgets(
            question_tokens=16, chunk_tokens=16, memory_tokens=12, answer_tokens=4, chunks_per_segment=2
        ),
        memory_sampling=SamplingParams(temperature=1.0),
    )
    records = [
        QARecord(
            question=f"Where is the {w} river?",
            document=" The quiet river stood near the old mill." * n,
            answers=(w,),
            index=i,
        )
        for i, (w, n) in enumerate([("green", 2), ("cold", 5), ("wide", 3)])
    ]
    scorer = WholeAnswerScorer()
    # Ground truths that some trajectories hit: the answers trajectory g = 0 of questions 0 and 1 samples.
    first = collect_rollouts(agent, records, 2, 7, scorer=scorer, question_ids=[4, 5, 6]).result()
    hits = {0: first.agent_result.answers[0], 1: first.agent_result.answers[2]}
    records = [dataclasses.replace(r, answers=(hits[i],)) if i in hits else r for i, r in enumerate(records)]
    whole = collect_rollouts(agent, records, 2, 7, scorer=scorer, question_ids=[4, 5, 6]).result()
    sliced = collect_rollouts_in_slices(
        agent, records, 2, 7, scorer=scorer, questions_per_call=2, question_ids=[4, 5, 6]
    )
    assert sliced.rewards.shape == whole.rewards.shape == (3, 2)
    assert whole.rewards[0, 0] == whole.rewards[1, 0] == 1.0  # the same keys sample the same answers again
    np.testing.assert_array_equal(sliced.rewards, whole.rewards)
    assert sliced.agent_result.answers == whole.agent_result.answers
    assert sliced.agent_result.num_chunks == whole.agent_result.num_chunks
    for a, b in zip(sliced.agent_result.conversations, whole.agent_result.conversations):
        assert [c.response_ids.tolist() for c in a] == [c.response_ids.tolist() for c in b]
        for ca, cb in zip(a, b):
            np.testing.assert_allclose(ca.logprobs, cb.logprobs, atol=1e-5)
    assert [r.index for r in sliced.records] == [0, 1, 2]


# ------------------------------------------------------------------------------------ log-probs at the temperature


def test_tempered_logprobs_are_those_of_logits_over_the_row_temperature():
    """With `tempered` the sampler records log_softmax(logits / the row's temperature) at each drawn token (top-k /
    top-p not applied, greedy rows: the logits), the same draws as without it; without it, the model's own."""
    import jax
    import jax.numpy as jnp

    from memagent_jax.sampling import RowSampling
    from memagent_jax.sampling.sampler import sample_tokens

    logits = np.random.default_rng(0).normal(size=(5, 40)).astype(np.float32) * 3.0
    rows = RowSampling(
        np.array([0.7, 0.7, 1.6, 0.0, 1.0], np.float32),
        np.array([0, 5, 0, 0, 0], np.int32),
        np.array([1.0, 0.9, 0.8, 1.0, 1.0], np.float32),
    )
    keys = jax.random.split(jax.random.key(3), 5)
    tokens, plain, sampled = sample_tokens(jnp.asarray(logits), keys, rows)
    t_tokens, tempered, t_sampled = sample_tokens(jnp.asarray(logits), keys, rows, tempered=True)
    np.testing.assert_array_equal(np.asarray(t_tokens), np.asarray(tokens))
    np.testing.assert_array_equal(np.asarray(t_sampled), np.asarray(sampled))

    def log_softmax(z):
        z = np.asarray(z, np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    picked = np.asarray(tokens)[:, None]
    scale = np.where(rows.temperature > 0, rows.temperature, 1.0)[:, None]
    want = np.take_along_axis(log_softmax(logits / scale), picked, axis=-1)[:, 0]
    np.testing.assert_allclose(np.asarray(tempered), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(plain), np.take_along_axis(log_softmax(logits), picked, axis=-1)[:, 0], rtol=0, atol=1e-5
    )
    assert np.abs(np.asarray(tempered) - np.asarray(plain))[[0, 1, 2]].min() > 1e-2  # the temperature matters
    # Rows at temperature 1 and greedy rows: the model's own log-probs either way.
    np.testing.assert_array_equal(np.asarray(tempered)[3:], np.asarray(plain)[3:])
    # The flag of a SamplingParams: off by default (answer, evaluate, serve, generate keep the model's log-probs).
    assert SamplingParams().tempered_logprobs is False
    hot = SamplingParams(temperature=0.7, tempered_logprobs=True)
    flagged = sample_tokens(jnp.asarray(logits), keys, hot)
    assert hot.static().tempered_logprobs is True  # part of what a compiled program is specialised on
    lp_hot = np.take_along_axis(log_softmax(logits / 0.7), np.asarray(flagged[0])[:, None], axis=-1)[:, 0]
    np.testing.assert_allclose(np.asarray(flagged[1]), lp_hot, rtol=0, atol=1e-5)


@pytest.mark.faults
def test_tempered_logprobs_must_be_a_boolean():
    from memagent_jax.sampling import SamplingError

    with pytest.raises(SamplingError, match=r"tempered_logprobs must be True or False, got 'yes'"):
        SamplingParams(temperature=0.7, tempered_logprobs="yes")


@pytest.mark.slow
def test_training_at_temperature_0_7_starts_at_ratio_1(tmp_path):
    """The trainer's rollout records the log-probs its learner computes at config.agent.temperature = 0.7 (old
    log-probs from the sampler, not recomputed): the first update's ratio is 1 and the old-vs-new KL 0."""
    import json
    import os

    from hf_tiny import grpo_cpu_config
    from memagent_jax.rl.recipe import learner_config
    from memagent_jax.rl.trainer import train

    folder = make_agent_model_dir(tmp_path / "model", seed=2)
    cfg = grpo_cpu_config(folder, steps=1, **{"agent.temperature": 0.7, "rl.num_minibatches": 1})
    assert cfg.rl.recompute_old_logprobs is False and learner_config(cfg).logprob_temperature == 0.7
    train(cfg, str(tmp_path / "run"))
    with open(os.path.join(tmp_path / "run", "metrics.jsonl")) as f:
        (step,) = [json.loads(line) for line in f]
    assert step["conversations"] > 0
    assert step["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and step["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert step["approx_kl_old"] == pytest.approx(0.0, abs=1e-7)
