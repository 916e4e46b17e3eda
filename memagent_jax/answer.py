"""Answer questions about long documents with a memory agent.

One document:
    python -m memagent_jax.answer --model DIR --question "Who ...?" --document book.txt [--trace]

A batch file (reference evaluation or training format, JSONL / JSON / parquet) -> JSONL of answers:
    python -m memagent_jax.answer --model DIR --input eval_800docs.json --output answers.jsonl [--trace]

Rows run with continuous batching over --batch-size row slots (a row whose document ends takes the next one); row i of
the file samples with fold_in(key(seed), i), so its answer does not depend on the batch. A row that cannot run (a
malformed JSON line, an array item that is not an object, text that is not UTF-8, a missing or ill-typed field, an empty
question or document, a question over budget) is written as {"row", "error", "field"} (the error names the file, the row
and the field) and the rest go on; so is a row whose answer was sampled from non-finite (NaN / inf) logits. When rows
carry gold answers, each output row also has "sub_em" (the QA accuracy metric) and "em".

Output: rows are written to OUTPUT.partial as they are answered (a killed run keeps what it finished
there) and the file is renamed to OUTPUT when the run ends; OUTPUT is never one of the input files. The last
stderr line says "wrote OUTPUT: A answered, F failed (...)".

Exit status: 0 every row answered; 1 the output is written but F > 0 rows failed (their "error" rows say
why); 2 nothing was answered (bad arguments, model, tokenizer or input file).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from memagent_jax import settings as settings_lib


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m memagent_jax.answer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="local Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    p.add_argument("--question", help="the question (single-document mode)")
    p.add_argument("--document", help="UTF-8 text file with the document (single-document mode)")
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


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """How the model is loaded and computed (shared with `serve` and `generate`): dtypes, attention kernel,
    non-finite weights."""
    p.add_argument("--dtype", default=None, help="param and compute dtype (float32, bfloat16; default: checkpoint)")
    p.add_argument(
        "--param-dtype",
        "--param_dtype",
        dest="param_dtype",
        default=None,
        help="dtype the weights are held in (overrides --dtype; default: --dtype, else the checkpoint's)",
    )
    p.add_argument(
        "--compute-dtype",
        "--compute_dtype",
        dest="compute_dtype",
        default=None,
        help="dtype of matmuls and the KV cache; norms, softmax, logits and sampling stay f32 (overrides "
        "--dtype; default: --dtype, else the param dtype)",
    )
    p.add_argument(
        "--attention-impl",
        dest="attention_impl",
        default="auto",
        choices=("auto", "materialized", "blockwise", "cudnn"),  # models.config.ATTENTION_IMPLS
        help="attention kernel (models/attention.py; default auto)",
    )
    p.add_argument(
        "--allow-nonfinite-weights",
        action="store_true",
        help="load a model whose weights hold NaN / inf (refused by default, naming the tensor)",
    )


def add_agent_arguments(p: argparse.ArgumentParser) -> None:
    """The agent-settings flags (`--agent.<config name>`, the names train and evaluate use) of `answer`, shared
    with `serve`. Unset = the model folder's memagent_agent.json (written by train's export), else the documented
    default shown."""
    p.add_argument(
        "--agent.question_tokens",
        dest="question_tokens",
        type=int,
        default=None,
        metavar="Q",
        help="question slot in tokens (default: the model's settings file, else 1024)",
    )
    p.add_argument(
        "--agent.chunk_tokens",
        dest="chunk_tokens",
        type=int,
        default=None,
        metavar="C",
        help="document tokens read per step (default: settings file, else 5000)",
    )
    p.add_argument(
        "--agent.memory_tokens",
        dest="memory_tokens",
        type=int,
        default=None,
        metavar="M",
        help="most new tokens of a memory update (default: settings file, else 1024)",
    )
    p.add_argument(
        "--agent.answer_tokens",
        dest="answer_tokens",
        type=int,
        default=None,
        metavar="A",
        help="most new tokens of the final answer (default: settings file, else 1024)",
    )
    p.add_argument(
        "--agent.chunks_per_segment",
        dest="chunks_per_segment",
        type=int,
        default=None,
        metavar="S",
        help="chunks per compiled scan (default: settings file, else 4)",
    )
    p.add_argument(
        "--agent.max_document_tokens",
        dest="max_document_tokens",
        type=int,
        default=None,
        metavar="N",
        help="centre-truncate longer documents (0 = off; default: settings file, else 0)",
    )
    p.add_argument(
        "--agent.question_overflow",
        dest="question_overflow",
        choices=("error", "truncate"),
        default=None,
        help="an over-budget question: error, or truncate with a warning (default: settings file, else error)",
    )
    p.add_argument(
        "--agent.templates",
        dest="templates",
        default=None,
        metavar="FILE",
        help="JSON file with memory_update / final_answer / initial_memory / system / prompt_mode "
        "(default: the settings file's templates, else the default wording)",
    )
    p.add_argument(
        "--agent.prompt_mode",
        dest="prompt_mode",
        choices=("pieces", "text"),
        default=None,
        help="how prompts become tokens (default: settings file / templates, else pieces)",
    )
    p.add_argument(
        "--agent.temperature",
        dest="temperature",
        type=float,
        default=None,
        metavar="T",
        help="sampling temperature, 0 = greedy (default: settings file, else 0; the evaluation recipe: 0.7)",
    )
    p.add_argument(
        "--agent.top_p",
        dest="top_p",
        type=float,
        default=None,
        metavar="P",
        help="nucleus sampling (default: settings file, else 1.0; the evaluation recipe: 0.95)",
    )


AGENT_FLAGS = (
    "question_tokens",
    "chunk_tokens",
    "memory_tokens",
    "answer_tokens",
    "chunks_per_segment",
    "max_document_tokens",
    "question_overflow",
    "templates",
    "prompt_mode",
    "temperature",
    "top_p",
)


def agent_flag_values(args) -> dict:
    """{config name: value} of the agent flags that were given (`add_agent_arguments`)."""
    return settings_lib.section_values(args, AGENT_FLAGS, skip_none=True)


class AnswerArgsError(settings_lib.ConfigError):
    """A command-line value is invalid; the message names the flag."""


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_args(args) -> None:
    """Checks every flag before anything loads; errors name the flag (and the file at fault)."""
    if args.batch_size < 1:
        raise AnswerArgsError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.output is not None:
        from memagent_jax.storage.paths import RemotePathError, check_local_path

        try:
            check_local_path(args.output, "--output")
        except RemotePathError as e:
            raise AnswerArgsError(str(e)) from None
    check_agent_args(args)
    if args.document is not None and not os.path.isfile(args.document):
        raise AnswerArgsError(f"--document {args.document!r} does not exist")
    if args.input is not None:
        if not os.path.isfile(args.input):
            raise AnswerArgsError(f"--input {args.input!r}: no such file")
        out = os.path.abspath(args.output)
        if os.path.isdir(out):
            raise AnswerArgsError(f"--output {args.output!r} is a folder; give a file name")
        same = out == os.path.abspath(args.input) or (os.path.exists(out) and os.path.samefile(out, args.input))
        if same:
            raise AnswerArgsError(f"--output {args.output!r} is the input file; refusing to write over it")


def check_agent_args(args) -> None:
    """Checks the agent-settings flags and the model / tokenizer folders (`add_agent_arguments` + --model,
    --tokenizer); errors name the flag."""
    from memagent_jax.agent import AgentSettings

    given = {k: v for k, v in agent_flag_values(args).items() if k != "templates"}
    with settings_lib.named("--agent", error=AnswerArgsError):
        AgentSettings().override(**given)  # the settings dataclasses check each value
    if not os.path.isdir(args.model):
        raise AnswerArgsError(f"--model {args.model!r}: no such folder (expected a local Hugging Face model folder)")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise AnswerArgsError(
            f"--model {args.model!r}: no config.json in the folder (expected a Hugging Face model folder)"
        )
    tok = args.tokenizer or args.model
    flag = "--tokenizer" if args.tokenizer else "--model"
    if not os.path.isdir(tok):
        raise AnswerArgsError(f"--tokenizer {tok!r}: no such folder")
    if not any(os.path.isfile(os.path.join(tok, name)) for name in _TOKENIZER_FILES):
        raise AnswerArgsError(
            f"{flag} {tok!r}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in the folder"
            + ("" if args.tokenizer else "; pass --tokenizer DIR")
        )
    if args.templates and not os.path.isfile(args.templates):
        raise AnswerArgsError(f"--agent.templates {args.templates!r}: no such file")


def _build_agent(args):
    from transformers import AutoTokenizer

    from memagent_jax.agent import MemoryAgent
    from memagent_jax.models import load_hf_params

    settings = resolve_settings(args)  # before anything heavy loads
    tok = args.tokenizer or args.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok, local_files_only=True)
    except Exception as e:  # transformers raises OSError / ValueError with long messages
        first = str(e).splitlines()[0] if str(e) else ""
        raise AnswerArgsError(
            f"{'--tokenizer' if args.tokenizer else '--model'} {tok!r}: cannot load a tokenizer: "
            f"{type(e).__name__}: {first}"
        ) from None
    param_dtype = args.param_dtype or args.dtype
    params, config = load_hf_params(args.model, param_dtype=param_dtype, allow_nonfinite=args.allow_nonfinite_weights)
    if args.compute_dtype or args.dtype or param_dtype:
        config = config.replace(compute_dtype=args.compute_dtype or args.dtype or param_dtype)
    config = config.replace(attention_impl=args.attention_impl)
    return MemoryAgent(
        params,
        config,
        tokenizer,
        budgets=settings.budgets,
        templates=settings.templates,
        memory_sampling=settings.sampling(),
    )


def resolve_settings(args):
    """The agent settings of this run: the model folder's memagent_agent.json (or the documented defaults),
    with every flag that was given on top. Errors name the file or flag."""
    from memagent_jax.agent import AgentSettings

    loaded = AgentSettings.load(args.model)
    with settings_lib.named("--agent", error=AnswerArgsError):
        return loaded.override(**agent_flag_values(args))


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
    print(result.answers[0])
    print(f"[{result.num_chunks[0]} chunks in {time.time() - t0:.1f}s]", file=sys.stderr)
    return 0


NONFINITE_MESSAGE = (
    "the model's logits were not finite (NaN / inf) while it answered: no answer (check the "
    "weights, or use float32 instead of a narrower dtype)"
)


def _error_row(i: int, error: Exception, **extra) -> dict:
    row = {"row": i, "error": str(error)}
    field = getattr(error, "field", None)
    if field is not None:
        row["field"] = field
    return dict(row, **extra)


def _batch(args, agent) -> int:
    from memagent_jax.agent import AgentInputError
    from memagent_jax.data.formats import open_file
    from memagent_jax.data.records import DataFormatError
    from memagent_jax.evaluation import verifier

    rows = open_file(args.input, on_bad_row="keep")  # bad rows raise one by one, below
    ready, failed, nonfinite = [], 0, 0
    out_path = os.path.abspath(args.output)
    partial = out_path + ".partial" if args.output != os.devnull else os.devnull
    if partial != os.devnull:
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(partial, "w", encoding="utf-8") as out:
        for i in range(len(rows)):
            try:
                record = rows[i]
                q_ids, d_ids = agent.prepare(record.question, record.document, source=f"{args.input} row {i}")
            except (DataFormatError, AgentInputError) as e:
                failed += 1
                out.write(json.dumps(_error_row(i, e), ensure_ascii=False) + "\n")
                print(f"skipped: {e}", file=sys.stderr)
                continue
            ready.append((d_ids.size, i, record, d_ids))
        out.flush()
        # Continuous batching over --batch-size row slots; row i of the file samples with fold_in(key(seed), i)
        # whatever its batch mates (row 0 = the single-document mode with the same seed). Each row is written as
        # soon as it is answered.
        import numpy as np

        from memagent_jax.sampling.api import row_keys

        def write(j: int, result) -> None:
            nonlocal failed, nonfinite
            _, i, record, _ = ready[j]
            if result.nonfinite and result.nonfinite[0]:
                failed += 1
                nonfinite += 1
                row = {
                    "row": i,
                    "index": record.index,
                    "question": record.question,
                    "error": f"{args.input} row {i}: {NONFINITE_MESSAGE}",
                    "answer": None,
                }
                print(f"failed: {row['error']}", file=sys.stderr)
            else:
                row = {
                    "row": i,
                    "index": record.index,
                    "question": record.question,
                    "answer": result.answers[0],
                    "num_chunks": result.num_chunks[0],
                    "finished": result.finished[0],
                }
                if record.answers:
                    row["answers"] = list(record.answers)
                    row["sub_em"] = verifier.score(result.answers[0], record.answers, "sub_em")
                    row["em"] = verifier.score(result.answers[0], record.answers, "em")
                if args.trace:
                    row["trace"] = result.traces[0]
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()

        if ready:
            agent.run(
                [r[2].question for r in ready],
                [r[3] for r in ready],
                rng=row_keys(args.seed, len(rows))[np.asarray([r[1] for r in ready])],
                trace=args.trace,
                batch_size=args.batch_size,
                progress=not args.no_progress,
                on_row=write,
            )
    if partial != os.devnull:
        os.replace(partial, out_path)
    answered = len(ready) - nonfinite
    detail = f" ({len(rows) - len(ready)} bad rows, {nonfinite} with non-finite logits)" if failed else ""
    print(f"wrote {args.output}: {answered} answered, {failed} failed{detail}", file=sys.stderr)
    return 1 if failed else 0


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
    from memagent_jax.agent import AgentInputError, AgentSettingsError, TemplateError
    from memagent_jax.data.records import DataFormatError
    from memagent_jax.models import CheckpointError, ConfigError

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
            agent = _build_agent(args)
            return _single(args, agent) if single else _batch(args, agent)
    except (
        AgentInputError,
        AgentSettingsError,
        AnswerArgsError,
        CheckpointError,
        ConfigError,
        DataFormatError,
        TemplateError,
        FileNotFoundError,
        distributed.DistributedError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
