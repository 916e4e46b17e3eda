"""Generating samples and rows: :func:`generate_sample`, :class:`SyntheticDataset`, :func:`concatenated_records`.

What a seed determines: sample ``index`` of a config is a pure function of (config, index, tokenizer's token
counts).  Three RNGs are seeded from SHA-256 digests of printable parts (:func:`~.document.derive_seed`, so the
same in every process whatever ``PYTHONHASHSEED``):

  * the task RNG, from (task, seed, index, resolved num_distractors, resolved hops, num_values, num_queries):
    the question, the answers and the facts' wording (never ``num_tokens``, so one index asks the same question
    at every length);
  * the placement RNG, from (task, seed, index[, attempt]): where the facts go;
  * the filler RNG, from (task, seed, index): the filler sentences.

The tokenizer only measures lengths: it decides how much filler fits, not which words are drawn.

Guarantees (tested): the document length is within 2% of ``num_tokens`` (usually within 2 tokens) and
:attr:`~.document.SyntheticSample.num_tokens` is its exact length for tokenizers that split at spaces; the
answer strings occur in the document only inside the facts that state them.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Iterator, Sequence

from ..records import QARecord
from ..tokenizer import TokenCounter, token_counter
from .config import SyntheticConfig
from .document import SyntheticSample, answer_alone, derive_seed, layout
from .registry import get_task

__all__ = ["generate_sample", "generate_samples", "SyntheticDataset", "concatenated_records"]


def generate_sample(config: SyntheticConfig, index: int, tokenizer) -> SyntheticSample:
    """Generate sample ``index`` of ``config``; ``tokenizer`` measures lengths (see
    :func:`memagent_jax.data.tokenizer.token_counter` for what it may be)."""
    counter: TokenCounter = token_counter(tokenizer)
    task = get_task(config.task)
    task_rng = random.Random(
        derive_seed(
            "task",
            config.task,
            config.seed,
            index,
            config.resolved_distractors,
            config.resolved_hops,
            config.num_values,
            config.num_queries,
        )
    )
    question, answers, drafts = task.make(config, task_rng, index)

    fact_tokens = [counter(d.text) for d in drafts]
    budget = config.num_tokens - sum(fact_tokens)
    if budget < 0:
        raise ValueError(f"the facts alone take {sum(fact_tokens)} tokens, more than num_tokens={config.num_tokens}")
    for attempt in range(256):
        facts, used, plan = layout(config, drafts, fact_tokens, budget, counter, index, attempt)
        if not config.isolate_answer or answer_alone(facts, config.chunk_tokens):
            break
    else:
        raise ValueError(
            f"sample {index}: no placement keeps the asked fact alone in its chunk; lower "
            "num_distractors or raise num_tokens"
        )
    return SyntheticSample(
        task=config.task,
        index=int(index),
        question=question,
        answers=tuple(answers),
        facts=tuple(facts),
        num_tokens=used + sum(fact_tokens),
        metric=task.metric,
        reward_style=task.reward_style,
        config=config,
        _plan=plan,
    )


def generate_samples(
    config: SyntheticConfig, num_samples: int, tokenizer, *, start: int = 0
) -> Iterator[SyntheticSample]:
    """Yield samples ``start .. start + num_samples - 1`` of ``config``."""
    counter = token_counter(tokenizer)
    for i in range(start, start + num_samples):
        yield generate_sample(config, i, counter)


class SyntheticDataset(Sequence[SyntheticSample]):
    """``num_samples`` samples of ``config`` as a random-access sequence (generated on access).

    Usable as the source of :class:`~memagent_jax.data.iterator.ShardedIterator` or of
    :func:`~memagent_jax.data.tfds_builder.build_arrayrecord`.
    """

    def __init__(self, config: SyntheticConfig, tokenizer, num_samples: int):
        self.config = config
        self.counter = token_counter(tokenizer)
        self.num_samples = int(num_samples)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        return generate_sample(self.config, i, self.counter)

    def records(self) -> Iterator[QARecord]:
        """Every sample as a materialised :class:`QARecord`."""
        for i in range(len(self)):
            yield self[i].to_record()


def concatenated_records(
    config: SyntheticConfig, num_rows: int, parts: int, tokenizer, *, data_source: str | None = None
) -> Iterator[QARecord]:
    """Rows whose document is ``parts`` documents of ``config`` joined end to end, asked about one that is not
    the last (a document the generator never made: several documents' worth of facts, the asked one followed
    by other documents' look-alikes).

    Row r asks the question of the r-th sample (in index order) whose length is exactly ``config.num_tokens``,
    placed at part ``p`` (0 <= p < parts - 1, seeded by (task, seed, r)); the other parts are exact-length
    samples drawn in order from indices 1_000_000 + ... that name none of the asked sample's fact subjects and
    none of its answers, so the answer stays unique.  As every part has exactly ``config.num_tokens`` tokens,
    with ``chunk_aligned`` every part starts on a chunk boundary and its facts stay whole in their chunks.

    Each row is a :class:`QARecord` with index r, ``data_source`` (default ``"synthetic_<task>_concat"``) and
    ``extra`` = {task, parts, asked_part, asked_index, metric, seed}.
    """
    if parts < 2:
        raise ValueError(f"parts must be >= 2 (the asked document is never the last), got {parts}")
    counter = token_counter(tokenizer)
    exact = lambda sample: sample.num_tokens == config.num_tokens
    asked_index = filler_index = 0
    filler_base = 1_000_000
    for r in range(num_rows):
        while not exact(asked := generate_sample(config, asked_index, counter)):
            asked_index += 1
        asked_index += 1
        subjects = {f.triple[0] for f in asked.facts if f.role != "distractor"}
        banned = subjects | set(asked.answers)
        rng = random.Random(derive_seed("concat", config.task, config.seed, r))
        position = rng.randrange(parts - 1)
        others = []
        while len(others) < parts - 1:
            sample = generate_sample(config, filler_base + filler_index, counter)
            filler_index += 1
            if exact(sample) and not any(f.triple[0] in banned or f.triple[2] in banned for f in sample.facts):
                others.append(sample)
        docs = others[:position] + [asked] + others[position:]
        yield QARecord(
            question=asked.question,
            document="".join(d.text() for d in docs),
            answers=asked.answers,
            index=r,
            data_source=data_source or f"synthetic_{config.task}_concat",
            extra={
                "task": config.task,
                "parts": parts,
                "asked_part": position,
                "asked_index": asked.index,
                "metric": asked.metric,
                "seed": config.seed,
            },
        )


def other_fact_records(
    config: SyntheticConfig, num_rows: int, tokenizer, *, data_source: str | None = None
) -> Iterator[QARecord]:
    """Rows asking each document about a look-alike's fact instead of the fact its generator picked.

    The generator places the asked fact at ordinal ``index % n`` with ``same_chunk_distractors`` look-alikes right
    beside it; these rows keep the document and ask about a look-alike instead: one whose subject no other fact of
    the document names, so its answer is unique (chosen by a seeded draw among those).  A policy that learned where
    the generator tends to put the answer, or which fact looks "asked", fails here; one that follows the question
    does not.  Only facts that state a value (relation other than a pointer) are asked; samples without a
    suitable look-alike are skipped, so row r asks about sample ``index`` >= r.

    Each row is a :class:`QARecord` with index r, ``data_source`` (default ``"synthetic_<task>_other_fact"``) and
    ``extra`` = {task, source_index, num_tokens, metric, seed}.
    """
    counter = token_counter(tokenizer)
    index = 0
    for r in range(num_rows):
        while True:
            sample = generate_sample(config, index, counter)
            index += 1
            subjects = collections.Counter(f.triple[0] for f in sample.facts)
            chain = {f.triple[0] for f in sample.facts if f.role != "distractor"}
            choices = [
                f
                for f in sample.facts
                if f.role == "distractor" and subjects[f.triple[0]] == 1 and f.triple[0] not in chain
            ]
            if choices:
                break
            if index > 100 * (num_rows + 1):
                raise ValueError(f"{config.task}: too few samples with a look-alike to ask about (row {r})")
        fact = random.Random(derive_seed("other_fact", config.task, config.seed, r)).choice(choices)
        key, _, value = fact.triple
        question = sample.question
        asked_key = next(f.triple[0] for f in sample.facts if f.role == "answer")
        if question.count(asked_key) != 1:
            raise ValueError(f"{config.task}: sample {sample.index}'s question does not name its subject once")
        yield QARecord(
            question=question.replace(asked_key, key),
            document=sample.text(),
            answers=(value,),
            index=r,
            data_source=data_source or f"synthetic_{config.task}_other_fact",
            extra={
                "task": config.task,
                "source_index": sample.index,
                "num_tokens": sample.num_tokens,
                "metric": sample.metric,
                "seed": config.seed,
            },
        )
