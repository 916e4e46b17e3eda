"""Answering a file of questions with a memory agent: every row answered or turned into an error row, written as
JSON Lines while the run goes on (`answer_file`), with the gold-answer scores when rows carry answers.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping

#: The fields of a row's optional "sampling" object (`row_sampling`).
ROW_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed")
SEED_RANGE = (-(2**63), 2**63 - 1)

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


def row_sampling(value, default, *, path: str, row: int):
    """A row's "sampling" object -> (its `SamplingParams`, its seed, the fields it set), checked with the settings
    rules (`memagent_jax.settings`): temperature >= 0 (0 = greedy), top_p in (0, 1], top_k an integer >= 0 (0 = off),
    seed an integer. Fields left out (or null) keep `default`'s (the agent's sampling); without temperature / top_p /
    top_k the row samples with None (the agent's own), without seed its seed is None (the file's). A bad value is a
    `DataFormatError` naming the file, the row and the field (e.g. 'sampling.temperature')."""
    from memagent_jax import settings
    from memagent_jax.data.records import DataFormatError

    if value is None:
        return None, None, {}
    if not isinstance(value, Mapping):
        raise DataFormatError(
            path, row, "sampling", f"must be an object with {', '.join(ROW_SAMPLING_FIELDS)}, got {value!r:.60}"
        )
    unknown = sorted(str(k) for k in value if k not in ROW_SAMPLING_FIELDS)
    if unknown:
        raise DataFormatError(
            path, row, f"sampling.{unknown[0]}", f"is not a sampling field; known: {', '.join(ROW_SAMPLING_FIELDS)}"
        )
    given = {}
    for name in ROW_SAMPLING_FIELDS:
        if value.get(name) is None:
            continue
        try:
            if name == "seed":
                low, high = SEED_RANGE
                given[name] = settings.integer(name, value[name], minimum=low, maximum=high)
            else:
                given[name] = getattr(settings, name)(value[name])
        except settings.SettingError as e:
            raise DataFormatError(path, row, f"sampling.{name}", e.reason) from None
    params = {k: v for k, v in given.items() if k != "seed"}
    return (default.replace(**params) if params else None), given.get("seed"), given


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
    fold_in(key(seed), i), whatever its batch mates. A row may carry its own sampling, an object "sampling":
    {"temperature", "top_p", "top_k", "seed"} (each optional; `row_sampling`): it samples with those settings (the
    others: the agent's) and, with a seed S, with the key of row 0 under seed S (the single-document mode's and the
    server's key for seed S); its output row echoes them as "sampling". A bad value makes it an error row naming the
    field. Returns the number of failed rows (bad rows and answers from non-finite logits).
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
                raw = rows.row(i).get("sampling")  # a top-level field in either format
                own = row_sampling(raw, None if raw is None else agent.spec.answer_sampling, path=input_path, row=i)
                q_ids, d_ids = agent.prepare(record.question, record.document, source=f"{input_path} row {i}")
            except (DataFormatError, AgentInputError) as e:
                failed += 1
                out.write(json.dumps(error_row(i, e), ensure_ascii=False) + "\n")
                print(f"skipped: {e}", file=sys.stderr)
                continue
            ready.append((d_ids.size, i, record, d_ids, own))
        out.flush()
        # Continuous batching over --batch-size row slots; row i of the file samples with fold_in(key(seed), i)
        # whatever its batch mates (row 0 = the single-document mode with the same seed); a row with its own seed S
        # with fold_in(key(S), 0). Each row is written as soon as it is answered.
        import jax
        import numpy as np

        from memagent_jax.sampling.api import row_keys

        def write(j: int, result) -> None:
            nonlocal failed, nonfinite
            _, i, record, _, (_, _, own_sampling) = ready[j]
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
                if own_sampling:
                    row["sampling"] = own_sampling
                if trace:
                    row["trace"] = result.traces[0]
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()

        if ready:
            keys = np.array(jax.random.key_data(row_keys(seed, len(rows))[np.asarray([r[1] for r in ready])]))
            for j, r in enumerate(ready):
                if r[4][1] is not None:  # the row's own seed
                    keys[j] = np.asarray(jax.random.key_data(row_keys(r[4][1], 1)))[0]
            per_row = [r[4][0] for r in ready]
            agent.run(
                [r[2].question for r in ready],
                [r[3] for r in ready],
                rng=keys,
                sampling=None if all(p is None for p in per_row) else per_row,
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
