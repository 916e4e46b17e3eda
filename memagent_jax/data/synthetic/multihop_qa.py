"""``multihop_qa``: a question about a generated world that needs every hop fact.

People work for companies, companies have main offices in cities, cities lie in provinces, provinces belong to
countries (:data:`RELATIONS`, one sentence per relation).  The question names a person and asks for the entity
``hops`` (default 2, 1..4) relations away (:data:`QUESTIONS`); every hop is a separate fact, and the answer needs
all of them: the person appears only in the first hop fact, the answer only in the last.  ``num_distractors``
(default 3) other people come with complete chains of their own (other companies, cities, ...), so no fact can
be skipped by elimination.  The hop facts are spread over the document in any order (at least ``chunk_tokens``
apart when set).  All names are generated and distinct within a sample.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from .task import Draft, SyntheticTask
from .vocabulary import MAKERS, Names

if TYPE_CHECKING:
    from .config import SyntheticConfig

__all__ = ["TASK", "RELATIONS", "RELATION_NAMES", "QUESTIONS", "make"]

# Relations, hop by hop: (fact template, subject kind, object kind).
RELATIONS = (
    (" {s} works for {o}.", "person", "company"),
    (" {s} has its main office in {o}.", "company", "city"),
    (" {s} lies in the province of {o}.", "city", "province"),
    (" The province of {s} belongs to the country of {o}.", "province", "country"),
)
RELATION_NAMES = ("works_for", "main_office_in", "in_province", "in_country")
# The question for h hops is QUESTIONS[h - 1].
QUESTIONS = (
    "Which company does {p} work for?",
    "In which city does the company that {p} works for have its main office?",
    "In which province is the city where the company that {p} works for has its main office?",
    "To which country belongs the province of the city where the company that {p} works for has its main office?",
)


def make(cfg: SyntheticConfig, rng: random.Random, index: int) -> tuple[str, tuple[str, ...], list[Draft]]:
    """The asked person's chain (group 0: support facts, the last hop the answer) and the distractor chains
    (groups 1..); ``index`` is not used."""
    names = Names(rng)
    drafts: list[Draft] = []
    hops = cfg.resolved_hops
    question = answer = None
    for chain in range(1 + cfg.resolved_distractors):
        subject = names.take(MAKERS["person"])
        person = subject
        for h in range(hops):
            template, _, obj_kind = RELATIONS[h]
            obj = names.take(MAKERS[obj_kind])
            if chain == 0:
                role = "answer" if h == hops - 1 else "support"
            else:
                role = "distractor"
            drafts.append(
                Draft(template.format(s=subject, o=obj), role, (subject, RELATION_NAMES[h], obj), group=chain)
            )
            subject = obj
        if chain == 0:
            question = QUESTIONS[hops - 1].format(p=person)
            answer = subject
    return question, (answer,), drafts


def _validate(cfg: SyntheticConfig) -> None:
    hops = cfg.resolved_hops
    if not 1 <= hops <= len(RELATIONS):
        raise ValueError(f"multihop_qa supports 1..{len(RELATIONS)} hops, got {hops}")


TASK = SyntheticTask(
    "multihop_qa",
    make,
    "sub_em",
    "boxed_em",
    default_distractors=3,
    default_hops=2,
    validate=_validate,
    chains_in_any_order=True,
)
