"""SQuAD-based RULER QA (``qa_1``-style) long-document builder, beside the HotpotQA one.

Input: a SQuAD JSON file, v1.1 or v2.0: ``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id",
"question", "answers": [{"text", "answer_start"}, ...], "is_impossible"?}, ...]}, ...]}, ...]}``.  Unanswerable
v2.0 questions (``is_impossible: true``) are left out, as RULER does; v1.1 has no such flag (all answerable).

The paragraphs of the whole file, de-duplicated and sorted, are the document store
(:class:`~memagent_jax.data.docstore.DocumentStore`, the same list the reference rebuilds, so its index-list files
load against the same file).  For a question and a document count N the document is

1. the question's own (gold) paragraph,
2. with the other paragraphs of its article, then random other paragraphs of the file, up to N (when the
   article alone has more than N - 1 other paragraphs, N - 1 of them are drawn at random; when N is at least the
   store size, the whole store),
3. shuffled, and numbered: ``"Document 1:\\n<paragraph>\\n\\nDocument 2:\\n..."``.

The answers of a row are every answer text of the question, in file order (duplicates kept, as in the file); the
question is the plain SQuAD question (RULER's instruction wording belongs to the user's templates).  RULER picks N
per token budget by tokenizing; here N is given directly (a SQuAD paragraph is about 150 tokens, so 50 documents
are about 8K tokens).  Evaluation files take the first ``num_questions`` questions in file order (as RULER does);
every random choice comes from (seed, question id, N), so the same file and seed give byte-identical output.

Command line (``--help`` for every flag; exit status 0 / 1 some rows failed / 2 nothing built)::

    python -m memagent_jax.data.squad --input dev-v2.0.json --out_dir data/ruler_qa1 \\
        --eval_docs 50,100,200,400,800 --num_questions 128
    python -m memagent_jax.data.squad --input train-v2.0.json --train_out data/squad_train.parquet --train_docs 50
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .docstore import DocumentStore, number_documents
from .formats import eval_row_from_record, write_train_file
from .records import DataFormatError, QARecord

__all__ = ["SquadQuestion", "parse_squad", "load_squad", "SquadQABuilder", "main"]


@dataclasses.dataclass(frozen=True)
class SquadQuestion:
    """One answerable SQuAD question.

    doc: store index of its paragraph; article_docs: store indices of the other paragraphs of its article;
    where: its place in the raw file (``data[i].paragraphs[j].qas[k]``), named in errors.
    """

    id: str
    question: str
    answers: tuple[str, ...]
    doc: int
    article_docs: tuple[int, ...]
    title: str = ""
    where: str = ""


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _parse_question(qa: Any, where: str, path, number: int) -> tuple[str, str, tuple[str, ...]] | None:
    """(id, question, answers) of one ``qas`` item, None for an unanswerable one; DataFormatError when bad.

    ``number`` is the question's 0-based position among all questions of the file (the error's row)."""
    if not isinstance(qa, dict):
        raise DataFormatError(path, number, where, f"must be a question object, got {_type_name(qa)}")
    impossible = qa.get("is_impossible", False)
    if not isinstance(impossible, bool):
        raise DataFormatError(
            path, number, f"{where}.is_impossible", f"must be true or false, got {_type_name(impossible)}"
        )
    if impossible:
        return None
    for key in ("id", "question"):
        if not isinstance(qa.get(key), str):
            raise DataFormatError(path, number, f"{where}.{key}", f"must be a string, got {_type_name(qa.get(key))}")
    answers = qa.get("answers")
    if not isinstance(answers, list) or not answers:
        raise DataFormatError(path, number, f"{where}.answers", 'must be a non-empty list of {"text": ...} objects')
    texts = []
    for k, ans in enumerate(answers):
        text = ans.get("text") if isinstance(ans, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataFormatError(
                path, number, f"{where}.answers[{k}].text", f"must be a non-empty string, got {text!r}"
            )
        texts.append(text)
    return qa["id"], qa["question"], tuple(texts)


def parse_squad(
    data: Any, path: str | os.PathLike | None = None, errors: list | None = None
) -> tuple[list[SquadQuestion], DocumentStore]:
    """Check parsed SQuAD JSON and return its answerable questions and its document store.

    Errors name the file, the question's 0-based position among the file's questions as the row (None for an
    article or paragraph), and the field path (``data[i].paragraphs[j].qas[k].answers``).  With ``errors`` (a
    list) a bad article, paragraph or question is appended there and skipped, and the rest go on; without, the
    first one raises.  A file that is not a SQuAD object always raises.
    """
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataFormatError(
            path,
            None,
            "data",
            'must be a SQuAD object {"data": [articles]}, got '
            f"{_type_name(data.get('data') if isinstance(data, dict) else data)}",
        )

    def problem(err: DataFormatError) -> None:
        if errors is None:
            raise err
        errors.append(err)

    # Pass 1: the store (every paragraph context of the file, unique, sorted) and the paragraphs per article.
    articles: list[tuple[str, list[tuple[int, str, list]], int]] = []  # (title, [(j, context, qas)], i)
    contexts: set[str] = set()
    for i, article in enumerate(data["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            problem(
                DataFormatError(path, None, f"data[{i}].paragraphs", f"must be a list, got {_type_name(paragraphs)}")
            )
            continue
        title = article.get("title") if isinstance(article.get("title"), str) else ""
        kept = []
        for j, para in enumerate(paragraphs):
            context = para.get("context") if isinstance(para, dict) else None
            if not isinstance(context, str):
                problem(
                    DataFormatError(
                        path, None, f"data[{i}].paragraphs[{j}].context", f"must be a string, got {_type_name(context)}"
                    )
                )
                continue
            qas = para.get("qas", [])
            if not isinstance(qas, list):
                problem(
                    DataFormatError(
                        path, None, f"data[{i}].paragraphs[{j}].qas", f"must be a list, got {_type_name(qas)}"
                    )
                )
                qas = []
            contexts.add(context)
            kept.append((j, context, qas))
        articles.append((title, kept, i))
    store = DocumentStore(sorted(contexts), str(path) if path is not None else "<squad>")
    index_of = {c: n for n, c in enumerate(store.documents)}

    # Pass 2: the questions.
    questions: list[SquadQuestion] = []
    number = 0
    for title, kept, i in articles:
        article_docs = [index_of[c] for _, c, _ in kept]
        for j, context, qas in kept:
            doc = index_of[context]
            others = tuple(d for d in dict.fromkeys(article_docs) if d != doc)
            for k, qa in enumerate(qas):
                where = f"data[{i}].paragraphs[{j}].qas[{k}]"
                try:
                    parsed = _parse_question(qa, where, path, number)
                except DataFormatError as e:
                    problem(e)
                    parsed = None
                number += 1
                if parsed is not None:
                    qid, question, answers = parsed
                    questions.append(SquadQuestion(qid, question, answers, doc, others, title, where))
    return questions, store


def load_squad(path: str | os.PathLike, errors: list | None = None) -> tuple[list[SquadQuestion], DocumentStore]:
    """Read and check a SQuAD JSON file (see :func:`parse_squad`)."""
    from .hotpotqa import read_json_file

    return parse_squad(read_json_file(path), Path(path), errors)


def _stable_int(*parts: Any) -> int:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


class SquadQABuilder:
    """Builds RULER ``qa_1``-style evaluation files and training rows from SQuAD questions.

    Args:
      questions, store: from :func:`load_squad`.
      seed: the seed of every random choice.
      data_source: the ``data_source`` of training rows.
    """

    def __init__(
        self, questions: Sequence[SquadQuestion], store: DocumentStore, seed: int = 0, data_source: str = "squad"
    ):
        if not questions:
            raise ValueError("no answerable SQuAD questions given")
        self.questions = list(questions)
        self.store = store
        self.seed = int(seed)
        self.data_source = data_source
        self.source: str | None = store.source

    @classmethod
    def from_file(cls, path: str | os.PathLike, errors: list | None = None, **kwargs) -> SquadQABuilder:
        """Builder over a SQuAD file; with ``errors`` (a list) bad entries are collected there and skipped."""
        questions, store = load_squad(path, errors)
        builder = cls(questions, store, **kwargs)
        builder.source = str(path)
        return builder

    # -- documents --------------------------------------------------------------------------------------------

    def document_ids(self, q: SquadQuestion, num_docs: int) -> list[int]:
        """Store indices of the ``num_docs`` documents for ``q``, in document order (gold included once)."""
        if num_docs < 1:
            raise ValueError(f"num_docs must be at least 1, got {num_docs}")
        n = len(self.store)
        rng = np.random.default_rng([self.seed, _stable_int("squad", q.id, num_docs)])
        if num_docs >= n:
            ids = list(range(n))
        elif num_docs - 1 > len(q.article_docs):
            taken = {q.doc, *q.article_docs}
            rest = np.fromiter((d for d in range(n) if d not in taken), dtype=np.int64)
            extra = rng.choice(rest, size=num_docs - 1 - len(q.article_docs), replace=False).tolist()
            ids = [q.doc, *q.article_docs, *extra]
        else:
            picked = rng.choice(len(q.article_docs), size=num_docs - 1, replace=False).tolist()
            ids = [q.doc] + [q.article_docs[p] for p in picked]
        order = rng.permutation(len(ids))
        return [int(ids[o]) for o in order]

    def document(self, q: SquadQuestion, num_docs: int) -> str:
        """The numbered document text for ``q`` with ``num_docs`` paragraphs."""
        return number_documents(self.store[i] for i in self.document_ids(q, num_docs))

    def record(self, q: SquadQuestion, num_docs: int, index: int) -> QARecord:
        return QARecord(
            question=q.question,
            document=self.document(q, num_docs),
            answers=q.answers,
            index=index,
            data_source=self.data_source,
            extra={"id": q.id, "title": q.title, "num_docs": min(num_docs, len(self.store))},
        )

    def _records(self, pairs, num_docs: int, errors: list | None) -> Iterator[QARecord]:
        for i, q in pairs:
            try:
                rec = self.record(q, num_docs, i)
            except ValueError as e:
                if errors is None:
                    raise
                err = DataFormatError(self.source, None, q.where, f"cannot be built with {num_docs} documents: {e}")
                err.num_docs = num_docs
                errors.append(err)
                continue
            yield rec

    # -- training ---------------------------------------------------------------------------------------------

    def training_records(
        self, num_docs: int = 50, limit: int | None = None, errors: list | None = None
    ) -> Iterator[QARecord]:
        """Training records for the first ``limit`` questions (all by default), in file order."""
        questions = self.questions if limit is None else self.questions[:limit]
        yield from self._records(enumerate(questions), num_docs, errors)

    def write_training_file(
        self, path: str | os.PathLike, num_docs: int = 50, limit: int | None = None, errors: list | None = None
    ) -> int:
        """Write training rows (``reward_model.style = "rule"``) to ``path``; returns the row count."""
        return write_train_file(self.training_records(num_docs, limit, errors), path)

    # -- evaluation -------------------------------------------------------------------------------------------

    def eval_questions(self, num_questions: int = 128) -> list[SquadQuestion]:
        """The first ``num_questions`` answerable questions in file order, shared by every length."""
        return self.questions[:num_questions]

    def eval_rows(self, num_docs: int, num_questions: int = 128, errors: list | None = None) -> Iterator[dict]:
        """Evaluation-format rows (context, input, answers, num_docs, index, id, title)."""
        for rec in self._records(enumerate(self.eval_questions(num_questions)), num_docs, errors):
            yield eval_row_from_record(rec)

    def write_eval_suite(
        self,
        out_dir: str | os.PathLike,
        doc_counts: Sequence[int] = (50, 100, 200, 400, 800),
        num_questions: int = 128,
        suffix: str = ".json",
        errors: list | None = None,
    ) -> dict[int, Path]:
        """Write ``eval_<N>docs<suffix>`` for each N in ``doc_counts``; returns ``{N: path}``."""
        from .buildcli import write_eval_suite

        return write_eval_suite(lambda n: self.eval_rows(n, num_questions, errors), out_dir, doc_counts, suffix)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m memagent_jax.data.squad``: build an evaluation suite and/or a training file."""
    import argparse

    from . import buildcli

    p = argparse.ArgumentParser(
        prog="python -m memagent_jax.data.squad",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    buildcli.add_common_arguments(p, default_train_docs=50)
    p.add_argument("--data_source", default="squad", help="data_source of training rows (default: %(default)s)")
    args = p.parse_args(argv)

    def make(path, errors, seed):
        builder = SquadQABuilder.from_file(path, errors=errors, seed=seed, data_source=args.data_source)
        return builder, len(builder.questions)

    return buildcli.run(args, make)


if __name__ == "__main__":
    raise SystemExit(main())
