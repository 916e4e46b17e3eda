"""RULER-style synthetic long-document tasks: seeded, deterministic, no downloads, lazy documents.

Every sample is a question, a document of a target length *in tokens of a given tokenizer*, and
the accepted answers.  The document is a haystack of bland generated sentences with a few inserted
facts ("needles"); it is described by a small plan and rendered on demand, piece by piece, so a
multi-million-token document is never one Python string unless :meth:`SyntheticSample.text` is
called.

Tasks (:data:`TASKS`):

``niah_single``
    One needle "The secret number for <key> is <7 digits>."; asked for that number.
``niah_multikey``
    The same, with ``num_distractors`` (default 3) needles for other keys.
``niah_multivalue``
    ``num_values`` (default 4) needles give the asked key different numbers; all are wanted.
``niah_multiquery``
    ``num_queries`` (default 4) keys are asked for at once; all their numbers are wanted.
``keyed_recall``
    One fact "The secret word for <creature> is <Word>." for the asked creature, among
    ``num_distractors`` (default 3) look-alike facts for other creatures; keys and words come from
    small closed sets (16 creatures, 28 words, each one token for the tokenizers made here) and
    look-alikes may repeat each other, so a document can hold any number of them.  The asked fact
    takes every ordinal among the document's facts equally often over rows (row ``index`` puts it at
    ``index % n`` of n), so "keep the last fact" scores 1/n; ``same_chunk_distractors`` look-alikes
    sit right beside it.  With ``hops`` h > 1 the asked creature's fact points to another's ("... is
    the one for <creature>."), h - 1 times (multi-hop).  The memory task of the CPU default job: what
    to keep is the whole difficulty, not how to copy.  ``fact_style="pair"`` writes every fact as
    "Remember <creature> <Word>." (pointers: "Remember <creature> as <creature>."), the word right after
    its key, which is the form an induction circuit reads (see ``memagent_jax.models.induction``).
``variable_tracking``
    A chain "Let <A> be 12345." "Let <B> be <A>." ... of ``hops`` (default 4) copies; asked which
    variables hold the value (all ``hops + 1`` names are wanted).  ``num_distractors`` (default 2)
    other chains hold other values.  The statements of a chain appear in order.
``multihop_qa``
    A generated world: people work for companies, companies have main offices in cities, cities lie
    in provinces, provinces belong to countries.  The question names a person and asks for the
    entity ``hops`` (default 2, 1..4) relations away; every hop is a separate fact, and the answer
    needs all of them.  ``num_distractors`` (default 3) other people come with complete chains of
    their own (other companies, cities, ...), so no fact can be skipped by elimination.

Knobs (:class:`SyntheticConfig`): ``num_tokens`` (target document length), ``num_distractors``,
``hops``, ``depth`` (relative position 0..1 of the answer needle(s); ``None``: random per
sample; not used by ``keyed_recall``, which balances the ordinal instead), ``same_chunk_distractors``, ``num_values``, ``num_queries``, ``chunk_tokens`` (when set, the facts the answer needs
start at least this many tokens apart, so with chunks of this size no chunk holds two of them),
``chunk_aligned`` (with ``chunk_tokens``: no fact straddles a multiple of ``chunk_tokens``; a fact
that would is moved past the next filler sentence(s), so every fact is read whole by one chunk
step), ``value_digits`` (digits of the niah numbers, default 7), ``seed``.

Guarantees (tested): the same config, index and tokenizer give the same sample in any process;
the document length is within 2% of ``num_tokens`` (usually within 2 tokens); the answer strings
occur in the document only inside the facts that state them; question and answers do not depend
on ``num_tokens``, so one index gives the same question at every length.

Token counts assume that the tokenizer splits text at a space followed by a word (true of
byte-level BPE tokenizers such as GPT-2's, Qwen's, Llama-3's and the ones made by
:mod:`memagent_jax.data.tokenizer`): every piece starts with a space and ends with a full stop,
and the length of the whole is the sum of the lengths of the pieces.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Any, Callable, Iterable, Iterator, Sequence

from .records import QARecord
from .tokenizer import TokenCounter, encode_fn, token_counter

__all__ = [
    "TASKS",
    "SyntheticConfig",
    "Fact",
    "SyntheticSample",
    "SyntheticDataset",
    "generate_sample",
    "generate_samples",
    "concatenated_records",
    "vocabulary_texts",
    "tokenizer_corpus",
    "whitespace_counter",
]

TASKS = (
    "niah_single",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "keyed_recall",
    "variable_tracking",
    "multihop_qa",
)

# Per task: metric for evaluation and reward style for training (see memagent_jax.evaluation.verifier).
_TASK_METRIC = {
    "niah_single": ("string_match_all", "boxed_em"),
    "niah_multikey": ("string_match_all", "boxed_em"),
    "niah_multivalue": ("string_match_all", "boxed_all"),
    "niah_multiquery": ("string_match_all", "boxed_all"),
    "keyed_recall": ("string_match_all", "boxed_em"),
    "variable_tracking": ("string_match_all", "boxed_all"),
    "multihop_qa": ("sub_em", "boxed_em"),
}
_DEFAULT_DISTRACTORS = {
    "niah_single": 0,
    "niah_multikey": 3,
    "niah_multivalue": 0,
    "niah_multiquery": 0,
    "keyed_recall": 3,
    "variable_tracking": 2,
    "multihop_qa": 3,
}
_DEFAULT_HOPS = {"variable_tracking": 4, "multihop_qa": 2}

# ---------------------------------------------------------------------------------------------
# Word lists (our own).  Filler words are lower-case and never used in keys or names.
# ---------------------------------------------------------------------------------------------

_ADJECTIVES = (
    "quiet", "old", "small", "green", "calm", "wide", "narrow", "gentle", "bright", "dusty",
    "warm", "cold", "busy", "empty", "long", "short", "soft", "plain", "distant", "simple",
)
_NOUNS = (
    "river", "road", "field", "house", "garden", "bridge", "market", "hill", "window", "door",
    "boat", "tree", "lamp", "wall", "path", "cart", "well", "roof", "fence", "stone",
    "harbor", "valley", "meadow", "orchard", "village", "tower", "mill", "barn", "pond", "gate",
)
_VERBS = (
    "stood", "waited", "rested", "leaned", "stayed", "turned", "shifted", "settled", "remained", "lay",
)
_PREPOSITIONS = ("near", "beside", "behind", "under", "past", "across", "beyond", "around")
_TIMES = ("morning", "evening", "night", "winter", "summer", "spring", "autumn", "noon")
_PEOPLE = ("farmer", "baker", "teacher", "child", "traveler", "painter", "sailor", "keeper")
_ACTIONS = ("walked", "looked", "watched", "listened", "worked", "waved", "smiled", "paused")

# Sentence templates: slot names are word lists, other items are literal words.
_TEMPLATES = (
    ("The", "ADJ", "NOUN", "VERB", "PREP", "the", "NOUN"),
    ("In", "the", "TIME", "the", "NOUN", "VERB", "PREP", "the", "ADJ", "NOUN"),
    ("A", "PERSON", "ACTION", "PREP", "the", "NOUN"),
    ("The", "PERSON", "ACTION", "and", "the", "NOUN", "VERB", "ADJ"),
    ("Every", "TIME", "the", "ADJ", "NOUN", "VERB", "PREP", "a", "NOUN"),
    ("Nothing", "changed", "at", "the", "NOUN", "that", "TIME"),
)
_SLOTS = {
    "ADJ": _ADJECTIVES,
    "NOUN": _NOUNS,
    "VERB": _VERBS,
    "PREP": _PREPOSITIONS,
    "TIME": _TIMES,
    "PERSON": _PEOPLE,
    "ACTION": _ACTIONS,
}
# Pre-spaced unit tables (" river") per slot, and for literals.
_SLOT_UNITS = {k: tuple(" " + w for w in v) for k, v in _SLOTS.items()}
_TEMPLATE_UNITS = tuple(tuple(_SLOT_UNITS.get(item, " " + item) for item in t) for t in _TEMPLATES)

_FILLER_WORDS = frozenset(
    w.lower() for t in _TEMPLATES for item in t for w in (_SLOTS.get(item, (item,)))
)

# Needle keys: colour + creature, neither in the filler.
_KEY_COLOURS = (
    "amber", "violet", "crimson", "silver", "golden", "ivory", "scarlet", "azure", "olive", "coral",
    "indigo", "copper", "jade", "ruby", "pearl", "sable",
)
_KEY_CREATURES = (
    "falcon", "otter", "badger", "heron", "lynx", "marten", "osprey", "beetle", "salmon", "gecko",
    "bison", "raven", "walrus", "ferret", "puffin", "moth",
)
# Syllables for generated names (capitalised when joined).
_SYLLABLES = (
    "ka", "lo", "mi", "ra", "ven", "tor", "sel", "dra", "pim", "qua", "zor", "bel", "nix", "fen",
    "gal", "hu", "ish", "jun", "mor", "ost", "pel", "rin", "sab", "tev", "ul", "wex", "yor", "cas",
)
_COMPANY_SUFFIXES = ("Works", "Labs", "Foundry", "Traders", "Holdings", "Textiles")
_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"

# Multi-hop relations: (fact template, subject kind, object kind).
_RELATIONS = (
    (" {s} works for {o}.", "person", "company"),
    (" {s} has its main office in {o}.", "company", "city"),
    (" {s} lies in the province of {o}.", "city", "province"),
    (" The province of {s} belongs to the country of {o}.", "province", "country"),
)
_RELATION_NAMES = ("works_for", "main_office_in", "in_province", "in_country")
_MULTIHOP_QUESTIONS = (
    "Which company does {p} work for?",
    "In which city does the company that {p} works for have its main office?",
    "In which province is the city where the company that {p} works for has its main office?",
    "To which country belongs the province of the city where the company that {p} works for has its main office?",
)


# ---------------------------------------------------------------------------------------------
# Public data types
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """What to generate.  ``None`` knobs take the task's default (see the module docstring)."""

    task: str
    num_tokens: int
    num_distractors: int | None = None
    hops: int | None = None
    depth: float | None = None
    num_values: int = 4
    num_queries: int = 4
    chunk_tokens: int | None = None
    chunk_aligned: bool = False
    value_digits: int = 7
    same_chunk_distractors: int = 0
    isolate_answer: bool = False
    exact_length: bool = False
    fact_style: str = "sentence"
    seed: int = 0

    def __post_init__(self):
        if self.fact_style not in FACT_STYLES:
            raise ValueError(f"fact_style must be one of {FACT_STYLES}, got {self.fact_style!r}")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {TASKS}")
        if self.num_tokens <= 0:
            raise ValueError("num_tokens must be positive")
        if self.depth is not None and not 0.0 <= self.depth <= 1.0:
            raise ValueError("depth must be in [0, 1]")
        if self.num_distractors is not None and self.num_distractors < 0:
            raise ValueError("num_distractors must be >= 0")
        hops = self.resolved_hops
        if self.task == "multihop_qa" and not 1 <= hops <= len(_RELATIONS):
            raise ValueError(f"multihop_qa supports 1..{len(_RELATIONS)} hops, got {hops}")
        if self.task == "keyed_recall" and not 1 <= hops <= 4:
            raise ValueError(f"keyed_recall supports 1..4 hops, got {hops}")
        if self.same_chunk_distractors < 0:
            raise ValueError("same_chunk_distractors must be >= 0")
        if self.isolate_answer and (not self.chunk_tokens or self.same_chunk_distractors):
            raise ValueError("isolate_answer needs chunk_tokens and same_chunk_distractors=0")
        if self.task == "variable_tracking" and hops < 1:
            raise ValueError("variable_tracking needs hops >= 1")
        if self.num_values < 1 or self.num_queries < 1:
            raise ValueError("num_values and num_queries must be >= 1")
        if self.chunk_tokens is not None and self.chunk_tokens <= 0:
            raise ValueError("chunk_tokens must be positive")
        if not 1 <= self.value_digits <= 12:
            raise ValueError("value_digits must be in 1..12")
        if self.chunk_aligned and not self.chunk_tokens:
            raise ValueError("chunk_aligned needs chunk_tokens")

    @property
    def resolved_distractors(self) -> int:
        return _DEFAULT_DISTRACTORS[self.task] if self.num_distractors is None else self.num_distractors

    @property
    def resolved_hops(self) -> int:
        return _DEFAULT_HOPS.get(self.task, 1) if self.hops is None else self.hops

    @property
    def metric(self) -> str:
        """Evaluation metric name (a key of ``memagent_jax.evaluation.verifier.METRICS``)."""
        return _TASK_METRIC[self.task][0]

    @property
    def reward_style(self) -> str:
        """Training reward style (a key of ``memagent_jax.evaluation.verifier.REWARD_STYLES``)."""
        return _TASK_METRIC[self.task][1]

    def replace(self, **changes) -> "SyntheticConfig":
        return dataclasses.replace(self, **changes)


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
class _Plan:
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
    _plan: _Plan = dataclasses.field(repr=False)

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
            units = _sentence_units(rng)
            if s == plan.full_sentences:  # the truncated last sentence
                for _ in range(plan.partial_skip):
                    units = _sentence_units(rng)
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
        """Materialise as a :class:`QARecord` (document text included)."""
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


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def _derive_seed(*parts: Any) -> int:
    """A 64-bit seed from any printable parts; independent of Python's hash randomisation."""
    digest = hashlib.sha256("\x1f".join(repr(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def _sentence_units(rng: random.Random) -> list[str]:
    template = _TEMPLATE_UNITS[rng.randrange(len(_TEMPLATE_UNITS))]
    return [rng.choice(u) if isinstance(u, tuple) else u for u in template]


class _Names:
    """Unique generated names that never contain (or hide in) each other or any filler word."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: list[str] = []

    def _ok(self, name: str) -> bool:
        low = name.lower()
        for part in low.split():
            if any(part in w or w in part for w in _FILLER_WORDS if len(w) > 2) or part in _FILLER_WORDS:
                return False
        return not any(low in u or u in low for u in self.used)

    def take(self, make: Callable[[random.Random], str]) -> str:
        for _ in range(10_000):
            name = make(self.rng)
            if self._ok(name):
                self.used.append(name.lower())
                return name
        raise RuntimeError("could not find a fresh name; too many entities requested")


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()


_MAKERS: dict[str, Callable[[random.Random], str]] = {
    "person": lambda r: f"{_word(r, 2)} {_word(r, 3)}",
    "company": lambda r: f"{_word(r, 2)} {r.choice(_COMPANY_SUFFIXES)}",
    "city": lambda r: _word(r, 3),
    "province": lambda r: _word(r, 3),
    "country": lambda r: _word(r, 3),
    "key": lambda r: f"{r.choice(_KEY_COLOURS)} {r.choice(_KEY_CREATURES)}",
    "variable": lambda r: "".join(r.choice(_LETTERS) for _ in range(5)),
}


def _number(rng: random.Random, digits: int, used: set[str]) -> str:
    if len(used) >= 9 * 10 ** (digits - 1) // 2:
        raise ValueError(f"too many distinct {digits}-digit numbers requested ({len(used) + 1}); raise value_digits")
    while True:
        value = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if value not in used:
            used.add(value)
            return value


@dataclasses.dataclass
class _Draft:
    """A fact before placement: text, role, triple, and its placement constraint."""

    text: str
    role: str
    triple: tuple[str, str, str]
    group: int = -1  # facts of one group >= 0 are placed in order, in separate segments
    depth: float | None = None
    rank: int = -1  # >= 0: ordinal in the document (every draft of the sample has one)
    tight: bool = False  # with rank: follows the previous fact with no filler in between


def _niah(cfg: SyntheticConfig, rng: random.Random) -> tuple[str, tuple[str, ...], list[_Draft]]:
    names = _Names(rng)
    numbers: set[str] = set()
    drafts: list[_Draft] = []

    def needle(key: str, value: str, role: str, depth=None) -> _Draft:
        return _Draft(f" The secret number for {key} is {value}.", role, (key, "secret_number", value), depth=depth)

    task = cfg.task
    if task == "niah_multiquery":
        keys = [names.take(_MAKERS["key"]) for _ in range(cfg.num_queries)]
        values = [_number(rng, cfg.value_digits, numbers) for _ in keys]
        drafts += [needle(k, v, "answer", cfg.depth) for k, v in zip(keys, values)]
        listed = ", ".join(keys[:-1]) + (" and " if len(keys) > 1 else "") + keys[-1]
        question = f"What are the secret numbers for {listed}?" if len(keys) > 1 else f"What is the secret number for {listed}?"
        answers = tuple(values)
    else:
        key = names.take(_MAKERS["key"])
        n_values = cfg.num_values if task == "niah_multivalue" else 1
        values = [_number(rng, cfg.value_digits, numbers) for _ in range(n_values)]
        drafts += [needle(key, v, "answer", cfg.depth) for v in values]
        if n_values > 1:
            question = f"What are all the secret numbers for {key}?"
        else:
            question = f"What is the secret number for {key}?"
        answers = tuple(values)
    for _ in range(cfg.resolved_distractors):
        drafts.append(needle(names.take(_MAKERS["key"]), _number(rng, cfg.value_digits, numbers), "distractor"))
    return question, answers, drafts


_RECALL_WORDS = tuple(s.capitalize() for s in _SYLLABLES)

# keyed_recall's fact wordings: (a fact stating a word, a pointer to another creature's fact).
FACT_STYLES = ("sentence", "pair")
_KEYED_FACTS = {
    "sentence": (" The secret word for {key} is {word}.", " The secret word for {key} is the one for {target}."),
    "pair": (" Remember {key} {word}.", " Remember {key} as {target}."),
}


def _keyed_recall(cfg: SyntheticConfig, rng: random.Random, index: int):
    """The asked fact, its look-alikes, and (hops > 1) the pointer facts that lead to it.

    Hops: with ``hops`` h > 1 the asked creature's fact points to another creature's ("The secret word for
    otter is the one for heron."), h - 1 times, and only the last creature's fact states the word.  Look-alikes
    never name a creature of the chain, so the answer is unambiguous.  The asked fact (the first of the chain)
    takes the ordinal ``index % n`` among the n facts of the document (every position, balanced over rows; with
    hops > 1 the chain's later facts are then moved after it, in chain order), and ``same_chunk_distractors``
    look-alikes are placed right beside it (with ``chunk_aligned``, in its chunk).
    """
    hops = cfg.resolved_hops
    chain = [rng.choice(_KEY_CREATURES)]
    chain += rng.sample([k for k in _KEY_CREATURES if k != chain[0]], hops - 1)
    word = rng.choice(_RECALL_WORDS)
    others = [k for k in _KEY_CREATURES if k not in chain]
    other_words = [w for w in _RECALL_WORDS if w != word]
    drafts = []
    stating, pointing = _KEYED_FACTS[cfg.fact_style]
    for h, (key, target) in enumerate(zip(chain, chain[1:] + [None])):
        role = "answer" if h == 0 else "support"
        if target is None:
            drafts.append(_Draft(stating.format(key=key, word=word), role, (key, "secret_word", word)))
        else:
            drafts.append(_Draft(pointing.format(key=key, target=target), role, (key, "same_word_as", target)))
    lookalikes = [_Draft(stating.format(key=k, word=w), "distractor", (k, "secret_word", w))
                  for k, w in ((rng.choice(others), rng.choice(other_words)) for _ in range(cfg.resolved_distractors))]
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
        after.insert(rng.randint(after.index(drafts[drafts.index(support) - 1]) + 1 if drafts.index(support) > 1
                                 else 0, len(after)), support)
    ordered = before + block + after
    for i, d in enumerate(ordered):
        d.rank = i
        d.tight = d in block[1:]  # placed right after the previous fact, no filler between
    question = f"What is the secret word for {chain[0]}?"
    return question, (word,), ordered


def _variable_tracking(cfg: SyntheticConfig, rng: random.Random):
    names = _Names(rng)
    numbers: set[str] = set()
    drafts: list[_Draft] = []
    hops = cfg.resolved_hops
    target_value = None
    target_vars: list[str] = []
    for chain in range(1 + cfg.resolved_distractors):
        value = _number(rng, 5, numbers)
        variables = [names.take(_MAKERS["variable"]) for _ in range(hops + 1)]
        role = "answer" if chain == 0 else "distractor"  # every link of the asked chain names an answer
        drafts.append(_Draft(f" Let {variables[0]} be {value}.", role, (variables[0], "equals", value), group=chain))
        for a, b in zip(variables, variables[1:]):
            drafts.append(_Draft(f" Let {b} be {a}.", role, (b, "equals", a), group=chain))
        if chain == 0:
            target_value, target_vars = value, variables
    question = f"Which variables hold the value {target_value}, directly or through other variables?"
    return question, tuple(target_vars), drafts


def _multihop(cfg: SyntheticConfig, rng: random.Random):
    names = _Names(rng)
    drafts: list[_Draft] = []
    hops = cfg.resolved_hops
    question = answer = None
    for chain in range(1 + cfg.resolved_distractors):
        subject = names.take(_MAKERS["person"])
        person = subject
        for h in range(hops):
            template, _, obj_kind = _RELATIONS[h]
            obj = names.take(_MAKERS[obj_kind])
            if chain == 0:
                role = "answer" if h == hops - 1 else "support"
            else:
                role = "distractor"
            drafts.append(_Draft(template.format(s=subject, o=obj), role, (subject, _RELATION_NAMES[h], obj), group=chain))
            subject = obj
        if chain == 0:
            question = _MULTIHOP_QUESTIONS[hops - 1].format(p=person)
            answer = subject
    return question, (answer,), drafts


def _place(cfg: SyntheticConfig, drafts: list[_Draft], budget: int, rng: random.Random) -> list[float]:
    """Filler-token offsets for every draft.

    Group 0 (the facts the answer needs, for chained tasks) is spread over separate equal segments
    of the document, at least ``chunk_tokens`` apart; other groups are ordered but unconstrained;
    ungrouped facts go at their depth or uniformly at random.
    """
    offsets: list[float] = [0.0] * len(drafts)
    if drafts and all(d.rank >= 0 for d in drafts):  # explicit ordinals: random gaps, in rank order
        ranked = sorted(range(len(drafts)), key=lambda i: drafts[i].rank)
        points = iter(sorted(rng.random() * budget for i in ranked if not drafts[i].tight))
        prev = ranked[0]
        for i in ranked:  # a tight draft shares the previous one's gap (never the first: see _keyed_recall)
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
            if cfg.task == "multihop_qa":
                rng.shuffle(order)  # hop facts appear in any order
            for slot, i in zip(order, members):
                lo = slot * seg + gap / 2
                hi = (slot + 1) * seg - gap / 2
                offsets[i] = lo + rng.random() * max(hi - lo, 0.0)
        else:
            points = sorted(rng.random() * budget for _ in members)
            if cfg.task == "multihop_qa":
                rng.shuffle(points)
            for p, i in zip(points, members):
                offsets[i] = p
    return offsets


def _answer_alone(facts: Sequence[Fact], chunk_tokens: int) -> bool:
    """No other fact starts or ends in a chunk that the asked fact occupies."""
    chunks = lambda f: {f.token_offset // chunk_tokens, (f.token_offset + f.num_tokens - 1) // chunk_tokens}
    asked = set().union(*(chunks(f) for f in facts if f.role == "answer"))
    return not any(chunks(f) & asked for f in facts if f.role != "answer")


def _layout(config: SyntheticConfig, drafts: list[_Draft], fact_tokens: list[int], budget: int, counter, index: int,
            attempt: int) -> tuple[list[Fact], int, _Plan]:
    """Places the facts in a haystack of filler -> (facts in document order, filler tokens, render plan)."""
    seed_parts = ("place", config.task, config.seed, index) + ((attempt,) if attempt else ())
    place_rng = random.Random(_derive_seed(*seed_parts))
    offsets = _place(config, drafts, budget, place_rng)

    # Plan the filler: whole sentences while they fit, then one truncated sentence.
    filler_seed = _derive_seed("filler", config.task, config.seed, index)
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
        units = _sentence_units(rng)
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
                counts = [counter(u) for u in _sentence_units(rng)]
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
    return facts, used, _Plan(filler_seed, full, partial, tuple(final_insert), partial_skip)


def generate_sample(config: SyntheticConfig, index: int, tokenizer) -> SyntheticSample:
    """Generate sample ``index`` of ``config``; ``tokenizer`` measures lengths (see
    :func:`memagent_jax.data.tokenizer.token_counter` for what it may be)."""
    counter: TokenCounter = token_counter(tokenizer)
    task_rng = random.Random(_derive_seed("task", config.task, config.seed, index, config.resolved_distractors, config.resolved_hops, config.num_values, config.num_queries))
    if config.task.startswith("niah"):
        question, answers, drafts = _niah(config, task_rng)
    elif config.task == "keyed_recall":
        question, answers, drafts = _keyed_recall(config, task_rng, index)
    elif config.task == "variable_tracking":
        question, answers, drafts = _variable_tracking(config, task_rng)
    else:
        question, answers, drafts = _multihop(config, task_rng)

    fact_tokens = [counter(d.text) for d in drafts]
    budget = config.num_tokens - sum(fact_tokens)
    if budget < 0:
        raise ValueError(f"the facts alone take {sum(fact_tokens)} tokens, more than num_tokens={config.num_tokens}")
    for attempt in range(256):
        facts, used, plan = _layout(config, drafts, fact_tokens, budget, counter, index, attempt)
        if not config.isolate_answer or _answer_alone(facts, config.chunk_tokens):
            break
    else:
        raise ValueError(f"sample {index}: no placement keeps the asked fact alone in its chunk; lower "
                         "num_distractors or raise num_tokens")
    metric, reward_style = _TASK_METRIC[config.task]
    return SyntheticSample(
        task=config.task,
        index=int(index),
        question=question,
        answers=tuple(answers),
        facts=tuple(facts),
        num_tokens=used + sum(fact_tokens),
        metric=metric,
        reward_style=reward_style,
        config=config,
        _plan=plan,
    )


def generate_samples(config: SyntheticConfig, num_samples: int, tokenizer, *, start: int = 0) -> Iterator[SyntheticSample]:
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


def concatenated_records(config: SyntheticConfig, num_rows: int, parts: int, tokenizer, *,
                         data_source: str | None = None) -> Iterator[QARecord]:
    """Rows whose document is ``parts`` documents of ``config`` joined end to end, asked about one that is not
    the last (a document the generator never made: several documents' worth of facts, the asked one followed
    by other documents' look-alikes).

    Row r asks the question of sample r, placed at part ``p`` (0 <= p < parts - 1, seeded per row); the other
    parts are samples drawn from indices 1_000_000 + ... that name none of the asked sample's fact subjects
    and none of its answers, so the answer stays unique.  Only samples whose length is exactly
    ``config.num_tokens`` are used, so with ``chunk_aligned`` every part starts on a chunk boundary and its
    facts stay whole in their chunks.
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
        rng = random.Random(_derive_seed("concat", config.task, config.seed, r))
        position = rng.randrange(parts - 1)
        others = []
        while len(others) < parts - 1:
            sample = generate_sample(config, filler_base + filler_index, counter)
            filler_index += 1
            if exact(sample) and not any(f.triple[0] in banned or f.triple[2] in banned for f in sample.facts):
                others.append(sample)
        docs = others[:position] + [asked] + others[position:]
        yield QARecord(question=asked.question, document="".join(d.text() for d in docs), answers=asked.answers,
                       index=r, data_source=data_source or f"synthetic_{config.task}_concat",
                       extra={"task": config.task, "parts": parts, "asked_part": position,
                              "asked_index": asked.index, "metric": asked.metric, "seed": config.seed})


# ---------------------------------------------------------------------------------------------
# Texts for training a tokenizer that covers the synthetic tasks
# ---------------------------------------------------------------------------------------------


def whitespace_counter(text: str) -> int:
    """A tokenizer-free length measure (whitespace-separated words); for drafts and corpora."""
    return len(text.split())


def vocabulary_texts() -> list[str]:
    """Strings covering every word, syllable, template and digit the generators can emit."""
    texts = []
    for words in (_ADJECTIVES, _NOUNS, _VERBS, _PREPOSITIONS, _TIMES, _PEOPLE, _ACTIONS, _KEY_COLOURS, _KEY_CREATURES):
        texts.append(" ".join(words) + ".")
    for t in _TEMPLATES:
        texts.append(" " + " ".join(w if w not in _SLOTS else _SLOTS[w][0] for w in t) + ".")
    texts.append(" ".join(s.capitalize() for s in _SYLLABLES))
    texts.append(" ".join(_SYLLABLES))
    texts.append(" ".join(_COMPANY_SUFFIXES))
    texts.append(" ".join(_LETTERS))
    texts.append(" 0 1 2 3 4 5 6 7 8 9")
    texts.append(" The secret number for amber falcon is 1234567. What is the secret number for amber falcon?")
    texts.append(" The secret word for otter is Ven. What is the secret word for otter?")
    texts.append(" Remember otter Ven. Remember heron as otter. for otter Ven for heron ?")
    texts.append(" What are all the secret numbers for violet otter? What are the secret numbers for a, b and c?")
    texts.append(" Let ABCDE be 12345. Let FGHJK be ABCDE. Which variables hold the value 12345, directly or through other variables?")
    texts.extend(t.format(s="Kalo Mira", o="Venra") for t, _, _ in _RELATIONS)
    texts.extend(q.format(p="Kalo Mira") for q in _MULTIHOP_QUESTIONS)
    return texts


def tokenizer_corpus(num_samples: int = 24, num_tokens: int = 400, seed: int = 0) -> Iterator[str]:
    """Texts to train a tokenizer for the synthetic tasks (no tokenizer needed to make them).

    :func:`vocabulary_texts` repeated, then ``num_samples`` small documents and questions of every
    task (lengths measured in whitespace words).  Pass it, plus the agent's prompt texts, to
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
