"""A plain-Python memory-agent loop, for tests and debugging.

One document at a time; every step builds its unpadded prompt as a list of ids (and its text), calls the
sampler once, and carries the new memory ids to the next step. No scan, no prefix reuse, no static
layout: the simplest correct agent, which the compiled chunk scan must reproduce. In text prompt mode each
prompt is instead the tokenization of the whole formatted string (`TextPrompter`), with the memory decoded
to text, which the text-mode runner must reproduce.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from memagent_jax.agent.chunking import split_chunks
from memagent_jax.agent.program import final_keys, step_keys
from memagent_jax.agent.runner import MemoryAgent
from memagent_jax.sampling.api import Sampler, row_keys


@dataclasses.dataclass
class ReferenceStep:
    prompt_ids: list[int]
    prompt_text: str
    response_ids: list[int]
    memory_ids: list[int]
    logprobs: np.ndarray


@dataclasses.dataclass
class ReferenceResult:
    steps: list[ReferenceStep]
    final_prompt_ids: list[int]
    answer_ids: list[int]
    answer_text: str


def reference_run(agent: MemoryAgent, question: str, document, rng=0, row: int = 0) -> ReferenceResult:
    """Runs one (question, document) row the slow way, with the same keys the chunk scan gives row `row`
    of a batch seeded by `rng`."""
    spec, tok = agent.spec, agent.tokenizer
    q_ids, doc_ids = agent.prepare(question, document)
    key = row_keys(rng, row + 1)[row]
    text = agent.text_prompter if spec.prompt_mode == "text" else None
    longest = (
        max(spec.text_update_length, spec.text_final_length)
        if text
        else max(spec.prefix_length + spec.rest_length, spec.final_length)
    )
    sampler = Sampler(agent.params, agent.config, keep_cache=False, max_prompt_length=longest)
    memory = list(spec.prompts.initial_memory)
    memory_text = agent.templates.initial_memory

    def decode(ids, skip):
        return tok.decode([int(t) for t in ids], skip_special_tokens=skip, clean_up_tokenization_spaces=False)

    if text:
        full = len(tok(question, add_special_tokens=False)["input_ids"])
        q_text = question if full == len(q_ids) else decode(q_ids, False)
    stops = set(spec.memory_sampling.stop_token_ids)
    steps = []
    for k, chunk in enumerate(split_chunks(doc_ids, agent.budgets.chunk_tokens)):
        if text:
            prompt = text.update_ids(q_text, memory_text, decode(chunk, False))
        else:
            prompt = spec.prompts.update.assemble({"question": q_ids, "memory": memory, "chunk": chunk})
        keys = step_keys(key[None], jax.numpy.int32(k))
        out = sampler.generate([prompt], spec.memory_sampling, rng=keys)
        response = out.tokens[0]
        memory = response[:-1] if response and response[-1] in stops and out.finished[0] else list(response)
        memory_text = decode(memory, True)
        steps.append(
            ReferenceStep(
                prompt_ids=prompt,
                prompt_text=tok.decode(prompt),
                response_ids=response,
                memory_ids=list(memory),
                logprobs=out.logprobs[0, : len(response)],
            )
        )
    if text:
        final_prompt = text.final_ids(q_text, memory_text)
    else:
        final_prompt = spec.prompts.final.assemble({"question": q_ids, "memory": memory})
    out = sampler.generate([final_prompt], spec.answer_sampling, rng=final_keys(key[None]))
    answer = out.tokens[0]
    text = tok.decode([t for t in answer if t not in stops], skip_special_tokens=True)
    return ReferenceResult(steps=steps, final_prompt_ids=final_prompt, answer_ids=answer, answer_text=text)
