"""The common part of every sample: facts, the filler haystack, placement, lazy rendering.

A sample's document is filler sentences (:func:`~.vocabulary.sentence_units`) with the task's facts inserted
between them.  It is described by a small :class:`Plan` (filler seed, sentence counts, where each fact goes) and
rendered on demand, piece by piece (:meth:`SyntheticSample.pieces`), so a multi-million-token document is never
one Python string unless :meth:`SyntheticSample.text` is called.

Token counts assume that the tokenizer splits text at a space followed by a word (true of byte-level BPE
tokenizers such as GPT-2's, Qwen's, Llama-3's and the ones made by :mod:`memagent_jax.data.tokenizer`): every
piece starts with a space and ends with a full stop, and the length of the whole is the sum of the lengths of
the pieces.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ..records import QARecord
from ..tokenizer import encode_fn
from .config import SyntheticConfig
from .registry import get_task
from .task import Draft
from .vocabulary import sentence_units

__all__ = ["Fact", "Plan", "SyntheticSample", "derive_seed", "layout", "answer_alone"]


@dataclasses.dataclass(frozen=True)
class Fact:
    """One inserted sentence.

    Attributes:
      text: the sentence as it appears (starts with a space, ends with a full stop).
      role: ``"answer"`` (states an answer), ``"support"`` (needed, but states no answer: earlier
        hops / earlier chain links) or ``"distractor"``.
      token_offset: tokens of the document before the fact.
      num_tokens: tokens of the fact itself.
      triple: ``(subject, relation, object)`` for needles, chain links and world facts.
    """

    text: str
    role: str
    token_offset: int
    num_tokens: int
    triple: tuple[str, str, str]


@dataclasses.dataclass(frozen=True)
class Plan:
    """How to render the haystack: filler RNG seed, sentence counts, where facts go."""

    filler_seed: int
    full_sentences: int
    partial_units: int  # words of the last, truncated sentence (0: none)
    insert_at: tuple[int, ...]  # per fact (in Fact order): filler sentences before it
    partial_skip: int = 0  # sentences drawn and passed over before the truncated one (for an exact fit)


@dataclasses.dataclass(frozen=True)
class SyntheticSample:
    """A generated question with a lazily rendered document.

    ``facts`` are in document order.  ``num_tokens`` is the planned document length.
    """

    task: str
    index: int
    question: str
    answers: tuple[str, ...]
    facts: tuple[Fact, ...]
    num_tokens: int
    metric: str
    reward_style: str
    config: SyntheticConfig
    _plan: Plan = dataclasses.field(repr=False)

    def pieces(self, omit: Iterable[int] = ()) -> Iterator[str]:
        """Yield the document as text pieces (sentences and facts), in order.

        ``omit``: indices into :attr:`facts` to leave out (for ablations: the document without a
        supporting fact).
        """
        omit = frozenset(omit)
        plan = self._plan
        rng = random.Random(plan.filler_seed)
        order = [(pos, i) for i, pos in enumerate(plan.insert_at)]
        k = 0
        total = plan.full_sentences + (1 if plan.partial_units else 0)
        for s in range(total + 1):
            while k < len(order) and order[k][0] == s:
                if order[k][1] not in omit:
                    yield self.facts[order[k][1]].text
                k += 1
            if s == total:
                break
            units = sentence_units(rng)
            if s == plan.full_sentences:  # the truncated last sentence
                for _ in range(plan.partial_skip):
                    units = sentence_units(rng)
                units = units[: plan.partial_units]
            yield "".join(units) + "."

    def text(self, omit: Iterable[int] = ()) -> str:
        """The whole document as one string (materialises it)."""
        return "".join(self.pieces(omit))

    def token_ids(self, tokenizer, *, block_chars: int = 1 << 16) -> Iterator[list[int]]:
        """Encode the document lazily: yields lists of token ids for consecutive blocks of pieces
        (each block about ``block_chars`` characters, cut between pieces)."""
        encode = encode_fn(tokenizer)
        block: list[str] = []
        size = 0
        for piece in self.pieces():
            block.append(piece)
            size += len(piece)
            if size >= block_chars:
                yield encode("".join(block))
                block, size = [], 0
        if block:
            yield encode("".join(block))

    def token_chunks(self, tokenizer, chunk_tokens: int) -> Iterator[list[int]]:
        """Yield the document's token ids in chunks of exactly ``chunk_tokens`` (last one shorter)."""
        if chunk_tokens <= 0:
            raise ValueError("chunk_tokens must be positive")
        buf: list[int] = []
        for ids in self.token_ids(tokenizer):
            buf.extend(ids)
            while len(buf) >= chunk_tokens:
                yield buf[:chunk_tokens]
                buf = buf[chunk_tokens:]
        if buf:
            yield buf

    def to_record(self, data_source: str | None = None) -> QARecord:
        """Materialise as a :class:`QARecord`: the question, the whole document text, the answers, the sample
        index, ``data_source`` (default ``"synthetic_<task>"``) and ``extra`` = {task, num_tokens, metric,
        reward_style, seed}."""
        return QARecord(
            question=self.question,
            document=self.text(),
            answers=self.answers,
            index=self.index,
            data_source=data_source or f"synthetic_{self.task}",
            extra={
                "task": self.task,
                "num_tokens": self.num_tokens,
                "metric": self.metric,
                "reward_style": self.reward_style,
                "seed": self.config.seed,
            },
        )


def derive_seed(*parts: Any) -> int:
    """A 64-bit seed from any printable parts; independent of Python's hash randomisation."""
    digest = hashlib.sha256("\x1f".join(repr(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def _place(cfg: SyntheticConfig, drafts: list[Draft], budget: int, rng: random.Random) -> list[float]:
    """Filler-token offsets for every draft.

    Ranked drafts (every draft has a ``rank``) go in rank order at random gaps, a ``tight`` one at its
    predecessor's offset.  Otherwise group 0 (the facts the answer needs, for chained tasks) is spread over
    separate equal segments of the document, at least ``chunk_tokens`` apart; other groups are ordered but
    unconstrained; ungrouped facts go at their depth or uniformly at random.  For a task with
    ``chains_in_any_order`` the segments and offsets of a group are shuffled among its facts.
    """
    any_order = get_task(cfg.task).chains_in_any_order
    offsets: list[float] = [0.0] * len(drafts)
    if drafts and all(d.rank >= 0 for d in drafts):  # explicit ordinals: random gaps, in rank order
        ranked = sorted(range(len(drafts)), key=lambda i: drafts[i].rank)
        points = iter(sorted(rng.random() * budget for i in ranked if not drafts[i].tight))
        prev = ranked[0]
        for i in ranked:  # a tight draft shares the previous one's gap (never the first: see keyed_recall.make)
            offsets[i] = offsets[prev] if drafts[i].tight else next(points)
            prev = i
        return offsets
    groups: dict[int, list[int]] = {}
    for i, d in enumerate(drafts):
        if d.group >= 0:
            groups.setdefault(d.group, []).append(i)
        elif d.depth is not None:
            offsets[i] = d.depth * budget
        else:
            offsets[i] = rng.random() * budget
    for g, members in sorted(groups.items()):
        if g == 0:
            n = len(members)
            gap = float(cfg.chunk_tokens or 0)
            seg = budget / n
            if gap > seg:
                raise ValueError(
                    f"{n} facts cannot be {cfg.chunk_tokens} tokens apart in a {cfg.num_tokens}-token document; "
                    "raise num_tokens or lower chunk_tokens"
                )
            order = list(range(n))
            if any_order:
                rng.shuffle(order)  # chain facts appear in any order
            for slot, i in zip(order, members):
                lo = slot * seg + gap / 2
                hi = (slot + 1) * seg - gap / 2
                offsets[i] = lo + rng.random() * max(hi - lo, 0.0)
        else:
            points = sorted(rng.random() * budget for _ in members)
            if any_order:
                rng.shuffle(points)
            for p, i in zip(points, members):
                offsets[i] = p
    return offsets


def answer_alone(facts: Sequence[Fact], chunk_tokens: int) -> bool:
    """No other fact starts or ends in a chunk that the asked fact occupies."""
    chunks = lambda f: {f.token_offset // chunk_tokens, (f.token_offset + f.num_tokens - 1) // chunk_tokens}
    asked = set().union(*(chunks(f) for f in facts if f.role == "answer"))
    return not any(chunks(f) & asked for f in facts if f.role != "answer")


def layout(
    config: SyntheticConfig, drafts: list[Draft], fact_tokens: list[int], budget: int, counter, index: int, attempt: int
) -> tuple[list[Fact], int, Plan]:
    """Places the facts in a haystack of filler -> (facts in document order, filler tokens, render plan).

    ``fact_tokens[i]`` is the length of ``drafts[i]``; ``budget`` the filler tokens to fill; ``counter`` a
    :data:`~memagent_jax.data.tokenizer.TokenCounter`.  Placement draws from a seed of (task, seed, index,
    attempt), the filler from a seed of (task, seed, index): a new ``attempt`` moves the facts, not the filler.
    """
    seed_parts = ("place", config.task, config.seed, index) + ((attempt,) if attempt else ())
    place_rng = random.Random(derive_seed(*seed_parts))
    offsets = _place(config, drafts, budget, place_rng)

    # Plan the filler: whole sentences while they fit, then one truncated sentence.
    filler_seed = derive_seed("filler", config.task, config.seed, index)
    rng = random.Random(filler_seed)
    order = sorted(range(len(drafts)), key=lambda i: (offsets[i], i))
    insert_at = [0] * len(drafts)
    filler_before = [0] * len(drafts)
    k = 0
    used = 0
    full = 0
    partial = partial_skip = 0
    period = counter(".")
    inserted = 0  # fact tokens placed so far
    align = config.chunk_tokens if config.chunk_aligned else None

    # A fact and the tight facts that follow it are placed as one block (the same chunk when aligned).
    order_pos = {i: p for p, i in enumerate(order)}

    def block_tokens(fact: int) -> int:
        size, p = fact_tokens[fact], order_pos[fact] + 1
        while p < len(order) and drafts[order[p]].tight:
            size += fact_tokens[order[p]]
            p += 1
        return size

    def straddles(fact: int) -> bool:
        if align is None or drafts[fact].tight:
            return False
        start = used + inserted
        return start // align != (start + block_tokens(fact) - 1) // align

    while True:
        while k < len(order) and offsets[order[k]] <= used and not straddles(order[k]):
            insert_at[order[k]] = full
            filler_before[order[k]] = used
            inserted += fact_tokens[order[k]]
            k += 1
        units = sentence_units(rng)
        counts = [counter(u) for u in units]
        size = sum(counts) + period
        if used + size <= budget and not (config.exact_length and budget - used - size == 1):
            used += size
            full += 1
            continue
        # Truncate: the longest prefix of words that still fits with its full stop, if any; when it leaves
        # tokens over, a few more drawn sentences are tried for a prefix that fills the budget exactly.
        room = budget - used - period
        choice = None
        for skip in range(16 if config.exact_length else 1):
            if skip:
                counts = [counter(u) for u in sentence_units(rng)]
            n = acc = 0
            while n < len(counts) and acc + counts[n] <= room:
                acc += counts[n]
                n += 1
            if choice is None or (acc == room and n > 0):
                choice = (skip, n, acc)
            if acc == room and n > 0:
                break
        skip, n, acc = choice
        if n > 0:
            partial, partial_skip = n, skip
            used += acc + period
        break
    end = full + (1 if partial else 0)
    while k < len(order):
        insert_at[order[k]] = end
        filler_before[order[k]] = used
        k += 1

    # Document order of facts and their token offsets.
    fact_order = sorted(range(len(drafts)), key=lambda i: (insert_at[i], offsets[i], i))
    facts: list[Fact] = []
    final_insert: list[int] = []
    inserted = 0
    for i in fact_order:
        offset = filler_before[i] + inserted
        facts.append(Fact(drafts[i].text, drafts[i].role, offset, fact_tokens[i], drafts[i].triple))
        final_insert.append(insert_at[i])
        inserted += fact_tokens[i]
    return facts, used, Plan(filler_seed, full, partial, tuple(final_insert), partial_skip)
