"""Host driver of the memory agent: questions + documents in, answers (and traces / RL records) out.

    agent = MemoryAgent(params, config, tokenizer, budgets=AgentBudgets(chunk_tokens=5000, ...))
    result = agent.run(["Who ...?"], [open("book.txt").read()], rng=0, trace=True)
    result.answers[0], result.traces[0]          # answer text, memory text after every chunk

A document of any length runs as a sequence of segments of S chunks: the same compiled `segment_program`
serves every segment of every document of the same batch size, so one compile covers every document
length, and device memory holds only the current segment's chunks, the memory and one KV cache. Host
memory holds the documents' token arrays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memagent_jax.agent.chunking import (AgentBudgets, AgentInputError, centre_truncate, num_chunks,
                                         prepare_question, tokenize_document)
from memagent_jax.agent.program import AgentSpec, final_program, prefix_program, segment_program, text_step_program
from memagent_jax.agent.templates import AgentPrompts, AgentTemplates, TextPrompter
from memagent_jax.distributed import arrays as multiprocess
from memagent_jax.models import sharding as sharding_lib
from memagent_jax.models.config import ModelConfig
from memagent_jax.sampling.api import new_cache, row_keys
from memagent_jax.sampling.params import SamplingParams

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Conversation:
    """One conversation of a trajectory: the exact prompt ids the model saw and what it sampled.

    kind: 'memory' (chunk step `step`) or 'final'. response_ids include the stop token when one was
    emitted; logprobs [len(response_ids)] are under the model's unmodified distribution.
    """

    kind: str
    step: int
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    logprobs: np.ndarray


@dataclasses.dataclass
class AgentResult:
    """Per input row: answer text and ids, whether the answer ended with a stop token, chunks read;
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

    def row(self, i: int) -> "AgentResult":
        """The result of row i alone (every field a one-element list)."""
        def one(values):
            return None if values is None else [values[i]]

        return AgentResult(answers=[self.answers[i]], answer_ids=[self.answer_ids[i]], finished=[self.finished[i]],
                           num_chunks=[self.num_chunks[i]], traces=one(self.traces),
                           conversations=one(self.conversations), nonfinite=one(self.nonfinite))


def default_stop_ids(tokenizer, config: ModelConfig) -> tuple[int, ...]:
    """EOS ids of the model config and the tokenizer (ChatML's <|im_end|> when the tokenizer has it)."""
    ids = set(config.eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if hasattr(tokenizer, "convert_tokens_to_ids") else None
    unk = getattr(tokenizer, "unk_token_id", None)
    if isinstance(im_end, int) and im_end != unk and im_end >= 0:
        ids.add(im_end)
    return tuple(sorted(ids))


class MemoryAgent:
    """A memory agent over one model (params + config + tokenizer), optionally on a mesh.

    Args:
      params, config: the model (params sharded on `mesh` if one is given).
      tokenizer: a Hugging Face tokenizer with a chat template.
      budgets: token budgets (`AgentBudgets`).
      templates: the prompt wording (`AgentTemplates`), and its `prompt_mode`: 'pieces' (the chunk scan, memory
        carried as exact ids) or 'text' (every prompt formatted as one string and tokenized whole on the host,
        one jitted step program per chunk; see `agent.templates` for what each mode guarantees).
      memory_sampling / answer_sampling: how memory updates / answers are sampled (temperature, top-p, ...);
        `max_new_tokens`, stop ids and pad id are set from the budgets and the tokenizer. Default: greedy.
      mesh: optional ('data', 'fsdp', 'tensor') mesh; rows are sharded over data x fsdp. A mesh may span several
        processes (multi-host): every process then calls `run` with its own rows (any count, also 0), the rows
        of all processes run as one batch, and each process gets back the results of its own rows.
      stop_token_ids: overrides the default stop ids (model + tokenizer EOS); () generates fixed-length
        memories and answers (benchmarks).
    """

    def __init__(self, params, config: ModelConfig, tokenizer, *, budgets: AgentBudgets = AgentBudgets(),
                 templates: AgentTemplates = AgentTemplates(), memory_sampling: SamplingParams | None = None,
                 answer_sampling: SamplingParams | None = None, mesh=None,
                 stop_token_ids: Sequence[int] | None = None):
        self.params = params
        self.config = config
        self.tokenizer = tokenizer
        self.mesh = mesh
        if stop_token_ids is None:
            stops = default_stop_ids(tokenizer, config)
            if not stops:
                raise AgentInputError("no stop token: neither the model config nor the tokenizer names an EOS "
                                      "token; pass stop_token_ids (an empty tuple = fixed-length generation)")
        else:
            stops = tuple(stop_token_ids)
        pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
        base_memory = memory_sampling or SamplingParams(temperature=0.0)
        base_answer = answer_sampling or base_memory
        self.spec = AgentSpec(
            config=config,
            budgets=budgets,
            prompts=AgentPrompts.build(tokenizer, templates),
            memory_sampling=base_memory.replace(max_new_tokens=budgets.memory_tokens, stop_token_ids=stops,
                                                pad_id=pad),
            answer_sampling=base_answer.replace(max_new_tokens=budgets.answer_tokens, stop_token_ids=stops,
                                                pad_id=pad),
            pad_id=pad,
            prompt_mode=templates.prompt_mode,
        )
        self.templates = templates
        self.text_prompter = TextPrompter(tokenizer, templates) if templates.prompt_mode == "text" else None
        if self.spec.max_context() > config.max_position_embeddings:
            raise AgentInputError(
                f"budgets need a context of {self.spec.max_context()} tokens (question {budgets.question_tokens} + "
                f"memory {budgets.memory_tokens} + chunk {budgets.chunk_tokens} + templates + new tokens), more "
                f"than the model's max_position_embeddings ({config.max_position_embeddings})")
        self._caches: dict[tuple[str, int], object] = {}

    @classmethod
    def from_pretrained(cls, folder: str, *, tokenizer=None, param_dtype: str | None = None,
                        compute_dtype: str | None = None, mesh=None, allow_nonfinite_weights: bool = False,
                        **overrides) -> "MemoryAgent":
        """A memory agent from a local Hugging Face folder, with the settings it was exported with.

        The folder's `memagent_agent.json` (written by `train`'s export; see `agent.settings`) gives the budgets,
        templates and sampling; a folder without it gets the documented defaults (reference budgets
        1024 / 5000 / 1024 / 1024, the default templates, greedy decoding). `overrides` replace single settings by
        their config names: `chunk_tokens=...`, `memory_tokens=...`, `temperature=...`, `top_p=...`,
        `memory_update=...`, `prompt_mode=...`, or whole `budgets=AgentBudgets(...)` / `templates=...` (an
        `AgentTemplates` or a JSON file). tokenizer: a tokenizer, a folder, or None (the model folder).
        param_dtype / compute_dtype: e.g. 'bfloat16' (None: the checkpoint's). The result's `settings` attribute
        holds what was used.
        """
        from memagent_jax.agent.settings import AgentSettings
        from memagent_jax.models import load_hf_params

        folder = os.fspath(folder)
        settings = AgentSettings.load(folder).override(**overrides)  # checked before anything heavy loads
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer or folder), local_files_only=True)
        params, config = load_hf_params(folder, mesh=mesh, param_dtype=param_dtype,
                                        allow_nonfinite=allow_nonfinite_weights)
        if compute_dtype or param_dtype:
            config = config.replace(compute_dtype=compute_dtype or param_dtype)
        agent = cls(params, config, tokenizer, budgets=settings.budgets, templates=settings.templates,
                    memory_sampling=settings.sampling(), mesh=mesh)
        agent.settings = settings
        return agent

    @property
    def budgets(self) -> AgentBudgets:
        return self.spec.budgets

    # ------------------------------------------------------------------------------------ inputs

    def prepare(self, question: str, document: str | Iterable[str] | np.ndarray, *, source: str = "row 0"):
        """(question ids, document ids) for one row, with errors naming `source`."""
        q_ids = prepare_question(self.tokenizer, question, self.budgets, source=f"{source}: question")
        if isinstance(document, np.ndarray):
            doc_ids = document.astype(np.int32)
            if doc_ids.size == 0:
                raise AgentInputError(f"{source}: document: the document is empty")
        else:
            doc_ids = tokenize_document(self.tokenizer, document, source=f"{source}: document")
        return q_ids, centre_truncate(doc_ids, self.budgets.max_document_tokens)

    def _put(self, x, rank: int | None = None):
        if multiprocess.is_multiprocess(self.mesh):  # this process's rows of a batch spanning processes
            return multiprocess.put_rows(x, self.mesh, rank)
        x = jnp.asarray(x)
        if self.mesh is None:
            return x
        return jax.device_put(x, sharding_lib.batch_sharding(self.mesh, x.ndim if rank is None else rank, x.shape[0]))

    def _get(self, tree):
        """Device results -> host NumPy: this process's rows when the mesh spans processes."""
        if multiprocess.is_multiprocess(self.mesh):
            return multiprocess.local_rows(tree, self.mesh)
        return jax.device_get(tree)

    def _cache(self, kind: str, batch: int, slots: int):
        cache = self._caches.pop((kind, batch), None)
        if cache is not None:
            return cache
        return new_cache(self.config, batch, slots, mesh=self.mesh)

    # --------------------------------------------------------------------------------------- run

    def run(self, questions: Sequence[str], documents: Sequence, rng=0, *, trace: bool = False,
            record: bool = False, progress: bool = False, batch_size: int | None = None,
            on_row=None) -> AgentResult:
        """Runs the agent over (question, document) rows.

        Args:
          questions: N question strings.
          documents: N documents: text, an iterable of text pieces, or a token id array.
          rng: int seed, one PRNG key (row i uses fold_in(key, i)), or [N] keys.
          trace: also return the memory text after every chunk (with `batch_size`, may be N bools: trace only
            those rows; the others get an empty trace).
          record: also return every conversation (prompt ids, response ids, log-probs) for training.
          progress: show a progress bar over chunks.
          batch_size: None runs all N rows as one batch in lockstep (as many chunk steps as the longest
            document). A number runs them with continuous batching (`agent.engine.DocumentEngine`) over that many
            row slots: a row whose document ends takes the next document at the next segment boundary, longest
            documents first. Either way a row's output depends only on its question, document and key. A mesh
            spanning processes, and the text prompt mode, always run in lockstep.
          on_row: optional callable `on_row(i, one_row_result)`, called as soon as row i is answered with an
            `AgentResult` of that row alone (streaming writers); in lockstep all rows come at the end.
        """
        if len(questions) != len(documents):
            raise AgentInputError(f"{len(questions)} questions but {len(documents)} documents")
        procs = multiprocess.mesh_process_count(self.mesh)
        if not questions and procs == 1:
            raise AgentInputError("no rows to run")
        rows = [self.prepare(q, d, source=f"row {i}") for i, (q, d) in enumerate(zip(questions, documents))]
        if batch_size is not None and procs == 1 and self.spec.prompt_mode == "pieces":
            return self._run_continuous(rows, row_keys(rng, len(rows)), batch_size, trace=trace, record=record,
                                        progress=progress, on_row=on_row)
        if not isinstance(trace, bool):
            trace = any(trace)
        if batch_size is not None and procs == 1 and len(rows) > batch_size:  # text mode: lockstep buckets
            result = self._run_bucketed(questions, rows, row_keys(rng, len(rows)), batch_size, trace=trace,
                                        record=record, progress=progress)
        else:
            result = self._run_lockstep(questions, rows, rng, procs, trace=trace, record=record, progress=progress)
        if on_row is not None:
            for i in range(len(rows)):
                on_row(i, result.row(i))
        return result

    def _run_bucketed(self, questions, rows, keys, batch_size: int, *, trace: bool, record: bool,
                      progress: bool) -> AgentResult:
        """Lockstep batches of `batch_size` rows of similar length, merged back into row order."""
        order = sorted(range(len(rows)), key=lambda i: (rows[i][1].size, i))
        parts = {}
        for start in range(0, len(order), batch_size):
            group = order[start:start + batch_size]
            part = self._run_lockstep([questions[i] for i in group], [rows[i] for i in group], keys[np.asarray(group)],
                                      1, trace=trace, record=record, progress=progress)
            parts.update({i: part.row(j) for j, i in enumerate(group)})
        rows_out = [parts[i] for i in range(len(rows))]

        def joined(field):
            values = [getattr(r, field) for r in rows_out]
            return None if any(v is None for v in values) else [v[0] for v in values]

        return AgentResult(answers=joined("answers"), answer_ids=joined("answer_ids"), finished=joined("finished"),
                           num_chunks=joined("num_chunks"), traces=joined("traces"),
                           conversations=joined("conversations"), nonfinite=joined("nonfinite"))

    def _run_lockstep(self, questions, rows, rng, procs: int, *, trace: bool, record: bool,
                      progress: bool) -> AgentResult:
        """`run` in lockstep: all rows as one batch, as many segments as the longest document."""
        spec, b = self.spec, self.budgets
        n = len(rows)
        docs = [d for _, d in rows]
        chunk_counts = [num_chunks(d.size, b.chunk_tokens) for d in docs]
        max_chunks = max(chunk_counts, default=0)
        segments = -(-max_chunks // b.chunks_per_segment)
        if procs > 1:
            # Every process runs the same programs the same number of times: a common row count (its own rows
            # padded) and the longest document of any process.
            n_max, segments, max_chunks = multiprocess.process_allgather(
                np.array([n, segments, max_chunks], np.int64)).max(axis=0)
            multiple = multiprocess.process_batch_multiple(self.mesh)
            batch = max(-(-int(n_max) // multiple) * multiple, multiple)
            segments, max_chunks = int(segments), int(max_chunks)
        else:
            batch = -(-n // sharding_lib.batch_multiple(self.mesh)) * sharding_lib.batch_multiple(self.mesh)
        keys = row_keys(rng, n) if n else row_keys(0, batch)
        if batch > keys.shape[0]:
            keys = jnp.concatenate([keys, jnp.broadcast_to(keys[:1], (batch - n,))])
        if spec.prompt_mode == "text":
            return self._run_text(questions, rows, keys, batch, max_chunks, chunk_counts, trace=trace,
                                  record=record, progress=progress)
        question = np.full((batch, b.question_tokens), spec.pad_id, np.int32)
        question_len = np.zeros((batch,), np.int32)
        for i, (q, _) in enumerate(rows + [rows[0]] * (batch - n) if rows else []):
            question[i, :q.size] = q
            question_len[i] = q.size
        global_batch = batch * procs

        memory = np.full((batch, b.memory_tokens), spec.pad_id, np.int32)
        init = spec.prompts.initial_memory
        memory[:, :len(init)] = init
        memory_len = np.full((batch,), len(init), np.int32)

        ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
        records = []
        bar = _progress(sum(chunk_counts), progress)
        with ctx:
            keys_d = self._put(keys, 1)
            question_d, question_len_d = self._put(question), self._put(question_len)
            prefix = prefix_program(self.params, spec, question_d, question_len_d,
                                    self._cache("update", global_batch, spec.update_cache_slots))
            cache, memory_d, memory_len_d = prefix.cache, self._put(memory), self._put(memory_len)
            for seg in range(segments):
                chunks, chunk_lens = self._segment_chunks(docs, batch, seg)
                cache, memory_d, memory_len_d, rec = segment_program(
                    self.params, spec, cache, prefix.next_positions, memory_d, memory_len_d, self._put(chunks),
                    self._put(chunk_lens), keys_d, self._put(np.full((batch,), seg * b.chunks_per_segment, np.int32)))
                if trace or record:
                    records.append(self._get(rec))
                bar.update(int((chunk_lens[:n] > 0).sum()))
            self._caches[("update", global_batch)] = cache
            active = self._put(np.arange(batch) < n)
            final, self._caches[("final", global_batch)] = final_program(
                self.params, spec, question_d, question_len_d, memory_d, memory_len_d, keys_d,
                self._cache("final", global_batch, spec.final_cache_slots), active)
            final_host = self._get(final)
            prefix_host = self._get((prefix.tokens, prefix.mask)) if record else None
        bar.close()

        answer_ids = [final_host.answer[i, :final_host.answer_len[i]].tolist() for i in range(n)]
        texts = self._answer_texts(answer_ids)
        nonfinite = [not np.all(np.isfinite(final_host.logprobs[i, :final_host.answer_len[i]])) for i in range(n)]
        for rec in records:  # memory updates, when they were fetched (trace / record)
            for i in range(n):
                lp = np.where(np.arange(rec.logprobs.shape[-1]) < rec.response_len[i][:, None], rec.logprobs[i], 0.0)
                nonfinite[i] = nonfinite[i] or not np.all(np.isfinite(lp))
        result = AgentResult(answers=texts, answer_ids=answer_ids,
                             finished=[bool(f) for f in final_host.finished[:n]], num_chunks=chunk_counts,
                             nonfinite=nonfinite)
        if trace:
            result.traces = [self._trace(records, i, chunk_counts[i]) for i in range(n)]
        if record:
            result.conversations = [self._conversations(records, final_host, prefix_host, i, chunk_counts[i])
                                    for i in range(n)]
        return result

    def _answer_texts(self, answer_ids: Sequence[Sequence[int]]) -> list[str]:
        stops = set(self.spec.answer_sampling.stop_token_ids)
        return [self.tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True)
                for ids in answer_ids]

    def _run_continuous(self, rows, keys, batch_size: int, *, trace, record: bool, progress: bool,
                        on_row=None) -> AgentResult:
        """`run` with continuous batching: every row through one `DocumentEngine` of `batch_size` slots."""
        from memagent_jax.agent.engine import DocumentEngine, RowRequest, RowProgress

        traced = [bool(trace)] * len(rows) if isinstance(trace, bool) else [bool(t) for t in trace]
        if len(traced) != len(rows):
            raise AgentInputError(f"trace: {len(traced)} flags for {len(rows)} rows")
        engine = DocumentEngine(self, batch_size)
        raw_keys = np.asarray(jax.random.key_data(keys))
        order = sorted(range(len(rows)), key=lambda i: (-rows[i][1].size, i))  # longest first: a short tail
        chunk_counts = [num_chunks(d.size, self.budgets.chunk_tokens) for _, d in rows]
        bar = _progress(sum(chunk_counts), progress)
        read = [0] * len(rows)

        def on_event(event):
            if isinstance(event, RowProgress):
                bar.update(event.chunks_read - read[event.tag])
                read[event.tag] = event.chunks_read
            elif on_row is not None:
                on_row(event.tag, self._result_of([event], [traced[event.tag]], record))

        results = engine.run((RowRequest(tag=i, question_ids=rows[i][0], document_ids=rows[i][1], key=raw_keys[i],
                                         trace=traced[i], record=record) for i in order), on_event=on_event)
        bar.close()
        return self._result_of([results[i] for i in range(len(rows))], traced, record)

    def _result_of(self, ordered, traced: Sequence[bool], record: bool) -> AgentResult:
        """An `AgentResult` from the engine's `RowResult`s."""
        answer_ids = [r.answer_ids for r in ordered]
        result = AgentResult(answers=self._answer_texts(answer_ids), answer_ids=answer_ids,
                             finished=[r.finished for r in ordered], num_chunks=[r.num_chunks for r in ordered],
                             nonfinite=[r.nonfinite for r in ordered])
        if any(traced):
            result.traces = [[self.tokenizer.decode(m.tolist(), skip_special_tokens=True) for m in r.memories or []]
                             for r in ordered]
        if record:
            result.conversations = [r.conversations for r in ordered]
        return result

    # ------------------------------------------------------------------------------- text mode

    def _decode_text(self, ids, *, skip_special: bool) -> str:
        return self.tokenizer.decode([int(t) for t in ids], skip_special_tokens=skip_special,
                                     clean_up_tokenization_spaces=False)

    def _text_batch(self, prompts: dict[int, list[int]], batch: int, length: int, what: str):
        """Right-padded [batch, length] tokens and mask from {row: ids}; a prompt longer than `length` is an
        error naming the row."""
        tokens = np.full((batch, length), self.spec.pad_id, np.int32)
        mask = np.zeros((batch, length), bool)
        for i, ids in prompts.items():
            if len(ids) > length:
                raise AgentInputError(
                    f"row {i}: {what}: the text-mode prompt has {len(ids)} tokens, more than its static length "
                    f"{length} (template + question + memory + chunk budgets + budgets.text_margin="
                    f"{self.budgets.text_margin}); raise budgets.text_margin")
            tokens[i, :len(ids)] = ids
            mask[i, :len(ids)] = True
        return tokens, mask

    def _run_text(self, questions, rows, keys, batch: int, steps: int, chunk_counts, *, trace: bool, record: bool,
                  progress: bool) -> AgentResult:
        """Text mode: before every step the host formats each row's whole prompt as text (the question, the memory
        decoded from its sampled ids, the decoded chunk) and tokenizes it once; one jitted static-shape program
        (`text_step_program`) then prefills it and samples the new memory. Same per-step keys as the chunk scan."""
        spec, b, prompter = self.spec, self.budgets, self.text_prompter
        n = len(rows)
        procs = multiprocess.mesh_process_count(self.mesh)
        global_batch = batch * procs
        q_texts = []
        for question, (q_ids, _) in zip(questions, rows):
            full = len(self.tokenizer(question, add_special_tokens=False)["input_ids"])
            q_texts.append(question if full == q_ids.size else self._decode_text(q_ids, skip_special=False))
        docs = [d for _, d in rows]
        memory = [self.templates.initial_memory] * n
        traces = [[] for _ in range(n)]
        convs = [[] for _ in range(n)]
        update_len, final_len = spec.text_update_length, spec.text_final_length
        ctx = jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()
        bar = _progress(sum(chunk_counts), progress)
        with ctx:
            keys_d = self._put(keys, 1)
            cache = self._cache("text_update", global_batch, update_len + b.memory_tokens)
            for k in range(steps):
                live = [i for i in range(n) if k < chunk_counts[i]]
                texts = [prompter.update_text(q_texts[i], memory[i], self._decode_text(
                    docs[i][k * b.chunk_tokens:(k + 1) * b.chunk_tokens], skip_special=False)) for i in live]
                prompts = dict(zip(live, prompter.encode_many(texts)))
                tokens, mask = self._text_batch(prompts, batch, update_len, f"chunk step {k}")
                active = np.zeros((batch,), bool)
                active[live] = True
                out, cache = text_step_program(self.params, spec, self._put(tokens), self._put(mask), keys_d,
                                               jnp.int32(k), cache, self._put(active), final=False)
                out = self._get(out)
                for i in live:
                    length = int(out.num_tokens[i])
                    response = out.tokens[i, :length].copy()
                    mem_ids = response[:length - int(out.finished[i])]
                    memory[i] = self._decode_text(mem_ids, skip_special=True)
                    if trace:
                        traces[i].append(memory[i])
                    if record:
                        convs[i].append(Conversation(kind="memory", step=k, prompt_ids=np.asarray(prompts[i], np.int32),
                                                     response_ids=response, logprobs=out.logprobs[i, :length].copy()))
                bar.update(len(live))
            self._caches[("text_update", global_batch)] = cache
            prompts = dict(enumerate(prompter.encode_many([prompter.final_text(q_texts[i], memory[i])
                                                           for i in range(n)])))
            tokens, mask = self._text_batch(prompts, batch, final_len, "final step")
            active = np.arange(batch) < n
            final, self._caches[("text_final", global_batch)] = text_step_program(
                self.params, spec, self._put(tokens), self._put(mask), keys_d, jnp.int32(0),
                self._cache("text_final", global_batch, final_len + b.answer_tokens), self._put(active), final=True)
            final = self._get(final)
        bar.close()
        answer_ids = [final.tokens[i, :final.num_tokens[i]].tolist() for i in range(n)]
        texts = self._answer_texts(answer_ids)
        result = AgentResult(answers=texts, answer_ids=answer_ids,
                             finished=[bool(f) for f in final.finished[:n]], num_chunks=list(chunk_counts))
        if trace:
            result.traces = traces
        if record:
            for i in range(n):
                length = int(final.num_tokens[i])
                convs[i].append(Conversation(kind="final", step=chunk_counts[i],
                                             prompt_ids=np.asarray(prompts[i], np.int32),
                                             response_ids=final.tokens[i, :length].copy(),
                                             logprobs=final.logprobs[i, :length].copy()))
            result.conversations = convs
        return result

    def _segment_chunks(self, docs: list[np.ndarray], batch: int, seg: int):
        b = self.budgets
        s, c = b.chunks_per_segment, b.chunk_tokens
        chunks = np.full((batch, s, c), self.spec.pad_id, np.int32)
        lens = np.zeros((batch, s), np.int32)
        for i, doc in enumerate(docs):
            for j in range(s):
                start = (seg * s + j) * c
                piece = doc[start:start + c]
                chunks[i, j, :piece.size] = piece
                lens[i, j] = piece.size
        return chunks, lens

    def _step_records(self, records, count: int):
        """(global step k, its segment's record, index within the segment) for the first `count` steps."""
        s = self.budgets.chunks_per_segment
        for k in range(count):
            yield k, records[k // s], k % s

    def _trace(self, records, row: int, count: int) -> list[str]:
        out = []
        for _, rec, j in self._step_records(records, count):
            ids = rec.response[row, j, :rec.memory_len[row, j]]
            out.append(self.tokenizer.decode(ids.tolist(), skip_special_tokens=True))
        return out

    def _conversations(self, records, final, prefix, row: int, count: int) -> list[Conversation]:
        prefix_ids = prefix[0][row][prefix[1][row]]
        convs = []
        for k, rec, j in self._step_records(records, count):
            rest = rec.rest_tokens[row, j][rec.rest_mask[row, j]]
            length = rec.response_len[row, j]
            convs.append(Conversation(kind="memory", step=k, prompt_ids=np.concatenate([prefix_ids, rest]),
                                      response_ids=rec.response[row, j, :length].copy(),
                                      logprobs=rec.logprobs[row, j, :length].copy()))
        length = final.answer_len[row]
        convs.append(Conversation(kind="final", step=count,
                                  prompt_ids=final.prompt_tokens[row][final.prompt_mask[row]],
                                  response_ids=final.answer[row, :length].copy(),
                                  logprobs=final.logprobs[row, :length].copy()))
        return convs


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="chunk", desc="reading", dynamic_ncols=True)
