"""Per-step metrics: a JSONL file and TensorBoard event files in the workdir, and a one-line console progress line.

    writer = MetricsWriter(workdir)
    writer.write(step, {"reward_mean": 0.4, "loss": 0.01, ...})   # scalars only (Python/NumPy/JAX 0-d)
    writer.close()

Every metric on the console line is also a TensorBoard scalar (`tensorboard --logdir <workdir>/tensorboard`,
`pip install -e ".[tensorboard]"`); the line starts with the elapsed time and the estimated time left.

Files: `<workdir>/metrics.jsonl` (one JSON object per step: {"step": s, "time": unix seconds, **metrics}; appended to,
so a resumed run continues the same file; `resume_step=S` first drops the rows of steps after S, which the resumed run
writes again, so the file keeps one row per step) and `<workdir>/tensorboard/` (tensorboardX event files; one scalar tag
per key). Only process 0 writes (on other processes every method is a no-op), so multi-host runs do not duplicate lines.

Weights & Biases (optional, `pip install -e ".[wandb]"`): with `wandb=WandbSettings(enabled=True, ...)` (the
`config.wandb` section) the same scalars also go to a W&B run, `wandb.log(metrics, step=step)` per step, with the
run's config (`run_config`, a flat {dotted key: value} dict) as the W&B config. The W&B run id is kept in
`<workdir>/wandb_run_id` (`RUN_ID_FILE`), so a resumed run continues the same W&B run (`resume="allow"`). wandb is
imported only when the sink is on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
import string
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import numpy as np

from memagent_jax import settings
from memagent_jax.errors import UserError

__all__ = [
    "RUN_ID_FILE",
    "WANDB_MODES",
    "MetricsWriter",
    "WandbError",
    "WandbSettings",
    "format_progress",
    "to_scalars",
    "truncate_jsonl",
    "wandb_installed",
    "wandb_run_id",
]

# Shown first on the console line, in this order, when present.
PROGRESS_KEYS = (
    "reward_mean",
    "accuracy",
    "loss",
    "pg_loss",
    "kl",
    "entropy",
    "clipfrac_high",
    "clipfrac_low",
    "grad_norm",
    "learning_rate",
    "tokens_per_s",
)


def to_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Converts every value to a Python float; raises ValueError naming a non-scalar entry."""
    out = {}
    for name, value in metrics.items():
        arr = np.asarray(value)
        if arr.size != 1:
            raise ValueError(f"metric {name!r} is not a scalar (shape {arr.shape})")
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise ValueError(f"metric {name!r} is not numeric (dtype {arr.dtype})")
        out[str(name)] = float(arr.reshape(()))
    return out


def _fmt(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return str(value)
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    if abs(value) >= 1e6 or abs(value) < 1e-3:
        return f"{value:.3e}"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.4f}"


def format_progress(
    step: int,
    metrics: Mapping[str, float],
    *,
    total_steps: int | None = None,
    max_items: int | None = None,
    elapsed_s: float | None = None,
    done_steps: int = 0,
) -> str:
    """'step 12/100 [01:10<09:40] | reward_mean 0.4000 | loss 0.0123 | ...': every metric (the PROGRESS_KEYS first,
    then the rest by name; `max_items` caps them); with `elapsed_s` (over `done_steps` steps of this run) the
    elapsed time and, given `total_steps`, the estimated time left (tqdm's interval format)."""
    head = f"step {step}" + (f"/{total_steps}" if total_steps else "")
    if elapsed_s is not None:
        from tqdm import tqdm

        left = ""
        if total_steps and done_steps > 0:
            left = "<" + tqdm.format_interval(elapsed_s / done_steps * max(0, total_steps - step))
        head += f" [{tqdm.format_interval(elapsed_s)}{left}]"
    keys = [k for k in PROGRESS_KEYS if k in metrics] + sorted(k for k in metrics if k not in PROGRESS_KEYS)
    return " | ".join([head] + [f"{k} {_fmt(metrics[k])}" for k in keys[:max_items]])


def truncate_jsonl(path: str, last_step: int) -> int:
    """Keeps the rows of `path` with "step" <= last_step (dropping lines that do not parse, e.g. one torn by a
    kill), rewriting the file atomically (temporary file + rename). Returns the number of rows dropped."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if step <= last_step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return dropped


# ------------------------------------------------------------------------------------------- Weights & Biases

WANDB_MODES = ("online", "offline", "disabled")
RUN_ID_FILE = "wandb_run_id"  # in the workdir: the W&B run id a resumed run continues
_PROJECT_CHARS = "/\\#?%:"  # refused by W&B in project names
_RUN_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class WandbError(UserError):
    """W&B could not start the run, or the workdir's run-id file is unusable; the message names which."""


def wandb_installed() -> bool:
    """Whether `import wandb` would find the package (nothing is imported)."""
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


@dataclasses.dataclass(frozen=True)
class WandbSettings:
    """The W&B sink of a MetricsWriter (the `config.wandb` section); checks itself.

    enabled: log to W&B. project / entity: where the run goes (entity '' = the logged-in user's default).
    name: the run's display name ('' = the workdir's folder name). mode: 'online' (to the W&B server), 'offline'
    (files only; `wandb sync <dir>/wandb/offline-run-*` uploads them later) or 'disabled' (nothing, wandb not
    imported). tags: comma-separated list. dir: the folder W&B writes its `wandb/` folder in ('' = the workdir).
    """

    enabled: bool = False
    project: str = "memagent-jax"
    entity: str = ""
    name: str = ""
    mode: str = "online"
    tags: str = ""
    dir: str = ""

    def __post_init__(self):
        settings.boolean("enabled", self.enabled)
        for name in ("project", "entity", "name", "mode", "tags", "dir"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise settings.SettingError.at(name, f"must be a string, got {value!r}")
        settings.choice("mode", self.mode, WANDB_MODES)
        bad = sorted({c for c in self.project if c in _PROJECT_CHARS})
        if not self.project.strip() or len(self.project) > 128 or bad:
            raise settings.SettingError.at(
                "project",
                f"must be a W&B project name (1 to 128 characters, none of {_PROJECT_CHARS!r}), got {self.project!r}",
            )
        for tag in self.tag_list:
            if len(tag) > 64:
                raise settings.SettingError.at("tags", f"holds a tag longer than 64 characters (W&B's limit): {tag!r}")

    @property
    def tag_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.tags.split(",") if t.strip())

    @property
    def active(self) -> bool:
        """Whether a W&B run is started (enabled, mode not 'disabled')."""
        return self.enabled and self.mode != "disabled"


def wandb_run_id(workdir: str) -> str:
    """The W&B run id of `workdir`, read from `<workdir>/wandb_run_id`, or a new one written there (atomically)."""
    path = os.path.join(workdir, RUN_ID_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            run_id = f.read().strip()
        if run_id:
            if not _RUN_ID.fullmatch(run_id):
                raise WandbError(
                    f"{path}: {run_id[:80]!r} is not a W&B run id (letters, digits, '_', '-', '.'; at most 128); "
                    f"delete the file to start a new W&B run"
                )
            return run_id
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(run_id + "\n")
    os.replace(tmp, path)
    return run_id


def _start_wandb(cfg: WandbSettings, workdir: str, run_config: Mapping[str, Any] | None):
    import wandb

    directory = cfg.dir or workdir
    os.makedirs(directory, exist_ok=True)
    try:
        return wandb.init(
            project=cfg.project,
            entity=cfg.entity or None,
            name=cfg.name or os.path.basename(os.path.abspath(workdir)),
            mode=cfg.mode,
            dir=directory,
            tags=list(cfg.tag_list) or None,
            config=dict(run_config or {}),
            resume="allow",
            id=wandb_run_id(workdir),
        )
    except wandb.errors.Error as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = " (config.wandb.mode=offline logs locally; `wandb sync` uploads later)" if cfg.mode == "online" else ""
        raise WandbError(f"config.wandb: W&B could not start the run: {reason}{hint}") from None


class MetricsWriter:
    """Writes scalar metrics per step to JSONL + TensorBoard + console (process 0 only).

    Args:
      workdir: run directory (created if missing).
      tensorboard: also write TensorBoard event files under `<workdir>/tensorboard`.
      console: print a progress line per `write` (every `console_every` steps).
      total_steps: shown as 'step s/total' on the console.
      process_index: defaults to `jax.process_index()`; non-zero processes write nothing.
      stream: where the console line goes (default stdout).
      resume_step: the step the run resumes from (0: a fresh start): rows of later steps already in the JSONL
        file (written before an interruption, and about to be written again) are removed first, as is a torn
        last line. None: append to the file as it is.
      wandb: the W&B sink's settings (None or not `active`: no W&B, wandb not imported). A resumed run continues
        the workdir's W&B run; steps W&B already holds are not replaced (W&B keeps a run's steps increasing).
      run_config: the W&B run's config, a flat {name: value} dict (the trainer passes the run's whole config).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        console: bool = True,
        console_every: int = 1,
        total_steps: int | None = None,
        process_index: int | None = None,
        stream: TextIO | None = None,
        jsonl_name: str = "metrics.jsonl",
        resume_step: int | None = None,
        wandb: WandbSettings | None = None,
        run_config: Mapping[str, Any] | None = None,
    ):
        if process_index is None:
            import jax

            process_index = jax.process_index()
        self.active = process_index == 0
        self.workdir = os.fspath(workdir)
        self.console = console
        self.console_every = max(1, int(console_every))
        self.total_steps = total_steps
        self.stream = stream if stream is not None else sys.stdout
        self.jsonl_path = os.path.join(self.workdir, jsonl_name)
        self._jsonl = None
        self._tb = None
        self._wandb = None  # the W&B run
        self._t0 = time.perf_counter()
        self._written = 0
        if not self.active:
            return
        os.makedirs(self.workdir, exist_ok=True)
        try:
            if resume_step is not None:
                truncate_jsonl(self.jsonl_path, int(resume_step))
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(logdir=os.path.join(self.workdir, "tensorboard"))
            if wandb is not None and wandb.active:
                self._wandb = _start_wandb(wandb, self.workdir, run_config)
        except BaseException:
            self.close()
            raise

    @property
    def wandb_run(self):
        """The W&B run (None without the W&B sink, or once closed)."""
        return self._wandb

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Records one step's scalar metrics (NaN/inf are kept: JSON gets NaN/Infinity, as Python's json does)."""
        if not self.active:
            return
        scalars = to_scalars(metrics)
        record = {"step": int(step), "time": time.time(), **scalars}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, global_step=int(step))
        if self._wandb is not None:
            self._wandb.log(scalars, step=int(step))
        self._written += 1
        if self.console and int(step) % self.console_every == 0:
            print(
                format_progress(
                    int(step),
                    scalars,
                    total_steps=self.total_steps,
                    elapsed_s=time.perf_counter() - self._t0,
                    done_steps=self._written,
                ),
                file=self.stream,
                flush=True,
            )

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self, exit_code: int | None = None) -> None:
        """Flushes and closes the files and finishes the W&B run with `exit_code` (None: 1 when called while an
        exception propagates, e.g. from a `finally`, else 0; W&B marks a non-zero run failed). Idempotent."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            run, self._wandb = self._wandb, None
            if exit_code is None:
                exit_code = 1 if sys.exc_info()[1] is not None else 0
            run.finish(exit_code=exit_code)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exit_code=0 if exc is None else 1)
