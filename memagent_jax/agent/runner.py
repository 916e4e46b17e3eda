"""Host driver of the memory agent: questions + documents in, answers (and traces / RL records) out.

    agent = MemoryAgent(params, config, tokenizer, budgets=AgentBudgets(chunk_tokens=5000, ...))
    result = agent.run(["Who ...?"], [open("book.txt").read()], rng=0, trace=True)
    result.predictions[0], result.answers[0]     # the extracted answer ("Ra"), the raw response ("\\boxed{Ra}")
    result.traces[0]                              # the memory text after every chunk

A document of any length runs as a sequence of segments of S chunks: the same compiled `segment_program`
serves every segment of every document of the same batch size, so one compile covers every document
length, and device memory holds only the current segment's chunks, the memory and one KV cache. Host
memory holds the documents' token arrays.

`run` schedules rows in lockstep, in lockstep buckets, or with continuous batching (`agent.engine`); which one
runs, and what each needs, is decided in one place, `choose_scheduling`. The text prompt mode's lockstep batch
is `agent.text_mode`. Device puts and the KV cache pool are the agent's `placement` (`agent.placement`), shared
by all of them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memagent_jax import settings as settings_lib
from memagent_jax.agent.chunking import (
    AgentBudgets,
    AgentInputError,
    centre_truncate,
    num_chunks,
    prepare_question,
    tokenize_document,
)
from memagent_jax.agent.engine import DocumentEngine
from memagent_jax.agent.placement import Placement
from memagent_jax.agent.program import AgentSpec, final_program, prefix_program, segment_program
from memagent_jax.agent.templates import AgentPrompts, AgentTemplates, TextPrompter
from memagent_jax.agent.text_mode import run_text
from memagent_jax.agent.types import AgentResult, Conversation, RowProgress, RowRequest, RowResult
from memagent_jax.models.config import ModelConfig
from memagent_jax.sampling.api import row_keys
from memagent_jax.sampling.params import RowSampling, SamplingError, SamplingParams
from memagent_jax.sampling.sampler import InferenceLayout, ParamsAttribute

log = logging.getLogger(__name__)

# How `MemoryAgent.run` schedules rows (`choose_scheduling` says which runs where).
SCHEDULING = ("lockstep", "bucketed", "continuous")


def choose_scheduling(scheduling: str | None, batch_size: int | None, *, prompt_mode: str, processes: int) -> str:
    """The scheduling `MemoryAgent.run` uses: the one place that states which mode runs where, and the default.

      'lockstep'    all rows as one batch, for as many chunk steps as the longest document. Any prompt mode, any
                    mesh (on a mesh spanning processes, the rows of every process run as one batch). No batch_size.
      'bucketed'    rows sorted by document length, run as lockstep batches of batch_size rows (one batch when
                    they fit one). Any prompt mode; one process.
      'continuous'  one `DocumentEngine` of batch_size row slots: a row whose document ends takes the next queued
                    document at the next segment boundary, longest documents first. Piece prompt mode; one process.

    scheduling=None (the default) picks 'lockstep' without a batch_size; with one, 'continuous' where it can run,
    else the fallback: 'lockstep' on a mesh spanning processes (batch_size unused), 'bucketed' in the text prompt
    mode. An explicit mode that cannot run here, or a batch_size it cannot use, is an AgentInputError.
    Every mode gives a row the same output: its question, document and key alone decide it.
    """
    if scheduling is None:
        if batch_size is None or processes > 1:
            return "lockstep"
        scheduling = "bucketed" if prompt_mode == "text" else "continuous"
    if scheduling not in SCHEDULING:
        raise AgentInputError(
            f"scheduling: must be one of {list(SCHEDULING)} (or None: chosen from batch_size), got {scheduling!r}"
        )
    if scheduling == "lockstep":
        if batch_size is not None:
            raise AgentInputError(
                f"scheduling='lockstep' runs all rows as one batch: batch_size must be None, got "
                f"{batch_size} (scheduling='bucketed' runs lockstep batches of batch_size rows)"
            )
        return scheduling
    if batch_size is None or isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise AgentInputError(
            f"scheduling={scheduling!r} needs batch_size >= 1 (rows per batch or row slots), got {batch_size!r}"
        )
    if processes > 1:
        raise AgentInputError(
            f"scheduling={scheduling!r} runs on one process; this mesh spans {processes} processes: "
            f"use scheduling='lockstep' (every process's rows as one batch)"
        )
    if scheduling == "continuous" and prompt_mode != "pieces":
        raise AgentInputError(
            f"scheduling='continuous' runs the piece prompt mode only; these templates use "
            f"prompt_mode={prompt_mode!r}: use scheduling='bucketed'"
        )
    return scheduling


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
      extract: how `run` takes the answer from each final response into `AgentResult.predictions` (one of
        `verifier.EXTRACTORS`; default 'boxed': the last \\boxed{...}). `from_pretrained` and the command-line
        tools pass the model's settings' "extract".
      compact_rows: a chunk step that only some rows of a batch reach (documents of different lengths) runs those
        rows alone, gathered into a batch of half, a quarter or an eighth of the rows where they fit
        (`agent.program.row_buckets`), instead of computing every row; it holds one more KV cache of the rows it
        gathers while it runs. None: on unless rows are sharded over several devices (gathering them would move
        their caches between devices). A row's outputs are those of the uncompacted step up to float rounding:
        products over fewer rows may sum in another order.
    Attributes besides the arguments: `spec` (the programs' static `AgentSpec`), `placement` (device puts and the
    KV cache pool, a `Placement` of `mesh`), `text_prompter` (text prompt mode only).
    The programs run `params` in the inference layout (`sampling.sampler.InferenceLayout`), made at the first run
    and held until `params` is assigned new weights or `release_layout()` is called.
    """

    params = ParamsAttribute()  # assigning new weights drops the held layout

    def __init__(
        self,
        params,
        config: ModelConfig,
        tokenizer,
        *,
        budgets: AgentBudgets = AgentBudgets(),
        templates: AgentTemplates = AgentTemplates(),
        memory_sampling: SamplingParams | None = None,
        answer_sampling: SamplingParams | None = None,
        mesh=None,
        stop_token_ids: Sequence[int] | None = None,
        extract: str = "boxed",
        compact_rows: bool | None = None,
    ):
        from memagent_jax.evaluation import verifier  # pure Python: no JAX

        self.extract = settings_lib.choice("extract", extract, verifier.EXTRACTORS)
        self._layout = InferenceLayout(config)
        self.params = params
        self.config = config
        self.tokenizer = tokenizer
        self.placement = Placement(mesh, config)
        if stop_token_ids is None:
            stops = default_stop_ids(tokenizer, config)
            if not stops:
                raise AgentInputError(
                    "no stop token: neither the model config nor the tokenizer names an EOS "
                    "token; pass stop_token_ids (an empty tuple = fixed-length generation)"
                )
        else:
            stops = tuple(stop_token_ids)
        pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
        base_memory = memory_sampling or SamplingParams(temperature=0.0)
        base_answer = answer_sampling or base_memory
        self.spec = AgentSpec(
            config=config,
            budgets=budgets,
            prompts=AgentPrompts.build(tokenizer, templates),
            memory_sampling=base_memory.replace(max_new_tokens=budgets.memory_tokens, stop_token_ids=stops, pad_id=pad),
            answer_sampling=base_answer.replace(max_new_tokens=budgets.answer_tokens, stop_token_ids=stops, pad_id=pad),
            pad_id=pad,
            prompt_mode=templates.prompt_mode,
            compact_rows=self.placement.batch_multiple == 1 if compact_rows is None else bool(compact_rows),
        )
        self.templates = templates
        self.text_prompter = TextPrompter(tokenizer, templates) if templates.prompt_mode == "text" else None
        if self.spec.max_context() > config.max_position_embeddings:
            raise AgentInputError(
                f"budgets need a context of {self.spec.max_context()} tokens (question {budgets.question_tokens} + "
                f"memory {budgets.memory_tokens} + chunk {budgets.chunk_tokens} + templates + new tokens), more "
                f"than the model's max_position_embeddings ({config.max_position_embeddings})"
            )

    @classmethod
    def from_pretrained(
        cls,
        folder: str,
        *,
        tokenizer=None,
        param_dtype: str | None = None,
        compute_dtype: str | None = None,
        mesh=None,
        allow_nonfinite_weights: bool = False,
        **overrides,
    ) -> MemoryAgent:
        """A memory agent from a local Hugging Face folder, with the settings it was exported with.

        The folder's `memagent_agent.json` (written by `train`'s export; see `agent.settings`) gives the budgets,
        templates and sampling; a folder without it gets the documented defaults (reference budgets
        1024 / 5000 / 1024 / 1024, the default templates, greedy decoding). `overrides` replace single settings by
        their config names: `chunk_tokens=...`, `memory_tokens=...`, `temperature=...`, `top_p=...`,
        `memory_update=...`, `prompt_mode=...`, `extract=...` (the answer extraction rule of `run`'s predictions), or
        whole `budgets=AgentBudgets(...)` / `templates=...` (an `AgentTemplates` or a JSON file). tokenizer: a
        tokenizer, a folder, or None (the model folder).
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
        params, config = load_hf_params(
            folder, mesh=mesh, param_dtype=param_dtype, allow_nonfinite=allow_nonfinite_weights
        )
        if compute_dtype or param_dtype:
            config = config.replace(compute_dtype=compute_dtype or param_dtype)
        agent = cls(
            params,
            config,
            tokenizer,
            budgets=settings.budgets,
            templates=settings.templates,
            memory_sampling=settings.sampling(),
            mesh=mesh,
            extract=settings.extract,
        )
        agent.settings = settings
        return agent

    def release_layout(self) -> None:
        """Frees the params' inference layout until the next run (`sampling.sampler.InferenceLayout`): one copy of
        the layer weights, held between runs so that runs on the same weights do not each make it."""
        self._layout.release()

    def _run_params(self):
        return self._layout.get(self._params)

    @property
    def budgets(self) -> AgentBudgets:
        return self.spec.budgets

    @property
    def mesh(self):
        """The mesh the agent runs on (None: one device)."""
        return self.placement.mesh

    def predict(self, responses: Sequence[str]) -> list[str | None]:
        """The answer the verifier takes from each final response under this agent's `extract` rule
        (`verifier.readable_answer`: the extracted answer without surrounding white space; None where it finds
        none): what `AgentResult.predictions` holds."""
        from memagent_jax.evaluation.verifier import readable_answer

        return [readable_answer(r, self.extract) for r in responses]

    def _with_predictions(self, result: AgentResult) -> AgentResult:
        result.predictions = self.predict(result.answers)
        return result

    def document_engine(self, batch_size: int, *, eager_answers: bool = False) -> DocumentEngine:
        """A `DocumentEngine` (continuous batching) of `batch_size` row slots over this agent's current params,
        sharing its placement and KV cache pool."""
        return DocumentEngine(self.spec, self._run_params(), self.placement, batch_size, eager_answers=eager_answers)

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

    # --------------------------------------------------------------------------------------- run

    def run(
        self,
        questions: Sequence[str],
        documents: Sequence,
        rng=0,
        *,
        trace: bool = False,
        record: bool = False,
        progress: bool = False,
        batch_size: int | None = None,
        scheduling: str | None = None,
        on_row=None,
        sampling=None,
    ) -> AgentResult:
        """Runs the agent over (question, document) rows.

        Args:
          questions: N question strings.
          documents: N documents: text, an iterable of text pieces, or a token id array.
          rng: int seed, one PRNG key (row i uses fold_in(key, i)), or [N] keys.
          trace: also return the memory text after every chunk (with scheduling 'continuous', may be N bools:
            trace only those rows; the others get an empty trace).
          record: also return every conversation (prompt ids, response ids, log-probs) for training.
          progress: show a progress bar over chunks.
          batch_size: rows per batch ('bucketed') or row slots ('continuous'); None for 'lockstep'. Clamped to the
            number of rows (outputs do not depend on it: every row has its own key).
          scheduling: 'lockstep' (all N rows as one batch, as many chunk steps as the longest document),
            'bucketed' (lockstep batches of batch_size rows of similar length) or 'continuous' (one
            `DocumentEngine` of batch_size row slots: a row whose document ends takes the next document at the
            next segment boundary). None: chosen from batch_size, the prompt mode and the mesh by
            `choose_scheduling`, which also states what each mode needs (an explicit mode that cannot run here
            raises AgentInputError). Whichever runs, a row's output depends only on its question, document and key.
          on_row: optional callable `on_row(i, one_row_result)`, called as soon as row i is answered with an
            `AgentResult` of that row alone (streaming writers); with 'lockstep' and 'bucketed' all rows come at
            the end.
          sampling: per-request temperature / top_k / top_p: None (every row samples with the agent's
            `memory_sampling` for memory updates and `answer_sampling` for answers), one `SamplingParams` (every
            row, memory updates and answer), or N entries of `SamplingParams` or None (row i's; None: the agent's).
            Only those three fields of an entry are used (the budgets set max_new_tokens, the tokenizer the stop
            ids). Settings are per-row arrays of the compiled programs: any mix runs in one batch, with no new
            compile; temperature 0 is greedy. A row's draws depend only on its key (`rng`) and its own settings.
        Returns an `AgentResult`: `answers` the raw final responses, `predictions` the answers extracted from them
        (`predict`), and the rest.
        """
        if len(questions) != len(documents):
            raise AgentInputError(f"{len(questions)} questions but {len(documents)} documents")
        procs = self.placement.processes
        if not questions and procs == 1:
            raise AgentInputError("no rows to run")
        mode = choose_scheduling(scheduling, batch_size, prompt_mode=self.spec.prompt_mode, processes=procs)
        rows = [self.prepare(q, d, source=f"row {i}") for i, (q, d) in enumerate(zip(questions, documents))]
        per_row = self._per_row_sampling(sampling, len(rows))
        if batch_size is not None:  # no more slots than rows: a huge batch_size must not compile (or allocate) them
            batch_size = min(int(batch_size), max(len(rows), 1))
        if mode == "continuous":
            each = None if on_row is None else (lambda i, one: on_row(i, self._with_predictions(one)))
            keys = row_keys(rng, len(rows))
            result = self._run_continuous(
                rows, keys, per_row, batch_size, trace=trace, record=record, progress=progress, on_row=each
            )
            return self._with_predictions(result)
        if not isinstance(trace, bool):
            trace = any(trace)
        if mode == "bucketed":
            result = self._run_bucketed(
                questions,
                rows,
                row_keys(rng, len(rows)),
                per_row,
                batch_size,
                trace=trace,
                record=record,
                progress=progress,
            )
        else:
            result = self._run_lockstep(questions, rows, rng, per_row, trace=trace, record=record, progress=progress)
        self._with_predictions(result)
        if on_row is not None:
            for i in range(len(rows)):
                on_row(i, result.row(i))
        return result

    @staticmethod
    def _per_row_sampling(sampling, n: int) -> list:
        """`run`'s sampling argument as n entries (SamplingParams or None)."""
        if sampling is None or isinstance(sampling, SamplingParams):
            return [sampling] * n
        if isinstance(sampling, (str, bytes)) or not isinstance(sampling, Sequence):
            raise SamplingError(
                f"sampling: must be a SamplingParams or a list of them (one per row), got {type(sampling).__name__}"
            )
        if len(sampling) != n:
            raise SamplingError(f"sampling: {len(sampling)} entries for {n} rows")
        for i, entry in enumerate(sampling):
            if entry is not None and not isinstance(entry, SamplingParams):
                raise SamplingError(f"sampling[{i}]: must be a SamplingParams or None, got {type(entry).__name__}")
        return list(sampling)

    def _row_sampling(self, per_row, batch: int) -> tuple[RowSampling, RowSampling]:
        """(memory, answer) per-row settings of a batch of `batch` rows (rows past len(per_row): padding)."""
        spec = self.spec
        memory = RowSampling.build(per_row, spec.memory_sampling, batch=batch)
        answer = RowSampling.build(per_row, spec.answer_sampling, batch=batch)
        return memory, answer

    def _run_bucketed(
        self, questions, rows, keys, per_row, batch_size: int, *, trace: bool, record: bool, progress: bool
    ) -> AgentResult:
        """Lockstep batches of `batch_size` rows of similar length, merged back into row order (rows that fit one
        batch run as one lockstep batch in their own order)."""
        if len(rows) <= batch_size:
            return self._run_lockstep(questions, rows, keys, per_row, trace=trace, record=record, progress=progress)
        order = sorted(range(len(rows)), key=lambda i: (rows[i][1].size, i))
        parts = {}
        for start in range(0, len(order), batch_size):
            group = order[start : start + batch_size]
            part = self._run_lockstep(
                [questions[i] for i in group],
                [rows[i] for i in group],
                keys[np.asarray(group)],
                [per_row[i] for i in group],
                trace=trace,
                record=record,
                progress=progress,
            )
            parts.update({i: part.row(j) for j, i in enumerate(group)})
        rows_out = [parts[i] for i in range(len(rows))]

        def joined(field):
            values = [getattr(r, field) for r in rows_out]
            return None if any(v is None for v in values) else [v[0] for v in values]

        return AgentResult(
            answers=joined("answers"),
            answer_ids=joined("answer_ids"),
            finished=joined("finished"),
            num_chunks=joined("num_chunks"),
            traces=joined("traces"),
            conversations=joined("conversations"),
            nonfinite=joined("nonfinite"),
        )

    def _run_lockstep(self, questions, rows, rng, per_row, *, trace: bool, record: bool, progress: bool) -> AgentResult:
        """`run` in lockstep: all rows as one batch, as many chunk steps as the longest document, in the agent's
        prompt mode (the piece layout's chunk scan, or the text mode's host-formatted prompts)."""
        shape = self._lockstep_shape(rows, rng, per_row)
        bar = _progress(sum(shape.chunk_counts), progress)
        if self.spec.prompt_mode == "text":
            run = run_text(
                self.spec,
                self._run_params(),
                self.placement,
                self.text_prompter,
                questions,
                rows,
                shape.keys,
                shape.batch,
                shape.max_chunks,
                shape.chunk_counts,
                shape.memory_rows,
                shape.answer_rows,
                trace=trace,
                record=record,
                bar=bar,
            )
            bar.close()
            return AgentResult(
                answers=self._answer_texts(run.answer_ids),
                answer_ids=run.answer_ids,
                finished=run.finished,
                num_chunks=list(shape.chunk_counts),
                traces=run.traces,
                conversations=run.conversations,
            )
        result = self._lockstep_pieces(rows, shape, trace=trace, record=record, bar=bar)
        bar.close()
        return result

    def _lockstep_shape(self, rows, rng, per_row) -> _LockstepShape:
        """The lockstep batch of `rows`: this process's batch size, the row keys (padding rows repeat the first
        key), the per-row sampling settings (padding rows greedy), each row's chunk count, and the segments / chunk
        steps to run (on a mesh spanning processes, the
        same on every process: a common row count and the longest document of any process)."""
        b = self.budgets
        n = len(rows)
        chunk_counts = [num_chunks(d.size, b.chunk_tokens) for _, d in rows]
        max_chunks = max(chunk_counts, default=0)
        segments = -(-max_chunks // b.chunks_per_segment)
        if self.placement.spans_processes:
            n_max, segments, max_chunks = self.placement.max_over_processes([n, segments, max_chunks])
            batch = self.placement.process_batch(int(n_max))
            segments, max_chunks = int(segments), int(max_chunks)
        else:
            batch = self.placement.round_batch(n)
        keys = row_keys(rng, n) if n else row_keys(0, batch)
        if batch > keys.shape[0]:
            keys = jnp.concatenate([keys, jnp.broadcast_to(keys[:1], (batch - n,))])
        memory_rows, answer_rows = self._row_sampling(per_row, batch)
        return _LockstepShape(
            batch=batch,
            keys=keys,
            chunk_counts=chunk_counts,
            segments=segments,
            max_chunks=max_chunks,
            memory_rows=memory_rows,
            answer_rows=answer_rows,
        )

    def _lockstep_pieces(self, rows, shape: _LockstepShape, *, trace: bool, record: bool, bar) -> AgentResult:
        """One lockstep batch in the piece prompt mode: the prefix once, then `segment_program` per segment of
        S chunks, then `final_program`."""
        spec, b, placement = self.spec, self.budgets, self.placement
        put, get = placement.put, placement.get
        n, batch, chunk_counts = len(rows), shape.batch, shape.chunk_counts
        docs = [d for _, d in rows]
        question = np.full((batch, b.question_tokens), spec.pad_id, np.int32)
        question_len = np.zeros((batch,), np.int32)
        for i, (q, _) in enumerate(rows + [rows[0]] * (batch - n) if rows else []):
            question[i, : q.size] = q
            question_len[i] = q.size
        global_batch = batch * placement.processes

        memory = np.full((batch, b.memory_tokens), spec.pad_id, np.int32)
        init = spec.prompts.initial_memory
        memory[:, : len(init)] = init
        memory_len = np.full((batch,), len(init), np.int32)

        records = []
        with placement.context():
            params = self._run_params()
            keys_d = put(shape.keys, 1)
            memory_rows = RowSampling(*(put(a, 1) for a in shape.memory_rows))
            question_d, question_len_d = put(question), put(question_len)
            prefix = prefix_program(
                params,
                spec,
                question_d,
                question_len_d,
                placement.cache("update", global_batch, spec.update_cache_slots),
            )
            cache, memory_d, memory_len_d = prefix.cache, put(memory), put(memory_len)
            for seg in range(shape.segments):
                chunks, chunk_lens = self._segment_chunks(docs, batch, seg)
                cache, memory_d, memory_len_d, rec = segment_program(
                    params,
                    spec.for_chunk_lens(chunk_lens),
                    cache,
                    prefix.next_positions,
                    memory_d,
                    memory_len_d,
                    put(chunks),
                    put(chunk_lens),
                    keys_d,
                    put(np.full((batch,), seg * b.chunks_per_segment, np.int32)),
                    memory_rows,
                )
                if trace or record:
                    records.append(get(rec))
                bar.update(int((chunk_lens[:n] > 0).sum()))
            placement.give_back("update", global_batch, cache)
            active = put(np.arange(batch) < n)
            final, cache = final_program(
                params,
                spec,
                question_d,
                question_len_d,
                memory_d,
                memory_len_d,
                keys_d,
                placement.cache("final", global_batch, spec.final_cache_slots),
                active,
                RowSampling(*(put(a, 1) for a in shape.answer_rows)),
            )
            placement.give_back("final", global_batch, cache)
            final_host = get(final)
            prefix_host = get((prefix.tokens, prefix.mask)) if record else None

        answer_ids = [final_host.answer[i, : final_host.answer_len[i]].tolist() for i in range(n)]
        texts = self._answer_texts(answer_ids)
        nonfinite = [not np.all(np.isfinite(final_host.logprobs[i, : final_host.answer_len[i]])) for i in range(n)]
        for rec in records:  # memory updates, when they were fetched (trace / record)
            for i in range(n):
                lp = np.where(np.arange(rec.logprobs.shape[-1]) < rec.response_len[i][:, None], rec.logprobs[i], 0.0)
                nonfinite[i] = nonfinite[i] or not np.all(np.isfinite(lp))
        result = AgentResult(
            answers=texts,
            answer_ids=answer_ids,
            finished=[bool(f) for f in final_host.finished[:n]],
            num_chunks=chunk_counts,
            nonfinite=nonfinite,
        )
        if trace:
            result.traces = [self._trace(records, i, chunk_counts[i]) for i in range(n)]
        if record:
            result.conversations = [
                self._conversations(records, final_host, prefix_host, i, chunk_counts[i]) for i in range(n)
            ]
        return result

    def _answer_texts(self, answer_ids: Sequence[Sequence[int]]) -> list[str]:
        stops = set(self.spec.answer_sampling.stop_token_ids)
        return [
            self.tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True) for ids in answer_ids
        ]

    def _run_continuous(
        self, rows, keys, per_row, batch_size: int, *, trace, record: bool, progress: bool, on_row=None
    ) -> AgentResult:
        """`run` with continuous batching: every row through one `DocumentEngine` of `batch_size` slots."""
        traced = [bool(trace)] * len(rows) if isinstance(trace, bool) else [bool(t) for t in trace]
        if len(traced) != len(rows):
            raise AgentInputError(f"trace: {len(traced)} flags for {len(rows)} rows")
        engine = self.document_engine(batch_size)
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

        results = engine.run(
            (
                RowRequest(
                    tag=i,
                    question_ids=rows[i][0],
                    document_ids=rows[i][1],
                    key=raw_keys[i],
                    trace=traced[i],
                    record=record,
                    sampling=per_row[i],
                )
                for i in order
            ),
            on_event=on_event,
        )
        bar.close()
        return self._result_of([results[i] for i in range(len(rows))], traced, record)

    def _result_of(self, ordered: Sequence[RowResult], traced: Sequence[bool], record: bool) -> AgentResult:
        """An `AgentResult` from the engine's `RowResult`s."""
        answer_ids = [r.answer_ids for r in ordered]
        result = AgentResult(
            answers=self._answer_texts(answer_ids),
            answer_ids=answer_ids,
            finished=[r.finished for r in ordered],
            num_chunks=[r.num_chunks for r in ordered],
            nonfinite=[r.nonfinite for r in ordered],
        )
        if any(traced):
            result.traces = [
                [self.tokenizer.decode(m.tolist(), skip_special_tokens=True) for m in r.memories or []] for r in ordered
            ]
        if record:
            result.conversations = [r.conversations for r in ordered]
        return result

    def _segment_chunks(self, docs: list[np.ndarray], batch: int, seg: int):
        b = self.budgets
        s, c = b.chunks_per_segment, b.chunk_tokens
        chunks = np.full((batch, s, c), self.spec.pad_id, np.int32)
        lens = np.zeros((batch, s), np.int32)
        for i, doc in enumerate(docs):
            for j in range(s):
                start = (seg * s + j) * c
                piece = doc[start : start + c]
                chunks[i, j, : piece.size] = piece
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
            ids = rec.response[row, j, : rec.memory_len[row, j]]
            out.append(self.tokenizer.decode(ids.tolist(), skip_special_tokens=True))
        return out

    def _conversations(self, records, final, prefix, row: int, count: int) -> list[Conversation]:
        prefix_ids = prefix[0][row][prefix[1][row]]
        convs = []
        for k, rec, j in self._step_records(records, count):
            rest = rec.rest_tokens[row, j][rec.rest_mask[row, j]]
            length = rec.response_len[row, j]
            convs.append(
                Conversation(
                    kind="memory",
                    step=k,
                    prompt_ids=np.concatenate([prefix_ids, rest]),
                    response_ids=rec.response[row, j, :length].copy(),
                    logprobs=rec.logprobs[row, j, :length].copy(),
                )
            )
        length = final.answer_len[row]
        convs.append(
            Conversation(
                kind="final",
                step=count,
                prompt_ids=final.prompt_tokens[row][final.prompt_mask[row]],
                response_ids=final.answer[row, :length].copy(),
                logprobs=final.logprobs[row, :length].copy(),
            )
        )
        return convs


@dataclasses.dataclass
class _LockstepShape:
    batch: int  # this process's rows (>= its n rows; a multiple of the mesh's batch share)
    keys: jax.Array  # [batch] row keys
    chunk_counts: list  # [n] chunks per row
    segments: int  # segments of S chunks to run
    max_chunks: int  # chunk steps to run (text mode)
    memory_rows: RowSampling  # [batch] host arrays: each row's memory-update settings
    answer_rows: RowSampling  # [batch] host arrays: each row's answer settings


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
