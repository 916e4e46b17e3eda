"""Needle in a haystack: secret numbers for colour-creature keys.

A needle is " The secret number for <key> is <number>." with ``<key>`` a colour and a creature ("amber
falcon") and ``<number>`` ``value_digits`` (default 7) digits; keys and numbers are distinct within a sample.
Needles go at ``depth`` (relative position 0..1 of the document) or, with ``depth=None``, uniformly at random.

``niah_single``
    One needle; asked "What is the secret number for <key>?"; the answer is its number.
``niah_multikey``
    The same, plus ``num_distractors`` (default 3) needles for other keys.
``niah_multivalue``
    ``num_values`` (default 4) needles give the asked key different numbers; asked "What are all the secret
    numbers for <key>?"; all numbers are wanted.
``niah_multiquery``
    ``num_queries`` (default 4) keys each get a needle and are asked at once ("What are the secret numbers for
    a, b and c?"); all their numbers are wanted, in the order asked.

``num_distractors`` adds needles for other keys to every variant (default 0 except ``niah_multikey``).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from .task import Draft, SyntheticTask
from .vocabulary import MAKERS, Names, number

if TYPE_CHECKING:
    from .config import SyntheticConfig

__all__ = ["TASKS", "make"]


def make(cfg: SyntheticConfig, rng: random.Random, index: int) -> tuple[str, tuple[str, ...], list[Draft]]:
    """Question, answers and needles of every niah variant (``cfg.task`` picks it; ``index`` is not used)."""
    names = Names(rng)
    numbers: set[str] = set()
    drafts: list[Draft] = []

    def needle(key: str, value: str, role: str, depth=None) -> Draft:
        return Draft(f" The secret number for {key} is {value}.", role, (key, "secret_number", value), depth=depth)

    task = cfg.task
    if task == "niah_multiquery":
        keys = [names.take(MAKERS["key"]) for _ in range(cfg.num_queries)]
        values = [number(rng, cfg.value_digits, numbers) for _ in keys]
        drafts += [needle(k, v, "answer", cfg.depth) for k, v in zip(keys, values)]
        listed = ", ".join(keys[:-1]) + (" and " if len(keys) > 1 else "") + keys[-1]
        if len(keys) > 1:
            question = f"What are the secret numbers for {listed}?"
        else:
            question = f"What is the secret number for {listed}?"
        answers = tuple(values)
    else:
        key = names.take(MAKERS["key"])
        n_values = cfg.num_values if task == "niah_multivalue" else 1
        values = [number(rng, cfg.value_digits, numbers) for _ in range(n_values)]
        drafts += [needle(key, v, "answer", cfg.depth) for v in values]
        if n_values > 1:
            question = f"What are all the secret numbers for {key}?"
        else:
            question = f"What is the secret number for {key}?"
        answers = tuple(values)
    for _ in range(cfg.resolved_distractors):
        drafts.append(needle(names.take(MAKERS["key"]), number(rng, cfg.value_digits, numbers), "distractor"))
    return question, answers, drafts


TASKS = (
    SyntheticTask("niah_single", make, "string_match_all", "boxed_em", default_distractors=0),
    SyntheticTask("niah_multikey", make, "string_match_all", "boxed_em", default_distractors=3),
    SyntheticTask("niah_multivalue", make, "string_match_all", "boxed_all", default_distractors=0),
    SyntheticTask("niah_multiquery", make, "string_match_all", "boxed_all", default_distractors=0),
)
