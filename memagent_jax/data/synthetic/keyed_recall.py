"""``keyed_recall``: recall the word stated for one creature among look-alike facts.

One fact " The secret word for <creature> is <Word>." for the asked creature, among ``num_distractors``
(default 3) look-alike facts for other creatures; asked "What is the secret word for <creature>?"; the answer is
the word.  Creatures (16, :data:`~.vocabulary.KEY_CREATURES`) and words (28, :data:`RECALL_WORDS`) come from
small closed sets, each one token for the tokenizers made by :mod:`memagent_jax.data.tokenizer`; look-alikes may
repeat each other (never the asked creature or its word), so a document can hold any number of them.

Placement is by ordinal, not depth: row ``index`` puts the asked fact at ordinal ``index % n`` of the
document's n facts, so over rows it takes every position equally often and "keep the last fact" scores 1/n.
``same_chunk_distractors`` look-alikes sit right beside it (before it where there is room), with no filler in
between; with ``chunk_aligned`` the block stays in one chunk.

Hops: with ``hops`` h > 1 (1..4) the asked creature's fact points to another's (" The secret word for <a> is the
one for <b>."), h - 1 times, and only the last creature's fact states the word; the chain's facts appear in
chain order, after the asked one.  Look-alikes never name a creature of the chain.

Pairs (``key_pairs``): each row draws one (asked, look-alike) pair; the pair's first creature is asked and every
look-alike fact is for its second (with its own word each time), so the document drills telling that pair apart.

Fact styles (``fact_style``, :data:`~.config.FACT_STYLES`): ``"sentence"`` as above; ``"pair"`` writes
" Remember <creature> <Word>." (pointers: " Remember <creature> as <creature>."), the word right after its key,
the form an induction circuit reads (see ``memagent_jax.models.induction``).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from .task import Draft, SyntheticTask
from .vocabulary import KEY_CREATURES, SYLLABLES

if TYPE_CHECKING:
    from .config import SyntheticConfig

__all__ = ["TASK", "RECALL_WORDS", "KEYED_FACTS", "make"]

RECALL_WORDS = tuple(s.capitalize() for s in SYLLABLES)

# Per fact style: (a fact stating a word, a pointer to another creature's fact).
KEYED_FACTS = {
    "sentence": (" The secret word for {key} is {word}.", " The secret word for {key} is the one for {target}."),
    "pair": (" Remember {key} {word}.", " Remember {key} as {target}."),
}

MAX_HOPS = 4


def make(cfg: SyntheticConfig, rng: random.Random, index: int) -> tuple[str, tuple[str, ...], list[Draft]]:
    """The asked fact, its look-alikes, and (hops > 1) the pointer facts that lead to it, all ranked.

    The asked fact (the first of the chain) takes the ordinal ``index % n`` among the n facts of the document;
    with hops > 1 the chain's later facts are then moved after it, in chain order.  ``same_chunk_distractors``
    look-alikes are marked ``tight`` to the asked fact (placed beside it with no filler between).
    """
    hops = cfg.resolved_hops
    if cfg.key_pairs:  # one drawn pair: its first creature is asked, every look-alike is for its second
        asked, lookalike = rng.choice(cfg.key_pairs)
        chain = [asked] + rng.sample([k for k in KEY_CREATURES if k not in (asked, lookalike)], hops - 1)
        others = [lookalike]
    else:
        chain = [rng.choice(KEY_CREATURES)]
        chain += rng.sample([k for k in KEY_CREATURES if k != chain[0]], hops - 1)
        others = [k for k in KEY_CREATURES if k not in chain]
    word = rng.choice(RECALL_WORDS)  # drawn after the chain in both forms (rows stay what they were)
    other_words = [w for w in RECALL_WORDS if w != word]
    drafts = []
    stating, pointing = KEYED_FACTS[cfg.fact_style]
    for h, (key, target) in enumerate(zip(chain, chain[1:] + [None])):
        role = "answer" if h == 0 else "support"
        if target is None:
            drafts.append(Draft(stating.format(key=key, word=word), role, (key, "secret_word", word)))
        else:
            drafts.append(Draft(pointing.format(key=key, target=target), role, (key, "same_word_as", target)))
    lookalikes = [
        Draft(stating.format(key=k, word=w), "distractor", (k, "secret_word", w))
        for k, w in ((rng.choice(others), rng.choice(other_words)) for _ in range(cfg.resolved_distractors))
    ]
    n = len(drafts) + len(lookalikes)
    near = min(cfg.same_chunk_distractors, len(lookalikes))
    # Ordinal of every draft in the document: the asked fact at index % n, its near look-alikes beside it
    # (before it where there is room), the rest in random order around them.
    asked_at = index % n
    first = max(0, min(asked_at - near, n - 1 - near - (len(drafts) - 1)))
    if near and asked_at == first:  # no room before: the near look-alikes follow
        block = [drafts[0]] + lookalikes[:near]
    else:
        block = lookalikes[:near] + [drafts[0]]
        asked_at = first + near
    rest = lookalikes[near:]
    rng.shuffle(rest)
    before, after = rest[:first], rest[first:]
    for support in drafts[1:]:  # the chain reads in order: each pointer before the fact it points to
        after.insert(
            rng.randint(
                after.index(drafts[drafts.index(support) - 1]) + 1 if drafts.index(support) > 1 else 0, len(after)
            ),
            support,
        )
    ordered = before + block + after
    for i, d in enumerate(ordered):
        d.rank = i
        d.tight = d in block[1:]  # placed right after the previous fact, no filler between
    question = f"What is the secret word for {chain[0]}?"
    return question, (word,), ordered


def _validate(cfg: SyntheticConfig) -> None:
    hops = cfg.resolved_hops
    if not 1 <= hops <= MAX_HOPS:
        raise ValueError(f"keyed_recall supports 1..{MAX_HOPS} hops, got {hops}")
    for i, pair in enumerate(cfg.key_pairs):
        if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(KEY_CREATURES):
            raise ValueError(
                f"key_pairs[{i}] must be two different creatures of KEY_CREATURES (asked, look-alike), got {pair!r}"
            )


TASK = SyntheticTask("keyed_recall", make, "string_match_all", "boxed_em", default_distractors=3, validate=_validate)
