"""The uniform internal record and the data error type shared by every reader and builder."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from memagent_jax.errors import UserError

__all__ = ["QARecord", "DataFormatError", "DataWriteError"]


class DataFormatError(UserError):
    """A data file or row does not follow its format.

    The message names the file, the 0-based row and the field, e.g.
    ``data/train.parquet row 17: field 'reward_model.ground_truth' must be a non-empty list of
    strings, got int``.  The parts are also available as attributes.
    """

    def __init__(self, path: str | None, row: int | None, field: str | None, problem: str):
        self.path = None if path is None else str(path)
        self.row = row
        self.field = field
        self.problem = problem
        where = self.path if self.path is not None else "<rows>"
        if row is not None:
            where += f" row {row}"
        message = f"{where}: field {field!r} {problem}" if field is not None else f"{where}: {problem}"
        super().__init__(message)

    def __reduce__(self):  # keep the error picklable (multiprocessing, subprocess tests)
        return (type(self), (self.path, self.row, self.field, self.problem))


class DataWriteError(OSError):
    """Writing a data file failed (disk full, no permission, ...). The message names the file; the writer has removed
    its ``.partial`` file, so nothing half-written is left (an older file of the same name is untouched)."""

    def __init__(self, path: str | os.PathLike, cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.path = os.fspath(path)
        self.filename = self.path

    def __str__(self) -> str:
        return f"{self.path}: cannot be written ({self.strerror}); its partial file was removed"

    def __reduce__(self):
        return (type(self), (self.path, OSError(self.errno, self.strerror)))


@dataclasses.dataclass(frozen=True)
class QARecord:
    """One question over one document, whatever file format or generator it came from.

    Attributes:
      question: the question text (the user content of a training row, ``input`` of an evaluation
        row).
      document: the long document (``context``).
      answers: the accepted answers (``reward_model.ground_truth`` / ``answers``), at least one.
      index: a stable integer id (``extra_info.index`` / ``index``, else the row number).
      data_source: where the record comes from (``data_source`` of a training row; for evaluation
        rows the reader fills in a name, by default the file's stem).
      extra: everything else (``extra_info`` of a training row; ``num_docs`` and unknown fields of an
        evaluation row).  Treat as read-only.
    """

    question: str
    document: str
    answers: tuple[str, ...]
    index: int = 0
    data_source: str = ""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.answers, str):
            object.__setattr__(self, "answers", (self.answers,))
        elif not isinstance(self.answers, tuple):
            object.__setattr__(self, "answers", tuple(self.answers))

    __hash__ = None  # extra is a dict; records compare by value but are not hashable
