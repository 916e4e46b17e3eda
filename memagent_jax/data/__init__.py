"""Data: MemAgent-format readers/writers, shared document stores, HotpotQA and SQuAD (RULER qa)
builders, synthetic tasks, iterator, tokenizers.

Nothing here imports JAX.  The builders (:mod:`.hotpotqa`, :mod:`.squad`) are imported on first use
of their names, so that ``python -m memagent_jax.data.hotpotqa`` / ``.squad`` run them as fresh
modules.  The TensorFlow-Datasets builder lives in :mod:`memagent_jax.data.tfds_builder` and is
imported only on request (``tensorflow-datasets`` and ``array_record`` are optional).
"""

from memagent_jax._lazy import lazy_exports

from .docstore import DocumentStore, number_documents
from .formats import (
    MemAgentFile,
    detect_kind,
    eval_row_from_record,
    iter_records,
    load_table,
    open_file,
    read_records,
    record_from_eval_row,
    record_from_train_row,
    train_row_from_record,
    write_eval_file,
    write_rows,
    write_train_file,
)
from .iterator import ShardedIterator
from .records import DataFormatError, QARecord
from .synthetic import TASKS, SyntheticConfig, SyntheticDataset, SyntheticSample, generate_sample, generate_samples
from .tokenizer import load_tokenizer, token_counter, train_tokenizer

__all__ = [
    "DataFormatError",
    "QARecord",
    "MemAgentFile",
    "detect_kind",
    "eval_row_from_record",
    "iter_records",
    "load_table",
    "open_file",
    "read_records",
    "record_from_eval_row",
    "record_from_train_row",
    "train_row_from_record",
    "write_eval_file",
    "write_rows",
    "write_train_file",
    "DocumentStore",
    "number_documents",
    "EVAL_DOC_COUNTS",
    "HotpotQABuilder",
    "load_hotpotqa",
    "ShardedIterator",
    "TASKS",
    "SyntheticConfig",
    "SyntheticDataset",
    "SyntheticSample",
    "generate_sample",
    "generate_samples",
    "load_tokenizer",
    "token_counter",
    "train_tokenizer",
]

# name -> submodule, imported on first access (PEP 562).
_LAZY = {
    "EVAL_DOC_COUNTS": ".hotpotqa",
    "HotpotQABuilder": ".hotpotqa",
    "load_hotpotqa": ".hotpotqa",
    "SquadQABuilder": ".squad",
    "load_squad": ".squad",
}
__all__ += ["SquadQABuilder", "load_squad"]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
