"""What an evaluation is asked to run, checked before any model loads: model specs, evaluation files, options.

    parse_models("warm=/ckpt/warm,rl=/ckpt/rl")   -> [("warm", "/ckpt/warm"), ("rl", "/ckpt/rl")]
    parse_eval_files("/data/eval_*docs.json")     -> the matching files in natural order (len_2 before len_10)
    file_keys(files), length_label(path, records)  -> unique short names / length labels of the files
    check_options(metric, extract, row_errors, batch_size, averaging); check_outputs_not_inputs(out_dir, files)

Every error is an `EvalConfigError` naming the field (or file) at fault. Nothing here imports JAX.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from memagent_jax import settings
from memagent_jax.evaluation.report import AVERAGING, format_tokens
from memagent_jax.settings import ConfigError

#: What happens to a row that fails (see `evaluation.loop.evaluate_agent`).
ROW_ERROR_POLICIES = ("skip", "zero", "raise")
#: How `evaluation.loop.evaluate_agent` batches a file's rows.
SCHEDULING = ("continuous", "bucketed")


class EvalConfigError(ConfigError):
    """An evaluation setting is invalid; the message names the field (or file) at fault."""


_GLOB_CHARS = re.compile(r"[*?\[]")


def _natural_key(path: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def parse_models(spec, *, field: str = "models") -> list[tuple[str, Any]]:
    """Models as [(name, source)]: from 'name=folder,...' (a bare folder is named after its basename), a dict
    {name: source} or a list of (name, source) pairs / folders. A source is a folder, a (params, config,
    tokenizer) triple, a `LoadedModel` or a `MemoryAgent`."""
    entries: list[tuple[str, Any]] = []
    if isinstance(spec, str):
        for item in (s.strip() for s in spec.split(",")):
            if not item:
                continue
            name, sep, folder = item.partition("=")
            if not sep:
                name, folder = "", item
            folder = folder.strip()
            if not folder:
                raise EvalConfigError(f"{field}: {item!r} names no folder (expected name=folder)")
            entries.append((name.strip() or os.path.basename(os.path.normpath(folder)), folder))
    elif isinstance(spec, Mapping):
        entries = [(str(k), v) for k, v in spec.items()]
    elif isinstance(spec, Iterable):
        for item in spec:
            if isinstance(item, (str, os.PathLike)):
                folder = os.fspath(item)
                entries.append((os.path.basename(os.path.normpath(folder)), folder))
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                entries.append((str(item[0]), item[1]))
            else:
                raise EvalConfigError(f"{field}: expected folders or (name, model) pairs, got {type(item).__name__}")
    else:
        raise EvalConfigError(f"{field}: expected 'name=folder,...', a dict or a list, got {type(spec).__name__}")
    if not entries:
        raise EvalConfigError(f"{field}: no models given (expected name=folder,... or folders)")
    seen = set()
    for name, source in entries:
        if not name or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise EvalConfigError(f"{field}: model name {name!r} must be letters, digits, '_', '.', '+' or '-'")
        if name in seen:
            raise EvalConfigError(f"{field}: two models are named {name!r}; name them explicitly (name=folder)")
        seen.add(name)
        if isinstance(source, (str, os.PathLike)):
            check_model_folder(os.fspath(source), name=name, field=field)
    return entries


def check_model_folder(folder: str, *, name: str = "", field: str = "models") -> None:
    """Raises EvalConfigError unless `folder` is a directory with a config.json."""
    what = f"{field}: model {name!r} folder {folder!r}" if name else f"{field}: folder {folder!r}"
    if not os.path.exists(folder):
        raise EvalConfigError(f"{what} does not exist")
    if not os.path.isdir(folder):
        raise EvalConfigError(f"{what} is not a directory")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise EvalConfigError(f"{what} has no config.json (expected a Hugging Face model folder)")


def parse_eval_files(spec, *, field: str = "eval_files") -> list[str]:
    """Evaluation files from a comma list (or a list) of paths and glob patterns, in the order given; the matches
    of one pattern in natural order (len_2 before len_10). Missing files and empty patterns are errors."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [os.fspath(s) for s in spec]
    files: list[str] = []
    for item in items:
        if not item:
            continue
        if _GLOB_CHARS.search(item) and not os.path.exists(item):
            matches = sorted((m for m in glob.glob(item) if os.path.isfile(m)), key=_natural_key)
            if not matches:
                raise EvalConfigError(f"{field}: pattern {item!r} matches no file")
            files.extend(matches)
        elif not os.path.exists(item):
            raise EvalConfigError(f"{field}: evaluation file {item!r} does not exist")
        elif os.path.isdir(item):
            raise EvalConfigError(f"{field}: {item!r} is a directory, not an evaluation file")
        else:
            files.append(item)
    if not files:
        raise EvalConfigError(f"{field}: no evaluation files given")
    return list(dict.fromkeys(files))


def file_keys(files: Sequence[str]) -> list[str]:
    """Unique short names: the stems, with a counter where two files share one."""
    stems = [re.sub(r"[^A-Za-z0-9_.+-]", "_", Path(f).stem) or "file" for f in files]
    keys, used = [], set()
    for stem in stems:
        key, k = stem, 2
        while key in used:
            key, k = f"{stem}_{k}", k + 1
        used.add(key)
        keys.append(key)
    return keys


_NAME_LABELS = (
    re.compile(r"(?<![A-Za-z])(len(?:gth)?[_-]?[0-9][0-9A-Za-z.]*)", re.IGNORECASE),  # len_4x, len8k, length_2
    re.compile(r"(?<![A-Za-z0-9])([0-9]+)[_-]?docs?(?![A-Za-z])", re.IGNORECASE),  # eval_800docs -> 800 docs
    re.compile(r"(?<![A-Za-z0-9])([0-9]+(?:\.[0-9]+)?[kKmM])(?:tok(?:ens)?)?(?![A-Za-z0-9])"),  # hotpot_28k
)


def length_label(path: str, records: Sequence = ()) -> str:
    """A short length label for one file: a label in its name (len_4x, 800docs, 28k), else the rows' common
    `num_docs`, else their mean `num_tokens`, else the file stem."""
    stem = Path(path).stem
    for k, pattern in enumerate(_NAME_LABELS):
        m = pattern.search(stem)
        if m:
            return f"{m.group(1)} docs" if k == 1 else m.group(1)
    docs = {r.extra.get("num_docs") for r in records}
    if len(docs) == 1 and None not in docs:
        return f"{docs.pop()} docs"
    tokens = [r.extra.get("num_tokens") for r in records]
    if tokens and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in tokens):
        return f"{format_tokens(float(np.mean(tokens)))} tok"
    return stem


def open_eval_file(path: str, doc_store=None):
    """Opens an evaluation-format file (DataFormatError names the file when it is not one); `doc_store` resolves
    rows whose context is a list of document indices (see `data.docstore`). A bad row (a
    malformed JSON line, an item that is not an object, text that is not UTF-8, a missing or ill-typed field)
    does not stop the file: it raises its DataFormatError (file, row, field) when read, and `evaluate_agent`
    turns it into an error row."""
    from memagent_jax.data.formats import open_file

    return open_file(path, kind="eval", on_bad_row="keep", doc_store=doc_store)


def check_outputs_not_inputs(out_dir: str | None, files: Sequence[str], output_names: Sequence[str] = ()) -> None:
    """EvalConfigError when an evaluation file would be overwritten by an output: it lies in `out_dir` under one
    of the report names or in `out_dir`/predictions/."""
    if out_dir is None:
        return
    out = os.path.abspath(out_dir)
    reports = {"results.json", "results.csv", "results.txt", "accuracy_vs_length.png", *output_names}
    for f in files:
        path = os.path.abspath(f)
        folder, name = os.path.split(path)
        if (folder == out and (name in reports or name.endswith(".tmp"))) or folder == os.path.join(out, "predictions"):
            raise EvalConfigError(
                f"eval_files: {f!r} lies where the evaluation writes its outputs ({out_dir}); "
                f"refusing to write over an input: choose another workdir"
            )


def check_averaging(averaging, *, path: str = "") -> str:
    """`averaging` if it is one of `AVERAGING`, else an `EvalConfigError` naming `path`.averaging (the settings
    layer's `choice` rule; path '' names the bare option)."""
    with settings.named(path, error=EvalConfigError, separator="." if path else ""):
        return settings.choice("averaging", averaging, AVERAGING)


def check_options(metric: str, extract: str, row_errors: str, batch_size: int, averaging: str = "ours") -> None:
    """Errors naming the option for an unknown metric / extraction / row-error policy / averaging or a bad batch
    size."""
    from memagent_jax.evaluation import verifier

    if metric != "auto" and metric not in verifier.METRICS:
        raise EvalConfigError(f"metric: unknown metric {metric!r}; choose one of {sorted(verifier.METRICS)} or 'auto'")
    if extract not in verifier.EXTRACTORS:
        raise EvalConfigError(f"extract: unknown extraction {extract!r}; choose one of {list(verifier.EXTRACTORS)}")
    if row_errors not in ROW_ERROR_POLICIES:
        raise EvalConfigError(f"row_errors: must be one of {list(ROW_ERROR_POLICIES)}, got {row_errors!r}")
    if batch_size <= 0:
        raise EvalConfigError(f"batch_size: must be positive, got {batch_size}")
    check_averaging(averaging)
