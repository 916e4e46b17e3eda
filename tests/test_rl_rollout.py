"""Bounded rollouts (rl.rollout_batch_size): continuous batching over rollout_batch_size row slots gives exactly
the trajectories, and the rewards, of one lockstep call over all of them."""

import concurrent.futures
import dataclasses

import numpy as np

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
