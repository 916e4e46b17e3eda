"""Command-line plumbing shared by the dataset builders (``python -m memagent_jax.data.hotpotqa`` / ``.squad``).

Contract of every builder command (as for the other batch entry points):

* A bad input row (a question the builder cannot read, or cannot build at some document count) does not stop
  the run: it becomes one line of the errors file (``{"file", "row", "field", "num_docs", "error"}``, the error
  naming file, row and field) and the other rows go on.
* Outputs are written atomically (``<name>.partial`` renamed into place). No output, temporary file or errors
  file may be the input (symbolic and hard links included), and no two outputs may name one file: such flags are
  refused before anything is read, naming both flags.
* The last stderr line is a summary: ``built F files (R rows) from INPUT: Q questions read, B rows failed ...``.
* Exit status: 0 everything built; 1 outputs written but some rows failed (see the errors file); 2 nothing was
  built (bad arguments, unreadable input, no usable row), or a write failed (disk full, no permission: one line
  names the file, whose partial file is removed; the outputs finished before it stay, the input is never touched).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from memagent_jax.errors import UserError

from .records import DataFormatError, DataWriteError

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


class BuildError(UserError):
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


def check_outputs(
    outputs: Iterable[tuple[str, str | os.PathLike]], inputs: Sequence[tuple[str, str | os.PathLike]]
) -> None:
    """BuildError naming both flags when an output, or the temporary file it is written to (``<name>.partial``),
    is an input (after symbolic links; hard links too), or when two outputs name one file.

    outputs, inputs: ``(flag, path)`` pairs, e.g. ``("--train_out", "train.parquet")``."""
    from memagent_jax.storage.paths import partial_path, same_file

    files = []  # (description, path, owner): every file the build writes, the temporary ones included
    for flag, out in outputs:
        files.append((f"{flag} {os.fspath(out)}", os.fspath(out), flag))
        files.append((f"the temporary file of {flag} ({partial_path(out)})", partial_path(out), flag))
    for what, path, _ in files:
        for flag, inp in inputs:
            if same_file(path, inp):
                raise BuildError(
                    f"{what} is the input file {flag} {os.fspath(inp)}: the build would write over it or delete it; "
                    "choose another output path"
                )
    for i, (what, path, owner) in enumerate(files):
        for other, other_path, other_owner in files[i + 1 :]:
            if owner != other_owner and same_file(path, other_path):
                raise BuildError(f"{what} and {other} name the same file: one would overwrite the other")


def error_entry(err: Exception, *, num_docs: int | None = None) -> dict:
    """One line of the errors file."""
    if isinstance(err, DataFormatError):
        return {"file": err.path, "row": err.row, "field": err.field, "num_docs": num_docs, "error": str(err)}
    return {"file": None, "row": None, "field": None, "num_docs": num_docs, "error": str(err)}


def write_errors(path: str | os.PathLike, entries: Sequence[dict]) -> Path:
    """Write the error entries as JSON Lines, atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            for entry in entries:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise DataWriteError(path, e) from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def errors_path(args) -> Path:
    if args.errors:
        return Path(args.errors)
    if args.out_dir:
        return Path(args.out_dir) / "errors.jsonl"
    return Path(str(args.train_out) + ".errors.jsonl")


def planned_outputs(args, counts: Sequence[int]) -> list[tuple[str, Path]]:
    """``(flag, path)`` of every file the build may write."""
    outs = []
    if args.out_dir:
        outs += [("--out_dir", Path(args.out_dir) / f"eval_{n}docs{args.suffix}") for n in counts]
    if args.train_out:
        outs.append(("--train_out", Path(args.train_out)))
    outs.append(("--errors" if args.errors else "--errors (default)", errors_path(args)))
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
    from memagent_jax.storage.paths import input_file_problem

    problem = input_file_problem(args.input, pipes=True)  # the raw file is read once: a pipe will do
    if problem is not None:
        raise BuildError(f"--input {args.input} {problem}")
    if args.out_dir and os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise BuildError(f"--out_dir {args.out_dir} is a file, not a directory")
    check_outputs(planned_outputs(args, counts), [("--input", args.input)])
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
    planned = len(counts) + bool(args.train_out)
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
    except DataFormatError as e:  # a row does not fit the file's schema: what was written stays
        print(f"error: {e}", file=sys.stderr)
        errors.append(e)
    except OSError as e:  # disk full, no permission: the build stops; the files already written are complete
        return _stopped(e, written, planned)
    entries = [error_entry(x, num_docs=getattr(x, "num_docs", None)) for x in errors]
    try:
        return finish(args, written=written, rows=rows, questions=questions, errors=entries)
    except OSError as e:  # the errors file could not be written
        return _stopped(e, written, planned)


def _stopped(err: OSError, written: dict, planned: int) -> int:
    """One line for a failed write (naming the file); exit status 2."""
    if not isinstance(err, DataWriteError):  # a write outside the data writers: name the file all the same
        err = DataWriteError(err.filename or "an output file", err)
    done = f" ({len(written)} of {planned} outputs finished before: {', '.join(written)})" if written else ""
    print(f"error: {err}; the build stopped{done}", file=sys.stderr)
    return 2
