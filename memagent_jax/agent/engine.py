"""Continuous batching of documents: a fixed number of row slots, refilled at segment boundaries.

    engine = DocumentEngine(agent.spec, agent.params, agent.placement, batch_size=8)   # or agent.document_engine(8)
    engine.submit(RowRequest(tag=0, question_ids=q_ids, document_ids=doc_ids, key=key))
    while engine.busy:
        for event in engine.step():       # RowProgress / RowResult events
            ...

Lockstep batching runs a batch for as many chunk steps as its longest document, so short documents leave their
rows idle. Here every `step` does, on the device:
  1. free slots take the next queued documents (`refill_program`: the slots' prefixes are prefilled and their
     memories reset; rows that keep their document get their prefix recomputed unchanged);
  2. one `segment_program` runs S = budgets.chunks_per_segment chunk steps for every occupied slot, each row at its
     own chunk index;
  3. slots whose document has ended hand their memory to the answer queue and are free for the next step;
  4. queued answers run as one `final_program` when a batch of them is waiting, when nothing else is left to
     read, or at every step with `eager_answers` (a server's latency).
Row b of any step samples with the keys of its own request (chunk k: fold_in(fold_in(key, 0), k); the answer:
fold_in(key, 1), as in `agent.program`) and its own sampling settings (`RowRequest.sampling`: per-row arrays of the
programs, so requests with different settings share one batch and one compile), so a row's output never depends on
which documents share its batch or
in what order they were queued: the same as `MemoryAgent.run` in lockstep.

Single-process only (a mesh spanning processes runs `MemoryAgent.run` in lockstep); piece prompt mode only.
The engine depends on the programs, the plain types, chunking and a `Placement` (device puts and the KV cache
pool it shares with the agent's other runs); it takes token ids and gives token ids (the runner decodes them).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from memagent_jax.agent.chunking import AgentInputError, num_chunks
from memagent_jax.agent.placement import Placement
from memagent_jax.agent.program import AgentSpec, final_program, refill_program, segment_program
from memagent_jax.agent.types import Conversation, RowProgress, RowRequest, RowResult
from memagent_jax.sampling.params import RowSampling, SamplingParams
from memagent_jax.sampling.sampler import InferenceLayout

__all__ = ["DocumentEngine", "RowProgress", "RowRequest", "RowResult"]


@dataclasses.dataclass
class _Slot:
    request: RowRequest
    num_chunks: int
    submitted_at: float
    started_at: float = 0.0
    next_chunk: int = 0
    prefix_ids: np.ndarray | None = None
    memories: list = dataclasses.field(default_factory=list)
    conversations: list = dataclasses.field(default_factory=list)
    nonfinite: bool = False


@dataclasses.dataclass
class _PendingAnswer:
    slot: _Slot
    memory: np.ndarray
    memory_len: int


def _raw_key(key) -> np.ndarray:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    key = np.asarray(key, np.uint32)
    if key.shape != (2,):
        raise AgentInputError(f"a row key must be one PRNG key, got shape {key.shape}")
    return key


class DocumentEngine:
    """Continuous batching over `batch_size` row slots (see the module docstring).

    Args:
      spec: the agent's static program spec (`AgentSpec`), piece prompt mode.
      params: the model params (on the placement's mesh); held in the inference layout
        (`sampling.sampler.InferenceLayout`: a copy of the layer weights unless they are laid out already).
      placement: where rows go and where the KV caches are pooled (`Placement`); one process (any
        single-process mesh).
      batch_size: row slots (rounded up to the mesh's batch multiple).
      eager_answers: answer finished rows at every step (lowest latency) instead of waiting for a full batch of
        them or for the end of the reading work (highest throughput).
    Not thread-safe: one thread submits and steps (a server funnels its requests through one engine thread).
    """

    def __init__(self, spec: AgentSpec, params, placement: Placement, batch_size: int, *, eager_answers: bool = False):
        if spec.prompt_mode != "pieces":
            raise AgentInputError("continuous batching runs the piece prompt mode only (text mode steps on the host)")
        if placement.spans_processes:
            raise AgentInputError(
                "continuous batching runs on one process; a mesh spanning processes runs in "
                "lockstep (MemoryAgent.run with scheduling='lockstep')"
            )
        if batch_size < 1:
            raise AgentInputError(f"batch_size must be >= 1, got {batch_size}")
        self.spec = spec
        self.params = InferenceLayout(spec.config).get(params)  # laid out once (no copy if it already is)
        self.placement = placement
        self.batch_size = placement.round_batch(batch_size)
        self.eager_answers = eager_answers
        b = spec.budgets
        batch = self.batch_size
        self._queue: collections.deque[_Slot] = collections.deque()
        self._slots: list[_Slot | None] = [None] * batch
        self._answers: list[_PendingAnswer] = []
        self._question = np.full((batch, b.question_tokens), spec.pad_id, np.int32)
        self._question_len = np.zeros((batch,), np.int32)
        self._keys = np.zeros((batch, 2), np.uint32)
        self._memory_rows = RowSampling.build([], spec.memory_sampling, batch=batch)  # free slots: greedy
        self._cache = None
        self._prefix = None
        self._memory = None
        self._memory_len = None
        self._cancelled: set = set()
        self.segments_run = 0
        self.answer_batches_run = 0

    # ------------------------------------------------------------------------------------------ state

    @property
    def queued(self) -> int:
        """Documents waiting for a slot."""
        return len(self._queue)

    @property
    def reading(self) -> int:
        """Occupied slots."""
        return sum(s is not None for s in self._slots)

    @property
    def answering(self) -> int:
        """Rows that finished reading and wait for their answer."""
        return len(self._answers)

    @property
    def busy(self) -> bool:
        return bool(self._queue) or self.reading > 0 or bool(self._answers)

    def waiting(self) -> list[RowRequest]:
        """The queued requests (not in a slot yet), in queue order."""
        return [slot.request for slot in self._queue]

    def submit(self, request: RowRequest) -> None:
        """Queues a document (checked here: an over-budget question or an empty document raises AgentInputError)."""
        q = np.asarray(request.question_ids, np.int32).reshape(-1)
        d = np.asarray(request.document_ids, np.int32).reshape(-1)
        budgets = self.spec.budgets
        if q.size == 0 or q.size > budgets.question_tokens:
            raise AgentInputError(
                f"{request.tag}: the question has {q.size} tokens; it needs 1 to "
                f"{budgets.question_tokens} (budgets.question_tokens)"
            )
        if d.size == 0:
            raise AgentInputError(f"{request.tag}: the document is empty")
        if request.sampling is not None and not isinstance(request.sampling, SamplingParams):
            raise AgentInputError(
                f"{request.tag}: sampling must be a SamplingParams or None, got {type(request.sampling).__name__}"
            )
        request = dataclasses.replace(request, question_ids=q, document_ids=d, key=_raw_key(request.key))
        self._queue.append(
            _Slot(
                request=request, num_chunks=num_chunks(d.size, budgets.chunk_tokens), submitted_at=time.perf_counter()
            )
        )

    def cancel(self, tag) -> bool:
        """Drops a queued or reading row (its slot is free at the next step); False when the tag is unknown or
        already answering."""
        for slot in self._queue:
            if slot.request.tag == tag:
                self._queue.remove(slot)
                return True
        for slot in self._slots:
            if slot is not None and slot.request.tag == tag:
                self._cancelled.add(id(slot))
                return True
        return False

    # ------------------------------------------------------------------------------------------ device

    def _refill(self) -> list[int]:
        """Gives free slots the next queued documents; returns the refilled slot indices."""
        for j, slot in enumerate(self._slots):
            if slot is not None and id(slot) in self._cancelled:
                self._cancelled.discard(id(slot))
                self._slots[j] = None
        refilled = []
        for j in range(self.batch_size):
            if self._slots[j] is None and self._queue:
                slot = self._queue.popleft()
                slot.started_at = time.perf_counter()
                self._slots[j] = slot
                q = slot.request.question_ids
                self._question[j] = self.spec.pad_id
                self._question[j, : q.size] = q
                self._question_len[j] = q.size
                self._keys[j] = slot.request.key
                one = RowSampling.build([slot.request.sampling], self.spec.memory_sampling)
                for array, value in zip(self._memory_rows, one):
                    array[j] = value[0]
                refilled.append(j)
        if not refilled:
            return refilled
        spec, put = self.spec, self.placement.put
        if self._cache is None:
            self._cache = self.placement.cache("update", self.batch_size, spec.update_cache_slots)
            self._memory = put(np.full((self.batch_size, spec.budgets.memory_tokens), spec.pad_id, np.int32))
            self._memory_len = put(np.zeros((self.batch_size,), np.int32))
        mask = np.zeros((self.batch_size,), bool)
        mask[refilled] = True
        self._prefix, self._memory, self._memory_len = refill_program(
            self.params,
            spec,
            put(self._question),
            put(self._question_len),
            self._memory,
            self._memory_len,
            put(mask),
            self._cache,
        )
        self._cache = self._prefix.cache
        if any(self._slots[j].request.record for j in refilled):
            tokens, prompt_mask = self.placement.get((self._prefix.tokens, self._prefix.mask))
            for j in refilled:
                if self._slots[j].request.record:
                    self._slots[j].prefix_ids = tokens[j][prompt_mask[j]]
        return refilled

    def _read_segment(self, events: list) -> None:
        spec, b, put, get = self.spec, self.spec.budgets, self.placement.put, self.placement.get
        s, c = b.chunks_per_segment, b.chunk_tokens
        chunks = np.full((self.batch_size, s, c), spec.pad_id, np.int32)
        lens = np.zeros((self.batch_size, s), np.int32)
        first = np.zeros((self.batch_size,), np.int32)
        for j, slot in enumerate(self._slots):
            if slot is None:
                continue
            doc, first[j] = slot.request.document_ids, slot.next_chunk
            for k in range(s):
                piece = doc[(slot.next_chunk + k) * c : (slot.next_chunk + k + 1) * c]
                chunks[j, k, : piece.size] = piece
                lens[j, k] = piece.size
        keys = put(jax.random.wrap_key_data(jnp.asarray(self._keys)), 1)
        self._cache, self._memory, self._memory_len, rec = segment_program(
            self.params,
            spec.for_chunk_lens(lens),
            self._cache,
            self._prefix.next_positions,
            self._memory,
            self._memory_len,
            put(chunks),
            put(lens),
            keys,
            put(first),
            RowSampling(*(put(a, 1) for a in self._memory_rows)),
        )
        self.segments_run += 1
        if any(slot is not None and (slot.request.trace or slot.request.record) for slot in self._slots):
            rec = get(rec)
            for j, slot in enumerate(self._slots):
                if slot is not None and (slot.request.trace or slot.request.record):
                    self._keep_steps(slot, rec, j, int((lens[j] > 0).sum()))
        ended = []
        for j, slot in enumerate(self._slots):
            if slot is None:
                continue
            slot.next_chunk = min(slot.next_chunk + s, slot.num_chunks)
            events.append(RowProgress(slot.request.tag, slot.next_chunk, slot.num_chunks))
            if slot.next_chunk >= slot.num_chunks:
                ended.append(j)
        if ended:
            memory, memory_len = get((self._memory, self._memory_len))
            for j in ended:
                self._answers.append(_PendingAnswer(self._slots[j], memory[j].copy(), int(memory_len[j])))
                self._slots[j] = None

    def _keep_steps(self, slot: _Slot, rec, j: int, steps: int) -> None:
        """Copies row j's first `steps` chunk steps of a segment record into the slot (trace / record)."""
        for k in range(steps):
            length = int(rec.response_len[j, k])
            lp = rec.logprobs[j, k, :length]
            slot.nonfinite = slot.nonfinite or not np.all(np.isfinite(lp))
            if slot.request.trace:
                slot.memories.append(rec.response[j, k, : rec.memory_len[j, k]].copy())
            if slot.request.record:
                rest = rec.rest_tokens[j, k][rec.rest_mask[j, k]]
                slot.conversations.append(
                    Conversation(
                        kind="memory",
                        step=slot.next_chunk + k,
                        prompt_ids=np.concatenate([slot.prefix_ids, rest]),
                        response_ids=rec.response[j, k, :length].copy(),
                        logprobs=lp.copy(),
                    )
                )

    def _answer(self, events: list) -> None:
        spec, b, put = self.spec, self.spec.budgets, self.placement.put
        group, self._answers = self._answers[: self.batch_size], self._answers[self.batch_size :]
        batch = self.batch_size
        question = np.full((batch, b.question_tokens), spec.pad_id, np.int32)
        question_len = np.zeros((batch,), np.int32)
        memory = np.full((batch, b.memory_tokens), spec.pad_id, np.int32)
        memory_len = np.zeros((batch,), np.int32)
        keys = np.zeros((batch, 2), np.uint32)
        for i, pending in enumerate(group):
            q = pending.slot.request.question_ids
            question[i, : q.size] = q
            question_len[i] = q.size
            memory[i] = pending.memory
            memory_len[i] = pending.memory_len
            keys[i] = pending.slot.request.key
        active = np.arange(batch) < len(group)
        answer_rows = RowSampling.build(
            [pending.slot.request.sampling for pending in group], spec.answer_sampling, batch=batch
        )
        final, cache = final_program(
            self.params,
            spec,
            put(question),
            put(question_len),
            put(memory),
            put(memory_len),
            put(jax.random.wrap_key_data(jnp.asarray(keys)), 1),
            self.placement.cache("final", batch, spec.final_cache_slots),
            put(active),
            RowSampling(*(put(a, 1) for a in answer_rows)),
        )
        self.placement.give_back("final", batch, cache)
        final = self.placement.get(final)
        self.answer_batches_run += 1
        now = time.perf_counter()
        for i, pending in enumerate(group):
            slot, length = pending.slot, int(final.answer_len[i])
            lp = final.logprobs[i, :length]
            result = RowResult(
                tag=slot.request.tag,
                answer_ids=final.answer[i, :length].tolist(),
                finished=bool(final.finished[i]),
                num_chunks=slot.num_chunks,
                nonfinite=slot.nonfinite or not np.all(np.isfinite(lp)),
                submitted_at=slot.submitted_at,
                started_at=slot.started_at,
                finished_at=now,
            )
            if slot.request.trace:
                result.memories = slot.memories
            if slot.request.record:
                slot.conversations.append(
                    Conversation(
                        kind="final",
                        step=slot.num_chunks,
                        prompt_ids=final.prompt_tokens[i][final.prompt_mask[i]],
                        response_ids=final.answer[i, :length].copy(),
                        logprobs=lp.copy(),
                    )
                )
                result.conversations = slot.conversations
            events.append(result)

    def step(self) -> list:
        """One round: refill free slots, read one segment, answer what is due. Returns the events
        (`RowProgress` for every row that read, `RowResult` for every row answered), in that order."""
        events: list = []
        with self.placement.context():
            self._refill()
            if self.reading:
                self._read_segment(events)
            nothing_to_read = not self._queue and not self.reading
            while self._answers and (len(self._answers) >= self.batch_size or nothing_to_read or self.eager_answers):
                self._answer(events)
        return events

    def run(self, requests: Iterable[RowRequest], *, on_event=None) -> dict:
        """Submits every request, steps until all are answered; returns {tag: RowResult}. `on_event` (optional)
        is called with every event as it happens (progress bars, streaming writers)."""
        for request in requests:
            self.submit(request)
        results = {}
        while self.busy:
            for event in self.step():
                if isinstance(event, RowResult):
                    results[event.tag] = event
                if on_event is not None:
                    on_event(event)
        self.release()
        return results

    def release(self) -> None:
        """Gives the KV cache back to the placement's pool for the agent's next call (the engine must be idle); a
        later `step` takes one again."""
        if self.reading or self._cache is None:
            return
        self.placement.give_back("update", self.batch_size, self._cache)
        self._cache = self._prefix = None
        self._memory = self._memory_len = None
