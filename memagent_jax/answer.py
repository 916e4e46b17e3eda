"""Answer questions about long documents with a memory agent.

One document:
    python -m memagent_jax.answer --model DIR --question "Who ...?" --document book.txt [--trace]

A batch file (reference evaluation or training format, JSONL / JSON / parquet) -> JSONL of answers:
    python -m memagent_jax.answer --model DIR --input eval_800docs.json --output answers.jsonl [--trace]

Rows of similar document length are batched together. A row that cannot run (empty question or
document, question over budget, malformed row) is written with an "error" field and the rest go on.
When rows carry gold answers, each output row also has "sub_em" (the QA accuracy metric) and "em".
Output rows are written as their batch finishes, so a killed run keeps what it finished.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m memagent_jax.answer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    p.add_argument("--question", help="the question (single-document mode)")
    p.add_argument("--document", help="UTF-8 text file with the document (single-document mode)")
    p.add_argument("--input", help="rows file (batch mode): reference eval or training format")
    p.add_argument("--output", help="JSONL output file (batch mode)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per agent batch (batch mode)")
    p.add_argument("--trace", action="store_true", help="print / write the memory after every chunk")
    p.add_argument("--question-tokens", type=int, default=1024)
    p.add_argument("--chunk-tokens", type=int, default=5000)
    p.add_argument("--memory-tokens", type=int, default=1024)
    p.add_argument("--answer-tokens", type=int, default=1024)
    p.add_argument("--chunks-per-segment", type=int, default=4)
    p.add_argument("--max-document-tokens", type=int, default=0, help="centre-truncate longer documents (0 = off)")
    p.add_argument("--truncate-question", action="store_true", help="truncate over-budget questions (with a warning)")
    p.add_argument("--templates", default=None, help="JSON file with memory_update / final_answer / initial_memory")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); evaluation recipe: 0.7")
    p.add_argument("--top-p", type=float, default=1.0, help="evaluation recipe: 0.95")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="param and compute dtype (float32, bfloat16; default: checkpoint)")
    p.add_argument("--no-progress", action="store_true")
    from memagent_jax import distributed

    distributed.add_arguments(p)
    return p


def _build_agent(args):
    from transformers import AutoTokenizer

    from memagent_jax.agent import AgentBudgets, AgentTemplates, MemoryAgent
    from memagent_jax.models import load_hf_params
    from memagent_jax.sampling import SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model, local_files_only=True)
    params, config = load_hf_params(args.model, param_dtype=args.dtype)
    if args.dtype:
        config = config.replace(compute_dtype=args.dtype)
    budgets = AgentBudgets(question_tokens=args.question_tokens, chunk_tokens=args.chunk_tokens,
                           memory_tokens=args.memory_tokens, answer_tokens=args.answer_tokens,
                           chunks_per_segment=args.chunks_per_segment, max_document_tokens=args.max_document_tokens,
                           question_overflow="truncate" if args.truncate_question else "error")
    templates = AgentTemplates.from_file(args.templates) if args.templates else AgentTemplates()
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p)
    return MemoryAgent(params, config, tokenizer, budgets=budgets, templates=templates, memory_sampling=sampling)


def _single(args, agent) -> int:
    from memagent_jax.agent import read_document_file

    text = read_document_file(args.document)
    t0 = time.time()
    result = agent.run([args.question], [text], rng=args.seed, trace=args.trace, progress=not args.no_progress)
    if args.trace:
        for k, memory in enumerate(result.traces[0]):
            print(f"--- memory after chunk {k + 1}/{result.num_chunks[0]} ---\n{memory}\n")
    print(result.answers[0])
    print(f"[{result.num_chunks[0]} chunks in {time.time() - t0:.1f}s]", file=sys.stderr)
    return 0


def _batch(args, agent) -> int:
    from memagent_jax import verifier
    from memagent_jax.agent import AgentInputError
    from memagent_jax.data.formats import open_file
    from memagent_jax.data.records import DataFormatError

    rows = open_file(args.input)
    ready, failed = [], 0
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as out:
        for i in range(len(rows)):
            try:
                record = rows[i]
                q_ids, d_ids = agent.prepare(record.question, record.document, source=f"{args.input} row {i}")
            except (DataFormatError, AgentInputError) as e:
                failed += 1
                out.write(json.dumps({"row": i, "error": str(e)}) + "\n")
                print(f"skipped: {e}", file=sys.stderr)
                continue
            ready.append((d_ids.size, i, record, d_ids))
        ready.sort(key=lambda r: r[0])  # similar lengths together: fewer idle rows per batch
        done, t0 = 0, time.time()
        for start in range(0, len(ready), args.batch_size):
            group = ready[start:start + args.batch_size]
            result = agent.run([r[2].question for r in group], [r[3] for r in group], rng=args.seed + start,
                               trace=args.trace)
            for j, (_, i, record, _) in enumerate(group):
                row = {"row": i, "index": record.index, "question": record.question, "answer": result.answers[j],
                       "num_chunks": result.num_chunks[j], "finished": result.finished[j]}
                if record.answers:
                    row["answers"] = list(record.answers)
                    row["sub_em"] = verifier.score(result.answers[j], record.answers, "sub_em")
                    row["em"] = verifier.score(result.answers[j], record.answers, "em")
                if args.trace:
                    row["trace"] = result.traces[j]
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            done += len(group)
            if not args.no_progress:
                print(f"{done}/{len(ready)} rows, {time.time() - t0:.0f}s", file=sys.stderr)
    print(f"wrote {args.output}: {len(ready)} answered, {failed} skipped", file=sys.stderr)
    return 0


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
    from memagent_jax.agent import AgentInputError
    from memagent_jax.models import CheckpointError, ConfigError

    try:
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
    except (AgentInputError, CheckpointError, ConfigError, FileNotFoundError, distributed.DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
