"""Readers and writers for the two MemAgent data formats (parquet, JSON, JSON Lines).

The formats are described field by field in ``docs/data_formats.md``.  In short:

* **training rows** -- ``data_source`` (str), ``prompt`` (list of ``{"role", "content"}`` chat
  messages; the question is the content of the last ``user`` message), ``context`` (str, the
  document), ``reward_model`` (``{"ground_truth": [str, ...], "style": str?}``), ``extra_info``
  (dict, optional; ``extra_info.index`` is the record id when present).
* **evaluation rows** -- ``context`` (str), ``input`` (str, the question), ``answers``
  (list of str), ``num_docs`` (int, optional), ``index`` (int, optional; defaults to the row number).
  RULER files name the answers ``outputs`` (accepted when ``answers`` is absent).  The reference's
  longest files store ``context`` as a list of document indices into a shared document store
  (:mod:`memagent_jax.data.docstore`); such rows need ``doc_store=`` when opened, and their
  document is the store's documents numbered from 1 (``num_docs`` defaults to the list's length).

Files load unchanged through ``datasets`` (offline; nothing is fetched) and every row is checked
when it is read: a bad row raises :class:`~memagent_jax.data.records.DataFormatError` naming the
file, the 0-based row and the field.  A single answer string is accepted where a list is expected
(it means a one-element list); everything else must match the types above.

Main entry points: :func:`open_file` (random-access view yielding :class:`QARecord`),
:func:`read_records`, :func:`write_train_file`, :func:`write_eval_file`.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from .records import DataFormatError, DataWriteError, QARecord

__all__ = [
    "TRAIN_FIELDS",
    "EVAL_FIELDS",
    "Kind",
    "detect_kind",
    "load_table",
    "MemAgentFile",
    "open_file",
    "read_records",
    "iter_records",
    "record_from_train_row",
    "record_from_eval_row",
    "train_row_from_record",
    "eval_row_from_record",
    "write_rows",
    "write_train_file",
    "write_eval_file",
]

Kind = Literal["train", "eval"]

#: Field names of a training row (``extra_info`` optional).
TRAIN_FIELDS = ("data_source", "prompt", "context", "reward_model", "extra_info")
#: Field names of an evaluation row (``num_docs`` and ``index`` optional).
EVAL_FIELDS = ("context", "input", "answers", "num_docs", "index", "outputs")

_SUFFIXES = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}


# ---------------------------------------------------------------------------------------------
# Row validation
# ---------------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_sequence(value: Any) -> list | None:
    """Lists, tuples and 1-d numpy arrays count as lists."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if type(value).__name__ == "ndarray" and getattr(value, "ndim", None) == 1:
        return value.tolist()
    return None


def _string_list(value: Any, path, row, field) -> tuple[str, ...]:
    """A non-empty list of strings (a lone string is a one-element list)."""
    if isinstance(value, str):
        return (value,)
    seq = _as_sequence(value)
    if seq is None or not seq:
        got = "an empty list" if seq == [] else _type_name(value)
        raise DataFormatError(path, row, field, f"must be a non-empty list of strings, got {got}")
    for j, item in enumerate(seq):
        if not isinstance(item, str):
            raise DataFormatError(path, row, f"{field}[{j}]", f"must be a string, got {_type_name(item)}")
    return tuple(seq)


def _require(row: Mapping, name: str, path, index) -> Any:
    value = row.get(name)
    if value is None:
        problem = "is null" if name in row else "is missing"
        raise DataFormatError(path, index, name, problem)
    return value


def _require_str(row: Mapping, name: str, path, index) -> str:
    value = _require(row, name, path, index)
    if not isinstance(value, str):
        raise DataFormatError(path, index, name, f"must be a string, got {_type_name(value)}")
    return value


def _check_mapping(row: Any, path, index) -> Mapping:
    if not isinstance(row, Mapping):
        raise DataFormatError(path, index, None, f"must be an object with named fields, got {_type_name(row)}")
    return row


def record_from_train_row(row: Mapping, *, path: str | os.PathLike | None = None, index: int = 0) -> QARecord:
    """Check one training row and convert it to a :class:`QARecord`.

    ``path`` and ``index`` only serve the error message.  The question is the content of the last
    message whose role is ``user``; ``QARecord.index`` is ``extra_info["index"]`` when that is an
    integer, else ``index``.
    """
    row = _check_mapping(row, path, index)
    data_source = _require_str(row, "data_source", path, index)
    prompt = _require(row, "prompt", path, index)
    messages = _as_sequence(prompt)
    if messages is None or not messages:
        got = "an empty list" if messages == [] else _type_name(prompt)
        raise DataFormatError(path, index, "prompt", f"must be a non-empty list of chat messages, got {got}")
    question = None
    for j, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise DataFormatError(
                path, index, f"prompt[{j}]", f"must be an object with 'role' and 'content', got {_type_name(msg)}"
            )
        for key in ("role", "content"):
            if not isinstance(msg.get(key), str):
                raise DataFormatError(
                    path, index, f"prompt[{j}].{key}", f"must be a string, got {_type_name(msg.get(key))}"
                )
        if msg["role"] == "user":
            question = msg["content"]
    if question is None:
        raise DataFormatError(path, index, "prompt", "has no message with role 'user' (the question)")
    context = _require_str(row, "context", path, index)
    reward_model = _require(row, "reward_model", path, index)
    if not isinstance(reward_model, Mapping):
        raise DataFormatError(
            path, index, "reward_model", f"must be an object with a 'ground_truth' list, got {_type_name(reward_model)}"
        )
    if reward_model.get("ground_truth") is None:
        raise DataFormatError(path, index, "reward_model.ground_truth", "is missing")
    answers = _string_list(reward_model["ground_truth"], path, index, "reward_model.ground_truth")
    style = reward_model.get("style")
    if style is not None and not isinstance(style, str):
        raise DataFormatError(path, index, "reward_model.style", f"must be a string, got {_type_name(style)}")
    extra_info = row.get("extra_info")
    if extra_info is None:
        extra_info = {}
    elif not isinstance(extra_info, Mapping):
        raise DataFormatError(path, index, "extra_info", f"must be an object, got {_type_name(extra_info)}")
    record_index = extra_info.get("index")
    if record_index is not None and not _is_int(record_index):
        raise DataFormatError(path, index, "extra_info.index", f"must be an integer, got {_type_name(record_index)}")
    extra = dict(extra_info)
    if style is not None:
        extra.setdefault("reward_style", style)
    return QARecord(
        question=question,
        document=context,
        answers=answers,
        index=int(record_index) if record_index is not None else int(index),
        data_source=data_source,
        extra=extra,
    )


def _eval_context(row: Mapping, path, index, doc_store) -> tuple[str, int | None]:
    """(document text, number of documents when ``context`` is an index list, else None)."""
    value = _require(row, "context", path, index)
    if isinstance(value, str):
        return value, None
    indices = _as_sequence(value)
    if indices is None:
        raise DataFormatError(
            path, index, "context", f"must be a string or a list of document indices, got {_type_name(value)}"
        )
    if doc_store is None:
        raise DataFormatError(
            path,
            index,
            "context",
            "is a list of document indices into a shared document store; "
            "give the store (doc_store=: the raw HotpotQA / SQuAD JSON the file was built from, "
            "or a JSON array of documents)",
        )
    return doc_store.document(indices, path=path, row=index), len(indices)


def _eval_answers(row: Mapping, path, index) -> tuple[str, ...]:
    """``answers``, or RULER's ``outputs`` when ``answers`` is absent (or null)."""
    if row.get("answers") is None and row.get("outputs") is not None:
        return _string_list(row["outputs"], path, index, "outputs")
    if row.get("answers") is None and "answers" not in row:
        raise DataFormatError(path, index, "answers", "is missing (RULER files may name it 'outputs')")
    return _string_list(_require(row, "answers", path, index), path, index, "answers")


def record_from_eval_row(
    row: Mapping, *, path: str | os.PathLike | None = None, index: int = 0, data_source: str = "", doc_store=None
) -> QARecord:
    """Check one evaluation row and convert it to a :class:`QARecord`.

    ``QARecord.index`` is the row's ``index`` when present, else ``index`` (the row number);
    ``num_docs`` and any unknown non-null fields go to ``QARecord.extra``.  The answers are
    ``answers``, else RULER's ``outputs``.  A ``context`` that is a list of document indices is
    resolved through ``doc_store`` (a :class:`~memagent_jax.data.docstore.DocumentStore`).
    """
    row = _check_mapping(row, path, index)
    context, listed_docs = _eval_context(row, path, index, doc_store)
    question = _require_str(row, "input", path, index)
    answers = _eval_answers(row, path, index)
    extra: dict[str, Any] = {}
    if listed_docs is not None and row.get("num_docs") is None:
        extra["num_docs"] = listed_docs
    num_docs = row.get("num_docs")
    if num_docs is not None:
        if not _is_int(num_docs) or num_docs < 0:
            raise DataFormatError(path, index, "num_docs", f"must be a non-negative integer, got {num_docs!r}")
        extra["num_docs"] = int(num_docs)
    record_index = row.get("index")
    if record_index is not None and not _is_int(record_index):
        raise DataFormatError(path, index, "index", f"must be an integer, got {_type_name(record_index)}")
    for key, value in row.items():
        if key not in EVAL_FIELDS and value is not None:
            extra[key] = value
    return QARecord(
        question=question,
        document=context,
        answers=answers,
        index=int(record_index) if record_index is not None else int(index),
        data_source=data_source,
        extra=extra,
    )


def train_row_from_record(record: QARecord, *, reward_style: str = "rule") -> dict:
    """The training-format row for a record (``extra_info`` always carries ``index``)."""
    extra = dict(record.extra)
    style = extra.pop("reward_style", reward_style)
    extra["index"] = int(record.index)
    return {
        "data_source": record.data_source,
        "prompt": [{"role": "user", "content": record.question}],
        "context": record.document,
        "reward_model": {"style": style, "ground_truth": list(record.answers)},
        "extra_info": extra,
    }


def eval_row_from_record(record: QARecord) -> dict:
    """The evaluation-format row for a record (``num_docs`` only when the record has it)."""
    row: dict[str, Any] = {"context": record.document, "input": record.question, "answers": list(record.answers)}
    if record.extra.get("num_docs") is not None:
        row["num_docs"] = int(record.extra["num_docs"])
    row["index"] = int(record.index)
    for key, value in record.extra.items():
        if key not in EVAL_FIELDS and key not in row:
            row[key] = value
    return row


def detect_kind(columns: Iterable[str], *, path: str | os.PathLike | None = None) -> Kind:
    """``"train"`` if the columns include ``reward_model`` or ``prompt``, ``"eval"`` if they include
    ``input`` or ``answers``; otherwise :class:`DataFormatError`."""
    columns = set(columns)
    if "reward_model" in columns or "prompt" in columns:
        return "train"
    if "input" in columns or "answers" in columns or "outputs" in columns:
        return "eval"
    raise DataFormatError(
        path,
        None,
        None,
        "is neither a training file (needs 'prompt', 'reward_model') nor an evaluation file (needs 'input', "
        f"'answers'); columns: {sorted(columns)}",
    )


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _file_format(path: Path) -> str:
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataFormatError(
            path, None, None, f"has an unknown extension {path.suffix!r}; expected one of {sorted(_SUFFIXES)}"
        )
    return fmt


def _locate_json_problem(path: Path) -> DataFormatError | None:
    """Parse a JSON / JSON Lines file with the standard library to find the first bad row."""
    with open(path, encoding="utf-8", errors="strict") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            return DataFormatError(path, None, None, f"is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}")
        if not isinstance(data, list):
            return DataFormatError(path, None, None, "must hold a JSON array of objects")
        for i, item in enumerate(data):
            if not isinstance(item, dict):
                return DataFormatError(path, i, None, f"must be a JSON object, got {_type_name(item)}")
        return None
    row = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                return DataFormatError(path, row, None, f"is not valid JSON: {e.msg} (column {e.colno})")
            if not isinstance(item, dict):
                return DataFormatError(path, row, None, f"must be a JSON object, got {_type_name(item)}")
            row += 1
    return None


def _read_json_rows(path: Path) -> list[dict]:
    """All rows of a JSON array or JSON Lines file, parsed by the standard library."""
    problem = _locate_json_problem(path)
    if problem is not None:
        raise problem
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


_NOT_UTF8 = re.compile("[\udc80-\udcff]")


def _non_utf8_field(value: Any, where: str = "") -> str | None:
    """The path of the first string (or key) in a parsed JSON value holding bytes that were not UTF-8
    (decoded with ``surrogateescape``), e.g. ``"context"`` or ``"answers[1]"``; None when there is none."""
    if isinstance(value, str):
        return where or "<row>" if _NOT_UTF8.search(value) else None
    if isinstance(value, Mapping):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and _NOT_UTF8.search(key):
                return path
            found = _non_utf8_field(item, path)
            if found is not None:
                return found
    elif isinstance(value, list):
        for j, item in enumerate(value):
            found = _non_utf8_field(item, f"{where}[{j}]")
            if found is not None:
                return found
    return None


def _check_json_row(item: Any, path: Path, row: int, line: int | None = None) -> DataFormatError | None:
    where = f" (line {line})" if line is not None else ""
    if not isinstance(item, dict):
        return DataFormatError(path, row, None, f"must be a JSON object, got {_type_name(item)}{where}")
    field = _non_utf8_field(item)
    if field is not None:
        return DataFormatError(path, row, field, f"holds bytes that are not UTF-8 text{where}")
    return None


def read_json_rows_tolerant(path: str | os.PathLike) -> tuple[list[dict | None], dict[int, DataFormatError]]:
    """Every row of a JSON array or JSON Lines file, read with the standard library, bad rows kept apart.

    Returns (rows, errors): ``rows[i]`` is row i's object, or None when row i is bad, and ``errors[i]`` then
    says why (a JSON Lines line that does not parse, an array item or line that is not an object, text that
    is not UTF-8), naming the file, the 0-based row (blank lines are not rows) and the field where one is
    at fault.  A JSON array that does not parse as a whole cannot be split into rows: that raises
    :class:`DataFormatError` for the file.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    rows: list[dict | None] = []
    errors: dict[int, DataFormatError] = {}
    if raw.lstrip().startswith(b"["):
        try:
            data = json.loads(raw.decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError as e:
            raise DataFormatError(
                path,
                None,
                None,
                f"is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}; "
                f"a JSON array that does not parse cannot be read row by row",
            ) from None
        if not isinstance(data, list):
            raise DataFormatError(path, None, None, "must hold a JSON array of objects")
        for i, item in enumerate(data):
            problem = _check_json_row(item, path, i)
            rows.append(None if problem else item)
            if problem:
                errors[i] = problem
        return rows, errors
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        i = len(rows)
        try:
            item = json.loads(line.decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError as e:
            rows.append(None)
            errors[i] = DataFormatError(path, i, None, f"is not valid JSON (line {lineno}, column {e.colno}): {e.msg}")
            continue
        problem = _check_json_row(item, path, i, lineno)
        rows.append(None if problem else item)
        if problem:
            errors[i] = problem
    return rows, errors


def _unreadable(path, e: OSError) -> DataFormatError:
    return DataFormatError(path, None, None, f"cannot be read ({(e.strerror or str(e)).lower()})")


def check_readable(path: str | os.PathLike) -> None:
    """Raises :class:`DataFormatError` naming ``path`` when it cannot be read as a table: it does not exist, is a
    directory, is a pipe (tables are memory-mapped and read more than once) or cannot be opened (no permission)."""
    from memagent_jax.storage.paths import input_file_problem

    problem = input_file_problem(path, pipes=False)
    if problem is not None:
        raise DataFormatError(path, None, None, problem)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise _unreadable(path, e) from None


def load_table(path: str | os.PathLike, *, cache_dir: str | None = None, keep_in_memory: bool = False):
    """Load a parquet / JSON / JSON Lines file as a ``datasets.Dataset``, unchanged and offline.

    ``.json`` may hold a JSON array of objects or one object per line.  A file that cannot be
    read (missing, a directory, a pipe, no permission) or parsed raises :class:`DataFormatError` naming the
    file (and the row, for JSON files).
    """
    import datasets

    path = Path(path)
    fmt = _file_format(path)
    check_readable(path)
    progress_was_enabled = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        if fmt == "parquet":
            return datasets.Dataset.from_parquet(str(path), cache_dir=cache_dir, keep_in_memory=keep_in_memory)
        return datasets.Dataset.from_json(str(path), cache_dir=cache_dir, keep_in_memory=keep_in_memory)
    except DataFormatError:
        raise
    except Exception as e:  # datasets / pyarrow errors: find the row ourselves when we can
        cause = e.__cause__ or e
        located = None
        if fmt == "json":
            try:
                located = _locate_json_problem(path)
            except UnicodeDecodeError as ue:
                located = DataFormatError(path, None, None, f"is not UTF-8 text: {ue}")
            except OSError as oe:
                located = _unreadable(path, oe)
        if located is not None:
            raise located from e
        raise DataFormatError(path, None, None, f"could not be read as {fmt}: {type(cause).__name__}: {cause}") from e
    finally:
        if progress_was_enabled:
            datasets.utils.logging.enable_progress_bar()


class MemAgentFile(Sequence[QARecord]):
    """A random-access view of one MemAgent-format file.

    ``file[i]`` checks row ``i`` and returns it as a :class:`QARecord`; ``file.row(i)`` returns the
    raw row dict unchanged.  Rows are read lazily from the memory-mapped ``datasets`` table, so a
    file of multi-megabyte documents is never loaded as a whole.  Usable directly as the source of
    :class:`~memagent_jax.data.iterator.ShardedIterator`.

    ``doc_store``: for evaluation files whose ``context`` is a list of document indices, the shared
    store (a :class:`~memagent_jax.data.docstore.DocumentStore`, a path to the raw HotpotQA /
    SQuAD JSON the file was built from or to a JSON array of documents, or a list of strings).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        kind: Kind | Literal["auto"] = "auto",
        *,
        data_source: str | None = None,
        on_bad_row: Literal["raise", "keep"] = "raise",
        doc_store=None,
        **load_kwargs,
    ):
        self.path = Path(path)
        if doc_store is not None:
            from .docstore import DocumentStore

            doc_store = DocumentStore.coerce(doc_store)
        self.doc_store = doc_store
        if on_bad_row not in ("raise", "keep"):
            raise ValueError(f"on_bad_row must be 'raise' or 'keep', got {on_bad_row!r}")
        # on_bad_row='keep': a JSON / JSON Lines file that does not load as a table (a malformed line, an item
        # that is not an object, bytes that are not UTF-8) is read row by row instead; its bad rows stay in
        # place and raise their DataFormatError (file, row, field) when read, so callers can go on past them.
        self.bad_rows: dict[int, DataFormatError] = {}
        fallback: list[dict | None] | None = None
        _file_format(self.path)
        check_readable(self.path)  # a file that cannot be read is not read row by row either
        try:
            self.dataset = load_table(self.path, **load_kwargs)
        except DataFormatError:
            if on_bad_row == "raise" or _file_format(self.path) != "json":
                raise
            try:
                fallback, self.bad_rows = read_json_rows_tolerant(self.path)
            except OSError as e:
                raise _unreadable(self.path, e) from None
            self.dataset = None
        if fallback is not None:
            columns = list(dict.fromkeys(k for r in fallback if r is not None for k in r))
            if not columns:
                raise DataFormatError(
                    self.path,
                    None,
                    None,
                    f"has no readable row ({len(self.bad_rows)} bad rows; "
                    f"first: {next(iter(self.bad_rows.values()), 'none')})",
                )
        else:
            columns = self.dataset.column_names
        detected = detect_kind(columns, path=self.path)
        if kind == "auto":
            kind = detected
        elif kind not in ("train", "eval"):
            raise ValueError(f"kind must be 'train', 'eval' or 'auto', got {kind!r}")
        elif kind != detected:
            raise DataFormatError(
                self.path,
                None,
                None,
                f"was opened as {kind!r} data but its columns {columns} are those of {detected!r} data",
            )
        self.kind: Kind = kind
        self.data_source = data_source if data_source is not None else self.path.stem
        # A JSON column whose rows mix types comes back from ``datasets`` as a ``Json`` column, in
        # which a bare string such as "50" is decoded as the number 50.  Such files are read
        # exactly with the standard library instead (held in memory; they are rare and small).
        self._exact_rows: list[dict | None] | None = fallback
        if (
            fallback is None
            and _file_format(self.path) == "json"
            and any(type(f).__name__ == "Json" for f in self.dataset.features.values())
        ):
            try:
                self._exact_rows = _read_json_rows(self.path)
            except OSError as e:
                raise _unreadable(self.path, e) from None

    def __len__(self) -> int:
        return len(self._exact_rows) if self._exact_rows is not None else len(self.dataset)

    def row(self, i: int) -> dict:
        """Raw row ``i`` as loaded (no checks; a row that could not be read raises its DataFormatError)."""
        if int(i) in self.bad_rows:
            raise self.bad_rows[int(i)]
        if self._exact_rows is not None:
            return self._exact_rows[int(i)]
        try:
            return self.dataset[int(i)]
        except UnicodeDecodeError as e:  # a string cell of a table holding bytes that are not UTF-8
            raise DataFormatError(
                self.path,
                int(i),
                self._non_utf8_column(int(i)),
                f"holds bytes that are not UTF-8 text ({e.reason} at byte {e.start})",
            ) from None

    def _non_utf8_column(self, i: int) -> str | None:
        for name in self.dataset.column_names:
            try:
                self.dataset.data.column(name)[i].as_py()
            except UnicodeDecodeError:
                return name
            except Exception:  # noqa: BLE001 - only naming the field; the row error is raised regardless
                return None
        return None

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"row {i} out of range for {self.path} ({n} rows)")
        row = self.row(i)
        if self.kind == "train":
            return record_from_train_row(row, path=self.path, index=i)
        return record_from_eval_row(
            row, path=self.path, index=i, data_source=self.data_source, doc_store=self.doc_store
        )

    def __iter__(self) -> Iterator[QARecord]:
        for i in range(len(self)):
            yield self[i]

    def validate(self) -> int:
        """Check every row; returns the number of rows or raises the first :class:`DataFormatError`."""
        for i in range(len(self)):
            self[i]
        return len(self)


def open_file(path: str | os.PathLike, kind: Kind | Literal["auto"] = "auto", **kwargs) -> MemAgentFile:
    """Open a training or evaluation file (format detected from its columns unless ``kind`` is given)."""
    return MemAgentFile(path, kind, **kwargs)


def iter_records(path: str | os.PathLike, kind: Kind | Literal["auto"] = "auto", **kwargs) -> Iterator[QARecord]:
    """Yield every row of a file as a checked :class:`QARecord`."""
    yield from open_file(path, kind, **kwargs)


def read_records(path: str | os.PathLike, kind: Kind | Literal["auto"] = "auto", **kwargs) -> list[QARecord]:
    """All rows of a file as checked :class:`QARecord` objects."""
    return list(iter_records(path, kind, **kwargs))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _json_default(value: Any):
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")


def _checked_rows(rows: Iterable[Mapping | QARecord], kind: Kind) -> Iterator[dict]:
    """Convert records to rows and check every row before it is written."""
    for i, item in enumerate(rows):
        if isinstance(item, QARecord):
            row = train_row_from_record(item) if kind == "train" else eval_row_from_record(item)
        else:
            row = dict(_check_mapping(item, None, i))
            if kind == "train":
                record_from_train_row(row, index=i)
                extra = dict(row.get("extra_info") or {})
                extra.setdefault("index", i)  # parquet cannot store an empty struct
                row["extra_info"] = extra
            else:
                record_from_eval_row(row, index=i)
                row.setdefault("index", i)
            row = {k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()}
        yield row


def _write_parquet(rows: Iterator[dict], path: Path, max_rows: int, max_bytes: int, shown_path: Path) -> int:
    """Stream rows to ``path`` in row groups; errors name ``shown_path``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    schema = None
    extra_keys: set[str] | None = None
    count = 0
    batch: list[dict] = []
    batch_bytes = 0

    def flush():
        nonlocal writer, schema, extra_keys
        if not batch:
            return
        if schema is None:
            table = pa.Table.from_pylist(batch)
            schema = table.schema
            writer = pq.ParquetWriter(str(path), schema)
            extra_keys = {k for r in batch for k in (r.get("extra_info") or {})}
        else:
            first = count - len(batch)
            for j, r in enumerate(batch):
                new = set(r.get("extra_info") or {}) - (extra_keys or set())
                if new:
                    raise DataFormatError(
                        shown_path,
                        first + j,
                        "extra_info",
                        f"adds keys {sorted(new)} not in the first rows; parquet needs one schema (write JSON Lines "
                        "instead, or give all rows the same keys)",
                    )
                missing = set(r) - set(schema.names)
                if missing:
                    raise DataFormatError(
                        shown_path,
                        first + j,
                        sorted(missing)[0],
                        "is not a column of the first rows; parquet needs one schema",
                    )
            try:
                table = pa.Table.from_pylist(batch, schema=schema)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise DataFormatError(
                    shown_path, first, None, f"rows {first}..{count - 1} do not fit the schema of the first rows: {e}"
                ) from e
        writer.write_table(table)
        batch.clear()

    try:
        for row in rows:
            batch.append(row)
            batch_bytes += len(row.get("context", "")) * 4
            count += 1
            if len(batch) >= max_rows or batch_bytes >= max_bytes:
                flush()
                batch_bytes = 0
        flush()
        if writer is None:  # no rows at all: an empty file with no columns
            pq.write_table(pa.table({}), str(path))
    finally:
        if writer is not None:
            writer.close()
    return count


def write_rows(
    rows: Iterable[Mapping | QARecord],
    path: str | os.PathLike,
    kind: Kind,
    *,
    rows_per_group: int = 64,
    max_group_bytes: int = 1 << 29,
) -> int:
    """Write rows (format dicts or :class:`QARecord`) as a ``kind`` file; returns the row count.

    The format follows the extension: ``.jsonl`` (one object per line), ``.json`` (a JSON array),
    ``.parquet`` (row groups of at most ``rows_per_group`` rows / about ``max_group_bytes`` of
    text).  Rows are streamed, never all held at once, and checked before they are written.
    Parquet needs the same fields (and ``extra_info`` keys) in every row.  Rows go to ``<path>.partial``,
    renamed to ``path`` at the end; a write that fails (disk full, no permission) raises
    :class:`DataWriteError` naming ``path``, with the partial file removed.
    """
    if kind not in ("train", "eval"):
        raise ValueError(f"kind must be 'train' or 'eval', got {kind!r}")
    path = Path(path)
    fmt = _file_format(path)
    checked = _checked_rows(rows, kind)
    tmp = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "parquet":
            count = _write_parquet(checked, tmp, rows_per_group, max_group_bytes, path)
        else:
            count = 0
            array = path.suffix.lower() == ".json"
            with open(tmp, "w", encoding="utf-8") as f:
                if array:
                    f.write("[\n")
                for row in checked:
                    if array and count:
                        f.write(",\n")
                    f.write(json.dumps(row, ensure_ascii=False, default=_json_default))
                    if not array:
                        f.write("\n")
                    count += 1
                if array:
                    f.write("\n]\n")
        os.replace(tmp, path)
    except OSError as e:  # disk full, no permission, ...: one error naming the file, nothing half-written left
        raise DataWriteError(path, e) from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return count


def write_train_file(rows: Iterable[Mapping | QARecord], path: str | os.PathLike, **kwargs) -> int:
    """Write training rows (see :func:`write_rows`)."""
    return write_rows(rows, path, "train", **kwargs)


def write_eval_file(rows: Iterable[Mapping | QARecord], path: str | os.PathLike, **kwargs) -> int:
    """Write evaluation rows (see :func:`write_rows`)."""
    return write_rows(rows, path, "eval", **kwargs)
