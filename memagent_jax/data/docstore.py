"""Shared document stores: evaluation rows whose ``context`` is a list of document indices.

The reference's longest evaluation files (RULER-HotpotQA at 12800 documents and more, RULER ``qa_*`` files past
2M tokens) do not repeat the documents in every row: ``context`` holds the indices of the row's documents, in
order, into one shared list of documents that the reference rebuilds from the raw dataset file each time:

* from a raw **HotpotQA** file (a JSON array of questions with ``context`` = ``[[title, [sentence, ...]], ...]``):
  every paragraph as ``"<title>\\n<sentences joined with no separator>"``, de-duplicated and sorted (Python string
  order);
* from a raw **SQuAD** file (v1.1 / v2.0: ``{"data": [{"paragraphs": [{"context": ...}, ...]}, ...]}``): every
  paragraph ``context``, de-duplicated and sorted.

A row's document text is then its documents numbered from 1, ``"Document <i>:\\n<document>"``, joined by blank
lines (:func:`number_documents`): exactly the text the reference feeds its agent.  :class:`DocumentStore` builds
the list the same way, so the reference's files load unchanged given the raw file they were built from; a plain
JSON array of strings is accepted too (a store written by :meth:`DocumentStore.write`).
"""

from __future__ import annotations

import functools
import json
import numbers
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .records import DataFormatError

__all__ = ["DocumentStore", "number_documents", "hotpotqa_paragraph"]


def number_documents(documents: Iterable[str]) -> str:
    """``"Document 1:\\n<doc>\\n\\nDocument 2:\\n<doc>..."``: documents numbered from 1, separated by a blank line."""
    return "\n\n".join(f"Document {i}:\n{doc}" for i, doc in enumerate(documents, 1))


def hotpotqa_paragraph(title: str, sentences: Sequence[str]) -> str:
    """One HotpotQA paragraph as a store document: the title, a newline, the sentences concatenated as they are."""
    return f"{title}\n{''.join(sentences)}"


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _hotpotqa_documents(data: list, path) -> list[str]:
    docs = set()
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataFormatError(path, i, None, f"must be a HotpotQA question object, got {_type_name(item)}")
        context = item.get("context")
        if not isinstance(context, list):
            raise DataFormatError(
                path, i, "context", f"must be a list of [title, [sentences]] pairs, got {_type_name(context)}"
            )
        for j, para in enumerate(context):
            if not (
                isinstance(para, (list, tuple))
                and len(para) == 2
                and isinstance(para[0], str)
                and isinstance(para[1], list)
                and all(isinstance(s, str) for s in para[1])
            ):
                raise DataFormatError(path, i, f"context[{j}]", "must be a [title, [sentence, ...]] pair of strings")
            docs.add(hotpotqa_paragraph(para[0], para[1]))
    return sorted(docs)


def _squad_documents(data: dict, path) -> list[str]:
    articles = data.get("data")
    if not isinstance(articles, list):
        raise DataFormatError(path, None, "data", f"must be a list of SQuAD articles, got {_type_name(articles)}")
    docs = set()
    for i, article in enumerate(articles):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DataFormatError(path, None, f"data[{i}].paragraphs", f"must be a list, got {_type_name(paragraphs)}")
        for j, para in enumerate(paragraphs):
            context = para.get("context") if isinstance(para, dict) else None
            if not isinstance(context, str):
                raise DataFormatError(
                    path, None, f"data[{i}].paragraphs[{j}].context", f"must be a string, got {_type_name(context)}"
                )
            docs.add(context)
    return sorted(docs)


class DocumentStore(Sequence[str]):
    """An ordered list of documents that index-list ``context`` rows point into.

    Args:
      documents: the documents, in store order (index 0 first).
      source: where they come from (named in errors).
    """

    def __init__(self, documents: Sequence[str], source: str = "<documents>"):
        self.documents = list(documents)
        self.source = str(source)
        for j, doc in enumerate(self.documents):
            if not isinstance(doc, str):
                raise DataFormatError(self.source, j, None, f"store document must be a string, got {_type_name(doc)}")

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, i):  # type: ignore[override]
        return self.documents[i]

    # -- building ------------------------------------------------------------------------------------------

    @classmethod
    def from_data(cls, data: Any, source: str = "<data>") -> DocumentStore:
        """The store for parsed JSON ``data``: a SQuAD object (has ``data``), a JSON array of strings (as is), or a
        JSON array of HotpotQA questions (paragraphs de-duplicated and sorted)."""
        if isinstance(data, dict):
            return cls(_squad_documents(data, source), source)
        if isinstance(data, list):
            if all(isinstance(d, str) for d in data):
                return cls(data, source)
            return cls(_hotpotqa_documents(data, source), source)
        raise DataFormatError(
            source,
            None,
            None,
            "must hold a SQuAD object, a HotpotQA array of questions or an "
            f"array of document strings, got {_type_name(data)}",
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> DocumentStore:
        """Read a store from a JSON file: the raw HotpotQA or SQuAD file the evaluation files were built from, or
        an array of document strings.  Loaded once per file version (cached on path, size and mtime)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"document store {path} does not exist")
        st = path.stat()
        return _load_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)

    @classmethod
    def coerce(cls, store: DocumentStore | str | os.PathLike | Sequence[str]) -> DocumentStore:
        """A DocumentStore from a store, a JSON file path or a list of document strings."""
        if isinstance(store, DocumentStore):
            return store
        if isinstance(store, (str, os.PathLike)):
            return cls.load(store)
        return cls(list(store))

    def write(self, path: str | os.PathLike) -> Path:
        """Write the documents as a JSON array of strings (atomically: a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.documents, f, ensure_ascii=False)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    # -- use -----------------------------------------------------------------------------------------------

    def check_indices(
        self, indices: Sequence[Any], *, path=None, row: int | None = None, field: str = "context"
    ) -> list[int]:
        """``indices`` as ints, each checked to point into the store (errors name file, row and ``field[j]``)."""
        out = []
        n = len(self.documents)
        for j, value in enumerate(indices):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise DataFormatError(
                    path, row, f"{field}[{j}]", f"must be an integer document index, got {_type_name(value)}"
                )
            if not 0 <= int(value) < n:
                raise DataFormatError(
                    path,
                    row,
                    f"{field}[{j}]",
                    f"is document index {int(value)}, outside the document store {self.source} ({n} documents)",
                )
            out.append(int(value))
        return out

    def document(self, indices: Sequence[Any], *, path=None, row: int | None = None, field: str = "context") -> str:
        """The numbered document text for a row whose ``context`` is ``indices`` (see :func:`number_documents`)."""
        return number_documents(self.documents[i] for i in self.check_indices(indices, path=path, row=row, field=field))


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, size: int, mtime_ns: int) -> DocumentStore:
    del size, mtime_ns  # cache keys only
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataFormatError(
            path, None, None, f"is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}"
        ) from e
    except UnicodeDecodeError as e:
        raise DataFormatError(path, None, None, f"is not UTF-8 text: {e}") from e
    return DocumentStore.from_data(data, path)
