"""What a synthetic task is: :class:`SyntheticTask` (registered by name) and the :class:`Draft` facts it writes.

A task turns a config, an RNG and a row index into a question, its accepted answers and the facts to insert
(drafts).  Everything else (the filler, where the facts go, token counts, rows) is common and lives in
:mod:`.document` and :mod:`.dataset`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import SyntheticConfig

__all__ = ["Draft", "SyntheticTask", "MakeFn"]


@dataclasses.dataclass
class Draft:
    """A fact before placement: text, role, triple, and its placement constraint.

    ``text`` starts with a space and ends with a full stop.  ``role`` is ``"answer"``, ``"support"`` or
    ``"distractor"`` (see :class:`~.document.Fact`).  Placement: either every draft of a sample has a ``rank``
    (its ordinal in the document), or none has and drafts are placed by ``group`` / ``depth`` / at random.
    """

    text: str
    role: str
    triple: tuple[str, str, str]
    group: int = -1  # facts of one group >= 0 are placed in order, in separate segments
    depth: float | None = None
    rank: int = -1  # >= 0: ordinal in the document (every draft of the sample has one)
    tight: bool = False  # with rank: follows the previous fact with no filler in between


# (config, task RNG, row index) -> (question, accepted answers, drafts).  The RNG is seeded from the config's
# task, seed, index and count knobs (never from num_tokens); every draw a task makes comes from it.
MakeFn = Callable[["SyntheticConfig", random.Random, int], "tuple[str, tuple[str, ...], list[Draft]]"]


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
    """A registered task.

    Attributes:
      name: the ``task`` of a :class:`~.config.SyntheticConfig`; also part of every seed of its samples.
      make: writes the question, answers and drafts (see :data:`MakeFn`).
      metric: evaluation metric (a key of ``memagent_jax.evaluation.verifier.METRICS``).
      reward_style: training reward style (a key of ``memagent_jax.evaluation.verifier.REWARD_STYLES``).
      default_distractors: ``num_distractors`` when the config leaves it ``None``.
      default_hops: ``hops`` when the config leaves it ``None``.
      validate: optional check of a config of this task (raises ValueError), run by the config itself.
      chains_in_any_order: grouped facts (one chain per group) are placed in shuffled order rather than in
        chain order.
    """

    name: str
    make: MakeFn
    metric: str
    reward_style: str
    default_distractors: int = 0
    default_hops: int = 1
    validate: Callable[[SyntheticConfig], None] | None = None
    chains_in_any_order: bool = False
