"""The conversation batch: the learner's input, produced by the rollout side.

Multi-conversation GRPO trains on *conversations*: every chunk step of a trajectory (memory update) and its final
answer step are separate prompt -> response pairs, all carrying the trajectory's advantage. A batch holds N of
them, right-padded to a common length T, one conversation per row:

    row n:  [prompt ids ..................][response ids .........][pad ... pad]
    token_mask:  1 ...................... 1 1 ..................... 1 0 ....... 0
    loss_mask:   0 ...................... 0 1 ..................... 1 0 ....... 0

    tokens        [N, T] int32   prompt ids then response ids, contiguous, then pads
    token_mask    [N, T] bool    real tokens (prompt + response)
    loss_mask     [N, T] bool    response tokens (the ones trained on); token t is predicted by the logits at t-1,
                                 so loss_mask[:, 0] is always False (a prompt has at least one token)
    old_logprobs  [N, T] f32     the sampler's log-prob of each response token (0 elsewhere)
    advantages    [N]    f32     the advantage of the conversation's trajectory
    ref_logprobs  [N, T] f32     optional: the frozen reference's log-prob of each response token (0 elsewhere)

Rows with no real token at all are allowed (padding rows, e.g. to reach a multiple of the device count); they
contribute nothing to any loss or metric. Positions are `positions_from_mask(token_mask)` (arange over real
tokens), computed by the learner.

`build_conversation_batch` makes one (NumPy arrays) from per-conversation lists; `validate_batch` checks one
with errors that name the field and the row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import numpy as np

__all__ = ["BatchError", "ConversationBatch", "build_conversation_batch", "validate_batch", "shuffle_rows",
           "pad_rows"]

_FIELDS = ("tokens", "token_mask", "loss_mask", "old_logprobs", "advantages", "ref_logprobs")


class BatchError(ValueError):
    """A conversation batch (or the lists it is built from) is malformed; the message names the field."""


@functools.partial(jax.tree_util.register_dataclass, data_fields=list(_FIELDS), meta_fields=[])
@dataclasses.dataclass(frozen=True)
class ConversationBatch:
    """N right-padded conversations (see the module docstring for the layout). A pytree of arrays.

    tokens [N, T] int32; token_mask [N, T] bool; loss_mask [N, T] bool; old_logprobs [N, T] f32;
    advantages [N] f32; ref_logprobs [N, T] f32 or None.
    """

    tokens: Any
    token_mask: Any
    loss_mask: Any
    old_logprobs: Any
    advantages: Any
    ref_logprobs: Any = None

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])

    def replace(self, **changes) -> "ConversationBatch":
        return dataclasses.replace(self, **changes)

    def num_response_tokens(self) -> int:
        """Total response tokens (host-side; forces a transfer for device arrays)."""
        return int(np.asarray(self.loss_mask).sum())

    def num_real_tokens(self) -> int:
        """Total real (prompt + response) tokens (host-side)."""
        return int(np.asarray(self.token_mask).sum())


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _as_int_list(seq, field: str, row: int) -> np.ndarray:
    arr = np.asarray(seq)
    if arr.ndim != 1:
        raise BatchError(f"{field}[{row}]: expected a flat sequence of token ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise BatchError(f"{field}[{row}]: token ids must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def build_conversation_batch(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    response_logprobs: Sequence[Sequence[float]] | None,
    advantages: Sequence[float],
    *,
    ref_logprobs: Sequence[Sequence[float]] | None = None,
    length_multiple: int = 128,
    max_length: int | None = None,
    rows_multiple: int = 1,
    pad_id: int = 0,
    vocab_size: int | None = None,
) -> ConversationBatch:
    """Packs per-conversation lists into a right-padded `ConversationBatch` of NumPy arrays.

    Args:
      prompt_ids: N sequences of prompt token ids (each at least one token).
      response_ids: N sequences of response token ids (may be empty).
      response_logprobs: N sequences, the sampler's log-prob of each response token (same lengths as
        `response_ids`); None gives zeros (warm-start / supervised batches, or when the learner recomputes them).
      advantages: N floats, the advantage of each conversation's trajectory (see `advantages.py`).
      ref_logprobs: optional N sequences of reference log-probs of the response tokens.
      length_multiple: T is the longest conversation rounded up to a multiple of this (bucketing keeps the
        number of compiled shapes small).
      max_length: optional hard cap on T; a longer conversation is an error (never silently truncated).
      rows_multiple: N is padded with empty rows up to a multiple of this (e.g. the learner's
        `LearnerConfig.rows_multiple(mesh)`).
      pad_id: token id written into pad positions (never attended to, never trained on).
      vocab_size: if given, every token id must be in [0, vocab_size).
    Returns:
      ConversationBatch with tokens [N', T] int32, masks [N', T] bool, old_logprobs/ref_logprobs [N', T] f32,
      advantages [N'] f32, N' = N rounded up to `rows_multiple`.
    """
    n = len(prompt_ids)
    if len(response_ids) != n:
        raise BatchError(f"response_ids: {len(response_ids)} conversations, but prompt_ids has {n}")
    if len(advantages) != n:
        raise BatchError(f"advantages: {len(advantages)} values, but there are {n} conversations")
    if response_logprobs is not None and len(response_logprobs) != n:
        raise BatchError(f"response_logprobs: {len(response_logprobs)} entries, but there are {n} conversations")
    if ref_logprobs is not None and len(ref_logprobs) != n:
        raise BatchError(f"ref_logprobs: {len(ref_logprobs)} entries, but there are {n} conversations")
    if n == 0:
        raise BatchError("prompt_ids: no conversations given")
    if length_multiple <= 0:
        raise BatchError(f"length_multiple must be positive, got {length_multiple}")
    if rows_multiple <= 0:
        raise BatchError(f"rows_multiple must be positive, got {rows_multiple}")

    prompts = [_as_int_list(p, "prompt_ids", i) for i, p in enumerate(prompt_ids)]
    responses = [_as_int_list(r, "response_ids", i) for i, r in enumerate(response_ids)]
    for i, p in enumerate(prompts):
        if p.size == 0:
            raise BatchError(f"prompt_ids[{i}]: empty prompt (the first response token needs a predecessor)")

    def per_token(values, field):
        out = []
        for i, (v, r) in enumerate(zip(values, responses)):
            arr = np.asarray(v, dtype=np.float64).reshape(-1)
            if arr.size != r.size:
                raise BatchError(f"{field}[{i}]: {arr.size} values for {r.size} response tokens")
            out.append(arr)
        return out

    logps = per_token(response_logprobs, "response_logprobs") if response_logprobs is not None else None
    refs = per_token(ref_logprobs, "ref_logprobs") if ref_logprobs is not None else None

    longest = max(p.size + r.size for p, r in zip(prompts, responses))
    t = _round_up(longest, length_multiple)
    if max_length is not None:
        if longest > max_length:
            row = max(range(n), key=lambda i: prompts[i].size + responses[i].size)
            raise BatchError(f"conversation {row} has {longest} tokens, more than max_length={max_length}")
        t = min(t, max_length)
    rows = _round_up(n, rows_multiple)

    tokens = np.full((rows, t), pad_id, np.int32)
    token_mask = np.zeros((rows, t), bool)
    loss_mask = np.zeros((rows, t), bool)
    old = np.zeros((rows, t), np.float32)
    ref = np.zeros((rows, t), np.float32) if refs is not None else None
    adv = np.zeros((rows,), np.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        lp, lr = p.size, r.size
        tokens[i, :lp] = p
        tokens[i, lp:lp + lr] = r
        token_mask[i, :lp + lr] = True
        loss_mask[i, lp:lp + lr] = True
        if logps is not None:
            old[i, lp:lp + lr] = logps[i]
        if refs is not None:
            ref[i, lp:lp + lr] = refs[i]
        adv[i] = advantages[i]
    batch = ConversationBatch(tokens=tokens, token_mask=token_mask, loss_mask=loss_mask, old_logprobs=old,
                              advantages=adv, ref_logprobs=ref)
    validate_batch(batch, vocab_size=vocab_size)
    return batch


def validate_batch(batch: ConversationBatch, *, vocab_size: int | None = None, check_values: bool = True) -> None:
    """Checks shapes, dtypes and the layout invariants; raises `BatchError` naming the field (and row).

    Layout: real tokens form a prefix of each row (right padding); response tokens are real, form one contiguous
    run that ends at the row's last real token, and never include position 0. With `check_values`, also:
    token ids in range (if `vocab_size`), advantages and log-probs finite, old log-probs <= 0 on response tokens.
    Runs on the host (pulls device arrays).
    """
    if not isinstance(batch, ConversationBatch):
        raise BatchError(f"expected a ConversationBatch, got {type(batch).__name__}")
    arrays = {name: getattr(batch, name) for name in _FIELDS}
    for name, value in arrays.items():
        if value is None and name == "ref_logprobs":
            continue
        if value is None:
            raise BatchError(f"{name}: missing")
        if not hasattr(value, "shape") or not hasattr(value, "dtype"):
            raise BatchError(f"{name}: expected an array, got {type(value).__name__}")
    tokens = np.asarray(batch.tokens)
    if tokens.ndim != 2:
        raise BatchError(f"tokens: expected shape [N, T], got {tokens.shape}")
    n, t = tokens.shape
    if not np.issubdtype(tokens.dtype, np.integer):
        raise BatchError(f"tokens: expected an integer dtype, got {tokens.dtype}")
    expected = {"token_mask": (n, t), "loss_mask": (n, t), "old_logprobs": (n, t), "advantages": (n,),
                "ref_logprobs": (n, t)}
    for name, shape in expected.items():
        value = arrays[name]
        if value is None:
            continue
        if tuple(value.shape) != shape:
            raise BatchError(f"{name}: expected shape {list(shape)} (tokens is [{n}, {t}]), got {list(value.shape)}")
    for name in ("token_mask", "loss_mask"):
        if np.dtype(arrays[name].dtype) != np.bool_:
            raise BatchError(f"{name}: expected dtype bool, got {arrays[name].dtype}")
    for name in ("old_logprobs", "advantages", "ref_logprobs"):
        value = arrays[name]
        if value is not None and not np.issubdtype(np.dtype(value.dtype), np.floating):
            raise BatchError(f"{name}: expected a float dtype, got {value.dtype}")

    token_mask = np.asarray(batch.token_mask)
    loss_mask = np.asarray(batch.loss_mask)
    lengths = token_mask.sum(axis=1)
    prefix = np.arange(t)[None, :] < lengths[:, None]
    bad = np.nonzero((token_mask != prefix).any(axis=1))[0]
    if bad.size:
        raise BatchError(f"token_mask: row {bad[0]} is not right-padded (real tokens must form a prefix)")
    bad = np.nonzero((loss_mask & ~token_mask).any(axis=1))[0]
    if bad.size:
        raise BatchError(f"loss_mask: row {bad[0]} marks a pad position as a response token")
    bad = np.nonzero(loss_mask[:, 0])[0]
    if bad.size:
        raise BatchError(f"loss_mask: row {bad[0]} marks position 0 as a response token (it has no predecessor)")
    num_resp = loss_mask.sum(axis=1)
    resp_start = lengths - num_resp
    suffix = (np.arange(t)[None, :] >= resp_start[:, None]) & prefix
    bad = np.nonzero((loss_mask != suffix).any(axis=1))[0]
    if bad.size:
        raise BatchError(f"loss_mask: row {bad[0]}: response tokens must be one contiguous run ending at the "
                         f"row's last real token (prompt, then response, then pads)")
    if not check_values:
        return
    if vocab_size is not None:
        real = tokens[token_mask]
        if real.size and (real.min() < 0 or real.max() >= vocab_size):
            row = int(np.nonzero(((tokens < 0) | (tokens >= vocab_size)) & token_mask)[0][0])
            raise BatchError(f"tokens: row {row} has a token id outside [0, {vocab_size})")
    adv = np.asarray(batch.advantages)
    if not np.all(np.isfinite(adv)):
        raise BatchError(f"advantages: row {int(np.nonzero(~np.isfinite(adv))[0][0])} is not finite")
    for name in ("old_logprobs", "ref_logprobs"):
        value = arrays[name]
        if value is None:
            continue
        value = np.asarray(value)
        bad = np.nonzero((~np.isfinite(value) & loss_mask).any(axis=1))[0]
        if bad.size:
            raise BatchError(f"{name}: row {bad[0]} has a non-finite log-prob on a response token")
        bad = np.nonzero(((value > 1e-4) & loss_mask).any(axis=1))[0]
        if bad.size:
            raise BatchError(f"{name}: row {bad[0]} has a positive log-prob on a response token")


def shuffle_rows(batch: ConversationBatch, seed: int | np.random.Generator) -> ConversationBatch:
    """The same batch with its rows in a random order (host-side, NumPy). Use before splitting into mini-batches."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    perm = rng.permutation(batch.num_rows)
    return jax.tree.map(lambda x: np.asarray(x)[perm], batch)


def pad_rows(batch: ConversationBatch, rows: int) -> ConversationBatch:
    """Appends empty rows (no real tokens) up to `rows` rows (host-side, NumPy)."""
    n = batch.num_rows
    if rows < n:
        raise BatchError(f"pad_rows: cannot pad {n} rows down to {rows}")

    def pad(x):
        x = np.asarray(x)
        return np.concatenate([x, np.zeros((rows - n,) + x.shape[1:], x.dtype)], axis=0)

    return jax.tree.map(pad, batch)
