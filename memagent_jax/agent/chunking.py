"""Budgets, document tokenization and chunking for the memory agent (host side, NumPy only).

A document is turned into one int32 token array (the only thing that grows with its length) and cut
into chunks of `chunk_tokens`; the last chunk may be partial. Text may be given as one string or as an
iterable of text pieces (e.g. a lazily generated multi-million-token document), which is tokenized
piece by piece so the whole text never has to exist as one Python string.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable

import numpy as np

from memagent_jax import settings
from memagent_jax.agent.templates import encode_text
from memagent_jax.data.tokenizer import ControlTokenError
from memagent_jax.errors import UserError

log = logging.getLogger(__name__)


class AgentInputError(UserError):
    """A question or document cannot be run (empty, over budget, unreadable)."""


class BudgetError(settings.SettingError, AgentInputError):
    """An `AgentBudgets` field is out of its range; `field` names it."""


@dataclasses.dataclass(frozen=True)
class AgentBudgets:
    """Token budgets of one agent step (the reference recipe: 1024 / 5000 / 1024 / 1024).

    question_tokens:     Q, the question slot (longer questions: error, or truncation per policy).
    chunk_tokens:        C, document tokens read per step.
    memory_tokens:       M, maximum new tokens of a memory update (and the memory slot size).
    answer_tokens:       A, maximum new tokens of the final answer.
    chunks_per_segment:  S, chunks per compiled scan; longer documents run as several segments.
    max_document_tokens: 0 = off; otherwise documents are centre-truncated to this many tokens.
    question_overflow:   'error' | 'truncate' (keep the first Q tokens, with a warning).
    text_margin:         text prompt mode only: extra prompt slots beyond the template's literal tokens + Q + M
                         + C, for whole-string tokenization that comes out longer than the pieces (re-encoded
                         memory, a chunk cut inside a character). A prompt that still does not fit is an error.
    """

    question_tokens: int = 1024
    chunk_tokens: int = 5000
    memory_tokens: int = 1024
    answer_tokens: int = 1024
    chunks_per_segment: int = 4
    max_document_tokens: int = 0
    question_overflow: str = "error"
    text_margin: int = 64

    def __post_init__(self):
        for name in ("question_tokens", "chunk_tokens", "memory_tokens", "answer_tokens", "chunks_per_segment"):
            settings.integer(name, getattr(self, name), minimum=1, allowed="> 0", error=BudgetError)
        settings.integer("text_margin", self.text_margin, minimum=0, error=BudgetError)
        settings.integer(
            "max_document_tokens",
            self.max_document_tokens,
            minimum=0,
            allowed=">= 0 (0 = whole documents)",
            error=BudgetError,
        )
        settings.choice("question_overflow", self.question_overflow, ("error", "truncate"), error=BudgetError)


def _plain_ids(tokenizer, text: str, source: str) -> list[int]:
    try:
        return encode_text(tokenizer, text)
    except ControlTokenError as e:
        raise AgentInputError(f"{source}: {e}") from None


def tokenize_document(tokenizer, document: str | Iterable[str], *, source: str = "document") -> np.ndarray:
    """Token ids [N] int32 of a document given as a string or an iterable of text pieces, read as plain text (a
    control token the text spells, e.g. ``<|im_end|>``, stays the ids of its characters: `encode_text`)."""
    pieces = [document] if isinstance(document, str) else document
    arrays = []
    for piece in pieces:
        if not isinstance(piece, str):
            raise AgentInputError(f"{source}: expected text, got {type(piece).__name__}")
        if piece:
            arrays.append(np.asarray(_plain_ids(tokenizer, piece, source), np.int32))
    ids = np.concatenate(arrays) if arrays else np.zeros((0,), np.int32)
    if ids.size == 0:
        raise AgentInputError(f"{source}: the document is empty")
    return ids


def read_document_file(path: str | os.PathLike) -> str:
    """Reads a UTF-8 text document; `"-"` reads standard input, and pipes (`/dev/stdin`, `<(cmd)`) are read like
    files. A missing file, a directory, a file that cannot be read or bytes that are not UTF-8 raise
    AgentInputError naming the file."""
    import sys

    from memagent_jax.storage.paths import input_file_problem

    path = os.fspath(path)
    name = "standard input" if path == "-" else f"document file {path!r}"
    if path != "-":
        problem = input_file_problem(path, pipes=True)
        if problem is not None:
            raise AgentInputError(f"{name} {problem}")
    try:
        if path == "-":
            raw = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except OSError as e:  # no permission, a read error
        raise AgentInputError(f"{name} cannot be read ({(e.strerror or str(e)).lower()})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise AgentInputError(
            f"{name} is not valid UTF-8: byte {e.start} (0x{raw[e.start]:02x}) cannot be decoded"
        ) from None


def centre_truncate(ids: np.ndarray, max_tokens: int) -> np.ndarray:
    """Keeps the first and last halves when `ids` is longer than `max_tokens` (0 = no limit)."""
    if max_tokens <= 0 or ids.size <= max_tokens:
        return ids
    head = max_tokens // 2
    return np.concatenate([ids[:head], ids[ids.size - (max_tokens - head) :]])


def prepare_question(tokenizer, question: str, budgets: AgentBudgets, *, source: str = "question") -> np.ndarray:
    """Question ids [<= Q] int32, read as plain text like documents; empty -> error; over budget -> error or
    truncation per policy."""
    if not isinstance(question, str) or not question.strip():
        raise AgentInputError(f"{source}: the question is empty")
    ids = np.asarray(_plain_ids(tokenizer, question, source), np.int32)
    if ids.size > budgets.question_tokens:
        if budgets.question_overflow == "error":
            raise AgentInputError(
                f"{source}: the question has {ids.size} tokens, over the budget of {budgets.question_tokens} "
                f"(raise budgets.question_tokens or set budgets.question_overflow='truncate')"
            )
        log.warning("%s: question of %d tokens truncated to %d", source, ids.size, budgets.question_tokens)
        ids = ids[: budgets.question_tokens]
    return ids


def split_chunks(ids: np.ndarray, chunk_tokens: int) -> list[np.ndarray]:
    """Cuts [N] ids into ceil(N / C) chunks of C tokens (the last may be shorter)."""
    return [ids[i : i + chunk_tokens] for i in range(0, ids.size, chunk_tokens)]


def num_chunks(num_tokens: int, chunk_tokens: int) -> int:
    return -(-num_tokens // chunk_tokens)
