"""Command-line plumbing shared by the dataset builders (``python -m memagent_jax.data.hotpotqa`` / ``.squad``).

Contract of every builder command (as for the other batch entry points):

* A bad input row (a question the builder cannot read, or cannot build at some document count) does not stop
  the run: it becomes one line of the errors file (``{"file", "row", "field", "num_docs", "error"}``, the error
  naming file, row and field) and the other rows go on.
* Outputs are written atomically (``<name>.partial`` renamed into place) and never over an input file.
* The last stderr line is a summary: ``built F files (R rows) from INPUT: Q questions read, B rows failed ...``.
* Exit status: 0 everything built; 1 outputs written but some rows failed (see the errors file); 2 nothing was
  built (bad arguments, unreadable input, no usable row).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from .records import DataFormatError

__all__ = [
    "BuildError",
    "add_common_arguments",
    "parse_counts",
    "check_outputs",
    "error_entry",
    "write_errors",
    "finish",
    "run",
]

_SUFFIXES = (".json", ".jsonl", ".parquet")


class BuildError(Exception):
    """A problem that stops the whole build (exit status 2)."""


def write_eval_suite(
    eval_rows, out_dir: str | os.PathLike, doc_counts: Sequence[int], suffix: str = ".json"
) -> dict[int, Path]:
    """Writes ``eval_<N>docs<suffix>`` with the rows ``eval_rows(N)`` for each N; returns ``{N: path}``. A length
    at which no row could be built (every question failed: see the builder's ``errors``) writes no file."""
    from .formats import write_eval_file

    out_dir = Path(out_dir)
    written = {}
    for n in doc_counts:
        path = out_dir / f"eval_{n}docs{suffix}"
        if write_eval_file(eval_rows(n), path):
            written[n] = path
        else:
            path.unlink()
    return written


def add_common_arguments(p: argparse.ArgumentParser, *, default_train_docs: int) -> None:
    p.add_argument("--input", required=True, help="the raw dataset JSON file")
    p.add_argument(
        "--out_dir",
        default=None,
        help="write the evaluation suite here: eval_<N>docs<suffix> for each N of --eval_docs",
    )
    p.add_argument(
        "--eval_docs",
        default="50,100,200,400,800",
        help="comma list of document counts for the evaluation suite (default: %(default)s)",
    )
    p.add_argument(
        "--num_questions", type=int, default=128, help="questions per evaluation file (default: %(default)s)"
    )
    p.add_argument("--suffix", default=".json", choices=_SUFFIXES, help="evaluation file format (default: %(default)s)")
    p.add_argument("--train_out", default=None, help="write training rows to this file (.parquet / .json / .jsonl)")
    p.add_argument(
        "--train_docs", type=int, default=default_train_docs, help="documents per training row (default: %(default)s)"
    )
    p.add_argument("--limit", type=int, default=0, help="training rows from the first N questions only (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error that stops the build")
    p.add_argument(
        "--errors",
        default=None,
        help="errors file (JSON Lines, one line per bad row; default: errors.jsonl in --out_dir, else "
        "<train_out>.errors.jsonl); written only when a row failed",
    )


def parse_counts(text: str, flag: str = "--eval_docs") -> tuple[int, ...]:
    """``"50,100"`` -> ``(50, 100)``; every count a positive integer."""
    counts = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise BuildError(f"{flag}: {part!r} is not an integer") from None
        if value <= 0:
            raise BuildError(f"{flag}: document counts must be positive, got {value}")
        counts.append(value)
    if not counts:
        raise BuildError(f"{flag}: no document count given")
    return tuple(dict.fromkeys(counts))


def _same(a: Path, b: Path) -> bool:
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(outputs: Iterable[str | os.PathLike], inputs: Sequence[str | os.PathLike]) -> None:
    """BuildError naming the output that would overwrite an input (or the input itself)."""
    for out in outputs:
        for inp in inputs:
            if _same(Path(out), Path(inp)):
                raise BuildError(f"output {out} is the input file {inp}; choose another output path")


def error_entry(err: Exception, *, num_docs: int | None = None) -> dict:
    """One line of the errors file."""
    if isinstance(err, DataFormatError):
        return {"file": err.path, "row": err.row, "field": err.field, "num_docs": num_docs, "error": str(err)}
    return {"file": None, "row": None, "field": None, "num_docs": num_docs, "error": str(err)}


def write_errors(path: str | os.PathLike, entries: Sequence[dict]) -> Path:
    """Write the error entries as JSON Lines, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for entry in entries:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def errors_path(args) -> Path:
    if args.errors:
        return Path(args.errors)
    if args.out_dir:
        return Path(args.out_dir) / "errors.jsonl"
    return Path(str(args.train_out) + ".errors.jsonl")


def planned_outputs(args, counts: Sequence[int]) -> list[Path]:
    outs = []
    if args.out_dir:
        outs += [Path(args.out_dir) / f"eval_{n}docs{args.suffix}" for n in counts]
    if args.train_out:
        outs.append(Path(args.train_out))
    outs.append(errors_path(args))
    return outs


def validate(args) -> tuple[int, ...]:
    """Checks the flags before anything is read; returns the evaluation document counts."""
    if not args.out_dir and not args.train_out:
        raise BuildError("nothing to build: give --out_dir (evaluation suite) and/or --train_out (training file)")
    counts = parse_counts(args.eval_docs) if args.out_dir else ()
    if args.num_questions <= 0:
        raise BuildError(f"--num_questions: must be positive, got {args.num_questions}")
    if args.train_docs <= 0:
        raise BuildError(f"--train_docs: must be positive, got {args.train_docs}")
    if args.limit < 0:
        raise BuildError(f"--limit: must be >= 0, got {args.limit}")
    if args.train_out and Path(args.train_out).suffix.lower() not in _SUFFIXES:
        raise BuildError(f"--train_out: unknown extension {Path(args.train_out).suffix!r}; use one of {_SUFFIXES}")
    if not os.path.isfile(args.input):
        raise BuildError(f"--input: {args.input} does not exist")
    check_outputs(planned_outputs(args, counts), [args.input])
    return counts


def finish(args, *, written: dict, rows: int, questions: int, errors: list[dict]) -> int:
    """Writes the errors file (when any), prints the summary line, returns the exit status."""
    bad_rows = {(e["file"], e["row"], e["field"]) for e in errors}
    detail = ""
    stale = errors_path(args)
    if not errors and stale.is_file():  # from an earlier run of the same command
        stale.unlink()
    if errors:
        path = write_errors(errors_path(args), errors)
        detail = f" ({len(errors)} errors, listed in {path})"
        for entry in errors[:5]:
            print(f"error: {entry['error']}", file=sys.stderr)
    print(
        f"built {len(written)} files ({rows} rows) from {args.input}: {questions} questions read, "
        f"{len(bad_rows)} rows failed{detail}",
        file=sys.stderr,
    )
    if not written:
        return 2
    return 1 if errors else 0


def run(args, make_builder) -> int:
    """Runs one builder command: ``make_builder(input_path, errors, seed)`` returns ``(builder, questions_read)``;
    the builder has ``write_eval_suite`` and ``write_training_file`` taking ``errors=``.  Returns the exit status."""
    from memagent_jax import errors as user_errors

    try:
        counts = validate(args)
        errors: list = []
        builder, questions = make_builder(args.input, errors, args.seed)
    except (*user_errors.user_error_types(), OSError) as e:  # nothing built: one line, exit status 2
        with user_errors.debugging(bool(getattr(args, "debug", False))):
            return user_errors.handle(e)
    except ValueError as e:  # no usable question at all
        print(f"error: {args.input}: {e}", file=sys.stderr)
        entries = [error_entry(x, num_docs=getattr(x, "num_docs", None)) for x in errors]
        return finish(args, written={}, rows=0, questions=0, errors=entries)
    written: dict = {}
    rows = 0
    try:
        if args.out_dir:
            before = len(errors)
            paths = builder.write_eval_suite(args.out_dir, counts, args.num_questions, args.suffix, errors=errors)
            written.update({str(p): n for n, p in paths.items()})
            rows += len(counts) * min(args.num_questions, questions) - (len(errors) - before)
        if args.train_out:
            count = builder.write_training_file(args.train_out, args.train_docs, args.limit or None, errors=errors)
            if count:
                rows += count
                written[str(args.train_out)] = args.train_docs
            else:  # every question failed (see the errors): no empty file
                Path(args.train_out).unlink(missing_ok=True)
    except (DataFormatError, OSError) as e:  # a write failed: what was written stays, the rest is not built
        print(f"error: {e}", file=sys.stderr)
        errors.append(e)
    entries = [error_entry(x, num_docs=getattr(x, "num_docs", None)) for x in errors]
    return finish(args, written=written, rows=rows, questions=questions, errors=entries)
