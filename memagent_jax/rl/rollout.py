"""Rollout for multi-conversation GRPO: G agent trajectories per question, scored off the device's path.

    scorer = RewardScorer(style="boxed_em")
    pending = collect_rollouts(agent, records, group_size=16, rng=key, scorer=scorer)
    ...                                    # device work may go on here while the verifier scores answers
    rollout = pending.result()             # rewards [Q, G] now available
    batch, stats = rollout_to_batch(rollout, advantages, pad_id=..., rows_multiple=...)

Trajectory t = q * G + g is the g-th sample for question q. Every conversation of a trajectory (each chunk
step's memory update and the final answer) becomes one row of the `ConversationBatch`, carrying the
trajectory's advantage: the reward only comes from the final answer, and all steps share it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from memagent_jax.agent.runner import MemoryAgent
from memagent_jax.agent.types import AgentResult
from memagent_jax.data.records import QARecord
from memagent_jax.evaluation import verifier
from memagent_jax.rl.batch import ConversationBatch, build_conversation_batch
from memagent_jax.rl.recipe import ANSWER_ADVANTAGES


class RewardScorer:
    """Scores final answers with the rule-based verifier in a thread pool.

    style: a `verifier.REWARD_STYLES` name (default 'boxed_em': 1 if the last \\boxed{} equals a ground truth
    after normalisation; 'reference_boxed': the reference's own rule). Accuracy (sub-exact-match of the boxed
    answer, thinking dropped) is computed alongside for metrics.
    drop_think: reward only the text after the last </think> (`verifier.strip_think`); the reference does not.
    """

    def __init__(self, style: str = "boxed_em", max_workers: int = 2, *, drop_think: bool = False):
        if style not in verifier.REWARD_STYLES:
            raise ValueError(f"reward style {style!r} is not known; choose one of {sorted(verifier.REWARD_STYLES)}")
        self.style = style
        self.drop_think = bool(drop_think)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reward")

    def _score(self, responses: Sequence[str], truths: Sequence[Sequence[str]]):
        rewards = np.array(
            [verifier.reward(r, t, style=self.style, drop_think=self.drop_think) for r, t in zip(responses, truths)],
            np.float32,
        )
        accuracy = np.array([verifier.score(r, t, "sub_em") for r, t in zip(responses, truths)], np.float32)
        return rewards, accuracy

    def submit(self, responses: Sequence[str], truths: Sequence[Sequence[str]]) -> concurrent.futures.Future:
        return self._pool.submit(self._score, list(responses), [list(t) for t in truths])

    def close(self) -> None:
        self._pool.shutdown(wait=True)


@dataclasses.dataclass
class Rollout:
    """G trajectories for each of Q questions.

    agent_result: the agent's output for the Q * G rows (conversations recorded).
    rewards, accuracy: [Q, G] f32.
    rollout_seconds, reward_seconds: wall time of the agent run and of waiting for the scores.
    """

    records: list[QARecord]
    group_size: int
    agent_result: AgentResult
    rewards: np.ndarray
    accuracy: np.ndarray
    rollout_seconds: float
    reward_seconds: float

    def length_stats(self) -> dict[str, float]:
        """Mean response lengths of memory steps and final steps, chunks per trajectory."""
        memory = [len(c.response_ids) for conv in self.agent_result.conversations for c in conv if c.kind == "memory"]
        final = [len(c.response_ids) for conv in self.agent_result.conversations for c in conv if c.kind == "final"]
        return {
            "memory_response_len": float(np.mean(memory)) if memory else 0.0,
            "final_response_len": float(np.mean(final)) if final else 0.0,
            "chunks_per_trajectory": float(np.mean(self.agent_result.num_chunks)),
        }


@dataclasses.dataclass
class PendingRollout:
    """A finished agent run whose rewards are still being scored."""

    records: list[QARecord]
    group_size: int
    agent_result: AgentResult
    future: concurrent.futures.Future
    rollout_seconds: float

    def result(self) -> Rollout:
        t0 = time.perf_counter()
        rewards, accuracy = self.future.result()
        g = self.group_size
        return Rollout(
            records=self.records,
            group_size=g,
            agent_result=self.agent_result,
            rewards=rewards.reshape(-1, g),
            accuracy=accuracy.reshape(-1, g),
            rollout_seconds=self.rollout_seconds,
            reward_seconds=time.perf_counter() - t0,
        )


def collect_rollouts(
    agent: MemoryAgent,
    records: Sequence[QARecord],
    group_size: int,
    rng,
    *,
    scorer: RewardScorer,
    progress: bool = False,
    question_ids: Sequence[int] | None = None,
    batch_size: int | None = None,
) -> PendingRollout:
    """Runs the agent G times per question (sampling per the agent's settings) and starts scoring.

    rng: a PRNG key or int seed; trajectory t = question_ids[q] * G + g uses row key fold_in(rng, t).
    question_ids: the global index of each of `records` in the step's batch (default 0, 1, ...). In a
      multi-process run each process rolls out its own questions; giving their global indices makes every
      trajectory's samples independent of how the questions are split over processes.
    batch_size: None runs every trajectory at once in lockstep; a number runs them with continuous batching over
      that many row slots (`MemoryAgent.run`): same samples, no row idles while others read.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    records = list(records)
    if not records:
        raise ValueError("no questions to roll out")
    questions = [r.question for r in records for _ in range(group_size)]
    documents = [r.document for r in records for _ in range(group_size)]
    if question_ids is not None:
        import jax
        import jax.numpy as jnp

        ids = np.asarray(question_ids, np.int64)
        if ids.shape != (len(records),):
            raise ValueError(f"question_ids: expected {len(records)} ids, got shape {ids.shape}")
        key = jax.random.key(int(rng)) if isinstance(rng, (int, np.integer)) else rng
        trajectories = (ids[:, None] * group_size + np.arange(group_size)[None, :]).reshape(-1)
        rng = jax.vmap(lambda t: jax.random.fold_in(key, t))(jnp.asarray(trajectories, jnp.uint32))
    t0 = time.perf_counter()
    result = agent.run(questions, documents, rng=rng, record=True, progress=progress, batch_size=batch_size)
    elapsed = time.perf_counter() - t0
    truths = [r.answers for r in records for _ in range(group_size)]
    return PendingRollout(
        records=records,
        group_size=group_size,
        agent_result=result,
        future=scorer.submit(result.answers, truths),
        rollout_seconds=elapsed,
    )


def merge_rollouts(rollouts: Sequence[Rollout]) -> Rollout:
    """One Rollout from the rollouts of consecutive slices of a step's questions (in order)."""
    if not rollouts:
        raise ValueError("no rollouts to merge")
    if len(rollouts) == 1:
        return rollouts[0]
    results = [r.agent_result for r in rollouts]

    def joined(field):
        parts = [getattr(a, field) for a in results]
        return None if any(p is None for p in parts) else [x for p in parts for x in p]

    merged = AgentResult(
        answers=joined("answers"),
        answer_ids=joined("answer_ids"),
        finished=joined("finished"),
        num_chunks=joined("num_chunks"),
        traces=joined("traces"),
        conversations=joined("conversations"),
    )
    return Rollout(
        records=[x for r in rollouts for x in r.records],
        group_size=rollouts[0].group_size,
        agent_result=merged,
        rewards=np.concatenate([r.rewards for r in rollouts]),
        accuracy=np.concatenate([r.accuracy for r in rollouts]),
        rollout_seconds=sum(r.rollout_seconds for r in rollouts),
        reward_seconds=sum(r.reward_seconds for r in rollouts),
    )


def collect_rollouts_in_slices(
    agent: MemoryAgent,
    records: Sequence[QARecord],
    group_size: int,
    rng,
    *,
    scorer: RewardScorer,
    questions_per_call: int,
    question_ids: Sequence[int] | None = None,
) -> Rollout:
    """The step's rollout with questions_per_call x G trajectories on the device at a time (bounded device
    memory). On one process: one continuous-batching call over questions_per_call x G row slots (a finished
    trajectory's row takes the next one at the next segment boundary). On a mesh spanning processes: lockstep
    calls over consecutive slices of questions_per_call questions, merged (each slice's scoring overlaps the
    next slice's rollout). Keys follow the global question ids, so the result equals one call over all
    questions either way."""
    from memagent_jax.distributed import arrays as multiprocess

    records = list(records)
    ids = list(range(len(records))) if question_ids is None else [int(i) for i in question_ids]
    step = max(1, int(questions_per_call))
    if not multiprocess.is_multiprocess(agent.mesh):
        return collect_rollouts(
            agent,
            records,
            group_size,
            rng,
            scorer=scorer,
            question_ids=ids,
            batch_size=min(step, len(records)) * group_size,
        ).result()
    pending = [
        collect_rollouts(agent, records[s : s + step], group_size, rng, scorer=scorer, question_ids=ids[s : s + step])
        for s in range(0, len(records), step)
    ]
    return merge_rollouts([p.result() for p in pending])


def rollout_to_batch(
    rollout: Rollout,
    advantages: np.ndarray,
    *,
    keep_groups: np.ndarray | None = None,
    pad_id: int = 0,
    vocab_size: int | None = None,
    length_multiple: int = 64,
    rows_multiple: int = 1,
    max_length: int | None = None,
    answer_advantage: str = "shared",
) -> tuple[ConversationBatch, dict]:
    """Every conversation of every kept trajectory as one row, with its trajectory's advantage.

    advantages: [Q, G] (e.g. `advantages.group_advantages(rollout.rewards)`); keep_groups: optional [Q] bool
    (dynamic sampling). answer_advantage: "shared" (every conversation carries the trajectory's advantage, the
    reference's multi-conversation GRPO) or "positive" (the final answer's conversation keeps a positive advantage
    and gets 0 for a negative one; its tokens still count in the loss, so a KL term holds them). Returns (batch of
    NumPy arrays, stats with counts of kept groups / conversations).
    """
    if answer_advantage not in ANSWER_ADVANTAGES:
        raise ValueError(f"answer_advantage must be one of {ANSWER_ADVANTAGES}, got {answer_advantage!r}")
    advantages = np.asarray(advantages, np.float32)
    q, g = rollout.rewards.shape
    if advantages.shape != (q, g):
        raise ValueError(f"advantages: expected shape {(q, g)}, got {advantages.shape}")
    keep = np.ones((q,), bool) if keep_groups is None else np.asarray(keep_groups, bool)
    prompts, responses, logprobs, advs = [], [], [], []
    for t, conversations in enumerate(rollout.agent_result.conversations):
        qi, gi = divmod(t, g)
        if not keep[qi]:
            continue
        for conv in conversations:
            prompts.append(conv.prompt_ids)
            responses.append(conv.response_ids)
            logprobs.append(conv.logprobs)
            advantage = float(advantages[qi, gi])
            if conv.kind == "final" and answer_advantage == "positive":
                advantage = max(advantage, 0.0)
            advs.append(advantage)
    stats = {"kept_groups": int(keep.sum()), "groups": q, "conversations": len(prompts)}
    if not prompts:
        return None, stats
    batch = build_conversation_batch(
        prompts,
        responses,
        logprobs,
        advs,
        length_multiple=length_multiple,
        max_length=max_length,
        rows_multiple=rows_multiple,
        pad_id=pad_id,
        vocab_size=vocab_size,
    )
    return batch, stats
