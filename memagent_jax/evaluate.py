"""Evaluate memory agents on evaluation files at several document lengths.

    python -m memagent_jax.evaluate --config configs/evaluate.py --workdir runs/eval \\
        --config.models=warm=/ckpt/warm,rl=/ckpt/rl --config.eval_files='/data/eval_*docs.json'

Every model (a local Hugging Face folder) is loaded once and run on every file; every file (reference
evaluation format: `context`, `input`, `answers`, optional `num_docs`, `index`) is one length point. Per
(model, file) the report gives accuracy (the mean of the chosen metric), exact match, token F1 and sub-exact-match
of the extracted prediction, each with a 95% confidence interval (Wilson score interval for 0/1 scores, normal
approximation mean +- 1.96 s / sqrt(n) otherwise), the number of rows, the mean document length in tokens of the
model's tokenizer, the mean number of chunks, the wall time and the document tokens read per second. The means
average every scored row as it is (`config.averaging='ours'`), or as the reference's evaluation scripts do
('reference': a row whose response is empty is left out, each row's score is rounded to 2 decimals first).

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

This module is the CLI: flags, the config check and its translation into one `evaluate_models` call. The
evaluation itself (model loading, the loop, warm-up, result writing) is `memagent_jax.evaluation.loop`; the model
specs and file lists are parsed in `evaluation.specs`; statistics, tables, report files and the plot are in
`evaluation.report`. From Python (no subprocess, params already in memory allowed):

    from memagent_jax.evaluation import evaluate_models, evaluate_agent
    results = evaluate_models({"rl": "/ckpt/rl", "live": (params, config, tokenizer)}, files, "runs/x/eval",
                              budgets=AgentBudgets(...), temperature=0.7, top_p=0.95)
    file_result = evaluate_agent(agent, "eval_50docs.json")        # one file with an existing MemoryAgent
"""

from __future__ import annotations

import os
import sys

from memagent_jax import errors, settings
from memagent_jax.evaluation.loop import evaluate_models
from memagent_jax.evaluation.report import EvalResults, failure_summary
from memagent_jax.evaluation.specs import (
    ROW_ERROR_POLICIES,
    SCHEDULING,
    EvalConfigError,
    check_averaging,
    parse_eval_files,
    parse_models,
)

try:  # multi-host start-up; the module defines its own flags, so it is imported before flags are parsed
    from memagent_jax import distributed as _distributed
except ImportError:  # a tree without multi-host support: single-process runs only
    _distributed = None


# ------------------------------------------------------------------------------------------- CLI


def validate_config(cfg) -> None:
    """Checks the CLI config before any expensive work; every error names the config field."""
    from memagent_jax.evaluation import verifier

    parse_models(cfg.models, field="config.models")
    parse_eval_files(cfg.eval_files, field="config.eval_files")
    if cfg.tokenizer and not os.path.isdir(cfg.tokenizer):
        raise EvalConfigError(f"config.tokenizer: {cfg.tokenizer!r} is not a directory")
    agent_overrides(cfg)
    if cfg.metric != "auto" and cfg.metric not in verifier.METRICS:
        raise EvalConfigError(
            f"config.metric: unknown metric {cfg.metric!r}; choose one of {sorted(verifier.METRICS)} or 'auto'"
        )
    if cfg.extract not in verifier.EXTRACTORS:
        raise EvalConfigError(
            f"config.extract: unknown extraction {cfg.extract!r}; choose one of {list(verifier.EXTRACTORS)}"
        )
    if cfg.row_errors not in ROW_ERROR_POLICIES:
        raise EvalConfigError(f"config.row_errors: must be one of {list(ROW_ERROR_POLICIES)}, got {cfg.row_errors!r}")
    if cfg.batch_size <= 0:
        raise EvalConfigError(f"config.batch_size: must be positive, got {cfg.batch_size}")
    check_averaging(cfg.get("averaging", "ours"), path="config")
    if cfg.get("scheduling", "continuous") not in SCHEDULING:
        raise EvalConfigError(f"config.scheduling: must be one of {list(SCHEDULING)}, got {cfg.scheduling!r}")
    for name in ("max_questions", "num_traces"):
        if cfg[name] < 0:
            raise EvalConfigError(f"config.{name}: must be >= 0, got {cfg[name]}")
    from memagent_jax.models.config import ATTENTION_IMPLS

    if (cfg.get("attention_impl") or "auto") not in ATTENTION_IMPLS:
        raise EvalConfigError(
            f"config.attention_impl: must be one of {list(ATTENTION_IMPLS)} (or '' = auto), got {cfg.attention_impl!r}"
        )


def agent_overrides(cfg) -> dict:
    """The agent settings the config sets ({config name: value}; unset fields, None or '', are left to each
    model's memagent_agent.json), each checked by the settings dataclasses themselves; errors name the field."""
    from memagent_jax.agent import AgentSettings

    out = {name: value for name, value in (cfg.get("agent") or {}).items() if value not in (None, "")}
    if "templates" in out and not os.path.isfile(out["templates"]):
        raise EvalConfigError(f"config.agent.templates: {out['templates']!r} does not exist")
    with settings.named("config.agent", error=EvalConfigError):
        AgentSettings().override(**out)
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
    overrides = agent_overrides(cfg)
    try:
        mesh = sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    except sharding_lib.MeshError as e:
        raise EvalConfigError(f"config.mesh: {e} ({jax.device_count()} devices)") from None
    return evaluate_models(
        cfg.models,
        cfg.eval_files,
        workdir,
        agent_overrides=overrides,
        metric=cfg.metric,
        extract=cfg.extract,
        batch_size=cfg.batch_size,
        scheduling=cfg.get("scheduling", "continuous"),
        max_questions=cfg.max_questions,
        seed=cfg.seed,
        num_traces=cfg.num_traces,
        row_errors=cfg.row_errors,
        averaging=cfg.get("averaging", "ours"),
        mesh=mesh,
        param_dtype=cfg.param_dtype or None,
        compute_dtype=cfg.compute_dtype or None,
        tokenizer_path=cfg.tokenizer or None,
        progress=cfg.progress,
        plot=cfg.plot,
        warmup=cfg.warmup,
        config=cfg,
        allow_nonfinite_weights=bool(cfg.get("allow_nonfinite_weights", False)),
        doc_store=cfg.get("doc_store") or None,
        attention_impl=cfg.get("attention_impl") or None,
    )


_CONFIG = None
_WORKDIR = None
_FLAG_VALUES = None


def define_flags(flag_values=None, sys_argv: list[str] | None = None) -> None:
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
    from memagent_jax import configs

    if sys_argv is None:
        sys.argv = configs.resolve_argv(sys.argv)
    else:
        sys_argv = configs.resolve_argv(sys_argv)
    _CONFIG = config_flags.DEFINE_config_file(
        "config",
        configs.path_of("evaluate"),
        "evaluation config file",
        flag_values=fv,
        lock_config=True,
        sys_argv=sys_argv,
    )
    _WORKDIR = flags.DEFINE_string(
        "workdir", None, "directory for results.json/csv, predictions/ and the plot", flag_values=fv
    )


def main(argv) -> None:
    from absl import app, flags
    from absl import logging as absl_logging

    if _distributed is not None and hasattr(_distributed, "initialize_from_flags"):
        with errors.report_user_errors():  # multi-host runs: join the other processes (a no-op for one process)
            _distributed.initialize_from_flags(_FLAG_VALUES)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with errors.report_user_errors():  # a bad setting, model or file: one line, exit status 2 (nothing ran)
        results = run(_CONFIG.value, _WORKDIR.value)
    summary = failure_summary(results)
    if summary is not None:  # the reports are written; exit status 1 says some rows did not count
        print(f"warning: {summary}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    errors.run_absl(main, define_flags, default_config="evaluate")
