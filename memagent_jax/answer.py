"""Answer questions about long documents with a memory agent.

One document (`--document -` reads it from standard input):
    python -m memagent_jax.answer --model DIR --question "Who ...?" --document book.txt [--trace]

prints the answer and the model's whole response, each after its label (the response last: it may run over several
lines):
    answer: Ra
    response: The word is \\boxed{Ra}.
The answer is what the verifier scores: the extraction rule of the model's settings (memagent_agent.json "extract",
or --agent.extract; default boxed, the content of the last \\boxed{...}); "answer: (none)" when the rule finds no
answer in the response. With --trace the memory after every chunk comes first.

A batch file (reference evaluation or training format, JSONL / JSON / parquet) -> JSONL of answers:
    python -m memagent_jax.answer --model DIR --input eval_800docs.json --output answers.jsonl [--trace]

Rows run with continuous batching over --batch-size row slots (a row whose document ends takes the next one); row i of
the file samples with fold_in(key(seed), i), so its answer does not depend on the batch. A row that cannot run (a
malformed JSON line, an array item that is not an object, text that is not UTF-8, a missing or ill-typed field, an empty
question or document, a question over budget) is written as {"row", "error", "field"} (the error names the file, the row
and the field) and the rest go on; so is a row whose answer was sampled from non-finite (NaN / inf) logits. An answered
row has "answer" (the extracted answer, as above; null when the rule finds none), "response" (the model's whole
response), "num_chunks" and "finished"; when rows carry gold answers, also "answers", "sub_em" (the QA accuracy
metric) and "em", scored from the response under the same extraction rule.

Sampling: --agent.temperature (0 = greedy), --agent.top_p, --agent.top_k (0 = off), else the model's
memagent_agent.json, else greedy. In batch mode a row may carry its own, an optional object field
    "sampling": {"temperature": 0.7, "top_p": 0.95, "top_k": 20, "seed": 11}
(each field optional; left out or null: the run's setting): that row samples its memory updates and its answer with
those settings and, with a seed S, with the key of --seed S in single-document mode instead of fold_in(key(seed), i);
its output row echoes them as "sampling". Rows with different settings share the batches; rows without "sampling"
answer as in a file without any. A bad value (e.g. a negative temperature, top_k not an integer >= 0, an unknown
field) makes that row an error row naming the file, the row and the field ("IN row 3: field 'sampling.temperature'
must be ..."); the other rows go on.

Output: rows are written to OUTPUT.partial as they are answered (a killed run keeps what it finished
there) and the file is renamed to OUTPUT when the run ends; OUTPUT is never one of the input files. The last
stderr line says "wrote OUTPUT: A answered, F failed (...)".

Exit status: 0 every row answered; 1 the output is written but F > 0 rows failed (their "error" rows say
why); 2 nothing was answered (bad arguments, model, tokenizer or input file).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from memagent_jax import errors
from memagent_jax.evaluation.answering import NONFINITE_MESSAGE, answer_file
from memagent_jax.model_flags import (
    FlagError,
    add_agent_arguments,
    add_model_arguments,
    build_agent,
    check_model_and_agent_flags,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m memagent_jax.answer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="local Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    p.add_argument("--question", help="the question (single-document mode)")
    p.add_argument(
        "--document", help="UTF-8 text file with the document, '-' for standard input (single-document mode)"
    )
    p.add_argument("--input", help="rows file (batch mode): reference eval or training format")
    p.add_argument("--output", help="JSONL output file (batch mode)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="rows read at once (batch mode): row slots of continuous batching, a row whose document "
        "ends takes the next one",
    )
    p.add_argument("--trace", action="store_true", help="print / write the memory after every chunk")
    add_agent_arguments(p)
    add_model_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    from memagent_jax import distributed

    distributed.add_arguments(p)
    return p


def check_args(args) -> None:
    """Checks every flag before anything loads; errors name the flag (and the file at fault)."""
    if args.batch_size < 1:
        raise FlagError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.output is not None:
        from memagent_jax.storage.paths import RemotePathError, check_local_path

        try:
            check_local_path(args.output, "--output")
        except RemotePathError as e:
            raise FlagError(str(e)) from None
    check_model_and_agent_flags(args)
    from memagent_jax.storage.paths import input_file_problem, same_file

    if args.document is not None and args.document != "-":  # '-': standard input
        problem = input_file_problem(args.document, pipes=True)  # read once: /dev/stdin, <(cmd) will do
        if problem is not None:
            raise FlagError(f"--document {args.document!r} {problem}")
    if args.input is not None:
        problem = input_file_problem(args.input, pipes=False)  # a table: memory-mapped, read more than once
        if problem is not None:
            raise FlagError(f"--input {args.input!r} {problem}")
        out = os.path.abspath(args.output)
        if os.path.isdir(out):
            raise FlagError(f"--output {args.output!r} is a folder; give a file name")
        if same_file(out, args.input):
            raise FlagError(f"--output {args.output!r} is the input file; refusing to write over it")


def _single(args, agent) -> int:
    from memagent_jax.agent import read_document_file

    text = read_document_file(args.document)
    t0 = time.time()
    result = agent.run([args.question], [text], rng=args.seed, trace=args.trace, progress=not args.no_progress)
    if args.trace:
        for k, memory in enumerate(result.traces[0]):
            print(f"--- memory after chunk {k + 1}/{result.num_chunks[0]} ---\n{memory}\n")
    if result.nonfinite and result.nonfinite[0]:
        print(f"error: {NONFINITE_MESSAGE}", file=sys.stderr)
        return 1
    prediction = result.predictions[0]
    print(f"answer: {'(none)' if prediction is None else prediction}")
    print(f"response: {result.answers[0]}")
    print(f"[{result.num_chunks[0]} chunks in {time.time() - t0:.1f}s]", file=sys.stderr)
    return 0


@errors.user_errors  # --debug (or MEMAGENT_DEBUG=1): the traceback of a user error instead of its one line
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    single = args.question is not None or args.document is not None
    batch = args.input is not None or args.output is not None
    if single == batch:
        _parser().error("give either --question and --document, or --input and --output")
    if single and (args.question is None or args.document is None):
        _parser().error("single-document mode needs both --question and --document")
    if batch and (args.input is None or args.output is None):
        _parser().error("batch mode needs both --input and --output")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from memagent_jax import distributed

    try:
        check_args(args)
        # Multi-process runs (e.g. the same command on every host): every process answers on its own devices
        # (same rows, same seed, same answers) and only process 0 prints and writes the output file.
        output = contextlib.nullcontext()
        if distributed.initialize_from_args(args):
            import jax

            if jax.process_index() != 0:
                if batch:
                    args.output = os.devnull
                output = contextlib.redirect_stdout(open(os.devnull, "w"))
        with output:
            agent = build_agent(args)
            if single:
                return _single(args, agent)
            failed = answer_file(
                agent,
                args.input,
                args.output,
                seed=args.seed,
                batch_size=args.batch_size,
                trace=args.trace,
                progress=not args.no_progress,
            )
            return 1 if failed else 0
    except errors.user_error_types() as e:  # nothing answered: one line naming the flag, file or row; status 2
        return errors.handle(e)


if __name__ == "__main__":
    raise SystemExit(main())
