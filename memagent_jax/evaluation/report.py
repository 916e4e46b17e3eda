"""Evaluation reports: scores with 95% intervals, the results of an evaluation, tables, files and the plot.

The presentation half of the evaluation (`evaluation.loop` runs the models and builds these results):

    estimate(scores) -> Estimate(mean, low, high, n, method)      # Wilson for 0/1 scores, normal otherwise
    summarize_rows(rows, averaging) -> {score: Estimate}           # 'ours' or the reference scripts' averaging
    FileResult / EvalResults                                       # one (model, file) / a whole evaluation
    format_table(results); write_reports(results, out_dir); plot_accuracy_vs_length(results, path)
    failure_summary(results)                                       # the line counting failed rows, or None
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

#: 95% two-sided normal quantile used by every interval.
Z95 = 1.96
#: The per-row scores reported for every (model, file), besides `accuracy`.
SCORE_NAMES = ("accuracy", "em", "f1", "sub_em")
#: How per-row scores are averaged (`summarize_rows`): 'ours' (every scored row as it is) or 'reference' (the
#: reference's evaluation scripts: rows whose response is empty left out, each row's score rounded to 2 decimals).
AVERAGING = ("ours", "reference")


# ------------------------------------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A mean with its 95% confidence interval [low, high]; method: 'wilson' or 'normal'.

    With n == 0 every number is NaN (written as null in JSON)."""

    mean: float
    low: float
    high: float
    n: int
    method: str

    def to_dict(self) -> dict:
        return {k: _json_number(v) for k, v in dataclasses.asdict(self).items()}


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion successes / n (e.g. 8 / 10 -> (0.490, 0.943)).

    (p + z^2 / 2n  +-  z sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n); (nan, nan) when n == 0.
    """
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1.0 - p) / n + z2 / (4 * n * n), 0.0)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def normal_interval(
    values: Sequence[float], z: float = Z95, bounds: tuple[float, float] | None = (0.0, 1.0)
) -> tuple[float, float, float]:
    """(mean, low, high): mean +- z * s / sqrt(n), s the sample standard deviation (ddof 1).

    The interval is clipped to `bounds` (scores live in [0, 1]; None = no clipping). With one value there is no
    spread estimate and the interval is the whole of `bounds` (nan without bounds); with none, all NaN.
    """
    x = np.asarray(values, np.float64)
    n = x.size
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if n < 2:
        low, high = bounds if bounds is not None else (math.nan, math.nan)
        return mean, float(low), float(high)
    half = z * float(x.std(ddof=1)) / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(bounds[0], low), min(bounds[1], high)
    return mean, low, high


def estimate(values: Sequence[float], method: str = "auto") -> Estimate:
    """Mean and 95% interval of per-row scores: 'wilson' (0/1 scores), 'normal', or 'auto' (Wilson when every
    value is exactly 0 or 1, normal otherwise)."""
    x = np.asarray(values, np.float64)
    if method == "auto":
        method = "wilson" if bool(np.all((x == 0.0) | (x == 1.0))) else "normal"
    if method == "wilson":
        if not np.all((x == 0.0) | (x == 1.0)):
            raise ValueError("the Wilson interval needs 0/1 scores")
        low, high = wilson_interval(float(x.sum()), x.size)
        mean = float(x.mean()) if x.size else math.nan
        return Estimate(mean, low, high, int(x.size), "wilson")
    if method != "normal":
        raise ValueError(f"unknown interval method {method!r}")
    mean, low, high = normal_interval(x)
    return Estimate(mean, low, high, int(x.size), "normal")


def summarize(scores: Sequence[Mapping[str, float]]) -> dict[str, Estimate]:
    """Per-row score dicts (keys of SCORE_NAMES) -> one Estimate per score.

    EM and sub-EM are 0/1 (Wilson), F1 is graded (normal); accuracy uses Wilson when every row scored 0 or 1
    (em, sub_em, single-answer string_match_all) and the normal approximation otherwise.
    """
    methods = {"accuracy": "auto", "em": "wilson", "sub_em": "wilson", "f1": "normal"}
    return {name: estimate([float(s[name]) for s in scores], methods[name]) for name in SCORE_NAMES}


def averaged_rows(rows: Sequence[Mapping], averaging: str = "ours") -> list[dict[str, float]]:
    """The per-row score dicts that enter the averages, from scored rows (each with 'scores' and 'response').

    'ours': every row's scores as they are. 'reference': as the reference's evaluation scripts average: a row
    whose response is the empty string is left out (there, the mark of a failed request), and each score is
    rounded to 2 decimals (Python's `round(x, 2)`) before the mean, so three rows scoring 1/3 average 0.33.
    """
    if averaging == "ours":
        return [dict(r["scores"]) for r in rows]
    if averaging == "reference":
        return [{k: round(float(v), 2) for k, v in r["scores"].items()} for r in rows if r.get("response") != ""]
    raise ValueError(f"averaging: must be one of {list(AVERAGING)}, got {averaging!r}")


def summarize_rows(rows: Sequence[Mapping], averaging: str = "ours") -> dict[str, Estimate]:
    """`summarize` of the scored rows under `averaging` (see `averaged_rows`)."""
    return summarize(averaged_rows(rows, averaging))


# ------------------------------------------------------------------------------------------- results


@dataclasses.dataclass
class FileResult:
    """The evaluation of one model on one file. Scores are fractions in [0, 1]."""

    model: str
    model_path: str
    file: str
    file_key: str  # unique short name of the file (its stem), used in file names
    label: str  # length label: from the file name (len_4x, 800docs, 28k), num_docs, num_tokens, or the stem
    metric: str  # the metric asked for ('auto' included)
    metrics_used: dict[str, int]  # metric -> rows scored with it
    extract: str
    n: int  # rows in the averages
    skipped: int  # rows that could not run (row_errors='skip')
    accuracy: Estimate
    em: Estimate
    f1: Estimate
    sub_em: Estimate
    mean_doc_tokens: float
    mean_chunks: float
    total_doc_tokens: int
    wall_s: float
    doc_tokens_per_s: float
    rows: list[dict] = dataclasses.field(default_factory=list, repr=False)  # per-row predictions
    # Rows with an 'error' (a bad row of the file, a row the agent cannot run, an answer sampled from non-finite
    # logits), whatever the row_errors policy; `nonfinite` of them had non-finite (NaN / inf) model logits.
    errors: int = 0
    nonfinite: int = 0
    averaging: str = "ours"  # how the rows' scores were averaged (`AVERAGING`)
    empty: int = 0  # scored rows left out of the averages for their empty response (averaging 'reference')

    def to_dict(self, rows: bool = False) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "rows" and not rows:
                continue
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, Estimate) else _json_number(value)
        return out

    def csv_row(self) -> dict:
        row = {
            "model": self.model,
            "file": self.file,
            "label": self.label,
            "n": self.n,
            "skipped": self.skipped,
            "errors": self.errors,
            "nonfinite": self.nonfinite,
            "metric": self.metric,
        }
        for name in SCORE_NAMES:
            e = getattr(self, name)
            row[name], row[f"{name}_low"], row[f"{name}_high"] = e.mean, e.low, e.high
        row.update(
            mean_doc_tokens=self.mean_doc_tokens,
            mean_chunks=self.mean_chunks,
            wall_s=self.wall_s,
            doc_tokens_per_s=self.doc_tokens_per_s,
            model_path=self.model_path,
        )
        return row


CSV_FIELDS = (
    ["model", "file", "label", "n", "skipped", "errors", "nonfinite", "metric"]
    + [f"{s}{suffix}" for s in SCORE_NAMES for suffix in ("", "_low", "_high")]
    + ["mean_doc_tokens", "mean_chunks", "wall_s", "doc_tokens_per_s", "model_path"]
)


@dataclasses.dataclass
class EvalResults:
    """All (model, file) results of one evaluation, in model-major order."""

    results: list[FileResult]
    config: dict
    out_dir: str | None = None

    def get(self, model: str, file: str) -> FileResult:
        """The result of `model` on `file` (a path, its file_key or its label)."""
        for r in self.results:
            if r.model == model and file in (r.file, r.file_key, r.label):
                return r
        raise KeyError(f"no result for model {model!r} on {file!r}")

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(r.model for r in self.results))

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "results": [r.to_dict() for r in self.results],
            "environment": _environment(),
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
        }

    def table(self) -> str:
        return format_table(self.results)


def _json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _json_number(value.item())
    return value


def _environment() -> dict:
    import jax

    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
    }


def format_percent(x: float) -> str:
    """A fraction as a percentage with one decimal (0.4567 -> '45.7'); '-' when it is not finite."""
    return "-" if not math.isfinite(x) else f"{100 * x:.1f}"


def format_table(results: Sequence[FileResult]) -> str:
    """The console table: one line per (model, file)."""
    header = [
        "model",
        "file",
        "length",
        "tokens",
        "chunks",
        "accuracy % [95% CI]",
        "EM %",
        "F1 %",
        "sub-EM %",
        "n",
        "tok/s",
    ]
    lines = []
    for r in results:
        acc = r.accuracy
        ci = f"{format_percent(acc.mean)} [{format_percent(acc.low)}, {format_percent(acc.high)}]" if acc.n else "-"
        lines.append(
            [
                r.model,
                r.file_key,
                r.label,
                f"{r.mean_doc_tokens:.0f}" if r.n else "-",
                f"{r.mean_chunks:.1f}" if r.n else "-",
                ci,
                format_percent(r.em.mean),
                format_percent(r.f1.mean),
                format_percent(r.sub_em.mean),
                f"{r.n}" + "".join(f" (+{k} {what})" for k, what in ((r.skipped, "skipped"), (r.empty, "empty")) if k),
                f"{r.doc_tokens_per_s:.0f}",
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    right = {3, 4, 6, 7, 8, 10}

    def fmt(row):
        return "  ".join(
            str(x).rjust(w) if i in right else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule] + [fmt(row) for row in lines])


# ------------------------------------------------------------------------------------------- outputs


def write_predictions(result: FileResult, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in result.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def write_reports(results: EvalResults, out_dir: str, *, plot: bool = True) -> None:
    """results.json, results.csv, results.txt and (plot=True) accuracy_vs_length.png in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    _write_text(os.path.join(out_dir, "results.json"), json.dumps(results.to_dict(), indent=2, allow_nan=False))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for r in results.results:
        writer.writerow(
            {k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.csv_row().items()}
        )
    _write_text(os.path.join(out_dir, "results.csv"), buf.getvalue())
    _write_text(os.path.join(out_dir, "results.txt"), results.table() + "\n")
    if plot:
        plot_accuracy_vs_length(results.results, os.path.join(out_dir, "accuracy_vs_length.png"))


def plot_accuracy_vs_length(
    results: Sequence[FileResult], path: str, title: str | None = None, *, train_tokens: float | None = None
) -> str:
    """Accuracy (%) against mean document tokens (log x axis), one line per model, 95% CI as error bars and a
    shaded band. Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).

    train_tokens: the training documents' length; when given, a dashed line marks it and every length is labelled
    once with its multiple of it ("1x", "64x", "16384x")."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    from matplotlib.ticker import FuncFormatter, NullFormatter

    markers = "osD^vP*Xh<>"
    styles = ("-", "--", "-.", ":")
    models = list(dict.fromkeys(r.model for r in results))
    metrics = sorted({m for r in results for m in r.metrics_used} or {r.metric for r in results})
    all_x: list[float] = []
    labelled: set[str] = set()
    for k, model in enumerate(models):
        pts = sorted(
            (r.mean_doc_tokens, r)
            for r in results
            if r.model == model and r.n and math.isfinite(r.mean_doc_tokens) and r.mean_doc_tokens > 0
        )
        if not pts:
            continue
        x = np.array([p[0] for p in pts])
        acc = np.array([100 * p[1].accuracy.mean for p in pts])
        lo = np.array([100 * p[1].accuracy.low for p in pts])
        hi = np.array([100 * p[1].accuracy.high for p in pts])
        all_x.extend(x)
        line = ax.errorbar(
            x,
            acc,
            yerr=[np.maximum(acc - lo, 0), np.maximum(hi - acc, 0)],
            marker=markers[k % len(markers)],
            markersize=7 - min(k, 3),
            capsize=3,
            linewidth=1.8,
            linestyle=styles[k % len(styles)],
            label=f"{model} (n={pts[0][1].n})" if len({p[1].n for p in pts}) == 1 else model,
        )
        color = line[0].get_color()
        if len(x) > 1:
            ax.fill_between(x, lo, hi, color=color, alpha=0.12, linewidth=0)
        if train_tokens:
            for xv, yv in zip(x, acc):
                label = f"{xv / train_tokens:.0f}x"
                if label not in labelled:  # each length labelled once, on the first model that reaches it
                    labelled.add(label)
                    below = yv > 90  # near the top: under the point, inside the axes
                    ax.annotate(
                        label,
                        (xv, yv),
                        textcoords="offset points",
                        xytext=(0, -16 if below else 9),
                        ha="center",
                        fontsize=8,
                    )
    if train_tokens:
        ax.axvline(train_tokens, color="0.4", linestyle="--", linewidth=1)
        ax.annotate(
            "training length", (train_tokens, 3), textcoords="offset points", xytext=(4, 0), fontsize=8, color="0.3"
        )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_tokens(v)))
    narrow = bool(all_x) and max(all_x) / min(all_x) < 30  # few decades: label the minor ticks too

    def minor(v, _):  # 2, 3 and 5 x 10^k only: readable without crowding
        lead = round(v / 10 ** math.floor(math.log10(v) + 1e-9)) if v > 0 else 0
        return format_tokens(v) if lead in (2, 3, 5) else ""

    ax.xaxis.set_minor_formatter(FuncFormatter(minor) if narrow else NullFormatter())
    ax.set_ylim(-2, 102)
    ax.set_xlabel("mean document length (tokens, log scale)")
    ax.set_ylabel(f"accuracy (%, {'/'.join(metrics)})")
    ax.set_title(title or "Memory agent accuracy vs document length (95% CI)")
    ax.grid(True, which="both", alpha=0.3)
    if models:
        ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return path


def format_tokens(n: float) -> str:
    """A token count in short form: 1234567 -> '1.23M', 7200 -> '7.2K', 512 -> '512'."""
    if n >= 1e6:
        return f"{n / 1e6:.3g}M"
    if n >= 1e3:
        return f"{n / 1e3:.3g}K"
    return f"{n:.0f}"


def failure_summary(results: EvalResults) -> str | None:
    """One line counting the rows that failed over every (model, file), or None when none did."""
    failed = sum(r.errors for r in results.results)
    if not failed:
        return None
    total = sum(len(r.rows) for r in results.results)
    nonfinite = sum(r.nonfinite for r in results.results)
    where = ", ".join(f"{r.model}/{r.file_key}: {r.errors}" for r in results.results if r.errors)
    return (
        f"{failed} of {total} rows failed ({nonfinite} with non-finite model outputs; {where}); their "
        f"'error' fields in predictions/*.jsonl say why"
    )
