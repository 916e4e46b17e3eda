"""Shared text pieces of the synthetic tasks: filler sentences, entity names, numbers.

Every word list is our own.  Filler words are lower-case and never appear in keys or names, so a fact's
subject or answer can only occur in the document inside a fact (see :class:`Names`).

Contracts:
  * :func:`sentence_units` draws one filler sentence from an RNG as pre-spaced words (``[" The", " old",
    ...]``, no full stop); the same RNG state always gives the same words.
  * :class:`Names` hands out names that are unique within one sample and share no substring with each
    other or with a filler word longer than two letters.
  * :func:`number` draws decimal numbers of a fixed digit count, distinct within the ``used`` set.

Changing any list, template or drawing order changes every generated document.
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = [
    "ADJECTIVES",
    "NOUNS",
    "VERBS",
    "PREPOSITIONS",
    "TIMES",
    "PEOPLE",
    "ACTIONS",
    "TEMPLATES",
    "SLOTS",
    "TEMPLATE_UNITS",
    "FILLER_WORDS",
    "KEY_COLOURS",
    "KEY_CREATURES",
    "SYLLABLES",
    "COMPANY_SUFFIXES",
    "LETTERS",
    "sentence_units",
    "Names",
    "word",
    "MAKERS",
    "number",
]

ADJECTIVES = (
    "quiet",
    "old",
    "small",
    "green",
    "calm",
    "wide",
    "narrow",
    "gentle",
    "bright",
    "dusty",
    "warm",
    "cold",
    "busy",
    "empty",
    "long",
    "short",
    "soft",
    "plain",
    "distant",
    "simple",
)
NOUNS = (
    "river",
    "road",
    "field",
    "house",
    "garden",
    "bridge",
    "market",
    "hill",
    "window",
    "door",
    "boat",
    "tree",
    "lamp",
    "wall",
    "path",
    "cart",
    "well",
    "roof",
    "fence",
    "stone",
    "harbor",
    "valley",
    "meadow",
    "orchard",
    "village",
    "tower",
    "mill",
    "barn",
    "pond",
    "gate",
)
VERBS = (
    "stood",
    "waited",
    "rested",
    "leaned",
    "stayed",
    "turned",
    "shifted",
    "settled",
    "remained",
    "lay",
)
PREPOSITIONS = ("near", "beside", "behind", "under", "past", "across", "beyond", "around")
TIMES = ("morning", "evening", "night", "winter", "summer", "spring", "autumn", "noon")
PEOPLE = ("farmer", "baker", "teacher", "child", "traveler", "painter", "sailor", "keeper")
ACTIONS = ("walked", "looked", "watched", "listened", "worked", "waved", "smiled", "paused")

# Filler sentence templates: slot names (keys of SLOTS) are filled from word lists, other items are literal words.
TEMPLATES = (
    ("The", "ADJ", "NOUN", "VERB", "PREP", "the", "NOUN"),
    ("In", "the", "TIME", "the", "NOUN", "VERB", "PREP", "the", "ADJ", "NOUN"),
    ("A", "PERSON", "ACTION", "PREP", "the", "NOUN"),
    ("The", "PERSON", "ACTION", "and", "the", "NOUN", "VERB", "ADJ"),
    ("Every", "TIME", "the", "ADJ", "NOUN", "VERB", "PREP", "a", "NOUN"),
    ("Nothing", "changed", "at", "the", "NOUN", "that", "TIME"),
)
SLOTS = {
    "ADJ": ADJECTIVES,
    "NOUN": NOUNS,
    "VERB": VERBS,
    "PREP": PREPOSITIONS,
    "TIME": TIMES,
    "PERSON": PEOPLE,
    "ACTION": ACTIONS,
}
# Per template, per item: a tuple of pre-spaced choices (" river", ...) for a slot, or one pre-spaced literal.
_SLOT_UNITS = {k: tuple(" " + w for w in v) for k, v in SLOTS.items()}
TEMPLATE_UNITS = tuple(tuple(_SLOT_UNITS.get(item, " " + item) for item in t) for t in TEMPLATES)

FILLER_WORDS = frozenset(w.lower() for t in TEMPLATES for item in t for w in (SLOTS.get(item, (item,))))

# Needle keys: colour + creature, neither in the filler.
KEY_COLOURS = (
    "amber",
    "violet",
    "crimson",
    "silver",
    "golden",
    "ivory",
    "scarlet",
    "azure",
    "olive",
    "coral",
    "indigo",
    "copper",
    "jade",
    "ruby",
    "pearl",
    "sable",
)
KEY_CREATURES = (
    "falcon",
    "otter",
    "badger",
    "heron",
    "lynx",
    "marten",
    "osprey",
    "beetle",
    "salmon",
    "gecko",
    "bison",
    "raven",
    "walrus",
    "ferret",
    "puffin",
    "moth",
)
# Syllables for generated names (capitalised when joined).
SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ra",
    "ven",
    "tor",
    "sel",
    "dra",
    "pim",
    "qua",
    "zor",
    "bel",
    "nix",
    "fen",
    "gal",
    "hu",
    "ish",
    "jun",
    "mor",
    "ost",
    "pel",
    "rin",
    "sab",
    "tev",
    "ul",
    "wex",
    "yor",
    "cas",
)
COMPANY_SUFFIXES = ("Works", "Labs", "Foundry", "Traders", "Holdings", "Textiles")
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


def sentence_units(rng: random.Random) -> list[str]:
    """One filler sentence as pre-spaced words, without its full stop (one template draw, one draw per slot)."""
    template = TEMPLATE_UNITS[rng.randrange(len(TEMPLATE_UNITS))]
    return [rng.choice(u) if isinstance(u, tuple) else u for u in template]


class Names:
    """Unique generated names that never contain (or hide in) each other or any filler word."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: list[str] = []

    def _ok(self, name: str) -> bool:
        low = name.lower()
        for part in low.split():
            if any(part in w or w in part for w in FILLER_WORDS if len(w) > 2) or part in FILLER_WORDS:
                return False
        return not any(low in u or u in low for u in self.used)

    def take(self, make: Callable[[random.Random], str]) -> str:
        """A fresh name from ``make`` (redrawn until it passes; RuntimeError after 10,000 tries)."""
        for _ in range(10_000):
            name = make(self.rng)
            if self._ok(name):
                self.used.append(name.lower())
                return name
        raise RuntimeError("could not find a fresh name; too many entities requested")


def word(rng: random.Random, syllables: int) -> str:
    """A capitalised made-up word of ``syllables`` syllables."""
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()


# Name makers per entity kind, for :meth:`Names.take`.
MAKERS: dict[str, Callable[[random.Random], str]] = {
    "person": lambda r: f"{word(r, 2)} {word(r, 3)}",
    "company": lambda r: f"{word(r, 2)} {r.choice(COMPANY_SUFFIXES)}",
    "city": lambda r: word(r, 3),
    "province": lambda r: word(r, 3),
    "country": lambda r: word(r, 3),
    "key": lambda r: f"{r.choice(KEY_COLOURS)} {r.choice(KEY_CREATURES)}",
    "variable": lambda r: "".join(r.choice(LETTERS) for _ in range(5)),
}


def number(rng: random.Random, digits: int, used: set[str]) -> str:
    """A ``digits``-digit number (no leading zero) not in ``used``; adds it to ``used``.

    Raises ValueError once half of the ``digits``-digit numbers are taken.
    """
    if len(used) >= 9 * 10 ** (digits - 1) // 2:
        raise ValueError(f"too many distinct {digits}-digit numbers requested ({len(used) + 1}); raise value_digits")
    while True:
        value = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if value not in used:
            used.add(value)
            return value
