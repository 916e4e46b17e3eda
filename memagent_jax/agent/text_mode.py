"""The text prompt mode: every prompt formatted as one string and tokenized whole on the host.

Before every chunk step the host formats each row's whole prompt as text (the question, the memory decoded from
its sampled ids, the decoded chunk) and tokenizes it once (the template's control tokens parsed, the question,
memory and chunk text read as plain text: `TextPrompter`); one jitted static-shape program (`text_step_program`)
then prefills it and samples the new memory; the final answer is one more such step. Same per-step keys as the
chunk scan (chunk k: fold_in(fold_in(key, 0), k); the answer: fold_in(key, 1)). See `agent.templates` for what
each prompt mode guarantees.

`MemoryAgent.run` calls `run_text` for a lockstep batch when the agent's templates ask for
`prompt_mode='text'`; the rows' batch shape and keys come from the runner, device placement and the KV cache pool
from its `Placement`. The result holds token ids; the runner decodes the answers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from memagent_jax.agent.chunking import AgentInputError
from memagent_jax.agent.placement import Placement
from memagent_jax.agent.program import AgentSpec, text_step_program
from memagent_jax.agent.templates import TextPrompter, encode_text
from memagent_jax.agent.types import Conversation
from memagent_jax.sampling.params import RowSampling

__all__ = ["TextRun", "run_text", "text_batch"]


@dataclasses.dataclass
class TextRun:
    """What a text-mode batch gives for its first n rows: answer ids (with the stop token when one was sampled),
    whether the answer ended with a stop token, the memory text after each chunk (`traces`, when asked) and the
    conversations (`conversations`, when recording)."""

    answer_ids: list[list[int]]
    finished: list[bool]
    traces: list[list[str]] | None = None
    conversations: list[list[Conversation]] | None = None


def text_batch(
    prompts: dict[int, list[int]], batch: int, length: int, what: str, *, pad_id: int, text_margin: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded tokens [batch, length] int32 and mask [batch, length] bool from {row: ids}; rows without a
    prompt are all pad. A prompt longer than `length` is an AgentInputError naming the row, `what` (the step) and
    the `text_margin` budget that sets the static length."""
    tokens = np.full((batch, length), pad_id, np.int32)
    mask = np.zeros((batch, length), bool)
    for i, ids in prompts.items():
        if len(ids) > length:
            raise AgentInputError(
                f"row {i}: {what}: the text-mode prompt has {len(ids)} tokens, more than its static length "
                f"{length} (template + question + memory + chunk budgets + budgets.text_margin="
                f"{text_margin}); raise budgets.text_margin"
            )
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = True
    return tokens, mask


def _decode(tokenizer, ids, *, skip_special: bool) -> str:
    return tokenizer.decode([int(t) for t in ids], skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)


def run_text(
    spec: AgentSpec,
    params,
    placement: Placement,
    prompter: TextPrompter,
    questions: Sequence[str],
    rows: Sequence[tuple[np.ndarray, np.ndarray]],
    keys,
    batch: int,
    steps: int,
    chunk_counts: Sequence[int],
    memory_rows: RowSampling,
    answer_rows: RowSampling,
    *,
    trace: bool,
    record: bool,
    bar,
) -> TextRun:
    """Runs n = len(rows) rows as one lockstep batch in text mode.

    Args:
      spec, params: the agent's program spec (prompt_mode 'text') and model params.
      placement: device placement and the KV cache pool ('text_update' / 'text_final' caches).
      prompter: the `TextPrompter` of the agent's tokenizer and templates.
      questions: the n question strings; rows: the n (question ids, document ids) from `MemoryAgent.prepare`
        (a question the budgets truncated is used as its decoded ids).
      keys: [batch] row PRNG keys (rows past n are padding rows); batch: this process's rows, >= n.
      steps: chunk steps to run (the longest document's chunk count, over all processes of the mesh);
        chunk_counts: each row's chunk count.
      memory_rows / answer_rows: [batch] per-row sampling settings of the memory steps / the answer (host arrays).
      trace, record: keep the memory text after each chunk / every conversation.
      bar: a progress bar (`update(chunks)`), advanced by the chunks read at each step.
    """
    tokenizer, templates = prompter.tokenizer, prompter.templates
    b = spec.budgets
    n = len(rows)
    global_batch = batch * placement.processes
    q_texts = []
    for question, (q_ids, _) in zip(questions, rows):
        full = len(encode_text(tokenizer, question))
        q_texts.append(question if full == q_ids.size else _decode(tokenizer, q_ids, skip_special=False))
    docs = [d for _, d in rows]
    memory = [templates.initial_memory] * n
    traces = [[] for _ in range(n)]
    convs = [[] for _ in range(n)]
    update_len, final_len = spec.text_update_length, spec.text_final_length
    put = placement.put

    def padded(prompts, length, what):
        return text_batch(prompts, batch, length, what, pad_id=spec.pad_id, text_margin=b.text_margin)

    with placement.context():
        keys_d = put(keys, 1)
        memory_rows = RowSampling(*(put(a, 1) for a in memory_rows))
        answer_rows = RowSampling(*(put(a, 1) for a in answer_rows))
        cache = placement.cache("text_update", global_batch, update_len + b.memory_tokens)
        for k in range(steps):
            live = [i for i in range(n) if k < chunk_counts[i]]
            rows_k = [
                (
                    q_texts[i],
                    memory[i],
                    _decode(tokenizer, docs[i][k * b.chunk_tokens : (k + 1) * b.chunk_tokens], skip_special=False),
                )
                for i in live
            ]
            prompts = dict(zip(live, prompter.update_ids_batch(rows_k)))
            tokens, mask = padded(prompts, update_len, f"chunk step {k}")
            active = np.zeros((batch,), bool)
            active[live] = True
            out, cache = text_step_program(
                params, spec, put(tokens), put(mask), keys_d, jnp.int32(k), cache, put(active), memory_rows, final=False
            )
            out = placement.get(out)
            for i in live:
                length = int(out.num_tokens[i])
                response = out.tokens[i, :length].copy()
                mem_ids = response[: length - int(out.finished[i])]
                memory[i] = _decode(tokenizer, mem_ids, skip_special=True)
                if trace:
                    traces[i].append(memory[i])
                if record:
                    convs[i].append(
                        Conversation(
                            kind="memory",
                            step=k,
                            prompt_ids=np.asarray(prompts[i], np.int32),
                            response_ids=response,
                            logprobs=out.logprobs[i, :length].copy(),
                        )
                    )
            bar.update(len(live))
        placement.give_back("text_update", global_batch, cache)
        prompts = dict(enumerate(prompter.final_ids_batch([(q_texts[i], memory[i]) for i in range(n)])))
        tokens, mask = padded(prompts, final_len, "final step")
        active = np.arange(batch) < n
        final, cache = text_step_program(
            params,
            spec,
            put(tokens),
            put(mask),
            keys_d,
            jnp.int32(0),
            placement.cache("text_final", global_batch, final_len + b.answer_tokens),
            put(active),
            answer_rows,
            final=True,
        )
        placement.give_back("text_final", global_batch, cache)
        final = placement.get(final)
    answer_ids = [final.tokens[i, : final.num_tokens[i]].tolist() for i in range(n)]
    if record:
        for i in range(n):
            length = int(final.num_tokens[i])
            convs[i].append(
                Conversation(
                    kind="final",
                    step=chunk_counts[i],
                    prompt_ids=np.asarray(prompts[i], np.int32),
                    response_ids=final.tokens[i, :length].copy(),
                    logprobs=final.logprobs[i, :length].copy(),
                )
            )
    return TextRun(
        answer_ids=answer_ids,
        finished=[bool(f) for f in final.finished[:n]],
        traces=traces if trace else None,
        conversations=convs if record else None,
    )
