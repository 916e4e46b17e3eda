"""Materialise any record source as a TensorFlow-Datasets ArrayRecord dataset (TensorFlow optional).

For pods: ArrayRecord files give random access by index, so every host reads only its own records
(with :class:`~memagent_jax.data.iterator.ShardedIterator`) and a saved position resumes exactly.

Writing uses a ``tfds.core.GeneratorBasedBuilder`` with ``file_format="array_record"``; reading uses
``tfds.builder_from_directory(...).as_data_source(split)``.  Neither needs TensorFlow; they need
``tensorflow-datasets``, ``array_record`` and ``importlib_resources`` (the ``tfds`` extra), which are
imported only when this module's functions are called.

Features of every record: ``question``, ``document`` (text), ``answers`` (sequence of text),
``index`` (int64), ``data_source`` (text), ``extra`` (text: the record's ``extra`` dict as JSON).
Records keep the order in which they were given (no shuffling at write time).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .records import QARecord

__all__ = ["DEFAULT_NAME", "build_arrayrecord", "ArrayRecordRecords", "open_arrayrecord", "require_tfds"]

DEFAULT_NAME = "memagent_qa"
_VERSION = "1.0.0"


def require_tfds():
    """Import ``tensorflow_datasets`` or explain which optional packages are missing."""
    try:
        import array_record  # noqa: F401
        import importlib_resources  # noqa: F401  (tfds needs it but does not declare it)
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "ArrayRecord datasets need the optional packages tensorflow-datasets, array_record and "
            "importlib_resources: pip install 'memagent-jax[tfds]'"
        ) from e
    return tfds


def _to_record(item: Any, position: int) -> QARecord:
    if isinstance(item, QARecord):
        return item
    to_record = getattr(item, "to_record", None)  # SyntheticSample
    if callable(to_record):
        return to_record()
    if isinstance(item, Mapping):
        from .formats import record_from_eval_row, record_from_train_row

        if "reward_model" in item or "prompt" in item:
            return record_from_train_row(item, index=position)
        return record_from_eval_row(item, index=position)
    raise TypeError(f"cannot store a {type(item).__name__}: give QARecords, synthetic samples or format rows")


def _json_default(value: Any):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _builder_class(tfds):
    """The builder class, created once per process (tfds registers builder classes by name)."""
    cached = globals().get("_BUILDER_CLASS")
    if cached is not None:
        return cached
    import numpy as np

    class MemagentQa(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """QA records stored as ArrayRecord; splits come from ``self._split_sources``."""

        VERSION = tfds.core.Version(_VERSION)
        RELEASE_NOTES = {_VERSION: "Question, document, answers, index, data_source, extra (JSON)."}

        def __init__(self, *, split_sources: Mapping[str, Iterable[Any]] | None = None, **kwargs):
            self._split_sources = split_sources or {}
            super().__init__(**kwargs)

        def _info(self):
            text = tfds.features.Text()
            return tfds.core.DatasetInfo(
                builder=self,
                description="memagent-jax question-answering records over long documents.",
                disable_shuffling=True,
                features=tfds.features.FeaturesDict(
                    {
                        "question": text,
                        "document": tfds.features.Text(),
                        "answers": tfds.features.Sequence(tfds.features.Text()),
                        "index": np.int64,
                        "data_source": tfds.features.Text(),
                        "extra": tfds.features.Text(),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {name: self._generate_examples(source) for name, source in self._split_sources.items()}

        def _generate_examples(self, source):
            for position, item in enumerate(source):
                rec = _to_record(item, position)
                yield (
                    position,
                    {
                        "question": rec.question,
                        "document": rec.document,
                        "answers": list(rec.answers),
                        "index": int(rec.index),
                        "data_source": rec.data_source,
                        "extra": json.dumps(dict(rec.extra), ensure_ascii=False, sort_keys=True, default=_json_default),
                    },
                )

    globals()["_BUILDER_CLASS"] = MemagentQa
    return MemagentQa


def build_arrayrecord(
    splits: Mapping[str, Iterable[Any]],
    data_dir: str | os.PathLike,
    *,
    config_name: str = "default",
) -> Path:
    """Write ``{split name: records}`` as an ArrayRecord TFDS dataset; returns its directory.

    Records may be :class:`QARecord`, synthetic samples (anything with ``to_record()``) or rows of
    either MemAgent format.  The dataset lands in ``data_dir/memagent_qa/<config_name>/1.0.0``.
    Building again into an existing directory reuses it (TFDS does not regenerate prepared data).
    """
    tfds = require_tfds()
    cls = _builder_class(tfds)
    config = tfds.core.BuilderConfig(name=config_name, version=_VERSION)
    builder = cls(split_sources=splits, data_dir=str(data_dir), config=config, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return Path(builder.data_dir)


class ArrayRecordRecords(Sequence[QARecord]):
    """Random-access :class:`QARecord` view of one split of a dataset made by
    :func:`build_arrayrecord` (decodes one record per access)."""

    def __init__(self, dataset_dir: str | os.PathLike, split: str):
        tfds = require_tfds()
        self.dataset_dir = Path(dataset_dir)
        self.split = split
        self._builder = tfds.builder_from_directory(str(self.dataset_dir))
        self._source = self._builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        ex = self._source[i]

        def text(v) -> str:
            return v.decode("utf-8") if isinstance(v, bytes) else str(v)

        return QARecord(
            question=text(ex["question"]),
            document=text(ex["document"]),
            answers=tuple(text(a) for a in ex["answers"]),
            index=int(ex["index"]),
            data_source=text(ex["data_source"]),
            extra=json.loads(text(ex["extra"])),
        )


def open_arrayrecord(dataset_dir: str | os.PathLike, split: str = "train") -> ArrayRecordRecords:
    """Open one split of an ArrayRecord dataset for random access (no TensorFlow needed)."""
    return ArrayRecordRecords(dataset_dir, split)
