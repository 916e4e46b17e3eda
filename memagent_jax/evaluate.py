"""Evaluate memory agents on evaluation files at several document lengths.

    python -m memagent_jax.evaluate --config configs/evaluate.py --workdir runs/eval \\
        --config.models=warm=/ckpt/warm,rl=/ckpt/rl --config.eval_files='/data/eval_*docs.json'

Every model (a local Hugging Face folder) is loaded once and run on every file; every file (reference
evaluation format: `context`, `input`, `answers`, optional `num_docs`, `index`) is one length point. Per
(model, file) the report gives accuracy (the mean of the chosen metric), exact match, token F1 and sub-exact-match
of the extracted prediction, each with a 95% confidence interval (Wilson score interval for 0/1 scores, normal
approximation mean +- 1.96 s / sqrt(n) otherwise), the number of rows, the mean document length in tokens of the
model's tokenizer, the mean number of chunks, the wall time and the document tokens read per second.

Written to the workdir:
    results.json                   everything, with the configuration
    results.csv                    one row per model x file
    results.txt                    the console table
    predictions/<model>__<file>.jsonl   per row: question, answers, response, prediction, scores, chunks, and for
                                   the first `num_traces` rows the memory after every chunk
    accuracy_vs_length.png         accuracy (%) against mean document tokens (log axis), one line per model

Bad rows never stop a run: a row of a file that is malformed (a bad JSON line, an item that is not an object,
text that is not UTF-8, a missing or ill-typed field), that the agent cannot run, or whose answer was sampled from
non-finite (NaN / inf) logits becomes an error row in predictions/ (naming the file, the row and the field) and is
counted in the `errors` / `nonfinite` columns; `row_errors` says whether it is left out of the scores (skip) or
scored 0 (zero). The CLI then ends with "warning: F of N rows failed ..." and exit status 1 (0: every row ran; 2:
nothing ran: a bad setting, model or file). Outputs are written atomically (temporary file + rename) and never over
an evaluation file. Weights holding NaN / inf are refused at load, naming the tensor
(--config.allow_nonfinite_weights=True loads them anyway).

Agent settings: a model folder exported by `train` carries `memagent_agent.json` (budgets, templates, sampling;
see `agent.settings`), which is used for that model unless the config sets a field (`config.agent.*`, the
same names as train's); a plain Hugging Face folder gets the reference budgets 1024 / 5000 / 1024 / 1024, the
default templates and the paper's evaluation sampling (temperature 0.7, top-p 0.95).

Sampling keys depend only on the seed and the row's `index`, so every model sees the same keys for the same
question and a rerun reproduces the same answers.

This module runs the models (`evaluate_agent`, `evaluate_models`) and is the CLI; the statistics, results, tables,
report files and plot are in `memagent_jax.evaluation.report` (re-exported here).

From Python (no subprocess, params already in memory allowed):

    from memagent_jax.evaluate import evaluate_models, evaluate_agent
    results = evaluate_models({"rl": "/ckpt/rl", "live": (params, config, tokenizer)}, files, "runs/x/eval",
                              budgets=AgentBudgets(...), temperature=0.7, top_p=0.95)
    file_result = evaluate_agent(agent, "eval_50docs.json")        # one file with an existing MemoryAgent
"""

from __future__ import annotations

import dataclasses
import gc
import glob
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# The reporting half (statistics, results, tables, files, plot) lives in evaluation/report.py; its names are part
# of this module's API too.
from memagent_jax.evaluation.report import (  # noqa: F401
    CSV_FIELDS, SCORE_NAMES, Z95, EvalResults, Estimate, FileResult, _fmt_tokens, _pct, estimate, format_table,
    normal_interval, plot_accuracy_vs_length, summarize, wilson_interval, write_predictions, write_reports)

try:  # multi-host start-up; the module defines its own flags, so it is imported before flags are parsed
    from memagent_jax import distributed as _distributed
except ImportError:  # a tree without multi-host support: single-process runs only
    _distributed = None

ROW_ERROR_POLICIES = ("skip", "zero", "raise")
_BINARY_METRICS = ("em", "sub_em")


class EvalConfigError(ValueError):
    """An evaluation setting is invalid; the message names the field (or file) at fault."""


class NonFiniteOutputError(FloatingPointError):
    """The model's logits were NaN / inf while a row was answered (see `AgentResult.nonfinite`)."""


# ------------------------------------------------------------------------------------------- scoring


def resolve_metric(metric: str, record=None, *, where: str = "") -> str:
    """The metric of one row: `metric`, or with 'auto' the row's extra field 'metric' (else 'sub_em')."""
    from memagent_jax.evaluation import verifier

    if metric != "auto":
        return metric
    chosen = record.extra.get("metric") if record is not None else None
    if chosen is None:
        return "sub_em"
    if chosen not in verifier.METRICS:
        raise EvalConfigError(f"{where}: field 'metric' names an unknown metric {chosen!r}; "
                              f"known: {sorted(verifier.METRICS)}")
    return chosen


def score_response(response: str, answers: Sequence[str], metric: str = "sub_em",
                   extract: str = "boxed") -> dict[str, Any]:
    """Scores of one final response: the prediction extracted from it (`verifier.extract_prediction`), then
    accuracy (= `metric`), em, f1 and sub_em of that prediction against the answers (0 when nothing is
    extracted)."""
    from memagent_jax.evaluation import verifier

    prediction = verifier.extract_prediction(response, extract)
    scores = {"accuracy": verifier.score(response, answers, metric, extract)}
    for name in ("em", "f1", "sub_em"):
        scores[name] = 0.0 if prediction is None else float(verifier.METRICS[name](prediction, answers))
    return {"prediction": prediction, "scores": scores}


# ------------------------------------------------------------------------------------------- inputs


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


def _file_keys(files: Sequence[str]) -> list[str]:
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
        return f"{_fmt_tokens(float(np.mean(tokens)))} tok"
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
            raise EvalConfigError(f"eval_files: {f!r} lies where the evaluation writes its outputs ({out_dir}); "
                                  f"refusing to write over an input: choose another workdir")


# ------------------------------------------------------------------------------------------- models


@dataclasses.dataclass
class LoadedModel:
    """A model in memory: params (possibly sharded), its ModelConfig and its tokenizer."""

    params: Any
    config: Any
    tokenizer: Any
    path: str = ""


def load_model(folder: str, *, tokenizer_path: str | None = None, mesh=None, param_dtype: str | None = None,
               compute_dtype: str | None = None, allow_nonfinite: bool = False,
               attention_impl: str | None = None) -> LoadedModel:
    """Loads a Hugging Face folder (params onto `mesh` when given) and its tokenizer (or `tokenizer_path`'s).
    Weights holding NaN / inf raise `NonFiniteWeightsError` naming the tensor unless `allow_nonfinite`.
    attention_impl: the model's attention kernel (None: ModelConfig's default 'auto')."""
    from transformers import AutoTokenizer

    from memagent_jax.models import load_hf_params

    check_model_folder(folder)
    tok_folder = tokenizer_path or folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_folder, local_files_only=True)
    except Exception as e:  # transformers raises OSError / ValueError with long messages
        raise EvalConfigError(f"tokenizer: cannot load a tokenizer from {tok_folder!r}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e
    params, config = load_hf_params(folder, mesh=mesh, param_dtype=param_dtype or None,
                                    allow_nonfinite=allow_nonfinite)
    compute = compute_dtype or param_dtype
    if compute:
        config = config.replace(compute_dtype=compute)
    if attention_impl:
        config = config.replace(attention_impl=attention_impl)
    return LoadedModel(params, config, tokenizer, path=folder)


def _agent_for(source, *, budgets, templates, memory_sampling, answer_sampling, mesh, tokenizer_path, param_dtype,
               compute_dtype, allow_nonfinite=False, attention_impl=None):
    """(MemoryAgent with the evaluation's budgets and sampling, model path or '')."""
    from memagent_jax.agent import MemoryAgent

    if isinstance(source, MemoryAgent):
        loaded, mesh = LoadedModel(source.params, source.config, source.tokenizer), source.mesh
    elif isinstance(source, LoadedModel):
        loaded = source
    elif isinstance(source, (tuple, list)) and len(source) == 3:
        loaded = LoadedModel(*source)
    elif isinstance(source, (str, os.PathLike)):
        loaded = load_model(os.fspath(source), tokenizer_path=tokenizer_path, mesh=mesh, param_dtype=param_dtype,
                            compute_dtype=compute_dtype, allow_nonfinite=allow_nonfinite,
                            attention_impl=attention_impl)
    else:
        raise EvalConfigError(f"models: a model must be a folder, (params, config, tokenizer), a LoadedModel or a "
                              f"MemoryAgent; got {type(source).__name__}")
    agent = MemoryAgent(loaded.params, loaded.config, loaded.tokenizer, budgets=budgets, templates=templates,
                        memory_sampling=memory_sampling, answer_sampling=answer_sampling, mesh=mesh)
    return agent, loaded.path


# ------------------------------------------------------------------------------------------- evaluation


def row_keys(seed: int, indices: Sequence[int]):
    """[len(indices)] PRNG keys: fold_in(key(seed), index), so a row's key depends only on the seed and its
    index (the same question id gets the same key in every file and for every model)."""
    import jax
    import jax.numpy as jnp

    base = jax.random.key(int(seed))
    ids = jnp.asarray(np.asarray([int(i) & 0xFFFFFFFF for i in indices], np.uint32))
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(ids)


def _is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def _log(message: str, enabled: bool) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


SCHEDULING = ("continuous", "bucketed")


def _check_options(metric: str, extract: str, row_errors: str, batch_size: int) -> None:
    """Errors naming the option for an unknown metric / extraction / row-error policy or a bad batch size."""
    from memagent_jax.evaluation import verifier

    if metric != "auto" and metric not in verifier.METRICS:
        raise EvalConfigError(f"metric: unknown metric {metric!r}; choose one of {sorted(verifier.METRICS)} or 'auto'")
    if extract not in verifier.EXTRACTORS:
        raise EvalConfigError(f"extract: unknown extraction {extract!r}; choose one of {list(verifier.EXTRACTORS)}")
    if row_errors not in ROW_ERROR_POLICIES:
        raise EvalConfigError(f"row_errors: must be one of {list(ROW_ERROR_POLICIES)}, got {row_errors!r}")
    if batch_size <= 0:
        raise EvalConfigError(f"batch_size: must be positive, got {batch_size}")


def evaluate_agent(agent, records, *, metric: str = "sub_em", extract: str = "boxed", batch_size: int = 8,
                   max_questions: int = 0, seed: int = 0, num_traces: int = 3, row_errors: str = "skip",
                   progress: bool = True, model_name: str = "model", model_path: str = "",
                   file_key: str | None = None, pad_batches: bool = True,
                   scheduling: str = "continuous") -> FileResult:
    """Evaluates one MemoryAgent (its own budgets, templates and sampling) on one file or list of records.

    Args:
      agent: a `memagent_jax.agent.MemoryAgent`.
      records: an evaluation file path, an opened file (`data.formats.open_file`) or a sequence of QARecord.
      metric: a key of `verifier.METRICS`, or 'auto' (each row's extra field 'metric', else 'sub_em').
      extract: how the prediction is taken from the final response (`verifier.EXTRACTORS`; default: the last
        \\boxed{...}).
      batch_size: rows the agent runs at once.
      scheduling: 'continuous' (one `DocumentEngine` of batch_size row slots over the whole file: a row whose
        document ends takes the next document at the next segment boundary) or 'bucketed' (rows sorted by
        document length, run in lockstep batches of batch_size). Same outputs either way (per-row keys).
      max_questions: evaluate the first N rows only (0 = all).
      seed: row r samples with fold_in(key(seed), r.index).
      num_traces: the first N rows (file order) keep the memory text after every chunk in `rows[i]['trace']`.
      row_errors: a row that fails (a bad row of the file: malformed, not an object, not UTF-8, a missing or
        ill-typed field; a row the agent cannot run: empty or over-budget question, empty document; an answer
        sampled from non-finite logits): 'skip' (an error row, not scored), 'zero' (an error row scored 0) or
        'raise'. Either way `FileResult.errors` counts them (`nonfinite` the non-finite ones).
      progress: rows-done progress bar on stderr (process 0 only).
      model_name, model_path, file_key: names used in the result and the progress output.
      pad_batches: run a short last batch at the full batch size (repeating a row), so that one compiled program
        serves the whole file.
    Returns:
      FileResult, with `rows` in file order.
    """
    from memagent_jax.agent import AgentInputError
    from memagent_jax.data.records import DataFormatError

    _check_options(metric, extract, row_errors, batch_size)
    if scheduling not in SCHEDULING:
        raise EvalConfigError(f"scheduling: must be one of {list(SCHEDULING)}, got {scheduling!r}")
    if isinstance(records, (str, os.PathLike)):
        records = open_eval_file(os.fspath(records))
    path = os.fspath(getattr(records, "path", "")) or "records"
    file_key = file_key or _file_keys([path])[0]
    total = len(records) if max_questions <= 0 else min(max_questions, len(records))
    show = progress and _is_main_process()

    t0 = time.perf_counter()
    rows: list[dict | None] = [None] * total
    ready, kept = [], []
    skipped = errors = nonfinite = 0

    def failed_row(i, base, e):
        """An error row for row i (policy row_errors); returns it."""
        nonlocal skipped, errors
        errors += 1
        if row_errors == "raise":
            raise e
        row = dict(base, error=str(e))
        if getattr(e, "field", None) is not None:
            row["field"] = e.field
        if row_errors == "skip":
            skipped += 1
        else:
            row.update(response="", prediction=None, scores={name: 0.0 for name in SCORE_NAMES}, num_chunks=0,
                       doc_tokens=None)
        _log(f"{model_name} / {file_key}: row {i}: {e}", show)
        return row

    for i in range(total):
        try:
            record = records[i]  # DataFormatError (file, row, field) surfaces here
            row_metric = resolve_metric(metric, record, where=f"{path} row {i}")
        except (DataFormatError, EvalConfigError) as e:
            rows[i] = failed_row(i, {"row": i, "index": None, "metric": metric}, e)
            continue
        kept.append(record)
        base = {"row": i, "index": record.index, "question": record.question, "answers": list(record.answers),
                "metric": row_metric}
        try:
            _, doc_ids = agent.prepare(record.question, record.document, source=f"{path} row {i}")
        except AgentInputError as e:
            rows[i] = failed_row(i, base, e)
            continue
        ready.append((int(doc_ids.size), i, record, doc_ids, row_metric))
    ready.sort(key=lambda r: (r[0], r[1]))  # similar lengths together: fewer idle rows per batch

    from memagent_jax.distributed import arrays as multiprocess

    def batches():
        """(rows, AgentResult) per agent run."""
        if scheduling == "continuous" and not multiprocess.is_multiprocess(getattr(agent, "mesh", None)):
            if ready:
                yield ready, agent.run([g[2].question for g in ready], [g[3] for g in ready],
                                       rng=row_keys(seed, [g[2].index for g in ready]),
                                       trace=[g[1] < num_traces for g in ready], batch_size=batch_size,
                                       progress=show)
            return
        bar = _bar(len(ready), f"{model_name} / {file_key}", show)
        full = min(batch_size, len(ready))
        for start in range(0, len(ready), batch_size):
            group = ready[start:start + batch_size]
            want_trace = any(g[1] < num_traces for g in group)
            # A short last batch repeats its last row up to the full batch size: every batch of the file has one
            # shape, so nothing new compiles inside the timed loop (the extra rows' results are dropped).
            run_rows = group + [group[-1]] * (full - len(group)) if pad_batches else group
            yield group, agent.run([g[2].question for g in run_rows], [g[3] for g in run_rows],
                                   rng=row_keys(seed, [g[2].index for g in run_rows]), trace=want_trace)
            bar.update(len(group))
        bar.close()

    for group, result in batches():
        for j, (size, i, record, _, row_metric) in enumerate(group):
            if result.nonfinite and result.nonfinite[j]:
                nonfinite += 1
                base = {"row": i, "index": record.index, "question": record.question,
                        "answers": list(record.answers), "metric": row_metric}
                rows[i] = failed_row(i, base, NonFiniteOutputError(
                    f"{path} row {i}: the model's logits were not finite (NaN / inf) while it answered; the answer "
                    f"is not scored as text (check the weights, or use float32 instead of a narrower dtype)"))
                if "scores" in rows[i]:
                    rows[i].update(num_chunks=int(result.num_chunks[j]), doc_tokens=size)
                continue
            scored = score_response(result.answers[j], record.answers, row_metric, extract)
            row = {"row": i, "index": record.index, "question": record.question, "answers": list(record.answers),
                   "metric": row_metric, "response": result.answers[j], "prediction": scored["prediction"],
                   "scores": scored["scores"], "num_chunks": int(result.num_chunks[j]), "doc_tokens": size,
                   "finished": bool(result.finished[j])}
            if i < num_traces and result.traces is not None:
                row["trace"] = result.traces[j]
            rows[i] = row
    wall = time.perf_counter() - t0

    scored_rows = [r for r in rows if r is not None and "scores" in r]
    run_rows = [r for r in scored_rows if r.get("doc_tokens") is not None]
    stats = summarize([r["scores"] for r in scored_rows])
    tokens = int(sum(r["doc_tokens"] for r in run_rows))
    used: dict[str, int] = {}
    for r in scored_rows:
        used[r["metric"]] = used.get(r["metric"], 0) + 1
    return FileResult(
        model=model_name, model_path=model_path, file=path, file_key=file_key, label=length_label(path, kept),
        metric=metric, metrics_used=used, extract=extract, n=len(scored_rows), skipped=skipped,
        accuracy=stats["accuracy"], em=stats["em"], f1=stats["f1"], sub_em=stats["sub_em"],
        mean_doc_tokens=float(np.mean([r["doc_tokens"] for r in run_rows])) if run_rows else math.nan,
        mean_chunks=float(np.mean([r["num_chunks"] for r in run_rows])) if run_rows else math.nan,
        total_doc_tokens=tokens, wall_s=wall, doc_tokens_per_s=tokens / wall if wall > 0 else math.nan,
        rows=[r for r in rows if r is not None], errors=errors, nonfinite=nonfinite)


class _NoBar:
    def update(self, n):
        pass

    def close(self):
        pass


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="row", desc=desc, dynamic_ncols=True, file=sys.stderr)


def evaluate_models(models, eval_files: Sequence[str] | str, out_dir: str | None, *, budgets=None, templates=None,
                    temperature: float | None = None, top_p: float | None = None, memory_sampling=None,
                    answer_sampling=None, agent_overrides: Mapping | None = None,
                    metric: str = "sub_em", extract: str = "boxed", batch_size: int = 8, max_questions: int = 0,
                    seed: int = 0, num_traces: int = 3, row_errors: str = "skip", mesh=None,
                    param_dtype: str | None = None, compute_dtype: str | None = None,
                    tokenizer_path: str | None = None, progress: bool = True, plot: bool = True,
                    warmup: bool = True, config: Mapping | None = None,
                    allow_nonfinite_weights: bool = False, doc_store=None,
                    scheduling: str = "continuous", attention_impl: str | None = None) -> EvalResults:
    """Evaluates every model on every file and writes the reports to `out_dir` (None: nothing written).

    Args:
      models: {name: source}, [(name, source)], folders, or 'name=folder,...'. A source is a Hugging Face folder
        (loaded once, on `mesh`, for all files), a (params, config, tokenizer) triple or `LoadedModel` already in
        memory, or a `MemoryAgent` (its params, tokenizer and mesh are used with this evaluation's settings).
      eval_files: evaluation-format files (paths or glob patterns; a comma-separated string works too).
      out_dir: where results.json / results.csv / results.txt / predictions/ / accuracy_vs_length.png go.
      budgets: `AgentBudgets` for every model (None: each model folder's memagent_agent.json, else the reference
        1024 / 5000 / 1024 / 1024).
      templates: `AgentTemplates`, a JSON template file, or None (the model's settings file, else the default
        wording).
      temperature, top_p: sampling of memories and answers (0 = greedy; None: the model's settings file, else
        0.7 / 0.95); `memory_sampling` / `answer_sampling` (`SamplingParams`) override them.
      agent_overrides: single settings by their config names ({"chunk_tokens": 32, "prompt_mode": "text"}),
        applied on top of each model's settings (see `AgentSettings.override`).
      metric, extract, batch_size, max_questions, seed, num_traces, row_errors, scheduling: see `evaluate_agent`.
      mesh: a ('data', 'fsdp', 'tensor') mesh for loading and running (None: one device).
      param_dtype, compute_dtype: for models loaded from folders (None: the checkpoint's dtype).
      attention_impl: attention kernel of models loaded from folders (None: 'auto'; see models/attention.py).
      tokenizer_path: tokenizer folder for models loaded from folders (None: each model's folder).
      progress: progress bars, per-file summary lines and the final table on stderr / stdout.
      plot: write accuracy_vs_length.png.
      warmup: before a model's first file, run one batch of a one-chunk dummy row, so that compilation is not
        counted in the first file's wall time and tokens/s.
      config: a configuration to echo into results.json (the CLI passes its ConfigDict).
      allow_nonfinite_weights: load folders whose weights hold NaN / inf (default: `NonFiniteWeightsError`
        naming the tensor, before any evaluation).
      doc_store: the shared document store of files whose rows give `context` as a list of document indices
        (the reference's 12800+ document files): the raw HotpotQA / SQuAD JSON they were built from, a JSON array
        of documents, or a `data.docstore.DocumentStore`. Loaded once.
    """
    from memagent_jax.agent import AgentSettings, AgentTemplates
    from memagent_jax.sampling import SamplingParams

    entries = parse_models(models)
    files = parse_eval_files(eval_files)
    _check_options(metric, extract, row_errors, batch_size)
    for name, value in (("max_questions", max_questions), ("num_traces", num_traces)):
        if value < 0:
            raise EvalConfigError(f"{name}: must be >= 0, got {value}")
    if tokenizer_path and not os.path.isdir(tokenizer_path):
        raise EvalConfigError(f"tokenizer: {tokenizer_path!r} is not a directory")
    keys = _file_keys(files)
    check_outputs_not_inputs(out_dir, files, [f"{name}__{key}.jsonl" for name, _ in entries for key in keys])
    if doc_store is not None:
        from memagent_jax.data.docstore import DocumentStore

        try:
            doc_store = DocumentStore.coerce(doc_store)
        except (OSError, ValueError) as e:  # a missing file; DataFormatError names the file, row and field
            raise EvalConfigError(f"doc_store: {e}") from None
    opened = [open_eval_file(f, doc_store) for f in files]  # every file checked before any model loads
    if isinstance(templates, (str, os.PathLike)):
        templates = AgentTemplates.from_file(templates)

    def settings_for(source):
        """Budgets, templates and sampling of one model: its settings file (folders) under the explicit ones."""
        folder = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
        base = AgentSettings.load(folder) if folder and os.path.isdir(folder) else AgentSettings()
        try:
            explicit = dict(budgets=budgets, templates=templates, temperature=temperature, top_p=top_p)
            settings = base.override(**{k: v for k, v in explicit.items() if v is not None}).override(
                **dict(agent_overrides or {}))
        except TypeError as e:
            raise EvalConfigError(f"agent_overrides: {e}") from None
        mem = memory_sampling or settings.sampling(0.7, 0.95)
        return settings, mem, answer_sampling or mem

    first_settings, first_memory, first_answer = settings_for(entries[0][1]) if entries else (
        AgentSettings(), SamplingParams(temperature=0.7, top_p=0.95), None)
    main = _is_main_process()
    show = progress and main

    echo = {
        "cli_config": _plain(config) if config is not None else None,
        "models": {name: (os.fspath(src) if isinstance(src, (str, os.PathLike)) else f"<{type(src).__name__}>")
                   for name, src in entries},
        "eval_files": files,
        "budgets": dataclasses.asdict(first_settings.budgets),
        "templates": dataclasses.asdict(first_settings.templates),
        "memory_sampling": _sampling_echo(first_memory),
        "answer_sampling": _sampling_echo(first_answer or first_memory),
        "agents": {},  # per model: the settings used (its memagent_agent.json under the explicit settings)
        "metric": metric, "extract": extract, "batch_size": batch_size, "scheduling": scheduling,
        "max_questions": max_questions,
        "seed": seed, "num_traces": num_traces, "row_errors": row_errors, "param_dtype": param_dtype,
        "compute_dtype": compute_dtype, "attention_impl": attention_impl, "tokenizer": tokenizer_path,
        "mesh": dict(mesh.shape) if mesh is not None else None, "warmup": warmup,
    }
    results = EvalResults(results=[], config=echo, out_dir=os.fspath(out_dir) if out_dir is not None else None)
    if out_dir is not None and main:
        os.makedirs(os.path.join(out_dir, "predictions"), exist_ok=True)
    for name, source in entries:
        t0 = time.perf_counter()
        settings, mem_sampling, ans_sampling = settings_for(source)
        echo["agents"][name] = dict(settings.to_dict(), settings_file=settings.path or None,
                                    memory_sampling=_sampling_echo(mem_sampling),
                                    answer_sampling=_sampling_echo(ans_sampling))
        agent, path = _agent_for(source, budgets=settings.budgets, templates=settings.templates,
                                 memory_sampling=mem_sampling, answer_sampling=ans_sampling, mesh=mesh, tokenizer_path=tokenizer_path,
                                 param_dtype=param_dtype, compute_dtype=compute_dtype,
                                 allow_nonfinite=allow_nonfinite_weights, attention_impl=attention_impl)
        _log(f"model {name!r}: ready in {time.perf_counter() - t0:.1f}s" + (f" ({path})" if path else ""), show)
        if warmup:
            t0 = time.perf_counter()
            sizes = [len(f) if max_questions <= 0 else min(len(f), max_questions) for f in opened]
            _warm_up(agent, min(batch_size, max(sizes)))
            _log(f"model {name!r}: warm-up batch (compilation) {time.perf_counter() - t0:.1f}s", show)
        for file, key in zip(opened, keys):
            r = evaluate_agent(agent, file, metric=metric, extract=extract, batch_size=batch_size,
                               max_questions=max_questions, seed=seed, num_traces=num_traces, row_errors=row_errors,
                               progress=progress, model_name=name, model_path=path, file_key=key,
                               scheduling=scheduling)
            results.results.append(r)
            acc = r.accuracy
            _log(f"{name} / {key} ({r.label}): accuracy {_pct(acc.mean)}% [{_pct(acc.low)}, {_pct(acc.high)}] "
                 f"n={r.n}, {r.mean_doc_tokens:.0f} tokens, {r.wall_s:.1f}s, {r.doc_tokens_per_s:.0f} tok/s"
                 + (f", {r.errors} rows failed ({r.nonfinite} non-finite)" if r.errors else ""), show)
            if out_dir is not None and main:
                write_predictions(r, os.path.join(out_dir, "predictions", f"{name}__{key}.jsonl"))
                write_reports(results, out_dir, plot=False)  # a killed run keeps every finished point
        del agent
        gc.collect()
    if out_dir is not None and main:
        write_reports(results, out_dir, plot=plot)
    if show:
        print(results.table(), flush=True)
        if out_dir is not None:
            print(f"wrote {out_dir}/results.json, results.csv, predictions/"
                  + (", accuracy_vs_length.png" if plot else ""), flush=True)
    return results


def _warm_up(agent, batch: int) -> None:
    """One untimed agent run of `batch` one-chunk dummy rows (compiles the prefix, segment and final programs)."""
    from memagent_jax.agent import AgentInputError

    if batch <= 0:
        return
    try:
        rows = (["What is this text about?"] * batch, ["A short text about a quiet river."] * batch)
        agent.run(*rows, rng=0)  # prefix, segment and final programs
        agent.run(*rows, rng=0, batch_size=batch)  # continuous batching's refill program
    except AgentInputError:  # an exotic tokenizer or a tiny budget: compile on the first real batch instead
        pass


def _sampling_echo(sampling) -> dict:
    """What the evaluation sets; max_new_tokens, stop ids and pad come from the budgets and the tokenizer."""
    return {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p}


def _plain(config) -> Any:
    """A ConfigDict / mapping as plain JSON-able values."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.loads(json.dumps(config, default=str))


# ------------------------------------------------------------------------------------------- CLI


def validate_config(cfg) -> None:
    """Checks the CLI config before any expensive work; every error names the config field."""
    from memagent_jax.evaluation import verifier

    parse_models(cfg.models, field="config.models")
    parse_eval_files(cfg.eval_files, field="config.eval_files")
    if cfg.tokenizer and not os.path.isdir(cfg.tokenizer):
        raise EvalConfigError(f"config.tokenizer: {cfg.tokenizer!r} is not a directory")
    agent_overrides(cfg)  # agent.* (and the deprecated budgets.* / sampling.* / templates), each field checked
    if cfg.metric != "auto" and cfg.metric not in verifier.METRICS:
        raise EvalConfigError(f"config.metric: unknown metric {cfg.metric!r}; choose one of "
                              f"{sorted(verifier.METRICS)} or 'auto'")
    if cfg.extract not in verifier.EXTRACTORS:
        raise EvalConfigError(f"config.extract: unknown extraction {cfg.extract!r}; choose one of "
                              f"{list(verifier.EXTRACTORS)}")
    if cfg.row_errors not in ROW_ERROR_POLICIES:
        raise EvalConfigError(f"config.row_errors: must be one of {list(ROW_ERROR_POLICIES)}, got {cfg.row_errors!r}")
    if cfg.batch_size <= 0:
        raise EvalConfigError(f"config.batch_size: must be positive, got {cfg.batch_size}")
    if cfg.get("scheduling", "continuous") not in SCHEDULING:
        raise EvalConfigError(f"config.scheduling: must be one of {list(SCHEDULING)}, got {cfg.scheduling!r}")
    for name in ("max_questions", "num_traces"):
        if cfg[name] < 0:
            raise EvalConfigError(f"config.{name}: must be >= 0, got {cfg[name]}")
    from memagent_jax.models.config import ATTENTION_IMPLS

    if (cfg.get("attention_impl") or "auto") not in ATTENTION_IMPLS:
        raise EvalConfigError(f"config.attention_impl: must be one of {list(ATTENTION_IMPLS)} (or '' = auto), got "
                              f"{cfg.attention_impl!r}")


_AGENT_INTS = ("question_tokens", "chunk_tokens", "memory_tokens", "answer_tokens", "chunks_per_segment")
_DEPRECATED = {**{f"budgets.{n}": f"agent.{n}" for n in _AGENT_INTS + ("max_document_tokens", "question_overflow")},
               "sampling.temperature": "agent.temperature", "sampling.top_p": "agent.top_p",
               "templates": "agent.templates"}


def agent_overrides(cfg, *, warn: bool = False) -> dict:
    """The agent settings the config sets ({config name: value}; unset fields are left to each model's
    memagent_agent.json). Reads `config.agent.*` and the deprecated `budgets.*` / `sampling.*` / `templates`
    (a warning names the new field when `warn`). Errors name the field."""
    out, where = {}, {}
    for name, value in (cfg.get("agent") or {}).items():
        if value not in (None, ""):
            out[name], where[name] = value, f"config.agent.{name}"
    for old, new in _DEPRECATED.items():  # set only when given, so they win over agent.* values of a variant
        node, *rest = old.split(".")
        value = cfg.get(node) if not rest else (cfg.get(node) or {}).get(rest[0])
        if value not in (None, ""):
            if warn:
                print(f"warning: config.{old} is deprecated; use config.{new} (the name train uses)", file=sys.stderr)
            out[new.split(".")[1]], where[new.split(".")[1]] = value, f"config.{old}"
    for name in _AGENT_INTS:
        if name in out and (isinstance(out[name], bool) or not isinstance(out[name], int) or out[name] < 1):
            raise EvalConfigError(f"{where[name]} must be a positive integer, got {out[name]!r}")
    if "max_document_tokens" in out and out["max_document_tokens"] < 0:
        raise EvalConfigError(f"{where['max_document_tokens']} must be >= 0 (0 = whole documents), got "
                              f"{out['max_document_tokens']}")
    if out.get("question_overflow", "error") not in ("error", "truncate"):
        raise EvalConfigError(f"{where['question_overflow']} must be 'error' or 'truncate', got "
                              f"{out['question_overflow']!r}")
    if "temperature" in out and not 0 <= out["temperature"] < float("inf"):
        raise EvalConfigError(f"{where['temperature']} must be >= 0 (0 = greedy), got {out['temperature']}")
    if "top_p" in out and not 0 < out["top_p"] <= 1:
        raise EvalConfigError(f"{where['top_p']} must be in (0, 1], got {out['top_p']}")
    if out.get("prompt_mode", "pieces") not in ("pieces", "text"):
        raise EvalConfigError(f"{where['prompt_mode']} must be 'pieces' or 'text', got {out['prompt_mode']!r}")
    if "templates" in out and not os.path.isfile(out["templates"]):
        raise EvalConfigError(f"{where['templates']}: {out['templates']!r} does not exist")
    return out


def run(cfg, workdir: str) -> EvalResults:
    """The CLI's work: validates `cfg` (configs/evaluate.py), builds the mesh, evaluates every model on every
    file, and writes the reports into `workdir`."""
    import jax

    from memagent_jax.models import sharding as sharding_lib

    validate_config(cfg)
    from memagent_jax.storage.paths import RemotePathError, check_local_path

    try:
        check_local_path(workdir, "--workdir")
    except RemotePathError as e:
        raise EvalConfigError(str(e)) from None
    overrides = agent_overrides(cfg, warn=True)
    try:
        mesh = sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    except sharding_lib.MeshError as e:
        raise EvalConfigError(f"config.mesh: {e} ({jax.device_count()} devices)") from None
    return evaluate_models(
        cfg.models, cfg.eval_files, workdir, agent_overrides=overrides, metric=cfg.metric, extract=cfg.extract,
        batch_size=cfg.batch_size, scheduling=cfg.get("scheduling", "continuous"), max_questions=cfg.max_questions,
        seed=cfg.seed, num_traces=cfg.num_traces,
        row_errors=cfg.row_errors, mesh=mesh, param_dtype=cfg.param_dtype or None,
        compute_dtype=cfg.compute_dtype or None, tokenizer_path=cfg.tokenizer or None, progress=cfg.progress,
        plot=cfg.plot, warmup=cfg.warmup, config=cfg,
        allow_nonfinite_weights=bool(cfg.get("allow_nonfinite_weights", False)), doc_store=cfg.get("doc_store") or None,
        attention_impl=cfg.get("attention_impl") or None)


def failure_summary(results: EvalResults) -> str | None:
    """One line counting the rows that failed over every (model, file), or None when none did."""
    failed = sum(r.errors for r in results.results)
    if not failed:
        return None
    total = sum(len(r.rows) for r in results.results)
    nonfinite = sum(r.nonfinite for r in results.results)
    where = ", ".join(f"{r.model}/{r.file_key}: {r.errors}" for r in results.results if r.errors)
    return (f"{failed} of {total} rows failed ({nonfinite} with non-finite model outputs; {where}); their "
            f"'error' fields in predictions/*.jsonl say why")


_CONFIG = None
_WORKDIR = None
_FLAG_VALUES = None


def _define_flags(flag_values=None, sys_argv: list[str] | None = None) -> None:
    """--config / --workdir on absl's global flags (or `flag_values`). Defined only when run as a program, so that
    this module and memagent_jax.train (which defines flags of the same names) can share one process; tests parse
    a private FlagValues with `sys_argv`."""
    global _CONFIG, _WORKDIR, _FLAG_VALUES
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FLAGS if flag_values is None else flag_values
    _FLAG_VALUES = fv
    if _distributed is not None and hasattr(_distributed, "define_flags"):
        _distributed.define_flags(fv)  # --coordinator_address / --num_processes / --process_id
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/evaluate.py", "evaluation config file",
                                              flag_values=fv, lock_config=True, sys_argv=sys_argv)
    _WORKDIR = flags.DEFINE_string("workdir", None, "directory for results.json/csv, predictions/ and the plot",
                                   flag_values=fv)


def main(argv) -> None:
    from absl import app, flags
    from absl import logging as absl_logging

    if _distributed is not None and hasattr(_distributed, "initialize_from_flags"):
        try:  # multi-host runs: join the other processes (a no-op for one process)
            _distributed.initialize_from_flags(_FLAG_VALUES)
        except getattr(_distributed, "DistributedError", ()) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from memagent_jax.agent import AgentInputError, AgentSettingsError, TemplateError
    from memagent_jax.data.records import DataFormatError
    from memagent_jax.models import CheckpointError, ConfigError

    try:
        results = run(_CONFIG.value, _WORKDIR.value)
    except (EvalConfigError, AgentSettingsError, DataFormatError, CheckpointError, ConfigError, AgentInputError, TemplateError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    summary = failure_summary(results)
    if summary is not None:  # the reports are written; exit status 1 says some rows did not count
        print(f"warning: {summary}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    from absl import app as _app

    _define_flags()
    _app.run(main)
