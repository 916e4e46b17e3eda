"""HotpotQA long-document builder (RULER-HotpotQA style) from a raw HotpotQA JSON file.

Input: the distractor-setting JSON of HotpotQA (train or dev): a list of objects with ``_id``,
``question``, ``answer``, ``supporting_facts`` (``[[title, sentence_index], ...]``), ``context``
(``[[title, [sentence, ...]], ...]``: the 2 gold and 8 distractor paragraphs), ``type``, ``level``.

For a question and a document count N the document is built from

1. the question's own paragraphs (gold first, then its distractors; when N is smaller, gold
   paragraphs are kept and distractors dropped),
2. padded with paragraphs of *other* questions of the same split (never one with a title the
   question already has), drawn at random,
3. shuffled, and written as numbered documents (:func:`format_documents`)::

       Document 1:
       <title>
       <paragraph>

       Document 2:
       ...

Everything is seeded: the padding of a question is a fixed random stream (so the document at N
contains every paragraph of the document at any smaller N), and the order of the N documents comes
from (seed, question id, N).  The same file and seed give byte-identical output on any machine.

:data:`EVAL_DOC_COUNTS` are the RULER-HotpotQA lengths (50 ... 25600 documents, about 7K ... 3.5M
tokens); :meth:`HotpotQABuilder.write_eval_suite` writes one evaluation file per count, all with
the same questions.

Command line (``--help`` for every flag; exit status 0 / 1 some rows failed / 2 nothing built)::

    python -m memagent_jax.data.hotpotqa --input hotpot_dev_distractor_v1.json --out_dir data/ruler_hqa \\
        --eval_docs 50,100,200,400,800,1600,3200,6400,12800,25600 --num_questions 128
    python -m memagent_jax.data.hotpotqa --input hotpot_train_v1.1.json --train_out data/hotpotqa_train.parquet \\
        --train_docs 200
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .formats import eval_row_from_record, train_row_from_record, write_train_file
from .records import DataFormatError, QARecord

__all__ = [
    "EVAL_DOC_COUNTS",
    "HotpotExample",
    "load_hotpotqa",
    "parse_hotpotqa",
    "format_documents",
    "HotpotQABuilder",
]

#: Document counts of the RULER-HotpotQA evaluation lengths.
EVAL_DOC_COUNTS = (50, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600)


@dataclasses.dataclass(frozen=True)
class HotpotExample:
    """One raw HotpotQA question with its paragraphs (``(title, text)``, in file order)."""

    id: str
    question: str
    answer: str
    gold_titles: tuple[str, ...]
    paragraphs: tuple[tuple[str, str], ...]
    type: str = ""
    level: str = ""
    row: int | None = None  # position in the raw file (named in errors)


def _paragraph_text(sentences: Sequence[str]) -> str:
    # HotpotQA sentences carry their own leading spaces ("First.", " Second."), so join with "".
    return "".join(sentences).strip()


def parse_hotpotqa(data: Any, path: str | os.PathLike | None = None, errors: list | None = None) -> list[HotpotExample]:
    """Check raw HotpotQA data (the parsed JSON) and convert it; errors name file, row and field.

    With ``errors`` (a list), a bad question is appended to it as a :class:`DataFormatError` and skipped, and the
    others go on; without, the first bad question raises.
    """
    if not isinstance(data, list):
        raise DataFormatError(path, None, None, f"must hold a JSON array of questions, got {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        try:
            out.append(_parse_item(item, i, path))
        except DataFormatError as e:
            if errors is None:
                raise
            errors.append(e)
    return out


def _parse_item(item: Any, i: int, path) -> HotpotExample:
    """One raw question, checked (errors name file, row and field)."""
    if not isinstance(item, dict):
        raise DataFormatError(path, i, None, f"must be an object, got {type(item).__name__}")
    for key in ("_id", "question", "answer"):
        if not isinstance(item.get(key), str):
            raise DataFormatError(path, i, key, f"must be a string, got {type(item.get(key)).__name__}")
    context = item.get("context")
    if not isinstance(context, list) or not context:
        raise DataFormatError(path, i, "context", "must be a non-empty list of [title, [sentences]] pairs")
    paragraphs = []
    for j, para in enumerate(context):
        if not (isinstance(para, list) and len(para) == 2 and isinstance(para[0], str) and isinstance(para[1], list)):
            raise DataFormatError(path, i, f"context[{j}]", "must be a [title, [sentences]] pair")
        for k, sent in enumerate(para[1]):
            if not isinstance(sent, str):
                raise DataFormatError(path, i, f"context[{j}][1][{k}]", f"must be a string, got {type(sent).__name__}")
        paragraphs.append((para[0], _paragraph_text(para[1])))
    facts = item.get("supporting_facts")
    if not isinstance(facts, list) or not facts:
        raise DataFormatError(path, i, "supporting_facts", "must be a non-empty list of [title, sentence_index] pairs")
    titles = {t for t, _ in paragraphs}
    gold: list[str] = []
    for j, fact in enumerate(facts):
        if not (isinstance(fact, list) and len(fact) == 2 and isinstance(fact[0], str) and isinstance(fact[1], int)):
            raise DataFormatError(path, i, f"supporting_facts[{j}]", "must be a [title, sentence_index] pair")
        if fact[0] not in titles:
            raise DataFormatError(
                path, i, f"supporting_facts[{j}]", f"names title {fact[0]!r}, which is not in 'context'"
            )
        if fact[0] not in gold:
            gold.append(fact[0])
    return HotpotExample(
        id=item["_id"],
        question=item["question"],
        answer=item["answer"],
        gold_titles=tuple(gold),
        paragraphs=tuple(paragraphs),
        type=str(item.get("type", "")),
        level=str(item.get("level", "")),
        row=i,
    )


def read_json_file(path: str | os.PathLike) -> Any:
    """Parse a JSON file (a pipe too: it is read once); a file that cannot be read (missing, a directory, no
    permission) or is not UTF-8 JSON raises :class:`DataFormatError` naming it."""
    from memagent_jax.storage.paths import input_file_problem

    path = Path(path)
    problem = input_file_problem(path, pipes=True)
    if problem is not None:
        raise DataFormatError(path, None, None, problem)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(
            path, None, None, f"is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}"
        ) from e
    except UnicodeDecodeError as e:
        raise DataFormatError(path, None, None, f"is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:  # no permission, a read error
        raise DataFormatError(path, None, None, f"cannot be read ({(e.strerror or str(e)).lower()})") from None


def load_hotpotqa(path: str | os.PathLike, errors: list | None = None) -> list[HotpotExample]:
    """Read and check a raw HotpotQA JSON file (distractor setting); ``errors``: see :func:`parse_hotpotqa`."""
    return parse_hotpotqa(read_json_file(path), Path(path), errors)


def format_documents(paragraphs: Iterable[tuple[str, str]]) -> str:
    """Numbered documents: ``"Document 1:\\n<title>\\n<text>"`` blocks separated by blank lines."""
    return "\n\n".join(f"Document {i}:\n{title}\n{text}" for i, (title, text) in enumerate(paragraphs, 1))


def _stable_int(*parts: Any) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


class HotpotQABuilder:
    """Builds long-document training rows and evaluation files from HotpotQA examples.

    Args:
      examples: parsed examples (:func:`load_hotpotqa`); their paragraphs, deduplicated by title
        (first occurrence wins), form the padding pool.
      seed: the seed of every random choice.
      data_source: the ``data_source`` of training rows.
    """

    def __init__(self, examples: Sequence[HotpotExample], seed: int = 0, data_source: str = "hotpotqa"):
        if not examples:
            raise ValueError("no HotpotQA examples given")
        self.examples = list(examples)
        self.source: str | None = None  # the raw file, named in errors (set by from_file)
        self.seed = int(seed)
        self.data_source = data_source
        pool: dict[str, str] = {}
        for ex in self.examples:
            for title, text in ex.paragraphs:
                pool.setdefault(title, text)
        self.pool_titles = list(pool)
        self.pool_texts = [pool[t] for t in self.pool_titles]
        self._title_index = {t: i for i, t in enumerate(self.pool_titles)}

    @classmethod
    def from_file(cls, path: str | os.PathLike, errors: list | None = None, **kwargs) -> HotpotQABuilder:
        """Builder over a raw file; with ``errors`` (a list) bad questions are collected there and skipped."""
        builder = cls(load_hotpotqa(path, errors), **kwargs)
        builder.source = str(path)
        return builder

    def _records(self, pairs, num_docs: int, errors: list | None) -> Iterator[QARecord]:
        """Records for ``(index, example)`` pairs; with ``errors`` a question that cannot be built at
        ``num_docs`` (too few paragraphs to pad, more gold paragraphs than documents) is collected there as a
        :class:`DataFormatError` (with a ``num_docs`` attribute) and skipped."""
        for i, ex in pairs:
            try:
                rec = self.record(ex, num_docs, i)
            except ValueError as e:
                if errors is None:
                    raise
                err = DataFormatError(self.source, ex.row, None, f"cannot be built with {num_docs} documents: {e}")
                err.num_docs = num_docs
                errors.append(err)
                continue
            yield rec

    # -- documents ------------------------------------------------------------------------------

    def _own_paragraphs(self, ex: HotpotExample, num_docs: int) -> list[tuple[str, str]]:
        gold = [p for p in ex.paragraphs if p[0] in ex.gold_titles]
        others = [p for p in ex.paragraphs if p[0] not in ex.gold_titles]
        if num_docs < len(gold):
            raise ValueError(
                f"num_docs={num_docs} is smaller than the {len(gold)} gold paragraphs of question {ex.id!r}"
            )
        return gold + others[: num_docs - len(gold)]

    def _padding(self, ex: HotpotExample, count: int) -> list[int]:
        """``count`` distinct pool indices (a prefix of the question's fixed random stream)."""
        if count <= 0:
            return []
        excluded = {self._title_index[t] for t, _ in ex.paragraphs if t in self._title_index}
        available = len(self.pool_titles) - len(excluded)
        if count > available:
            raise ValueError(
                f"cannot pad question {ex.id!r} to {count} extra paragraphs: the split has only {available} other "
                "paragraphs"
            )
        # A fixed stream of draws (fixed batch size, independent of ``count``), skipping repeats and
        # the question's own titles: a larger count extends a smaller one's choice.
        rng = np.random.default_rng([self.seed, _stable_int("pad", ex.id)])
        chosen: list[int] = []
        seen = set(excluded)
        while len(chosen) < count:
            for i in rng.integers(0, len(self.pool_titles), size=1024).tolist():
                if i not in seen:
                    seen.add(i)
                    chosen.append(i)
                    if len(chosen) == count:
                        break
        return chosen

    def paragraphs_for(self, ex: HotpotExample, num_docs: int) -> list[tuple[str, str]]:
        """The ``num_docs`` shuffled ``(title, text)`` paragraphs of the document for ``ex``.

        The document at N contains every paragraph of the document at any smaller N (as long as
        the question's own paragraphs all fit in both).
        """
        own = self._own_paragraphs(ex, num_docs)
        pad = [(self.pool_titles[i], self.pool_texts[i]) for i in self._padding(ex, num_docs - len(own))]
        docs = own + pad
        order = np.random.default_rng([self.seed, _stable_int("order", ex.id, num_docs)]).permutation(len(docs))
        return [docs[int(i)] for i in order]

    def document(self, ex: HotpotExample, num_docs: int) -> str:
        """The numbered document text for ``ex`` with ``num_docs`` paragraphs."""
        return format_documents(self.paragraphs_for(ex, num_docs))

    def record(self, ex: HotpotExample, num_docs: int, index: int) -> QARecord:
        return QARecord(
            question=ex.question,
            document=self.document(ex, num_docs),
            answers=(ex.answer,),
            index=index,
            data_source=self.data_source,
            extra={"_id": ex.id, "num_docs": num_docs, "type": ex.type, "level": ex.level},
        )

    # -- training ----------------------------------------------------------------------------------

    def training_records(
        self, num_docs: int = 200, limit: int | None = None, errors: list | None = None
    ) -> Iterator[QARecord]:
        """Training records for the first ``limit`` questions (all by default), in file order; ``errors``: see
        :meth:`_records`."""
        examples = self.examples if limit is None else self.examples[:limit]
        yield from self._records(enumerate(examples), num_docs, errors)

    def training_rows(self, num_docs: int = 200, limit: int | None = None) -> Iterator[dict]:
        """Training-format rows (``reward_model.style = "rule"``)."""
        for rec in self.training_records(num_docs, limit):
            yield train_row_from_record(rec)

    def write_training_file(
        self, path: str | os.PathLike, num_docs: int = 200, limit: int | None = None, errors: list | None = None
    ) -> int:
        """Write training rows to ``path`` (.parquet / .json / .jsonl); returns the row count."""
        return write_train_file(self.training_records(num_docs, limit, errors), path)

    # -- evaluation --------------------------------------------------------------------------------

    def eval_questions(self, num_questions: int = 128) -> list[HotpotExample]:
        """A seeded choice of ``num_questions`` questions, shared by every evaluation length."""
        n = min(num_questions, len(self.examples))
        perm = np.random.default_rng([self.seed, _stable_int("eval-questions")]).permutation(len(self.examples))
        return [self.examples[int(i)] for i in perm[:n]]

    def eval_rows(self, num_docs: int, num_questions: int = 128, errors: list | None = None) -> Iterator[dict]:
        """Evaluation-format rows at ``num_docs`` documents (fields: context, input, answers,
        num_docs, index, _id); ``errors``: see :meth:`_records`."""
        for rec in self._records(enumerate(self.eval_questions(num_questions)), num_docs, errors):
            yield eval_row_from_record(rec)

    def write_eval_suite(
        self,
        out_dir: str | os.PathLike,
        doc_counts: Sequence[int] = EVAL_DOC_COUNTS,
        num_questions: int = 128,
        suffix: str = ".json",
        errors: list | None = None,
    ) -> dict[int, Path]:
        """Write ``eval_<N>docs<suffix>`` for each N in ``doc_counts``; returns ``{N: path}`` (a length at which
        no question could be built writes no file).

        Rows are streamed, so even the 25600-document file (about 3.5M tokens a question) is never
        held in memory as a whole.
        """
        from .buildcli import write_eval_suite

        return write_eval_suite(lambda n: self.eval_rows(n, num_questions, errors), out_dir, doc_counts, suffix)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m memagent_jax.data.hotpotqa``: build an evaluation suite and/or a training file."""
    import argparse

    from . import buildcli

    p = argparse.ArgumentParser(
        prog="python -m memagent_jax.data.hotpotqa",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    buildcli.add_common_arguments(p, default_train_docs=200)
    p.add_argument("--data_source", default="hotpotqa", help="data_source of training rows (default: %(default)s)")
    args = p.parse_args(argv)

    def make(path, errors, seed):
        builder = HotpotQABuilder.from_file(path, errors=errors, seed=seed, data_source=args.data_source)
        return builder, len(builder.examples)

    return buildcli.run(args, make)


if __name__ == "__main__":
    raise SystemExit(main())
