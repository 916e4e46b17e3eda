"""Data: MemAgent-format readers/writers, shared document stores, HotpotQA and SQuAD (RULER qa)
builders, synthetic tasks, iterator, tokenizers.

Nothing here imports JAX.  The TensorFlow-Datasets builder lives in
:mod:`memagent_jax.data.tfds_builder` and is imported only on request (``tensorflow-datasets`` and
``array_record`` are optional).
"""
from .records import DataFormatError, QARecord
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
from .docstore import DocumentStore, number_documents
from .hotpotqa import EVAL_DOC_COUNTS, HotpotQABuilder, load_hotpotqa
from .iterator import ShardedIterator
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
