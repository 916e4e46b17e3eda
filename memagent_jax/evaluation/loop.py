"""The evaluation loop: memory agents run on evaluation files, every row scored, the reports written.

    evaluate_models({"rl": "/ckpt/rl", "live": (params, config, tokenizer)}, files, out_dir, ...) -> EvalResults
    evaluate_agent(agent, "eval_50docs.json", ...) -> FileResult        # one file, an existing MemoryAgent

A model is loaded once (`load_model`) and run on every file; a short warm-up run compiles its programs before the
first file is timed. A row samples with fold_in(key(seed), row.index) (`row_keys`), so every model sees the same
keys for the same question and a rerun reproduces the same answers. A row that fails (a bad row of the file, a row
the agent cannot run, an answer sampled from non-finite logits) becomes an error row under the `row_errors` policy.
The model specs, files and options are checked in `evaluation.specs`; the statistics, tables, report files and
plot are `evaluation.report`'s. JAX is imported inside the functions that run models only.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from memagent_jax.evaluation.report import (
    SCORE_NAMES,
    EvalResults,
    FileResult,
    format_percent,
    summarize_rows,
    write_predictions,
    write_reports,
)
from memagent_jax.evaluation.specs import (
    SCHEDULING,
    EvalConfigError,
    check_model_folder,
    check_options,
    check_outputs_not_inputs,
    file_keys,
    length_label,
    open_eval_file,
    parse_eval_files,
    parse_models,
)


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
        raise EvalConfigError(
            f"{where}: field 'metric' names an unknown metric {chosen!r}; known: {sorted(verifier.METRICS)}"
        )
    return chosen


def score_response(
    response: str, answers: Sequence[str], metric: str = "sub_em", extract: str = "boxed"
) -> dict[str, Any]:
    """Scores of one final response: the prediction extracted from it (`verifier.extract_prediction`), then
    accuracy (= `metric`), em, f1 and sub_em of that prediction against the answers (0 when nothing is
    extracted)."""
    from memagent_jax.evaluation import verifier

    prediction = verifier.extract_prediction(response, extract)
    scores = {"accuracy": verifier.score(response, answers, metric, extract)}
    for name in ("em", "f1", "sub_em"):
        scores[name] = 0.0 if prediction is None else float(verifier.METRICS[name](prediction, answers))
    return {"prediction": None if prediction is None else prediction.strip(), "scores": scores}


# ------------------------------------------------------------------------------------------- models


@dataclasses.dataclass
class LoadedModel:
    """A model in memory: params (possibly sharded), its ModelConfig and its tokenizer."""

    params: Any
    config: Any
    tokenizer: Any
    path: str = ""


def load_model(
    folder: str,
    *,
    tokenizer_path: str | None = None,
    mesh=None,
    param_dtype: str | None = None,
    compute_dtype: str | None = None,
    allow_nonfinite: bool = False,
    attention_impl: str | None = None,
) -> LoadedModel:
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
        raise EvalConfigError(
            f"tokenizer: cannot load a tokenizer from {tok_folder!r}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    params, config = load_hf_params(folder, mesh=mesh, param_dtype=param_dtype or None, allow_nonfinite=allow_nonfinite)
    compute = compute_dtype or param_dtype
    if compute:
        config = config.replace(compute_dtype=compute)
    if attention_impl:
        config = config.replace(attention_impl=attention_impl)
    return LoadedModel(params, config, tokenizer, path=folder)


def _agent_for(
    source,
    *,
    budgets,
    templates,
    memory_sampling,
    answer_sampling,
    mesh,
    tokenizer_path,
    param_dtype,
    compute_dtype,
    allow_nonfinite=False,
    attention_impl=None,
):
    """(MemoryAgent with the evaluation's budgets and sampling, model path or '')."""
    from memagent_jax.agent import MemoryAgent

    if isinstance(source, MemoryAgent):
        loaded, mesh = LoadedModel(source.params, source.config, source.tokenizer), source.mesh
    elif isinstance(source, LoadedModel):
        loaded = source
    elif isinstance(source, (tuple, list)) and len(source) == 3:
        loaded = LoadedModel(*source)
    elif isinstance(source, (str, os.PathLike)):
        loaded = load_model(
            os.fspath(source),
            tokenizer_path=tokenizer_path,
            mesh=mesh,
            param_dtype=param_dtype,
            compute_dtype=compute_dtype,
            allow_nonfinite=allow_nonfinite,
            attention_impl=attention_impl,
        )
    else:
        raise EvalConfigError(
            f"models: a model must be a folder, (params, config, tokenizer), a LoadedModel or a "
            f"MemoryAgent; got {type(source).__name__}"
        )
    agent = MemoryAgent(
        loaded.params,
        loaded.config,
        loaded.tokenizer,
        budgets=budgets,
        templates=templates,
        memory_sampling=memory_sampling,
        answer_sampling=answer_sampling,
        mesh=mesh,
    )
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


def evaluate_agent(
    agent,
    records,
    *,
    metric: str = "sub_em",
    extract: str = "boxed",
    batch_size: int = 8,
    max_questions: int = 0,
    seed: int = 0,
    num_traces: int = 3,
    row_errors: str = "skip",
    progress: bool = True,
    model_name: str = "model",
    model_path: str = "",
    file_key: str | None = None,
    pad_batches: bool = True,
    scheduling: str = "continuous",
    averaging: str = "ours",
) -> FileResult:
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
      averaging: how the rows' scores become the file's figures (`report.AVERAGING`): 'ours' (every scored row,
        unrounded) or 'reference' (the reference's evaluation scripts: a row whose response is empty is left out,
        each row's score is rounded to 2 decimals before the mean). The rows keep their unrounded scores.
    Returns:
      FileResult, with `rows` in file order.
    """
    from memagent_jax.agent import AgentInputError
    from memagent_jax.data.records import DataFormatError

    check_options(metric, extract, row_errors, batch_size, averaging)
    if scheduling not in SCHEDULING:
        raise EvalConfigError(f"scheduling: must be one of {list(SCHEDULING)}, got {scheduling!r}")
    if isinstance(records, (str, os.PathLike)):
        records = open_eval_file(os.fspath(records))
    path = os.fspath(getattr(records, "path", "")) or "records"
    file_key = file_key or file_keys([path])[0]
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
            row.update(
                response="", prediction=None, scores={name: 0.0 for name in SCORE_NAMES}, num_chunks=0, doc_tokens=None
            )
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
        base = {
            "row": i,
            "index": record.index,
            "question": record.question,
            "answers": list(record.answers),
            "metric": row_metric,
        }
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
                yield (
                    ready,
                    agent.run(
                        [g[2].question for g in ready],
                        [g[3] for g in ready],
                        rng=row_keys(seed, [g[2].index for g in ready]),
                        trace=[g[1] < num_traces for g in ready],
                        batch_size=batch_size,
                        progress=show,
                    ),
                )
            return
        bar = _bar(len(ready), f"{model_name} / {file_key}", show)
        full = min(batch_size, len(ready))
        for start in range(0, len(ready), batch_size):
            group = ready[start : start + batch_size]
            want_trace = any(g[1] < num_traces for g in group)
            # A short last batch repeats its last row up to the full batch size: every batch of the file has one
            # shape, so nothing new compiles inside the timed loop (the extra rows' results are dropped).
            run_rows = group + [group[-1]] * (full - len(group)) if pad_batches else group
            yield (
                group,
                agent.run(
                    [g[2].question for g in run_rows],
                    [g[3] for g in run_rows],
                    rng=row_keys(seed, [g[2].index for g in run_rows]),
                    trace=want_trace,
                ),
            )
            bar.update(len(group))
        bar.close()

    for group, result in batches():
        for j, (size, i, record, _, row_metric) in enumerate(group):
            if result.nonfinite and result.nonfinite[j]:
                nonfinite += 1
                base = {
                    "row": i,
                    "index": record.index,
                    "question": record.question,
                    "answers": list(record.answers),
                    "metric": row_metric,
                }
                rows[i] = failed_row(
                    i,
                    base,
                    NonFiniteOutputError(
                        f"{path} row {i}: the model's logits were not finite (NaN / inf) while it answered; the answer "
                        f"is not scored as text (check the weights, or use float32 instead of a narrower dtype)"
                    ),
                )
                if "scores" in rows[i]:
                    rows[i].update(num_chunks=int(result.num_chunks[j]), doc_tokens=size)
                continue
            scored = score_response(result.answers[j], record.answers, row_metric, extract)
            row = {
                "row": i,
                "index": record.index,
                "question": record.question,
                "answers": list(record.answers),
                "metric": row_metric,
                "response": result.answers[j],
                "prediction": scored["prediction"],
                "scores": scored["scores"],
                "num_chunks": int(result.num_chunks[j]),
                "doc_tokens": size,
                "finished": bool(result.finished[j]),
            }
            if i < num_traces and result.traces is not None:
                row["trace"] = result.traces[j]
            rows[i] = row
    wall = time.perf_counter() - t0

    scored_rows = [r for r in rows if r is not None and "scores" in r]
    run_rows = [r for r in scored_rows if r.get("doc_tokens") is not None]
    stats = summarize_rows(scored_rows, averaging)
    tokens = int(sum(r["doc_tokens"] for r in run_rows))
    used: dict[str, int] = {}
    for r in scored_rows:
        used[r["metric"]] = used.get(r["metric"], 0) + 1
    return FileResult(
        model=model_name,
        model_path=model_path,
        file=path,
        file_key=file_key,
        label=length_label(path, kept),
        metric=metric,
        metrics_used=used,
        extract=extract,
        n=stats["accuracy"].n,
        skipped=skipped,
        accuracy=stats["accuracy"],
        em=stats["em"],
        f1=stats["f1"],
        sub_em=stats["sub_em"],
        mean_doc_tokens=float(np.mean([r["doc_tokens"] for r in run_rows])) if run_rows else math.nan,
        mean_chunks=float(np.mean([r["num_chunks"] for r in run_rows])) if run_rows else math.nan,
        total_doc_tokens=tokens,
        wall_s=wall,
        doc_tokens_per_s=tokens / wall if wall > 0 else math.nan,
        rows=[r for r in rows if r is not None],
        errors=errors,
        nonfinite=nonfinite,
        averaging=averaging,
        empty=len(scored_rows) - stats["accuracy"].n,
    )


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


def evaluate_models(
    models,
    eval_files: Sequence[str] | str,
    out_dir: str | None,
    *,
    budgets=None,
    templates=None,
    temperature: float | None = None,
    top_p: float | None = None,
    memory_sampling=None,
    answer_sampling=None,
    agent_overrides: Mapping | None = None,
    metric: str = "sub_em",
    extract: str = "boxed",
    batch_size: int = 8,
    max_questions: int = 0,
    seed: int = 0,
    num_traces: int = 3,
    row_errors: str = "skip",
    mesh=None,
    param_dtype: str | None = None,
    compute_dtype: str | None = None,
    tokenizer_path: str | None = None,
    progress: bool = True,
    plot: bool = True,
    warmup: bool = True,
    config: Mapping | None = None,
    allow_nonfinite_weights: bool = False,
    doc_store=None,
    scheduling: str = "continuous",
    attention_impl: str | None = None,
    averaging: str = "ours",
) -> EvalResults:
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
      metric, extract, batch_size, max_questions, seed, num_traces, row_errors, scheduling, averaging: see
        `evaluate_agent` (results.json records the averaging, in its config and per result).
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
    check_options(metric, extract, row_errors, batch_size, averaging)
    for name, value in (("max_questions", max_questions), ("num_traces", num_traces)):
        if value < 0:
            raise EvalConfigError(f"{name}: must be >= 0, got {value}")
    if tokenizer_path and not os.path.isdir(tokenizer_path):
        raise EvalConfigError(f"tokenizer: {tokenizer_path!r} is not a directory")
    keys = file_keys(files)
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
                **dict(agent_overrides or {})
            )
        except TypeError as e:
            raise EvalConfigError(f"agent_overrides: {e}") from None
        mem = memory_sampling or settings.sampling(0.7, 0.95)
        return settings, mem, answer_sampling or mem

    first_settings, first_memory, first_answer = (
        settings_for(entries[0][1]) if entries else (AgentSettings(), SamplingParams(temperature=0.7, top_p=0.95), None)
    )
    main = _is_main_process()
    show = progress and main

    echo = {
        "cli_config": _plain(config) if config is not None else None,
        "models": {
            name: (os.fspath(src) if isinstance(src, (str, os.PathLike)) else f"<{type(src).__name__}>")
            for name, src in entries
        },
        "eval_files": files,
        "budgets": dataclasses.asdict(first_settings.budgets),
        "templates": dataclasses.asdict(first_settings.templates),
        "memory_sampling": _sampling_echo(first_memory),
        "answer_sampling": _sampling_echo(first_answer or first_memory),
        "agents": {},  # per model: the settings used (its memagent_agent.json under the explicit settings)
        "metric": metric,
        "extract": extract,
        "batch_size": batch_size,
        "scheduling": scheduling,
        "max_questions": max_questions,
        "seed": seed,
        "num_traces": num_traces,
        "row_errors": row_errors,
        "averaging": averaging,
        "param_dtype": param_dtype,
        "compute_dtype": compute_dtype,
        "attention_impl": attention_impl,
        "tokenizer": tokenizer_path,
        "mesh": dict(mesh.shape) if mesh is not None else None,
        "warmup": warmup,
    }
    results = EvalResults(results=[], config=echo, out_dir=os.fspath(out_dir) if out_dir is not None else None)
    if out_dir is not None and main:
        os.makedirs(os.path.join(out_dir, "predictions"), exist_ok=True)
    for name, source in entries:
        t0 = time.perf_counter()
        settings, mem_sampling, ans_sampling = settings_for(source)
        echo["agents"][name] = dict(
            settings.to_dict(),
            settings_file=settings.path or None,
            memory_sampling=_sampling_echo(mem_sampling),
            answer_sampling=_sampling_echo(ans_sampling),
        )
        agent, path = _agent_for(
            source,
            budgets=settings.budgets,
            templates=settings.templates,
            memory_sampling=mem_sampling,
            answer_sampling=ans_sampling,
            mesh=mesh,
            tokenizer_path=tokenizer_path,
            param_dtype=param_dtype,
            compute_dtype=compute_dtype,
            allow_nonfinite=allow_nonfinite_weights,
            attention_impl=attention_impl,
        )
        _log(f"model {name!r}: ready in {time.perf_counter() - t0:.1f}s" + (f" ({path})" if path else ""), show)
        if warmup:
            t0 = time.perf_counter()
            sizes = [len(f) if max_questions <= 0 else min(len(f), max_questions) for f in opened]
            _warm_up(agent, min(batch_size, max(sizes)))
            _log(f"model {name!r}: warm-up batch (compilation) {time.perf_counter() - t0:.1f}s", show)
        for file, key in zip(opened, keys):
            r = evaluate_agent(
                agent,
                file,
                metric=metric,
                extract=extract,
                batch_size=batch_size,
                max_questions=max_questions,
                seed=seed,
                num_traces=num_traces,
                row_errors=row_errors,
                progress=progress,
                model_name=name,
                model_path=path,
                file_key=key,
                scheduling=scheduling,
                averaging=averaging,
            )
            results.results.append(r)
            acc = r.accuracy
            _log(
                f"{name} / {key} ({r.label}): accuracy {format_percent(acc.mean)}% "
                f"[{format_percent(acc.low)}, {format_percent(acc.high)}] "
                f"n={r.n}, {r.mean_doc_tokens:.0f} tokens, {r.wall_s:.1f}s, {r.doc_tokens_per_s:.0f} tok/s"
                + (f", {r.errors} rows failed ({r.nonfinite} non-finite)" if r.errors else ""),
                show,
            )
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
            print(
                f"wrote {out_dir}/results.json, results.csv, predictions/"
                + (", accuracy_vs_length.png" if plot else ""),
                flush=True,
            )
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
