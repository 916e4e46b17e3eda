"""Continuous batching vs lockstep batches: documents/s on files of mixed document lengths, one run, side by side.

    python benchmarks/bench_batching.py            # about 4 minutes on 2 CPU cores
    python benchmarks/bench_batching.py --quick    # fewer documents

Two workloads over the same random tiny-shape agent (greedy, fixed-length memories and answers, so every row does
the same work per chunk step), documents of 1x..64x a base chunk count (log-uniform), `--slots` rows on the device:

file:     an evaluation-style file. Baseline: bucketed scheduling (rows sorted by document length, lockstep batches of
          `slots` rows, what `evaluate --config.scheduling=bucketed` runs). Sorting already removes most idle
          rows of an offline file, so this is the hardest baseline for continuous batching.
arrival:  rows in arrival order with no sorting possible: a rollout's trajectories (question by question, G
          trajectories sharing a document) in agent calls of `slots` rows (slices of rl.rollout_batch_size),
          or requests reaching a server. Baseline: lockstep batches of `slots` rows in that order.
Continuous batching (`MemoryAgent.run(batch_size=slots)`) runs both with `slots` row slots; both sides give the
same answers (checked). Printed per side: wall time, documents/s, document tokens/s, and occupancy (chunk steps of
real documents / chunk-step rows the device ran).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from bench_agent import TINY, _agent, _tokenizer  # noqa: E402


def _lengths(rng, count: int, chunk: int, max_factor: int) -> list[int]:
    """Document lengths in tokens: chunk counts log-uniform in [1, max_factor] (1x..64x), last chunk partial."""
    chunks = np.exp(rng.uniform(0.0, np.log(max_factor), count)).round().astype(int).clip(1, max_factor)
    return [int(c * chunk - rng.integers(0, chunk // 2)) for c in chunks]


def _lockstep(agent, questions, docs, keys, slots: int, order: list[int]):
    """Lockstep batches of `slots` rows in `order`; returns (answer ids by row, chunk-step rows run)."""
    from memagent_jax.agent.chunking import num_chunks

    c, s = agent.budgets.chunk_tokens, agent.budgets.chunks_per_segment
    answers, rows_run = {}, 0
    for start in range(0, len(order), slots):
        group = order[start : start + slots]
        group = group + [group[-1]] * (slots - len(group))  # one compiled shape, as evaluation pads
        result = agent.run([questions[i] for i in group], [docs[i] for i in group], rng=keys[np.asarray(group)])
        for j, i in enumerate(group):
            answers[i] = result.answer_ids[j]
        longest = max(num_chunks(docs[i].size, c) for i in group)
        rows_run += slots * -(-longest // s) * s
    return [answers[i] for i in range(len(docs))], rows_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="24 documents instead of 48")
    parser.add_argument("--slots", type=int, default=8, help="rows on the device (batch size / row slots)")
    parser.add_argument("--max-factor", type=int, default=64, help="longest document, in base chunk counts")
    args = parser.parse_args()

    import jax

    from memagent_jax.agent import AgentBudgets
    from memagent_jax.agent.chunking import num_chunks
    from memagent_jax.models.presets import preset_config
    from memagent_jax.sampling.api import row_keys

    tokenizer = _tokenizer(os.path.join(tempfile.mkdtemp(), "tok"))
    budgets = AgentBudgets(question_tokens=16, chunk_tokens=64, memory_tokens=16, answer_tokens=8, chunks_per_segment=2)
    agent = _agent(preset_config("tiny", vocab_size=len(tokenizer), **TINY), tokenizer, budgets)
    rng = np.random.default_rng(0)
    count, slots, group = (24 if args.quick else 48), args.slots, 4
    vocab = len(tokenizer)

    file_docs = [rng.integers(3, vocab, n).astype(np.int32) for n in _lengths(rng, count, 64, args.max_factor)]
    question_docs = [
        rng.integers(3, vocab, n).astype(np.int32) for n in _lengths(rng, count // group, 64, args.max_factor)
    ]
    rollout_docs = [d for d in question_docs for _ in range(group)]  # G trajectories per question, in order
    workloads = [("file", file_docs, "sorted by length"), ("arrival", rollout_docs, "arrival order")]

    # Compile every program once (lockstep and continuous, `slots` rows) outside the timed runs.
    warm = [file_docs[0][:64]] * slots
    agent.run(["Where?"] * slots, warm, rng=0)
    agent.run(["Where?"] * slots, warm, rng=0, batch_size=slots)

    print(
        f"\n== continuous batching vs lockstep batches: tiny shape, budgets C/M/A {budgets.chunk_tokens}/"
        f"{budgets.memory_tokens}/{budgets.answer_tokens}, {budgets.chunks_per_segment} chunks per segment, "
        f"{slots} rows on the device, documents of 1x..{args.max_factor}x chunks =="
    )
    print(
        f"{'workload':<9} {'docs':>5} {'doc tokens':>10} {'baseline':<18} {'base s':>7} {'base docs/s':>11} "
        f"{'base occ.':>9} {'cont. s':>8} {'cont docs/s':>11} {'cont occ.':>9} {'ratio':>6}"
    )
    for name, docs, baseline in workloads:
        questions = [f"Where is item {i // group if name == 'arrival' else i}?" for i in range(len(docs))]
        keys = row_keys(7, len(docs))
        order = sorted(range(len(docs)), key=lambda i: (docs[i].size, i)) if name == "file" else list(range(len(docs)))
        t0 = time.perf_counter()
        base_answers, base_rows = _lockstep(agent, questions, docs, keys, slots, order)
        base_s = time.perf_counter() - t0
        from memagent_jax.agent.engine import DocumentEngine

        counter = {"segments": 0}
        step = DocumentEngine.step

        def counted(self):
            if self.reading or self.queued:
                counter["segments"] += 1
            return step(self)

        DocumentEngine.step = counted
        t0 = time.perf_counter()
        cont = agent.run(questions, docs, rng=keys, batch_size=slots)
        cont_s = time.perf_counter() - t0
        DocumentEngine.step = step
        if cont.answer_ids != base_answers:
            raise SystemExit(f"{name}: continuous batching answered differently from lockstep batches")
        real = sum(num_chunks(d.size, budgets.chunk_tokens) for d in docs)
        cont_rows = counter["segments"] * slots * budgets.chunks_per_segment
        tokens = sum(d.size for d in docs)
        print(
            f"{name:<9} {len(docs):>5} {tokens:>10} {baseline:<18} {base_s:>7.1f} {len(docs) / base_s:>11.2f} "
            f"{real / base_rows:>8.0%} {cont_s:>8.1f} {len(docs) / cont_s:>11.2f} {real / cont_rows:>8.0%} "
            f"{base_s / cont_s:>5.2f}x"
        )
    print(f"(occupancy: chunk steps of real documents / chunk-step rows run; devices: {jax.devices()[0].platform})")


if __name__ == "__main__":
    main()
