""":class:`SyntheticConfig`: what to generate (task, target length, knobs, seed)."""

from __future__ import annotations

import dataclasses

from .registry import get_task

__all__ = ["SyntheticConfig", "FACT_STYLES"]

# Fact wordings a config may ask for (read by keyed_recall; other tasks have one wording).
FACT_STYLES = ("sentence", "pair")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """What to generate.  ``None`` knobs take the task's default (:class:`~.task.SyntheticTask`).

    Attributes:
      task: a registered task name (:func:`~.registry.get_task`).
      num_tokens: target document length in tokens of the tokenizer passed to the generator.
      num_distractors: distractor facts or chains (``None``: the task's default).
      hops: chain length (``None``: the task's default; see each task for its range).
      depth: relative position 0..1 of the answer needle(s) (niah tasks); ``None``: random per sample.
      num_values: needles for the asked key (``niah_multivalue``).
      num_queries: keys asked at once (``niah_multiquery``).
      chunk_tokens: when set, the facts the answer needs start at least this many tokens apart, so with chunks of
        this size no chunk holds two of them.
      chunk_aligned: with ``chunk_tokens``, no fact straddles a multiple of ``chunk_tokens``; a fact that would is
        moved past the next filler sentence(s), so every fact is read whole by one chunk step.
      value_digits: digits of the niah numbers (1..12).
      same_chunk_distractors: look-alikes placed right beside the asked fact (``keyed_recall``).
      isolate_answer: with ``chunk_tokens`` (and no ``same_chunk_distractors``), placements are redrawn until no
        other fact shares a chunk with the asked fact.
      exact_length: the filler is chosen so the document is exactly ``num_tokens`` long where it can be.
      fact_style: one of :data:`FACT_STYLES` (``keyed_recall``).
      key_pairs: (asked, look-alike) creature pairs (``keyed_recall``): each row draws one, asks about its first
        creature and makes every look-alike fact one for its second. Empty: creatures drawn freely.
      seed: with the task and the row index, determines every draw of a sample (see :mod:`.dataset`).
    """

    task: str
    num_tokens: int
    num_distractors: int | None = None
    hops: int | None = None
    depth: float | None = None
    num_values: int = 4
    num_queries: int = 4
    chunk_tokens: int | None = None
    chunk_aligned: bool = False
    value_digits: int = 7
    same_chunk_distractors: int = 0
    isolate_answer: bool = False
    exact_length: bool = False
    fact_style: str = "sentence"
    key_pairs: tuple[tuple[str, str], ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.fact_style not in FACT_STYLES:
            raise ValueError(f"fact_style must be one of {FACT_STYLES}, got {self.fact_style!r}")
        task = get_task(self.task)
        if self.num_tokens <= 0:
            raise ValueError("num_tokens must be positive")
        if self.depth is not None and not 0.0 <= self.depth <= 1.0:
            raise ValueError("depth must be in [0, 1]")
        if self.num_distractors is not None and self.num_distractors < 0:
            raise ValueError("num_distractors must be >= 0")
        if task.validate is not None:
            task.validate(self)
        if self.same_chunk_distractors < 0:
            raise ValueError("same_chunk_distractors must be >= 0")
        if self.isolate_answer and (not self.chunk_tokens or self.same_chunk_distractors):
            raise ValueError("isolate_answer needs chunk_tokens and same_chunk_distractors=0")
        if self.num_values < 1 or self.num_queries < 1:
            raise ValueError("num_values and num_queries must be >= 1")
        if self.chunk_tokens is not None and self.chunk_tokens <= 0:
            raise ValueError("chunk_tokens must be positive")
        if not 1 <= self.value_digits <= 12:
            raise ValueError("value_digits must be in 1..12")
        if self.chunk_aligned and not self.chunk_tokens:
            raise ValueError("chunk_aligned needs chunk_tokens")
        if self.key_pairs and self.task != "keyed_recall":
            raise ValueError(f"key_pairs is read by the keyed_recall task only, not {self.task!r}")

    @property
    def resolved_distractors(self) -> int:
        """``num_distractors``, or the task's default."""
        return get_task(self.task).default_distractors if self.num_distractors is None else self.num_distractors

    @property
    def resolved_hops(self) -> int:
        """``hops``, or the task's default."""
        return get_task(self.task).default_hops if self.hops is None else self.hops

    @property
    def metric(self) -> str:
        """Evaluation metric name (a key of ``memagent_jax.evaluation.verifier.METRICS``)."""
        return get_task(self.task).metric

    @property
    def reward_style(self) -> str:
        """Training reward style (a key of ``memagent_jax.evaluation.verifier.REWARD_STYLES``)."""
        return get_task(self.task).reward_style

    def replace(self, **changes) -> SyntheticConfig:
        return dataclasses.replace(self, **changes)
