"""The memory agent's compiled programs: prefix prefill, the chunk scan, the final answer, the text mode's step.

Static prompt layout of a memory-update step (U = the update template's literal token pieces):

    [U0][question: Q slots][U1] | [memory: M slots][U2][chunk: C slots][U3] | [M slots for the new memory]
    \\_______ prefix _______/     \\______________ rest _______________/

The prefix (chat header, instruction, question) depends only on the document, so it is prefilled once
per document; every chunk step rewinds the KV cache to the end of the prefix, prefills the rest and
decodes up to M new tokens. Pads are masked and positions count real tokens only, so every step computes
exactly what the unpadded prompt would.

Programs: pure functions, each jitted at the bottom of this module (`spec` and `final` static, the KV cache
donated: one buffer per shape lives on the device and is updated in place). The host drivers (`agent.runner`'s
lockstep run, `agent.engine`'s continuous batching, `agent.text_mode`) call these jitted entry points:

    prefix_program  = jit(prefill_prefix)(params, spec, question, question_len, cache) -> PrefixState
    segment_program = jit(run_segment)(params, spec, cache, prefix, memory, memory_len, chunks, chunk_lens,
                                       row_keys, first_step, memory_rows)
        -> (cache, memory, memory_len, SegmentRecord)      # lax.scan over S chunks
    refill_program  = jit(refill_rows)(params, spec, question, question_len, memory, memory_len, refill, cache)
        -> (PrefixState, memory, memory_len)               # continuous batching: new documents join
    final_program   = jit(final_answer)(params, spec, question, question_len, memory, memory_len, row_keys,
                                        cache, active, answer_rows)
        -> (FinalRecord, cache)
    text_step_program = jit(text_step)(params, spec, tokens, mask, row_keys, step, cache, active, rows, final=...)
        -> (SampleOutput, cache)                           # text prompt mode: one whole prompt per row

Shapes: B documents, Q/M/C/A budgets (question, memory, chunk, answer), S chunks per segment,
R = rest length, P0 = prefix length, F = final prompt length.

Sampling: `spec.memory_sampling` / `spec.answer_sampling` give the static part (max_new_tokens, stop ids, pad id)
and the defaults; each row's temperature / top-k / top-p come in as `RowSampling` arrays [B] (`memory_rows` for
the chunk steps, `answer_rows` for the answer), so one compile serves any mix of per-row settings.

Randomness: chunk step k of row b draws with key fold_in(fold_in(row_keys[b], 0), k) (and the sampler
folds in the token index); the final answer uses fold_in(row_keys[b], 1). A row's output never depends
on its batch mates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from memagent_jax.agent.chunking import AgentBudgets
from memagent_jax.agent.templates import AgentPrompts
from memagent_jax.models.config import ModelConfig
from memagent_jax.models.transformer import KVCache, rewind_cache
from memagent_jax.sampling.params import RowSampling, SamplingParams
from memagent_jax.sampling.sampler import (
    SampleOutput,
    decode,
    decode_params,
    prefill,
    prefill_and_decode,
    prefill_params,
    reset_cache,
)


@dataclasses.dataclass(frozen=True)
class AgentSpec:
    """Everything static about an agent program (hashable: a jit static argument)."""

    config: ModelConfig
    budgets: AgentBudgets
    prompts: AgentPrompts
    memory_sampling: SamplingParams  # max_new_tokens == budgets.memory_tokens
    answer_sampling: SamplingParams  # max_new_tokens == budgets.answer_tokens
    pad_id: int = 0
    prompt_mode: str = "pieces"  # 'text': whole prompts tokenized on the host, run by `text_step_program`
    # A chunk step that only some rows reach runs just those rows, gathered into a smaller batch (`row_buckets`).
    # The host drivers set it per segment (`for_chunk_lens`): on only where a step has such rows.
    compact_rows: bool = False

    def __post_init__(self):
        if self.memory_sampling.max_new_tokens != self.budgets.memory_tokens:
            raise ValueError(
                f"memory_sampling.max_new_tokens ({self.memory_sampling.max_new_tokens}) must equal "
                f"budgets.memory_tokens ({self.budgets.memory_tokens})"
            )
        if self.answer_sampling.max_new_tokens != self.budgets.answer_tokens:
            raise ValueError(
                f"answer_sampling.max_new_tokens ({self.answer_sampling.max_new_tokens}) must equal "
                f"budgets.answer_tokens ({self.budgets.answer_tokens})"
            )
        if len(self.prompts.initial_memory) > self.budgets.memory_tokens:
            raise ValueError(
                f"the initial memory has {len(self.prompts.initial_memory)} tokens, more than "
                f"budgets.memory_tokens ({self.budgets.memory_tokens})"
            )

    @property
    def prefix_length(self) -> int:
        u = self.prompts.update.pieces
        return len(u[0]) + self.budgets.question_tokens + len(u[1])

    @property
    def rest_length(self) -> int:
        u = self.prompts.update.pieces
        return self.budgets.memory_tokens + len(u[2]) + self.budgets.chunk_tokens + len(u[3])

    @property
    def update_cache_slots(self) -> int:
        return self.prefix_length + self.rest_length + self.budgets.memory_tokens

    @property
    def final_length(self) -> int:
        f = self.prompts.final.pieces
        return sum(len(p) for p in f) + self.budgets.question_tokens + self.budgets.memory_tokens

    @property
    def final_cache_slots(self) -> int:
        return self.final_length + self.budgets.answer_tokens

    @property
    def text_update_length(self) -> int:
        """Text mode: static prompt length of a memory-update step (literal tokens + Q + M + C + margin)."""
        b = self.budgets
        return (
            sum(len(p) for p in self.prompts.update.pieces)
            + b.question_tokens
            + b.memory_tokens
            + b.chunk_tokens
            + b.text_margin
        )

    @property
    def text_final_length(self) -> int:
        """Text mode: static prompt length of the final step (literal tokens + Q + M + margin)."""
        b = self.budgets
        return sum(len(p) for p in self.prompts.final.pieces) + b.question_tokens + b.memory_tokens + b.text_margin

    def for_chunk_lens(self, chunk_lens) -> AgentSpec:
        """The spec for a segment of host `chunk_lens` [B, S]: row compaction stays on (where this spec has it)
        only when some chunk step has rows with a chunk and rows without, so a batch whose rows all end together
        compiles and computes exactly as without it."""
        if not self.compact_rows:
            return self
        reached = np.asarray(chunk_lens) > 0
        partial = reached.any(axis=0) & ~reached.all(axis=0)
        return self if partial.any() else dataclasses.replace(self, compact_rows=False)

    def max_context(self) -> int:
        """The longest position any step reaches (for checking against the model's context length)."""
        if self.prompt_mode == "text":
            return max(
                self.text_update_length + self.budgets.memory_tokens,
                self.text_final_length + self.budgets.answer_tokens,
            )
        return max(self.update_cache_slots, self.final_cache_slots)


class PrefixState(NamedTuple):
    """Per-document prefix: cache holds it at slots [0, P0); next_positions [B]; tokens/mask [B, P0]."""

    cache: KVCache
    next_positions: jax.Array
    tokens: jax.Array
    mask: jax.Array


class SegmentRecord(NamedTuple):
    """What each chunk step of a segment produced, stacked [B, S, ...].

    rest_tokens / rest_mask [B, S, R]: the step's prompt after the prefix (memory, chunk, template pieces).
    response [B, S, M]: sampled ids (stop token included; pad after). response_len [B, S]: their count.
    logprobs [B, S, M]: log-probs under the model's unmodified distribution (logits / temperature with the
      sampling's `tempered_logprobs`). active [B, S]: the step ran.
    memory_len [B, S]: length of the new memory (the response without its stop token).
    """

    rest_tokens: jax.Array
    rest_mask: jax.Array
    response: jax.Array
    response_len: jax.Array
    logprobs: jax.Array
    active: jax.Array
    memory_len: jax.Array


class FinalRecord(NamedTuple):
    """The final step: prompt tokens/mask [B, F]; answer ids [B, A]; answer_len [B]; finished [B];
    logprobs [B, A]."""

    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    answer: jax.Array
    answer_len: jax.Array
    finished: jax.Array
    logprobs: jax.Array


def _slot_mask(lengths: jax.Array, size: int) -> jax.Array:
    return jnp.arange(size, dtype=jnp.int32)[None, :] < lengths[:, None]


def assemble(parts: Sequence, batch: int, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """Concatenates literal pieces and padded slots into a static-shape prompt.

    parts: each either a tuple of literal token ids (shared by every row) or (ids [B, n], lengths [B]).
    Returns (tokens [B, P] int32, mask [B, P] bool), pads set to `pad_id` and masked out.
    """
    tokens, masks = [], []
    for part in parts:
        if isinstance(part, tuple) and (not part or isinstance(part[0], int)):
            if not part:
                continue
            tokens.append(jnp.broadcast_to(jnp.asarray(part, jnp.int32), (batch, len(part))))
            masks.append(jnp.ones((batch, len(part)), bool))
        else:
            ids, lengths = part
            mask = _slot_mask(lengths, ids.shape[1])
            tokens.append(jnp.where(mask, ids.astype(jnp.int32), pad_id))
            masks.append(mask)
    return jnp.concatenate(tokens, axis=1), jnp.concatenate(masks, axis=1)


def _memory_from_response(response: jax.Array, response_len: jax.Array, finished: jax.Array, pad_id: int):
    """New memory = the sampled ids without the stop token: ids [B, M], length [B]."""
    memory_len = response_len - finished.astype(jnp.int32)
    memory = jnp.where(_slot_mask(memory_len, response.shape[1]), response, pad_id)
    return memory, memory_len


def prefill_prefix(
    params, spec: AgentSpec, question: jax.Array, question_len: jax.Array, cache: KVCache
) -> PrefixState:
    """Writes [U0][question][U1] for every row into slots [0, P0) of a reset cache.

    question: [B, Q] int32 (right-padded), question_len: [B] int32.
    """
    u = spec.prompts.update.pieces
    batch = question.shape[0]
    tokens, mask = assemble([u[0], (question, question_len), u[1]], batch, spec.pad_id)
    pre = prefill(params, spec.config, tokens, mask, reset_cache(cache))
    return PrefixState(cache=pre.cache, next_positions=pre.next_positions, tokens=tokens, mask=mask)


def memory_step(
    params,
    spec: AgentSpec,
    cache: KVCache,
    prefix_next_positions: jax.Array,
    memory: jax.Array,
    memory_len: jax.Array,
    chunk: jax.Array,
    chunk_len: jax.Array,
    keys: jax.Array,
    params_for_decode=None,
    rows: RowSampling | None = None,
):
    """One chunk step for every row: rest prompt -> new memory.

    params_for_decode: the params in the decode layout (`sampling.sampler.decode_params`), made once by the
    caller outside its loops; None: made here from `params`.

    memory [B, M], memory_len [B], chunk [B, C], chunk_len [B] (0 = this row has no chunk here: it keeps
    its memory and nothing is sampled), keys [B], rows: each row's settings (None: spec.memory_sampling's).
    Returns (cache, memory, memory_len, per-step record).
    """
    u = spec.prompts.update.pieces
    batch = memory.shape[0]
    active = chunk_len > 0
    rest_tokens, rest_mask = assemble([(memory, memory_len), u[2], (chunk, chunk_len), u[3]], batch, spec.pad_id)
    cache = rewind_cache(cache, spec.prefix_length)
    if params_for_decode is None:
        params_for_decode = decode_params(params, spec.config, batch)
    row_inputs = (rest_tokens, rest_mask, prefix_next_positions, keys, active, rows)

    def sample(cache, tokens, mask, starts, keys, active, rows):
        pre = prefill(
            prefill_params(params, params_for_decode), spec.config, tokens, mask, cache, start_positions=starts
        )
        return decode(
            params_for_decode,
            spec.config,
            pre.cache,
            pre.last_logits,
            pre.next_positions,
            keys,
            spec.memory_sampling,
            active,
            rows,
        )

    def every_row(cache):
        return sample(cache, *row_inputs)

    def nothing(cache):
        # What `decode` gives rows that are all inactive, without the prefill it would still run for them: a
        # segment's steps past every row's last chunk (documents shorter than the segment) cost nothing.
        n = spec.memory_sampling.max_new_tokens
        no_logprobs = jnp.zeros((batch, n), jnp.float32)
        return SampleOutput(
            tokens=jnp.full((batch, n), spec.memory_sampling.pad_id, jnp.int32),
            num_tokens=jnp.zeros((batch,), jnp.int32),
            finished=jnp.zeros((batch,), bool),
            logprobs=no_logprobs,
            sampling_logprobs=no_logprobs,
            cache=cache,
        )

    def gathered(size):
        def branch(cache):
            # The active rows first, in row order: `size` is at least their count, so each of them runs.
            take = jnp.argsort(jnp.logical_not(active), stable=True)[:size]
            pick = lambda a: a[take]  # noqa: E731
            sub_cache = KVCache(
                k=cache.k[:, take],
                v=cache.v[:, take],
                positions=pick(cache.positions),
                valid=pick(cache.valid),
                length=cache.length,
            )
            out = sample(sub_cache, *jax.tree.map(pick, row_inputs))
            # Rows left out get `nothing`'s outputs. The cache comes back as the rewind left it: what a step
            # writes past the prefix is never read after the step (the next step rewinds, an answer resets).
            empty = nothing(cache)
            return empty._replace(
                tokens=empty.tokens.at[take].set(out.tokens),
                num_tokens=empty.num_tokens.at[take].set(out.num_tokens),
                finished=empty.finished.at[take].set(out.finished),
                logprobs=empty.logprobs.at[take].set(out.logprobs),
                sampling_logprobs=empty.sampling_logprobs.at[take].set(out.sampling_logprobs),
            )

        return branch

    if spec.compact_rows and batch > 1:
        sizes = row_buckets(batch)
        branches = [nothing] + [gathered(size) for size in sizes[:-1]] + [every_row]
        reached = jnp.sum(active, dtype=jnp.int32)
        index = jnp.where(reached == 0, 0, 1 + jnp.searchsorted(jnp.asarray(sizes, jnp.int32), reached))
        out = jax.lax.switch(index, branches, cache)
    else:
        out = jax.lax.cond(jnp.any(active), every_row, nothing, cache)
    new_memory, new_len = _memory_from_response(out.tokens, out.num_tokens, out.finished, spec.pad_id)
    memory = jnp.where(active[:, None], new_memory, memory)
    memory_len = jnp.where(active, new_len, memory_len)
    record = (rest_tokens, rest_mask, out.tokens, out.num_tokens, out.logprobs, active, memory_len)
    return out.cache, memory, memory_len, record


def row_buckets(batch: int, levels: int = 4) -> tuple[int, ...]:
    """The batch sizes a compacting chunk step runs its active rows in, ascending and ending with `batch`: it
    halves `levels - 1` times (8 -> (1, 2, 4, 8); 256 -> (32, 64, 128, 256)). Each size is one more compiled
    branch of the step, so there are few."""
    return tuple(sorted({max(1, -(-batch // 2**i)) for i in range(levels)}))


def step_keys(row_keys: jax.Array, step: jax.Array) -> jax.Array:
    """[B] keys of chunk step `step` (global index within each row's document): a scalar, or [B] when rows are
    at different steps (continuous batching)."""
    step = jnp.broadcast_to(jnp.asarray(step, jnp.int32), row_keys.shape)
    return jax.vmap(lambda k, s: jax.random.fold_in(jax.random.fold_in(k, 0), s))(row_keys, step)


def final_keys(row_keys: jax.Array) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, 1))(row_keys)


def run_segment(
    params,
    spec: AgentSpec,
    cache: KVCache,
    prefix_next_positions: jax.Array,
    memory: jax.Array,
    memory_len: jax.Array,
    chunks: jax.Array,
    chunk_lens: jax.Array,
    row_keys: jax.Array,
    first_step: jax.Array,
    memory_rows: RowSampling,
):
    """A `lax.scan` over S chunk steps.

    chunks [B, S, C] int32, chunk_lens [B, S] (0 = no chunk), row_keys [B], first_step [] or [B] int32 (global
    index, within each row's document, of this segment's first chunk: rows of a continuously refilled batch are
    at different steps), memory_rows: each row's temperature / top-k / top-p ([B] arrays). Returns (cache, memory,
    memory_len, SegmentRecord [B, S, ...]).

    Prefill runs the stacked layers (`lax.scan`); decode runs `config.decode_layout`. The agent passes params
    holding the decode's copies already (`MemoryAgent` keeps them: `sampling.sampler.InferenceLayout`); given bare
    params, with 'unstacked' the layer weights are split into per-layer arrays once per call, here, outside the
    chunk scan (one extra copy of the layer weights for the length of the call), and on CPU the tied head's
    transposed copy is made here too.
    """
    params_for_decode = decode_params(params, spec.config, memory.shape[0])

    def body(carry, xs):
        cache, memory, memory_len = carry
        chunk, chunk_len, step = xs
        cache, memory, memory_len, record = memory_step(
            params,
            spec,
            cache,
            prefix_next_positions,
            memory,
            memory_len,
            chunk,
            chunk_len,
            step_keys(row_keys, step),
            params_for_decode,
            memory_rows,
        )
        return (cache, memory, memory_len), record

    batch, segment = chunks.shape[:2]
    first_step = jnp.broadcast_to(jnp.asarray(first_step, jnp.int32), (batch,))
    xs = (
        jnp.swapaxes(chunks, 0, 1),
        jnp.swapaxes(chunk_lens, 0, 1),
        first_step[None, :] + jnp.arange(segment, dtype=jnp.int32)[:, None],
    )  # steps [S, B]
    (cache, memory, memory_len), stacked = jax.lax.scan(body, (cache, memory, memory_len), xs)
    record = SegmentRecord(*(jnp.swapaxes(a, 0, 1) for a in stacked))
    return cache, memory, memory_len, record


def refill_rows(
    params,
    spec: AgentSpec,
    question: jax.Array,
    question_len: jax.Array,
    memory: jax.Array,
    memory_len: jax.Array,
    refill: jax.Array,
    cache: KVCache,
):
    """Continuous batching: rows marked in `refill` [B] start a new document.

    The prefix of every row is prefilled again from `question` [B, Q] / `question_len` [B] (rows that keep their
    document pass their own question, so their prefix is recomputed unchanged: one program for any set of
    refilled rows), and the refilled rows' memory is reset to the initial memory. memory [B, M], memory_len [B].
    Returns (PrefixState, memory, memory_len).
    """
    prefix = prefill_prefix(params, spec, question, question_len, cache)
    init = spec.prompts.initial_memory
    fresh = jnp.full(memory.shape, spec.pad_id, jnp.int32)
    if init:
        fresh = fresh.at[:, : len(init)].set(jnp.asarray(init, jnp.int32))
    memory = jnp.where(refill[:, None], fresh, memory)
    memory_len = jnp.where(refill, jnp.int32(len(init)), memory_len)
    return prefix, memory, memory_len


def final_answer(
    params,
    spec: AgentSpec,
    question: jax.Array,
    question_len: jax.Array,
    memory: jax.Array,
    memory_len: jax.Array,
    row_keys: jax.Array,
    cache: KVCache,
    active: jax.Array,
    answer_rows: RowSampling,
) -> tuple[FinalRecord, KVCache]:
    """[F0][question][F1][memory][F2] -> answer of up to A tokens. cache: >= F + A slots (reset here; returned
    for reuse). answer_rows: each row's temperature / top-k / top-p ([B] arrays)."""
    f = spec.prompts.final.pieces
    batch = question.shape[0]
    tokens, mask = assemble([f[0], (question, question_len), f[1], (memory, memory_len), f[2]], batch, spec.pad_id)
    pre = prefill(params, spec.config, tokens, mask, reset_cache(cache))
    out = decode(
        params,
        spec.config,
        pre.cache,
        pre.last_logits,
        pre.next_positions,
        final_keys(row_keys),
        spec.answer_sampling,
        active,
        answer_rows,
    )
    return FinalRecord(
        prompt_tokens=tokens,
        prompt_mask=mask,
        answer=out.tokens,
        answer_len=out.num_tokens,
        finished=out.finished,
        logprobs=out.logprobs,
    ), out.cache


def text_step(
    params,
    spec: AgentSpec,
    tokens: jax.Array,
    mask: jax.Array,
    row_keys: jax.Array,
    step: jax.Array,
    cache: KVCache,
    active: jax.Array,
    rows: RowSampling,
    *,
    final: bool,
):
    """Text mode: one step on whole prompts tokenized by the host.

    tokens / mask [B, L] (right-padded prompts: L = spec.text_update_length, or text_final_length when `final`),
    row_keys [B], step [] int32 (the chunk index; ignored when final), cache >= L + M (or + A) slots (reset here),
    active [B], rows: each row's settings for this step (memory or answer). Keys are those of the piece mode
    (`step_keys` / `final_keys`), so the same prompts give the same
    samples. Returns (SampleOutput with tokens / num_tokens / finished / logprobs [B, N], cache).
    """
    keys = final_keys(row_keys) if final else step_keys(row_keys, step)
    sampling = spec.answer_sampling if final else spec.memory_sampling
    out = prefill_and_decode(params, spec.config, tokens, mask, cache, keys, sampling, active, rows)
    return out._replace(cache=None), out.cache


# Jitted entry points (caches donated: one buffer per shape lives on device and is updated in place).
prefix_program = jax.jit(prefill_prefix, static_argnames=("spec",), donate_argnames=("cache",))
refill_program = jax.jit(refill_rows, static_argnames=("spec",), donate_argnames=("cache",))
segment_program = jax.jit(run_segment, static_argnames=("spec",), donate_argnames=("cache",))
final_program = jax.jit(final_answer, static_argnames=("spec",), donate_argnames=("cache",))
text_step_program = jax.jit(text_step, static_argnames=("spec", "final"), donate_argnames=("cache",))
