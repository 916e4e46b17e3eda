"""Row tiles for CPU: how many rows of a batch one piece of work takes at a time.

XLA's CPU backend streams every intermediate of a program through memory. In a learner step the forward keeps
every layer's activations for the backward: for tens of thousands of tokens they leave the caches (and are freshly
allocated, and page-faulted, at every step), and the elementwise work then runs at memory speed. Micro-batches of a
few thousand tokens, run one after another inside the same program, keep them in the caches. The learner's
micro-batches (`rl.learner`, `micro_batch_tokens`) and the planner's count of them are sized here.

(A chunk step's prefill, which keeps nothing for a backward, gained nothing from row groups: 16 rows x 600 tokens
of the tiny benchmark shape took 107 ms at once and 115 ms in groups of 4.)
"""

from __future__ import annotations

__all__ = ["CPU_TILE_TOKENS", "rows_per_tile"]

# Tokens (rows x T) per tile on CPU, measured on the main job's GRPO step (2,048-4,096 tokens per micro-batch the
# fastest, `benchmarks/bench_learner.py --micro`).
CPU_TILE_TOKENS = 4096


def rows_per_tile(rows: int, length: int, tokens: int, multiple: int = 1) -> int:
    """The most rows, a divisor of `rows` and a multiple of `multiple` (when `rows` is), whose tile holds at most
    `tokens` tokens of `length` each; at least the smallest such divisor. `tokens` 0, or all rows within it: `rows`."""
    if tokens <= 0 or rows * length <= tokens:
        return rows
    step = multiple if multiple > 0 and rows % multiple == 0 else 1
    fits = [d for d in range(step, rows + 1, step) if rows % d == 0 and d * length <= tokens]
    return max(fits) if fits else step
