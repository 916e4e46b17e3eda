"""Warm start: supervised fine-tuning on scripted memory-agent trajectories.

A memory agent trained by RL must first be able to play the game: write notes in the expected shape, carry
them from step to step, and answer in ``\\boxed{}``. Instruct models arrive with that skill; a model made
from scratch (the CPU default job) gets it here, from trajectories written by a *scripted policy* over the
synthetic needle tasks, turned into the exact conversations the agent will later see (same prompt layouts,
same token ids) and trained with the SFT loss.

The script is deliberately imperfect, like an instruct model that was never taught what to keep: it notes
the fact the question asks about whenever it reads one, but at a section with nothing about the question it
rewrites its notes from that section alone with probability ``forget_prob`` (dropping what it had: the notes
go back to the initial "nothing yet" text), and it may note a look-alike fact for another key with
probability ``overwrite_prob``. On short documents that costs little; on long ones, with more sections after
the answer, the notes are lost more and more often. GRPO is what teaches the model to keep them.

    policy = ScriptedPolicy(overwrite_prob=0.7)
    convs = scripted_conversations(sample, doc_ids, tokenizer, prompts, budgets, policy, rng)
    batch = conversations_to_sft_batch(convs_of_many_samples, pad_id=0, rows_multiple=...)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from memagent_jax.agent.chunking import AgentBudgets
from memagent_jax.agent.templates import AgentPrompts, encode_text
from memagent_jax.rl.batch import ConversationBatch, build_conversation_batch

__all__ = [
    "ScriptedPolicy",
    "StraddlingFactError",
    "ScriptedConversation",
    "scripted_conversations",
    "conversations_to_sft_batch",
    "sft_learner_config",
    "fact_chunks",
]


class StraddlingFactError(ValueError):
    """A fact of the sample is split between two chunks (the script reads facts whole)."""


NOTE_STYLES = ("value", "fact", "keyed")
ANSWER_FORMS = ("noted", "spelled")


@dataclasses.dataclass(frozen=True)
class ScriptedPolicy:
    """How the scripted agent treats what it reads.

    forget_prob: probability, at a chunk without the asked fact, of dropping the notes (back to the initial
      memory text).
    overwrite_prob: probability of replacing the notes with a fact that answers a *different* key (a
      look-alike); the fact for the asked key is always noted.
    note_style: what the notes hold: 'value' (the fact's answer, as the document spells it), 'fact' (the
      whole fact sentence) or 'keyed' (" for <asked key> <answer>", and " for <asked key> ?" while the notes
      hold no answer: from the first chunk on, the notes name what is asked; the key comes first so the answer
      is the token that follows the key in the document's "Remember <key> <Word>." facts).
    unknown_answer: the boxed answer given when the notes hold no fact.
    answer_form: how the boxed answer writes the noted word. 'noted': with the very tokens the notes hold (the
      word with its leading space, `\\boxed{ Word}`), so the answer step copies one token from the notes.
      'spelled': as the text `\\boxed{Word}` tokenises, which after the brace is usually a different split
      (" Mor" is one token, "{Mor" is "{", "M", "or"): the answer step must then re-spell every word, a per-word
      lookup learned from few examples, where words that share a first piece ("Mor" and "Mi") are told apart
      only after it is written. That second choice is where a policy can collapse onto one piece.
    """

    forget_prob: float = 0.3
    overwrite_prob: float = 0.0
    note_style: str = "value"
    unknown_answer: str = "unknown"
    answer_form: str = "noted"

    def __post_init__(self):
        for name in ("forget_prob", "overwrite_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.note_style not in NOTE_STYLES:
            raise ValueError(f"note_style must be one of {NOTE_STYLES}, got {self.note_style!r}")
        if self.answer_form not in ANSWER_FORMS:
            raise ValueError(f"answer_form must be one of {ANSWER_FORMS}, got {self.answer_form!r}")


@dataclasses.dataclass(frozen=True)
class ScriptedConversation:
    """One prompt -> response pair of a scripted trajectory (ids exactly as the agent program builds them).

    kind: 'memory' or 'final'; step: the chunk index (the number of chunks for 'final')."""

    kind: str
    step: int
    prompt_ids: np.ndarray
    response_ids: np.ndarray


def fact_chunks(sample, chunk_tokens: int) -> list[int]:
    """The chunk index of every fact of a synthetic sample (facts are assumed not to straddle chunks)."""
    return [f.token_offset // chunk_tokens for f in sample.facts]


def scripted_conversations(
    sample,
    doc_ids: np.ndarray,
    tokenizer,
    prompts: AgentPrompts,
    budgets: AgentBudgets,
    policy: ScriptedPolicy,
    rng: np.random.Generator,
    stop_id: int,
) -> list[ScriptedConversation]:
    """The conversations of one scripted trajectory over a needle-task sample.

    Args:
      sample: a `data.synthetic.SyntheticSample` of a niah task (facts carry (key, relation, value) triples
        and token offsets into `doc_ids`).
      doc_ids: [D] the document's token ids as the agent reads them (`agent.chunking.tokenize_document`).
      prompts: the agent's prompt layouts (`AgentPrompts.build(tokenizer, templates)`).
      budgets: the agent's budgets; memories longer than `memory_tokens` are an error.
      policy: the scripted behaviour; rng: its randomness.
      stop_id: the end-of-turn token that closes every response.
    Returns:
      one 'memory' conversation per chunk, then the 'final' one.
    """
    c = budgets.chunk_tokens
    question_ids = encode_text(tokenizer, sample.question)
    asked = next((f.triple[0] for f in sample.facts if f.role == "answer"), None)
    by_chunk: dict[int, list] = {}
    for fact in sample.facts:
        start, end = fact.token_offset, fact.token_offset + fact.num_tokens
        if start // c != (end - 1) // c:
            raise StraddlingFactError(
                f"sample {sample.index}: a fact straddles chunks {start // c} and {(end - 1) // c}; "
                "generate with SyntheticConfig(chunk_aligned=True)"
            )
        by_chunk.setdefault(start // c, []).append(fact)

    memory = list(prompts.initial_memory)
    noted = None  # triple of the fact the notes hold
    # 'keyed' notes follow chains: " for <asked> as <next> ... <Word or ?>"; `path` holds the creatures after the
    # asked one whose pointer facts were read, and the last creature named is the one still looked for.
    path: list[str] = []

    def keyed(word: str) -> list[int]:
        return encode_text(tokenizer, "".join([f" for {asked}", *(f" as {k}" for k in path), f" {word}"]))

    out = []
    num_chunks = -(-len(doc_ids) // c)
    for k in range(num_chunks):
        chunk = doc_ids[k * c : (k + 1) * c]
        prompt = prompts.update.assemble({"question": question_ids, "memory": memory, "chunk": chunk})
        facts = by_chunk.get(k, [])
        chain = {asked, *path}
        if all(f.triple[0] not in chain for f in facts) and rng.random() < policy.forget_prob:
            memory, noted, path = list(prompts.initial_memory), None, []
        for fact in facts:
            looked_for = (path or [asked])[-1]
            if policy.note_style == "keyed" and fact.triple[0] == looked_for and fact.triple[1] == "same_word_as":
                path.append(fact.triple[2])  # a pointer: follow it, the word is still to be found
                noted = None
                memory = keyed("?")
            elif fact.triple[0] == looked_for or rng.random() < policy.overwrite_prob:
                if policy.note_style == "fact":
                    memory = [int(t) for t in doc_ids[fact.token_offset : fact.token_offset + fact.num_tokens]]
                elif policy.note_style == "keyed":
                    memory = keyed(fact.triple[2])
                else:
                    memory = encode_text(tokenizer, " " + fact.triple[2])
                noted = fact.triple
        if policy.note_style == "keyed" and noted is None:
            memory = keyed("?")
        if len(memory) + 1 > budgets.memory_tokens:
            raise ValueError(
                f"sample {sample.index}: notes of {len(memory)} tokens (+ stop) exceed "
                f"memory_tokens={budgets.memory_tokens}"
            )
        out.append(
            ScriptedConversation("memory", k, np.asarray(prompt, np.int32), np.asarray(memory + [stop_id], np.int32))
        )
    answer = noted[2] if noted is not None else policy.unknown_answer
    answer_ids = scripted_answer_ids(tokenizer, answer, policy.answer_form)
    if len(answer_ids) + 1 > budgets.answer_tokens:
        raise ValueError(f"sample {sample.index}: answer of {len(answer_ids)} tokens exceeds answer_tokens")
    prompt = prompts.final.assemble({"question": question_ids, "memory": memory})
    out.append(
        ScriptedConversation(
            "final", num_chunks, np.asarray(prompt, np.int32), np.asarray(answer_ids + [stop_id], np.int32)
        )
    )
    return out


def scripted_answer_ids(tokenizer, word: str, answer_form: str = "noted") -> list[int]:
    """The scripted final response's ids (before the stop token) for `word` (see `ScriptedPolicy.answer_form`)."""
    if answer_form == "spelled":
        return encode_text(tokenizer, "\\boxed{" + word + "}")
    if answer_form != "noted":
        raise ValueError(f"answer_form must be one of {ANSWER_FORMS}, got {answer_form!r}")
    return encode_text(tokenizer, "\\boxed{") + encode_text(tokenizer, " " + word) + encode_text(tokenizer, "}")


def conversations_to_sft_batch(
    conversations: Sequence[ScriptedConversation],
    *,
    pad_id: int = 0,
    rows_multiple: int = 1,
    length_multiple: int = 32,
    vocab_size: int | None = None,
) -> ConversationBatch:
    """Conversations as an SFT `ConversationBatch` (advantages 1, log-probs 0: the SFT loss ignores both)."""
    return build_conversation_batch(
        [c.prompt_ids for c in conversations],
        [c.response_ids for c in conversations],
        None,
        [1.0] * len(conversations),
        pad_id=pad_id,
        rows_multiple=rows_multiple,
        length_multiple=length_multiple,
        vocab_size=vocab_size,
    )


def sft_learner_config(
    *,
    learning_rate: float,
    updates: int,
    warmup: int = 0,
    updates_per_call: int = 1,
    min_lr_ratio: float = 0.1,
    lora=None,
):
    """The warm start's `LearnerConfig`: the SFT loss, AdamW without weight decay, warm-up then cosine to
    `min_lr_ratio` over `updates` optimiser updates, `updates_per_call` mini-batches per train step.

    lora: a `LoraConfig` or a config section (dict / ConfigDict, errors named `config.lora.<field>`); rank > 0
    trains adapters only: the `Learner` keeps the loaded params frozen as its base, and the fine-tuned model to
    export is `learner.policy_params(state)` (the base with the adapters merged in; `state.params` are the
    adapters, `models.lora.save_adapters` writes them alone)."""
    from memagent_jax.models import lora as lora_lib
    from memagent_jax.rl.learner import LearnerConfig, OptimizerConfig
    from memagent_jax.rl.losses import LossConfig

    if not isinstance(lora, lora_lib.LoraConfig):
        lora = lora_lib.lora_config(lora)
    return LearnerConfig(
        loss=LossConfig(kind="sft"),
        optimizer=OptimizerConfig(
            learning_rate=learning_rate,
            weight_decay=0.0,
            warmup_steps=min(warmup, updates - 1),
            schedule="cosine",
            total_steps=updates,
            min_lr_ratio=min_lr_ratio,
        ),
        num_minibatches=updates_per_call,
        compute_entropy=False,
        lora=lora,
    )
