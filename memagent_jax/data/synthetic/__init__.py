"""RULER-style synthetic long-document tasks: seeded, deterministic, no downloads, lazy documents.

Every sample is a question, a document of a target length *in tokens of a given tokenizer*, and the accepted
answers.  The document is a haystack of bland generated sentences with a few inserted facts ("needles"); it is
rendered on demand, piece by piece, so a multi-million-token document is never one Python string unless
:meth:`SyntheticSample.text` is called.

Built-in tasks (:data:`TASKS`; each module's docstring says exactly what it asks):

``niah_single``, ``niah_multikey``, ``niah_multivalue``, ``niah_multiquery`` (:mod:`.niah`)
    Secret numbers for colour-creature keys, with other keys' needles, several values or several queries.
``keyed_recall`` (:mod:`.keyed_recall`)
    The word stated for one creature among look-alike facts, the asked fact at every ordinal equally often;
    optionally multi-hop and in the "pair" fact style.  The memory task of the CPU default job.
``variable_tracking`` (:mod:`.variable_tracking`)
    Every variable of a chain of copies that holds a value.
``multihop_qa`` (:mod:`.multihop_qa`)
    An entity 1..4 relations away from a person in a generated world; every hop is a separate fact.

Layout of the package: :mod:`.vocabulary` (word lists, filler sentences, names, numbers), :mod:`.task` (what a
task provides), :mod:`.registry` (name -> task), :mod:`.config` (:class:`SyntheticConfig`, the knobs),
:mod:`.document` (facts, placement, lazy rendering), :mod:`.dataset` (samples and rows), :mod:`.corpus`
(tokenizer training texts).

Rows: :meth:`SyntheticSample.to_record` and :class:`SyntheticDataset` give :class:`~memagent_jax.data.records.
QARecord` rows (question, document, answers, index, ``data_source="synthetic_<task>"``, ``extra`` with task,
num_tokens, metric, reward_style, seed); :func:`concatenated_records` joins several documents into one row.

Seeds: sample ``index`` of a config is a pure function of (config, index, the tokenizer's token counts), the
same in every process; the question and answers depend on the task, seed, index and count knobs but never on
``num_tokens`` (see :mod:`.dataset`).

New tasks: build a :class:`SyntheticTask` and pass it to :func:`register_task`; :func:`get_task` looks one up.
"""

from .config import FACT_STYLES, SyntheticConfig
from .corpus import tokenizer_corpus, vocabulary_texts, whitespace_counter
from .dataset import SyntheticDataset, concatenated_records, generate_sample, generate_samples, other_fact_records
from .document import Fact, SyntheticSample
from .registry import TASKS, get_task, register_task, task_names
from .task import Draft, SyntheticTask

__all__ = [
    "TASKS",
    "FACT_STYLES",
    "SyntheticConfig",
    "Fact",
    "SyntheticSample",
    "SyntheticDataset",
    "generate_sample",
    "generate_samples",
    "concatenated_records",
    "other_fact_records",
    "vocabulary_texts",
    "tokenizer_corpus",
    "whitespace_counter",
    "SyntheticTask",
    "Draft",
    "register_task",
    "get_task",
    "task_names",
]
