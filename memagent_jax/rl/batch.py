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

Packed batches (`pack_conversations`): several conversations share a row, each a contiguous run of tokens, and

    segment_ids   [N, T] int32   1, 2, ... for the row's first, second, ... conversation, 0 at pads
    advantages    [N, T] f32     per token: the advantage of the conversation the token belongs to (0 at pads)

tokens attend only within their own conversation and positions restart at 0 at each conversation's first token,
so every conversation is computed as in its own row while pads shrink from the longest-minus-mean of every row to
the tail of each packed row. The learner supports packed batches with the 'token-mean' loss aggregation.

`build_conversation_batch` makes one (NumPy arrays) from per-conversation lists; `validate_batch` checks one
with errors that name the field and the row.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

__all__ = [
    "BatchError",
    "ConversationBatch",
    "build_conversation_batch",
    "validate_batch",
    "shuffle_rows",
    "pad_rows",
    "pack_conversations",
    "segment_positions",
    "head_window",
]

_FIELDS = ("tokens", "token_mask", "loss_mask", "old_logprobs", "advantages", "ref_logprobs", "segment_ids")


class BatchError(ValueError):
    """A conversation batch (or the lists it is built from) is malformed; the message names the field."""


@functools.partial(jax.tree_util.register_dataclass, data_fields=list(_FIELDS), meta_fields=[])
@dataclasses.dataclass(frozen=True)
class ConversationBatch:
    """N right-padded conversations (see the module docstring for the layout). A pytree of arrays.

    tokens [N, T] int32; token_mask [N, T] bool; loss_mask [N, T] bool; old_logprobs [N, T] f32;
    advantages [N] f32 ([N, T] when packed); ref_logprobs [N, T] f32 or None; segment_ids [N, T] int32 when packed
    (several conversations per row, see `pack_conversations`), else None.
    """

    tokens: Any
    token_mask: Any
    loss_mask: Any
    old_logprobs: Any
    advantages: Any
    ref_logprobs: Any = None
    segment_ids: Any = None

    @property
    def packed(self) -> bool:
        return self.segment_ids is not None

    @property
    def num_rows(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])

    def replace(self, **changes) -> ConversationBatch:
        return dataclasses.replace(self, **changes)

    def num_response_tokens(self) -> int:
        """Total response tokens (host-side; forces a transfer for device arrays)."""
        return int(np.asarray(self.loss_mask).sum())

    def num_real_tokens(self) -> int:
        """Total real (prompt + response) tokens (host-side)."""
        return int(np.asarray(self.token_mask).sum())


def head_window(longest_response: int) -> int:
    """The LM-head window a learner picks for responses of up to `longest_response` tokens: that rounded up to a
    power of two, at least 16 (few distinct compiled shapes)."""
    return max(16, 1 << max(longest_response - 1, 0).bit_length())


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
        tokens[i, lp : lp + lr] = r
        token_mask[i, : lp + lr] = True
        loss_mask[i, lp : lp + lr] = True
        if logps is not None:
            old[i, lp : lp + lr] = logps[i]
        if refs is not None:
            ref[i, lp : lp + lr] = refs[i]
        adv[i] = advantages[i]
    batch = ConversationBatch(
        tokens=tokens, token_mask=token_mask, loss_mask=loss_mask, old_logprobs=old, advantages=adv, ref_logprobs=ref
    )
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
        if value is None and name in ("ref_logprobs", "segment_ids"):
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
    packed = arrays["segment_ids"] is not None
    expected = {
        "token_mask": (n, t),
        "loss_mask": (n, t),
        "old_logprobs": (n, t),
        "advantages": (n, t) if packed else (n,),
        "ref_logprobs": (n, t),
        "segment_ids": (n, t),
    }
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
    if packed:
        _validate_packed_layout(np.asarray(batch.segment_ids), token_mask, loss_mask)
    else:
        _validate_row_layout(token_mask, loss_mask)
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


def _validate_packed_layout(segment_ids: np.ndarray, token_mask: np.ndarray, loss_mask: np.ndarray) -> None:
    """Packed rows: real tokens are exactly those with a segment id > 0; no response token opens a segment."""
    if not np.issubdtype(segment_ids.dtype, np.integer):
        raise BatchError(f"segment_ids: expected an integer dtype, got {segment_ids.dtype}")
    bad = np.nonzero(((segment_ids > 0) != token_mask).any(axis=1))[0]
    if bad.size:
        raise BatchError(
            f"segment_ids: row {bad[0]}: real tokens (token_mask) must be exactly those with a segment id > 0"
        )
    bad = np.nonzero((loss_mask & ~token_mask).any(axis=1))[0]
    if bad.size:
        raise BatchError(f"loss_mask: row {bad[0]} marks a pad position as a response token")
    opens = np.ones_like(token_mask)
    opens[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    bad = np.nonzero((loss_mask & opens).any(axis=1))[0]
    if bad.size:
        raise BatchError(
            f"loss_mask: row {bad[0]} marks the first token of a conversation as a response token (it "
            f"has no predecessor)"
        )


def _validate_row_layout(token_mask: np.ndarray, loss_mask: np.ndarray) -> None:
    """One conversation per row: prompt, then response, then pads."""
    t = token_mask.shape[1]
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
        raise BatchError(
            f"loss_mask: row {bad[0]}: response tokens must be one contiguous run ending at the "
            f"row's last real token (prompt, then response, then pads)"
        )


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


def pack_conversations(
    batch: ConversationBatch, length: int, *, rows_multiple: int = 1, min_rows: int = 0
) -> ConversationBatch:
    """Packs a one-conversation-per-row batch into rows of `length` tokens holding several conversations each.

    First-fit decreasing: conversations are taken longest first (ties: in row order) and each goes into the first
    packed row with room for it, else a new one. A conversation longer than `length` gets a row of its own and the
    packed length grows to the unpacked batch's (its padded length: never truncated, and still one of the few
    lengths its builder rounds to). Pad rows (no real token) are dropped. Host-side, NumPy.

    Args:
      batch: an unpacked `ConversationBatch` (validated layout: prompt, response, pads).
      length: tokens per packed row (>= 1).
      rows_multiple: the packed row count is rounded up to a multiple of this with empty rows.
      min_rows: at least this many rows (e.g. the largest packed batch so far, so the learner keeps one shape).
    Returns:
      a packed `ConversationBatch` (see the module docstring): tokens [N', T'], segment_ids [N', T'] (1, 2, ... in
      each row, 0 at pads), advantages [N', T'] per token; T' = `length`, or the unpacked T when longer.
    """
    if batch.packed:
        raise BatchError("pack_conversations: the batch is already packed")
    if length < 1:
        raise BatchError(f"pack_conversations: length must be >= 1, got {length}")
    if rows_multiple < 1:
        raise BatchError(f"pack_conversations: rows_multiple must be >= 1, got {rows_multiple}")
    token_mask = np.asarray(batch.token_mask)
    lengths = token_mask.sum(axis=1)
    order = sorted((i for i in range(len(lengths)) if lengths[i] > 0), key=lambda i: (-lengths[i], i))
    width = max(length, batch.length)
    free: list[int] = []  # room left in each packed row
    placement: list[list[int]] = []  # source rows of each packed row, in placement order
    for i in order:
        need = int(lengths[i])
        row = next((r for r, room in enumerate(free) if room >= need), None)
        if row is None:
            free.append(width)
            placement.append([])
            row = len(free) - 1
        free[row] -= need
        placement[row].append(i)
    rows = _round_up(max(len(placement), 1, min_rows), rows_multiple)

    def empty(dtype, fill=0):
        return np.full((rows, width), fill, dtype)

    src = {name: np.asarray(getattr(batch, name)) for name in ("tokens", "loss_mask", "old_logprobs")}
    tokens = empty(src["tokens"].dtype)
    out_token_mask = empty(bool, False)
    loss_mask = empty(bool, False)
    old = empty(np.float32)
    ref_src = None if batch.ref_logprobs is None else np.asarray(batch.ref_logprobs)
    ref = None if ref_src is None else empty(np.float32)
    adv_src = np.asarray(batch.advantages)
    adv = empty(np.float32)
    segment_ids = empty(np.int32)
    for r, sources in enumerate(placement):
        at = 0
        for k, i in enumerate(sources):
            n = int(lengths[i])
            span = slice(at, at + n)
            tokens[r, span] = src["tokens"][i, :n]
            out_token_mask[r, span] = True
            loss_mask[r, span] = src["loss_mask"][i, :n]
            old[r, span] = src["old_logprobs"][i, :n]
            if ref is not None:
                ref[r, span] = ref_src[i, :n]
            adv[r, span] = adv_src[i]
            segment_ids[r, span] = k + 1
            at += n
    return ConversationBatch(
        tokens=tokens,
        token_mask=out_token_mask,
        loss_mask=loss_mask,
        old_logprobs=old,
        advantages=adv,
        ref_logprobs=ref,
        segment_ids=segment_ids,
    )


def segment_positions(segment_ids):
    """Positions that restart at 0 at each conversation of a packed row: [N, T] int32 (jnp or np in, jnp out)."""
    import jax.numpy as jnp

    segment_ids = jnp.asarray(segment_ids)
    index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None, :]
    opens = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    start = jax.lax.cummax(jnp.where(opens, index, 0), axis=1)
    return (index - start).astype(jnp.int32)
