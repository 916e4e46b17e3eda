"""Sampling parameters: `SamplingParams`, the validated settings, and `RowSampling`, their per-row form.

The compiled programs are specialised on the shape of a generation only: `max_new_tokens`, the stop ids and the
pad id (`SamplingParams.static()`, a static jit argument). Temperature, top-k and top-p are per-row arrays
(`RowSampling`, a pytree of [B] arrays), so one compile serves any mix of per-row settings:

    sp = SamplingParams(max_new_tokens=64, temperature=0.7, top_p=0.95, stop_token_ids=(2,))
    rows = RowSampling.build([None, sp.replace(temperature=0.0), sp.replace(top_k=20)], default=sp)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from memagent_jax import settings


class SamplingError(settings.SettingError):
    """Bad sampling parameters or bad prompts given to the sampler."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token.

    Order of the transforms on the model's f32 logits (the same as transformers' and vLLM's):
      1. temperature: logits / temperature; temperature == 0 means greedy (argmax; top_k / top_p unused);
      2. top_k: keep the k highest-scoring tokens (0 = off; k >= vocab size = off);
      3. top_p: on the renormalised result of 2, keep the smallest set of highest-probability tokens whose
         probability sums to at least top_p (the most likely token is always kept; 1.0 = off).
    Ties are broken by token id (lower id first), so the kept set always has exactly k (resp. the
    smallest number of) tokens.

    Attributes:
      max_new_tokens: N, the most tokens generated per row (> 0). The decode loop stops earlier when every
        row has emitted a stop token.
      temperature: >= 0 and finite; 0 = greedy.
      top_k: >= 0; 0 = no top-k filter.
      top_p: in (0, 1]; 1 = no nucleus filter.
      stop_token_ids: token ids that end a row (EOS and any extra stop ids). The stop token itself is part
        of the output and counted in `num_tokens`; everything after it is `pad_id`.
      pad_id: the id written after a row has stopped (and for inactive rows); >= 0.
      tempered_logprobs: record each new token's log-prob (`SampleOutput.logprobs`) under logits / temperature
        (each row's own; greedy rows: the logits) instead of the logits: what a GRPO learner at the rollout
        temperature computes (as verl: top-k / top-p not applied). Off: the model's own log-probs. Static.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    pad_id: int = 0
    tempered_logprobs: bool = False

    def __post_init__(self):
        e = SamplingError
        settings.integer("max_new_tokens", self.max_new_tokens, minimum=1, allowed="> 0", error=e)
        settings.temperature(self.temperature, error=e)
        settings.integer("top_k", self.top_k, minimum=0, allowed=">= 0 (0 = off)", error=e)
        settings.top_p(self.top_p, error=e)
        stops = self.stop_token_ids
        if stops is None:
            stops = ()
        elif settings.is_integer(stops):
            stops = (stops,)
        try:
            stops = tuple(stops)
        except TypeError:
            raise e.at("stop_token_ids", f"must be a sequence of token ids, got {self.stop_token_ids!r}") from None
        for s in stops:
            if not settings.is_integer(s) or s < 0:
                raise e.at("stop_token_ids", f"must be integers >= 0, got {self.stop_token_ids!r}")
        # Canonical form: sorted, unique, plain ints (so equal settings hash equal and share one compile).
        object.__setattr__(self, "stop_token_ids", tuple(sorted({int(s) for s in stops})))
        settings.integer("pad_id", self.pad_id, minimum=0, error=e)
        object.__setattr__(
            self, "tempered_logprobs", settings.boolean("tempered_logprobs", self.tempered_logprobs, error=e)
        )
        object.__setattr__(self, "max_new_tokens", int(self.max_new_tokens))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "pad_id", int(self.pad_id))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    def static(self) -> SamplingParams:
        """The part a compiled program is specialised on (max_new_tokens, stop ids, pad id, tempered_logprobs), with
        the per-row settings at their neutral values: equal for any temperature / top_k / top_p, so they share one
        compile."""
        return self.replace(temperature=1.0, top_k=0, top_p=1.0)

    def check_vocab(self, vocab_size: int) -> None:
        """Raises `SamplingError` if a stop id or the pad id is outside [0, vocab_size)."""
        bad = [s for s in self.stop_token_ids if s >= vocab_size]
        if bad:
            raise SamplingError(f"stop_token_ids {bad} are outside the vocabulary (size {vocab_size})")
        if self.pad_id >= vocab_size:
            raise SamplingError(f"pad_id {self.pad_id} is outside the vocabulary (size {vocab_size})")


class RowSampling(NamedTuple):
    """Per-row sampling settings: a pytree of [B] arrays, an ordinary (traced) argument of the compiled programs.

    temperature: [B] f32, >= 0; 0 = greedy (argmax; the row's top_k / top_p unused).
    top_k:       [B] int32, >= 0; 0 (or >= the vocabulary size) = off.
    top_p:       [B] f32 in (0, 1]; 1 = off.
    The transforms are those of `SamplingParams`, applied to each row with its own values. Build it with `build`
    (validated by the `SamplingParams` rules) or `broadcast`.
    """

    temperature: Any
    top_k: Any
    top_p: Any

    @classmethod
    def build(
        cls, rows: Sequence[SamplingParams | None], default: SamplingParams, *, batch: int | None = None
    ) -> RowSampling:
        """Row i samples with rows[i]'s temperature / top_k / top_p (None: `default`'s; every entry is a validated
        `SamplingParams`, so the settings rules hold). `batch` > len(rows) appends greedy padding rows (inactive
        rows: greedy keeps an all-greedy batch on the argmax-only path). Host (NumPy) arrays."""
        n = len(rows)
        batch = n if batch is None else batch
        if batch < n:
            raise SamplingError(f"batch ({batch}) is smaller than the {n} rows")
        temperature = np.zeros((batch,), np.float32)
        top_k = np.zeros((batch,), np.int32)
        top_p = np.ones((batch,), np.float32)
        for i, row in enumerate(rows):
            row = default if row is None else row
            if not isinstance(row, SamplingParams):
                raise SamplingError(f"sampling[{i}] must be a SamplingParams or None, got {type(row).__name__}")
            temperature[i], top_k[i], top_p[i] = row.temperature, min(row.top_k, 2**31 - 1), row.top_p
        return cls(temperature, top_k, top_p)

    @classmethod
    def broadcast(cls, sampling: SamplingParams, batch: int) -> RowSampling:
        """Every one of `batch` rows with `sampling`'s settings (host arrays)."""
        return cls.build([sampling] * batch, sampling)

    def take(self, index) -> RowSampling:
        """The rows at `index` (host or device arrays alike)."""
        return RowSampling(*(np.asarray(a)[index] for a in self))
