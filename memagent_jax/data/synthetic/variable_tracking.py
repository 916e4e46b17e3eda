"""``variable_tracking``: follow a chain of variable copies.

A chain " Let <A> be 12345." " Let <B> be <A>." ... of ``hops`` (default 4, >= 1) copies, names of five capital
letters and a five-digit value; asked "Which variables hold the value 12345, directly or through other
variables?"; all ``hops + 1`` names of the chain are wanted (every statement of the asked chain is an answer
fact).  ``num_distractors`` (default 2) other chains, of the same length, hold other values.  The statements of
a chain appear in order, the chain spread over the document (at least ``chunk_tokens`` apart when set).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from .task import Draft, SyntheticTask
from .vocabulary import MAKERS, Names, number

if TYPE_CHECKING:
    from .config import SyntheticConfig

__all__ = ["TASK", "make"]


def make(cfg: SyntheticConfig, rng: random.Random, index: int) -> tuple[str, tuple[str, ...], list[Draft]]:
    """The asked chain (group 0) and the distractor chains (groups 1..); ``index`` is not used."""
    names = Names(rng)
    numbers: set[str] = set()
    drafts: list[Draft] = []
    hops = cfg.resolved_hops
    target_value = None
    target_vars: list[str] = []
    for chain in range(1 + cfg.resolved_distractors):
        value = number(rng, 5, numbers)
        variables = [names.take(MAKERS["variable"]) for _ in range(hops + 1)]
        role = "answer" if chain == 0 else "distractor"  # every link of the asked chain names an answer
        drafts.append(Draft(f" Let {variables[0]} be {value}.", role, (variables[0], "equals", value), group=chain))
        for a, b in zip(variables, variables[1:]):
            drafts.append(Draft(f" Let {b} be {a}.", role, (b, "equals", a), group=chain))
        if chain == 0:
            target_value, target_vars = value, variables
    question = f"Which variables hold the value {target_value}, directly or through other variables?"
    return question, tuple(target_vars), drafts


def _validate(cfg: SyntheticConfig) -> None:
    if cfg.resolved_hops < 1:
        raise ValueError("variable_tracking needs hops >= 1")


TASK = SyntheticTask(
    "variable_tracking",
    make,
    "string_match_all",
    "boxed_all",
    default_distractors=2,
    default_hops=4,
    validate=_validate,
)
