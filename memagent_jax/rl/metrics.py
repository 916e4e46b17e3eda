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
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import numpy as np

__all__ = ["MetricsWriter", "format_progress", "to_scalars", "truncate_jsonl"]

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
        self._t0 = time.perf_counter()
        self._written = 0
        if not self.active:
            return
        os.makedirs(self.workdir, exist_ok=True)
        if resume_step is not None:
            truncate_jsonl(self.jsonl_path, int(resume_step))
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=os.path.join(self.workdir, "tensorboard"))

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

    def close(self) -> None:
        """Flushes and closes the files. Idempotent."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
