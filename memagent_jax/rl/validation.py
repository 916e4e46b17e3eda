"""Evaluation during training: the current policy on evaluation files every `config.eval.every_steps` steps.

    ev = EvalSettings(files="/data/eval_*docs.json", every_steps=50)      # `config.eval`, checked
    evaluation = TrainingEvaluation(ev, agent, workdir, export=..., resume_step=start, restored=metadata)
    if evaluation.due(step):
        metrics.update(evaluation.run(step, params))                        # eval/<file>/accuracy, ...

The evaluation is `memagent evaluate`'s: the files are parsed and opened by `evaluation.specs`, every file runs
through `evaluation.loop.evaluate_agent` (row r samples with fold_in(key(seed), r.index); greedy by default),
on the params the rollout agent holds (on its mesh, in place: no copy, no second model). In a multi-process run
every process evaluates rows p, p + P, ... of each file and the rows' scores are combined over the processes.

Per evaluated step: the step's metrics get `eval/<file key>/accuracy`, `..._low`, `..._high` (the 95% interval of
the evaluation report: Wilson for 0/1 scores, else normal), `eval/<file key>/n` and `eval/accuracy_mean` (the
mean over files, which picks the best step); one console line per file; one row per file appended to
`<workdir>/eval_history.jsonl`. A step whose mean accuracy beats every earlier one is exported to `<workdir>/best/`
(the regular export's format, with `best.json` naming the step and its accuracies), replaced atomically. The
best-so-far is kept in every checkpoint's metadata, so a resumed run compares against it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

from memagent_jax import settings

HISTORY_FILE = "eval_history.jsonl"
BEST_DIR = "best"
BEST_FILE = "best.json"
METADATA_KEY = "eval_best"  # the best-so-far in the checkpoint metadata


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """`config.eval`: evaluation of the policy during training; checks itself (errors name the field).

    files: evaluation files, a comma-separated string (or a list) of paths and glob patterns, in the format
      `memagent evaluate` reads. every_steps: evaluate after every N-th training step (0 = never: evaluation
      off). max_questions: the first N rows of each file (0 = all). temperature / top_p: sampling of memories
      and answers (default greedy). at_start: also evaluate the initial params (step 0). at_end: also evaluate
      after the last step when every_steps does not divide config.steps. metric / extract: as
      `memagent evaluate`'s. batch_size: rows the agent runs at once. seed: row r samples with
      fold_in(key(seed), r.index).
    """

    files: str | tuple = ""
    every_steps: int = 0
    max_questions: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    at_start: bool = False
    at_end: bool = True
    metric: str = "sub_em"
    extract: str = "boxed"
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        from memagent_jax.evaluation import verifier

        if isinstance(self.files, (list, tuple)):
            if not all(isinstance(f, str) for f in self.files):
                raise settings.SettingError.at("files", f"must be paths (strings), got {list(self.files)!r}")
        elif not isinstance(self.files, str):
            raise settings.SettingError.at("files", f"must be a comma-separated string of paths, got {self.files!r}")
        settings.integer("every_steps", self.every_steps, minimum=0, allowed=">= 0 (0 = no evaluation)")
        settings.integer("max_questions", self.max_questions, minimum=0, allowed=">= 0 (0 = every row)")
        settings.temperature(self.temperature)
        settings.top_p(self.top_p)
        settings.boolean("at_start", self.at_start)
        settings.boolean("at_end", self.at_end)
        settings.choice("metric", self.metric, (*sorted(verifier.METRICS), "auto"))
        settings.choice("extract", self.extract, verifier.EXTRACTORS)
        settings.integer("batch_size", self.batch_size, minimum=1)
        settings.integer("seed", self.seed, minimum=0)
        if self.every_steps and not self.file_items:
            raise settings.SettingError.at(
                "files", "must name at least one evaluation file when config.eval.every_steps > 0"
            )

    @property
    def file_items(self) -> list[str]:
        items = self.files.split(",") if isinstance(self.files, str) else list(self.files)
        return [s.strip() for s in items if s.strip()]

    @property
    def enabled(self) -> bool:
        return self.every_steps > 0

    def due(self, step: int, total_steps: int) -> bool:
        """Whether the params after `step` training steps are evaluated."""
        if not self.enabled:
            return False
        if step == 0:
            return self.at_start
        return step % self.every_steps == 0 or (self.at_end and step == total_steps)


def open_files(ev: EvalSettings, *, field: str = "config.eval.files"):
    """[(path, file key, opened file)] of `ev.files` (`evaluation.specs`); a ConfigError naming `field`."""
    from memagent_jax.data.records import DataFormatError
    from memagent_jax.evaluation.specs import EvalConfigError, file_keys, open_eval_file, parse_eval_files

    try:
        files = parse_eval_files(ev.file_items, field=field)
        opened = [open_eval_file(f) for f in files]
    except EvalConfigError as e:
        raise settings.ConfigError(str(e)) from None
    except DataFormatError as e:
        raise settings.ConfigError(f"{field}: {e}") from None
    for path, records in zip(files, opened):
        if len(records) == 0:
            raise settings.ConfigError(f"{field}: {path!r} has no rows")
    return list(zip(files, file_keys(files), opened))


class _Rows:
    """Rows `indices` of an opened file, as a file (`path`, len, [i]) for `evaluate_agent`."""

    def __init__(self, records, indices):
        self.records, self.indices = records, list(indices)
        self.path = getattr(records, "path", "")

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.records[self.indices[i]]


def _runnable(agent, rows, metric: str) -> int:
    """How many of `rows` `evaluate_agent` will run (the others are error rows): it makes
    ceil(runnable / batch_size) agent calls."""
    from memagent_jax.agent import AgentInputError
    from memagent_jax.data.records import DataFormatError
    from memagent_jax.evaluation.loop import resolve_metric
    from memagent_jax.evaluation.specs import EvalConfigError

    count = 0
    for i in range(len(rows)):
        try:
            record = rows[i]
            resolve_metric(metric, record, where="row")
            agent.prepare(record.question, record.document)
        except (DataFormatError, EvalConfigError, AgentInputError):
            continue
        count += 1
    return count


def evaluate_policy(agent, files, ev: EvalSettings) -> list:
    """[report.Estimate of the accuracy] per file of `files` ([(path, key, opened)]) for `agent` as it is.

    One process: `evaluate_agent` on the file (as `memagent evaluate` runs it). Several: process p runs rows
    p, p + P, ... of the first max_questions; every process makes the same number of agent calls (the calls are
    collective; a process with fewer batches runs empty ones), and the rows' accuracies are gathered."""
    import jax
    import numpy as np

    from memagent_jax.distributed import arrays as multiprocess
    from memagent_jax.evaluation.loop import evaluate_agent
    from memagent_jax.evaluation.report import averaged_rows, estimate

    processes, index = jax.process_count(), jax.process_index()
    spans = multiprocess.is_multiprocess(getattr(agent, "mesh", None))
    out = []
    for path, key, records in files:
        options = dict(
            metric=ev.metric,
            extract=ev.extract,
            batch_size=ev.batch_size,
            seed=ev.seed,
            num_traces=0,
            row_errors="skip",
            progress=False,
            model_name="policy",
            file_key=key,
        )
        if not spans:
            out.append(evaluate_agent(agent, records, max_questions=ev.max_questions, **options).accuracy)
            continue
        total = len(records) if ev.max_questions <= 0 else min(ev.max_questions, len(records))
        share = _Rows(records, range(index, total, processes))
        calls = -(-_runnable(agent, share, ev.metric) // ev.batch_size)
        most = int(multiprocess.process_allgather(np.asarray(calls, np.int64)).max())
        result = evaluate_agent(agent, share, scheduling="bucketed", **options)
        for _ in range(most - calls):
            agent.run([], [], rng=0)  # this process's part of another process's batch
        scores = np.asarray([r["accuracy"] for r in averaged_rows([r for r in result.rows if "scores" in r])])
        width = int(multiprocess.process_allgather(np.asarray(scores.size, np.int64)).max())
        padded = np.full((max(width, 1),), np.nan)
        padded[: scores.size] = scores
        every = multiprocess.process_allgather(padded).reshape(-1)
        out.append(estimate(every[~np.isnan(every)], "auto"))
    return out


def _percent(x: float) -> str:
    return "nan" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _number(x: float):
    return None if x is None or math.isnan(x) else float(x)


class TrainingEvaluation:
    """Evaluation of the policy inside `train` (see the module docstring).

    Args:
      ev: the checked `config.eval`.
      agent: the `MemoryAgent` that evaluates (the policy's params are set on it per evaluation).
      workdir: the run's folder (eval_history.jsonl, best/).
      export: export(folder, extra_files) writes the current params as the regular export does.
      resume_step: the step the run resumes from (0: a fresh run); history rows of later steps are dropped.
      restored: the checkpoint metadata the run resumed from (its best-so-far), or None.
      total_steps: config.steps.
    """

    def __init__(self, ev: EvalSettings, agent, workdir: str, *, export, resume_step: int, restored, total_steps):
        import jax

        from memagent_jax.rl.metrics import truncate_jsonl

        self.ev, self.agent, self.workdir, self.export = ev, agent, workdir, export
        self.total_steps = total_steps
        self.main = jax.process_index() == 0
        self.files = open_files(ev)
        self.history_path = os.path.join(workdir, HISTORY_FILE)
        self.best_dir = os.path.join(workdir, BEST_DIR)
        best = (restored or {}).get(METADATA_KEY)
        self.best: dict | None = best if isinstance(best, dict) and best.get("step", math.inf) <= resume_step else None
        if self.main:
            # A fresh run (step 0) evaluates step 0 again; a resumed one keeps the rows of the steps it does not redo.
            truncate_jsonl(self.history_path, resume_step if resume_step > 0 else -1)
            from memagent_jax.models.hf_io import clean_stale_exports

            clean_stale_exports(self.best_dir)  # left by a kill during a best export

    def due(self, step: int) -> bool:
        return self.ev.due(step, self.total_steps)

    def run(self, step: int, params) -> dict:
        """Evaluates `params` (on the agent's mesh) after `step` steps: the metrics, the history rows, and the
        best export when this step's mean accuracy is the best so far."""
        t0 = time.perf_counter()
        self.agent.params = params
        estimates = evaluate_policy(self.agent, self.files, self.ev)
        self.agent.release_layout()  # training goes on: its memory is the learner's
        metrics: dict = {}
        accuracies = {}
        rows = []
        for (path, key, _), est in zip(self.files, estimates):
            metrics.update(
                {
                    f"eval/{key}/accuracy": est.mean,
                    f"eval/{key}/accuracy_low": est.low,
                    f"eval/{key}/accuracy_high": est.high,
                    f"eval/{key}/n": est.n,
                }
            )
            accuracies[key] = _number(est.mean)
            rows.append(
                {
                    "step": int(step),
                    "file": path,
                    "file_key": key,
                    "accuracy": _number(est.mean),
                    "low": _number(est.low),
                    "high": _number(est.high),
                    "n": int(est.n),
                    "interval": est.method,
                }
            )
        known = [a for a in accuracies.values() if a is not None]
        mean = float(sum(known) / len(known)) if known else math.nan
        metrics["eval/accuracy_mean"] = mean
        metrics["eval/time_s"] = time.perf_counter() - t0
        if self.main:
            for row in rows:
                print(
                    f"eval step {step}: {row['file_key']} accuracy {_percent(row['accuracy'])}% "
                    f"[{_percent(row['low'])}, {_percent(row['high'])}] n={row['n']}",
                    flush=True,
                )
            with open(self.history_path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        if known and (self.best is None or mean > self.best["accuracy_mean"]):
            self.best = {"step": int(step), "accuracy_mean": mean, "accuracy": accuracies}
            self.export(self.best_dir, {BEST_FILE: json.dumps(self.best, indent=2) + "\n"})
            if self.main:
                print(
                    f"eval step {step}: best mean accuracy so far ({_percent(mean)}%), exported to {self.best_dir}",
                    file=sys.stdout,
                    flush=True,
                )
        return metrics

    def metadata(self) -> dict:
        """What a checkpoint keeps: {METADATA_KEY: the best so far} (empty before any evaluation)."""
        return {METADATA_KEY: self.best} if self.best is not None else {}
