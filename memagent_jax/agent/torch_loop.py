"""An independent memory-agent loop on a transformers PyTorch model, for cross-checking the JAX chunk scan.

    model = load_torch_model("/ckpt/exported")            # safetensors only, never remote code
    tokenizer = load_tokenizer("/ckpt/exported")
    out = torch_agent_run(model, tokenizer, "Who ...?", document_text, budgets=AgentBudgets(...))
    out.answer, out.memories                              # compare with MemoryAgent(...).run(..., trace=True)

Only the host-side prompt pieces are shared with the JAX agent (the chat-template layouts of
`AgentPrompts`, question preparation, document tokenization, centre truncation, chunk counting and the
default stop ids); generation is a plain greedy loop in torch with a KV cache (transformers' `cache`).
Every step's prompt is the unpadded concatenation the JAX program's static layout stands for:

    update step k:  U0 + question + U1 + memory_{k-1} + U2 + chunk_k + U3
    final step:     F0 + question + F1 + memory_K + F2

The memory carried to the next step is what the JAX program carries (`program._memory_from_response`):
the sampled ids with the trailing stop token removed when one was emitted, otherwise all
`budgets.memory_tokens` ids (cut at the budget, possibly mid-word); never re-tokenized, never padded.
A memory may be empty (the model stopped at once). The answer ids keep their stop token, and the answer
text is decoded without stop ids and with `skip_special_tokens=True`, like `AgentResult.answers`.

With `templates.prompt_mode == 'text'` every prompt is instead the whole formatted string tokenized once
(`TextPrompter`), the memory decoded to text and the chunk decoded from its ids, as the JAX text mode does.

This module itself imports no JAX (importing the `memagent_jax.agent` package does, through its
`__init__`).
"""

from __future__ import annotations

import dataclasses
import os
import types
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from memagent_jax.agent.chunking import (
    AgentBudgets,
    AgentInputError,
    centre_truncate,
    num_chunks,
    prepare_question,
    tokenize_document,
)
from memagent_jax.agent.runner import default_stop_ids
from memagent_jax.agent.templates import AgentPrompts, AgentTemplates, TextPrompter


@dataclasses.dataclass
class TorchAgentResult:
    """One (question, document) row run by `torch_agent_run`.

    answer: the answer text (stop ids removed, special tokens skipped); answer_ids: the generated answer
    ids, stop token included when one was emitted. memories / memory_ids: the memory after every chunk
    (text, and the exact ids carried to the next step). response_ids: every chunk step's generated ids
    (stop token included); prompt_ids: every chunk step's unpadded prompt; final_prompt_ids: the final
    step's prompt; finished: whether the answer ended with a stop token.
    """

    answer: str
    answer_ids: list[int]
    memories: list[str]
    memory_ids: list[list[int]]
    response_ids: list[list[int]] = dataclasses.field(default_factory=list)
    prompt_ids: list[list[int]] = dataclasses.field(default_factory=list)
    final_prompt_ids: list[int] = dataclasses.field(default_factory=list)
    finished: bool = False


def load_torch_model(folder: str | os.PathLike):
    """A transformers causal LM from a Hugging Face folder, in f32 and eval mode.

    Weights are read from safetensors only (`use_safetensors=True`) and no code from the folder is run
    (`trust_remote_code=False`).
    """
    import transformers

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder {folder!r} does not exist")
    if not any(name.endswith(".safetensors") or name == "model.safetensors.index.json" for name in os.listdir(folder)):
        raise FileNotFoundError(f"model folder {folder!r} has no .safetensors weights")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
    )
    return model.eval()


def model_eos_ids(model) -> tuple[int, ...]:
    """EOS ids named by the model's config (`eos_token_id`: one id or a list), like `ModelConfig.eos_token_ids`."""
    eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def torch_stop_ids(model, tokenizer) -> tuple[int, ...]:
    """The stop ids `MemoryAgent` uses by default for the same checkpoint (model EOS + tokenizer EOS +
    ChatML's <|im_end|>)."""
    return default_stop_ids(tokenizer, types.SimpleNamespace(eos_token_ids=model_eos_ids(model)))


def _cache_kwarg(model) -> str:
    """The name the model's forward takes its KV cache by: `cache` (transformers >= 5.x, where `past_key_values`
    is deprecated for removal in 5.40) or `past_key_values` (earlier 5.x releases)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@torch.no_grad()
def greedy_generate(
    model, prompt_ids: Sequence[int], max_new_tokens: int, stop_token_ids: Iterable[int] = ()
) -> tuple[list[int], bool]:
    """Greedy decoding of one unpadded prompt with a KV cache -> (new ids, stop token emitted).

    The stop token is included in the returned ids; at most `max_new_tokens` ids are produced. Ties in
    the argmax go to the lowest id (torch.argmax returns the first maximum), as in the JAX sampler.
    """
    stops = {int(s) for s in stop_token_ids}
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    out = model(input_ids=input_ids, use_cache=True)
    past = _returned_cache(out)
    logits = out.logits[0, -1]
    new: list[int] = []
    for i in range(max_new_tokens):
        token = int(torch.argmax(logits.float()))
        new.append(token)
        if token in stops:
            return new, True
        if i + 1 == max_new_tokens:
            break
        out = model(
            input_ids=torch.tensor([[token]], dtype=torch.long, device=device),
            use_cache=True,
            **{_cache_kwarg(model): past},
        )
        past = _returned_cache(out)
        logits = out.logits[0, -1]
    return new, False


def _document_ids(tokenizer, document, budgets: AgentBudgets) -> np.ndarray:
    if isinstance(document, np.ndarray):
        ids = document.astype(np.int32)
        if ids.size == 0:
            raise AgentInputError("document: the document is empty")
    else:
        ids = tokenize_document(tokenizer, document, source="document")
    return centre_truncate(ids, budgets.max_document_tokens)


def torch_agent_run(
    model,
    tokenizer,
    question: str,
    document,
    *,
    budgets: AgentBudgets = AgentBudgets(),
    templates: AgentTemplates = AgentTemplates(),
    stop_token_ids: Sequence[int] | None = None,
) -> TorchAgentResult:
    """Runs one (question, document) row through the memory agent, greedily, in torch.

    Args:
      model: a transformers causal LM (e.g. from `load_torch_model`).
      tokenizer: the Hugging Face tokenizer (with chat template) the JAX agent uses.
      question: the question text (prepared like `MemoryAgent`: empty -> error, over budget -> error or
        truncation per `budgets.question_overflow`).
      document: text, an iterable of text pieces, or a token id array (centre-truncated to
        `budgets.max_document_tokens` when that is set).
      budgets: token budgets; chunk_tokens, memory_tokens and answer_tokens are used.
      templates: the prompt wording.
      stop_token_ids: None = `MemoryAgent`'s default for this checkpoint; () = fixed-length generation.
    """
    prompts = AgentPrompts.build(tokenizer, templates)
    if len(prompts.initial_memory) > budgets.memory_tokens:
        raise AgentInputError(
            f"the initial memory has {len(prompts.initial_memory)} tokens, more than "
            f"budgets.memory_tokens ({budgets.memory_tokens})"
        )
    stops = tuple(torch_stop_ids(model, tokenizer)) if stop_token_ids is None else tuple(int(s) for s in stop_token_ids)
    q_ids = prepare_question(tokenizer, question, budgets, source="question").tolist()
    doc_ids = _document_ids(tokenizer, document, budgets)
    c = budgets.chunk_tokens
    memory = list(prompts.initial_memory)
    text = TextPrompter(tokenizer, templates) if templates.prompt_mode == "text" else None

    def decode(ids, skip):
        return tokenizer.decode(list(ids), skip_special_tokens=skip, clean_up_tokenization_spaces=False)

    if text:
        whole = len(tokenizer(question, add_special_tokens=False)["input_ids"]) == len(q_ids)
        q_text, memory_text = (question if whole else decode(q_ids, False)), templates.initial_memory
    result = TorchAgentResult(answer="", answer_ids=[], memories=[], memory_ids=[])
    for k in range(num_chunks(doc_ids.size, c)):
        chunk = doc_ids[k * c : (k + 1) * c].tolist()
        if text:
            prompt = text.update_ids(q_text, memory_text, decode(chunk, False))
        else:
            prompt = prompts.update.assemble({"question": q_ids, "memory": memory, "chunk": chunk})
        response, stopped = greedy_generate(model, prompt, budgets.memory_tokens, stops)
        # The JAX program's carried memory: response minus its stop token (memory_len = response_len - finished).
        memory = response[:-1] if stopped else list(response)
        result.prompt_ids.append(prompt)
        result.response_ids.append(response)
        result.memory_ids.append(list(memory))
        result.memories.append(tokenizer.decode(memory, skip_special_tokens=True))
        if text:
            memory_text = decode(memory, True)
    if text:
        final_prompt = text.final_ids(q_text, memory_text)
    else:
        final_prompt = prompts.final.assemble({"question": q_ids, "memory": memory})
    answer, finished = greedy_generate(model, final_prompt, budgets.answer_tokens, stops)
    stop_set = set(stops)
    result.final_prompt_ids = final_prompt
    result.answer_ids = answer
    result.finished = finished
    result.answer = tokenizer.decode([t for t in answer if t not in stop_set], skip_special_tokens=True)
    return result
