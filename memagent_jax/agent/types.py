"""The memory agent's plain data types: what a run returns, and what the document engine takes and gives.

    Conversation    one prompt the model saw and what it sampled (training records)
    AgentResult     `MemoryAgent.run`'s per-row answers, traces and conversations
    RowRequest      one document for the `DocumentEngine`
    RowProgress     an engine event: a row read another segment
    RowResult       an engine event: a row is answered (token ids; the runner decodes them)

Host data only (NumPy arrays, lists, numbers): nothing here imports JAX, so every layer can name these types.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["AgentResult", "Conversation", "RowProgress", "RowRequest", "RowResult"]


@dataclasses.dataclass
class Conversation:
    """One conversation of a trajectory: the exact prompt ids the model saw and what it sampled.

    kind: 'memory' (chunk step `step`) or 'final'. response_ids include the stop token when one was
    emitted; logprobs [len(response_ids)] are under the model's unmodified distribution (under logits / temperature
    when the memory sampling sets `tempered_logprobs`, as GRPO's rollouts do).
    """

    kind: str
    step: int
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    logprobs: np.ndarray


@dataclasses.dataclass
class AgentResult:
    """Per input row: the final response's text (`answers`, raw: e.g. "\\boxed{Ra}") and ids, the answer the
    verifier takes from it (`predictions`: e.g. "Ra"), whether the response ended with a stop token, chunks read;
    `traces[i]` the memory text after each chunk (when asked), `conversations[i]` the trajectory's
    conversations (when recording for training)."""

    answers: list[str]
    answer_ids: list[list[int]]
    finished: list[bool]
    num_chunks: list[int]
    traces: list[list[str]] | None = None
    conversations: list[list[Conversation]] | None = None
    # Per row: the model's logits were not finite (NaN / inf) when a token of the final answer (or, when traced
    # or recorded, of a memory update) was sampled, so the text is not a real answer. Always filled by `run`.
    nonfinite: list[bool] | None = None
    # Per row: the answer extracted from `answers[i]` by the agent's extraction rule (`MemoryAgent.extract`, from
    # its settings' "extract"; default 'boxed', the last \boxed{...}): `verifier.readable_answer(answers[i],
    # extract)` (surrounding white space removed), None where the rule finds no answer. Always filled by `run`.
    predictions: list[str | None] | None = None

    def row(self, i: int) -> AgentResult:
        """The result of row i alone (every field a one-element list)."""

        def one(values):
            return None if values is None else [values[i]]

        return AgentResult(
            answers=[self.answers[i]],
            answer_ids=[self.answer_ids[i]],
            finished=[self.finished[i]],
            num_chunks=[self.num_chunks[i]],
            traces=one(self.traces),
            conversations=one(self.conversations),
            nonfinite=one(self.nonfinite),
            predictions=one(self.predictions),
        )


@dataclasses.dataclass
class RowRequest:
    """One document to answer.

    tag: the caller's name for the row (returned with its events). question_ids [<= Q] / document_ids [n > 0]:
    token ids (`MemoryAgent.prepare`). key: the row's PRNG key (typed scalar key or raw uint32 [2]).
    trace: keep the memory ids after every chunk; record: keep every conversation (training).
    sampling: the row's temperature / top_k / top_p (a `SamplingParams`, only those fields used) for its memory
    updates and its answer; None: the agent's `memory_sampling` / `answer_sampling`.
    """

    tag: Any
    question_ids: np.ndarray
    document_ids: np.ndarray
    key: Any
    trace: bool = False
    record: bool = False
    sampling: Any = None


@dataclasses.dataclass
class RowProgress:
    """A row read another segment: `chunks_read` of `num_chunks` chunks."""

    tag: Any
    chunks_read: int
    num_chunks: int


@dataclasses.dataclass
class RowResult:
    """A finished row. answer_ids include the stop token when one was emitted; `memories` (trace) the memory ids
    after each chunk; `conversations` (record) `Conversation`s; times from `time.perf_counter()`."""

    tag: Any
    answer_ids: list[int]
    finished: bool
    num_chunks: int
    nonfinite: bool
    memories: list[np.ndarray] | None = None
    conversations: list[Conversation] | None = None
    submitted_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
