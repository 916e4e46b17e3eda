"""Texts for training a tokenizer that covers the synthetic tasks, and a tokenizer-free length measure."""

from __future__ import annotations

from collections.abc import Iterator

from .config import SyntheticConfig
from .dataset import generate_samples
from .multihop_qa import QUESTIONS, RELATIONS
from .registry import TASKS
from .vocabulary import (
    ACTIONS,
    ADJECTIVES,
    COMPANY_SUFFIXES,
    KEY_COLOURS,
    KEY_CREATURES,
    LETTERS,
    NOUNS,
    PEOPLE,
    PREPOSITIONS,
    SLOTS,
    SYLLABLES,
    TEMPLATES,
    TIMES,
    VERBS,
)

__all__ = ["whitespace_counter", "vocabulary_texts", "tokenizer_corpus"]


def whitespace_counter(text: str) -> int:
    """A tokenizer-free length measure (whitespace-separated words); for drafts and corpora."""
    return len(text.split())


def vocabulary_texts() -> list[str]:
    """Strings covering every word, syllable, template and digit the built-in generators can emit."""
    texts = []
    for words in (ADJECTIVES, NOUNS, VERBS, PREPOSITIONS, TIMES, PEOPLE, ACTIONS, KEY_COLOURS, KEY_CREATURES):
        texts.append(" ".join(words) + ".")
    for t in TEMPLATES:
        texts.append(" " + " ".join(w if w not in SLOTS else SLOTS[w][0] for w in t) + ".")
    texts.append(" ".join(s.capitalize() for s in SYLLABLES))
    texts.append(" ".join(SYLLABLES))
    texts.append(" ".join(COMPANY_SUFFIXES))
    texts.append(" ".join(LETTERS))
    texts.append(" 0 1 2 3 4 5 6 7 8 9")
    texts.append(" The secret number for amber falcon is 1234567. What is the secret number for amber falcon?")
    texts.append(" The secret word for otter is Ven. What is the secret word for otter?")
    texts.append(" Remember otter Ven. Remember heron as otter. for otter Ven for heron ?")
    texts.append(" What are all the secret numbers for violet otter? What are the secret numbers for a, b and c?")
    texts.append(
        " Let ABCDE be 12345. Let FGHJK be ABCDE."
        " Which variables hold the value 12345, directly or through other variables?"
    )
    texts.extend(t.format(s="Kalo Mira", o="Venra") for t, _, _ in RELATIONS)
    texts.extend(q.format(p="Kalo Mira") for q in QUESTIONS)
    return texts


def tokenizer_corpus(num_samples: int = 24, num_tokens: int = 400, seed: int = 0) -> Iterator[str]:
    """Texts to train a tokenizer for the synthetic tasks (no tokenizer needed to make them).

    :func:`vocabulary_texts` 8 times, then, for every built-in task in :data:`~.registry.TASKS` order,
    ``num_samples`` small documents with their questions and answers (lengths measured in whitespace words).
    The same arguments give the same texts in the same order.  Pass it, plus the agent's prompt texts, to
    :func:`memagent_jax.data.tokenizer.train_tokenizer`.
    """
    vocab = vocabulary_texts()
    for _ in range(8):
        yield from vocab
    for task in TASKS:
        cfg = SyntheticConfig(task, num_tokens=num_tokens, seed=seed)
        for sample in generate_samples(cfg, num_samples, whitespace_counter):
            yield sample.question
            yield sample.text()
            yield " ".join(sample.answers)
