"""Answering a file of questions with a memory agent: every row answered or turned into an error row, written as
JSON Lines while the run goes on (`answer_file`), with the gold-answer scores when rows carry answers.
"""

from __future__ import annotations

import json
import os
import sys

NONFINITE_MESSAGE = (
    "the model's logits were not finite (NaN / inf) while it answered: no answer (check the "
    "weights, or use float32 instead of a narrower dtype)"
)


def error_row(i: int, error: Exception, **extra) -> dict:
    row = {"row": i, "error": str(error)}
    field = getattr(error, "field", None)
    if field is not None:
        row["field"] = field
    return dict(row, **extra)


def answer_file(
    agent,
    input_path: str,
    output_path: str,
    *,
    seed: int = 0,
    batch_size: int = 8,
    trace: bool = False,
    progress: bool = True,
) -> int:
    """Answers every row of `input_path` (reference evaluation or training format) into `output_path` (JSONL).

    Rows are written to `output_path`.partial as they are answered and the file is renamed when the run ends;
    a row that cannot run becomes {"row", "error", "field"}. An answered row holds "answer" (the answer extracted
    from the response by the agent's `extract` rule, None where it finds none) and "response" (the raw text); with
    gold answers, "sub_em" and "em" score the response under the same rule (`verifier.score`). Row i samples with
    fold_in(key(seed), i), whatever its batch mates. Returns the number of failed rows (bad rows and answers from
    non-finite logits).
    """
    from memagent_jax.agent import AgentInputError
    from memagent_jax.data.formats import open_file
    from memagent_jax.data.records import DataFormatError
    from memagent_jax.evaluation import verifier

    rows = open_file(input_path, on_bad_row="keep")  # bad rows raise one by one, below
    ready, failed, nonfinite = [], 0, 0
    out_path = os.path.abspath(output_path)
    partial = out_path + ".partial" if output_path != os.devnull else os.devnull
    if partial != os.devnull:
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(partial, "w", encoding="utf-8") as out:
        for i in range(len(rows)):
            try:
                record = rows[i]
                q_ids, d_ids = agent.prepare(record.question, record.document, source=f"{input_path} row {i}")
            except (DataFormatError, AgentInputError) as e:
                failed += 1
                out.write(json.dumps(error_row(i, e), ensure_ascii=False) + "\n")
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
                    "error": f"{input_path} row {i}: {NONFINITE_MESSAGE}",
                    "answer": None,
                    "response": None,
                }
                print(f"failed: {row['error']}", file=sys.stderr)
            else:
                row = {
                    "row": i,
                    "index": record.index,
                    "question": record.question,
                    "answer": result.predictions[0],
                    "response": result.answers[0],
                    "num_chunks": result.num_chunks[0],
                    "finished": result.finished[0],
                }
                if record.answers:
                    row["answers"] = list(record.answers)
                    row["sub_em"] = verifier.score(result.answers[0], record.answers, "sub_em", agent.extract)
                    row["em"] = verifier.score(result.answers[0], record.answers, "em", agent.extract)
                if trace:
                    row["trace"] = result.traces[0]
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()

        if ready:
            agent.run(
                [r[2].question for r in ready],
                [r[3] for r in ready],
                rng=row_keys(seed, len(rows))[np.asarray([r[1] for r in ready])],
                trace=trace,
                batch_size=batch_size,
                progress=progress,
                on_row=write,
            )
    if partial != os.devnull:
        os.replace(partial, out_path)
    answered = len(ready) - nonfinite
    detail = f" ({len(rows) - len(ready)} bad rows, {nonfinite} with non-finite logits)" if failed else ""
    print(f"wrote {output_path}: {answered} answered, {failed} failed{detail}", file=sys.stderr)
    return failed
