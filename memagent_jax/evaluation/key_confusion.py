"""Which keys a keyed-recall memory agent confuses: one memory step, teacher-forced, for every pair of keys.

A memory agent asked "What is the secret word for <a>?" must, at each chunk, note the word of a's fact and leave
look-alike facts for other creatures alone. Accuracy per file hides *which* creatures fail; this probe measures it
directly. For every ordered pair (a, b) of keys it builds memory-update prompts whose notes are in one of three
states, runs the prompt plus the notes' prefix (" for <a>") through the model once, and reads the probability of
the next token, the noted word. Each state's figure is the probability of a failure:

    unknown  notes " for <a> ?" (a's fact not read yet); the chunk states b's word.    P(b's word)   (a confusion)
    held     notes " for <a> <X>" (a's word noted); the chunk states b's word.        P(b's word)   (an overwrite)
    wrong    notes " for <a> <X>" with X not a's word; the chunk states a's word Y.   1 - P(Y)      (stuck)
    answer   the final prompt with the two-hop notes " for <a> as <b> <Y>", the answer
             teacher-forced up to its word (`answer_prefix`).                         1 - P(Y)      (a lost copy)

The chunk is `chunk_tokens` tokens of filler sentences holding the one fact whole, at a random place.

Why it matters for GRPO: a pair confused with probability near 1 makes every rollout of a document where b's
fact comes first note the same wrong word. The group's rewards are then equal, its advantages zero, and GRPO
gets no signal to correct it; only what the model learned before (the warm start) can. A probability well inside
(0, 1) splits the group and GRPO can learn from it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

__all__ = ["STATES", "KeyConfusion", "confusion_rows", "key_confusion"]

STATES = ("unknown", "held", "wrong", "answer")


@dataclass
class KeyConfusion:
    """probability[state]: [K, K] array; [i, j] is the mean probability over variants of the state's failure for
    asked key keys[i] and other key keys[j] (the diagonal is NaN)."""

    keys: tuple[str, ...]
    probability: dict[str, np.ndarray]

    def worst(self, state: str, count: int = 3) -> list[tuple[str, str, float]]:
        """The `count` pairs (asked, other, probability) with the highest probability of `state`'s failure."""
        p = np.nan_to_num(self.probability[state], nan=-1.0)
        order = np.argsort(-p, axis=None)[:count]
        return [(self.keys[i], self.keys[j], float(p[i, j])) for i, j in zip(*np.unravel_index(order, p.shape))]

    def summary(self) -> dict:
        """Per state: mean over pairs, pairs above 0.5 and above 0.1, and the three worst pairs ('a<b': p)."""
        out = {}
        for state, p in self.probability.items():
            values = p[~np.isnan(p)]
            out[state] = {
                "mean": float(values.mean()),
                "pairs_over_0.5": int((values > 0.5).sum()),
                "pairs_over_0.1": int((values > 0.1).sum()),
                "pairs": int(values.size),
                "worst": {f"{a}<{b}": round(v, 4) for a, b, v in self.worst(state)},
            }
        return out


def _chunk_with(tokenizer, fact: str, chunk_tokens: int, rng: random.Random) -> list[int]:
    """`chunk_tokens` ids of filler sentences with `fact` (text) whole inside, at a random place."""
    from memagent_jax.agent.templates import encode_text
    from memagent_jax.data.synthetic.vocabulary import sentence_units

    fact_ids = encode_text(tokenizer, fact)
    if len(fact_ids) > chunk_tokens:
        raise ValueError(f"the fact {fact!r} is {len(fact_ids)} tokens, longer than a chunk ({chunk_tokens})")

    def filler(n: int) -> list[int]:
        ids: list[int] = []
        while len(ids) < n:
            ids += encode_text(tokenizer, "".join(sentence_units(rng)) + ".")
        return ids

    room = chunk_tokens - len(fact_ids)
    before = rng.randint(0, room)  # the chunk may start and end mid-sentence, as a document's chunks do
    head = filler(before)[-before:] if before else []
    return head + fact_ids + filler(room - before)[: room - before]


def confusion_rows(
    tokenizer,
    prompts,
    keys,
    words,
    *,
    state: str,
    chunk_tokens: int,
    variants: int = 4,
    fact_template: str = " Remember {key} {word}.",
    question_template: str = "What is the secret word for {key}?",
    note_template: str = " for {key} {word}",
    unknown_word: str = "?",
    chain_template: str = " for {key} as {target} {word}",
    answer_prefix: str = "\\boxed{",
    seed: int = 0,
):
    """The probe's rows for one state.

    Returns (rows, targets, pairs): rows: list of token-id lists (the update prompt + the notes' prefix up to the
    word, or for 'answer' the final prompt + `answer_prefix`); targets: [N] the id of the word the chunk (or the
    notes) state; pairs: [N, 2] indices (asked, other) into `keys`.
    """
    from memagent_jax.agent.templates import encode_text

    if state not in STATES:
        raise ValueError(f"state must be one of {STATES}, got {state!r}")
    rng = random.Random(seed)
    rows, targets, pairs = [], [], []
    for i, a in enumerate(keys):
        prefix = encode_text(tokenizer, note_template.format(key=a, word="\0").split("\0")[0].rstrip())
        for j, b in enumerate(keys):
            if i == j:
                continue
            for _ in range(variants):
                held, stated = rng.sample(list(words), 2)
                question = encode_text(tokenizer, question_template.format(key=a))
                if state == "answer":  # b is the bridge creature of two-hop notes
                    notes = encode_text(tokenizer, chain_template.format(key=a, target=b, word=stated))
                    prompt = prompts.final.assemble({"question": question, "memory": notes})
                    rows.append(list(prompt) + encode_text(tokenizer, answer_prefix))
                else:  # in 'wrong' the chunk states a's own word: b only spreads the variants
                    noted = unknown_word if state == "unknown" else held
                    fact = fact_template.format(key=a if state == "wrong" else b, word=stated)
                    notes = encode_text(tokenizer, note_template.format(key=a, word=noted))
                    chunk = _chunk_with(tokenizer, fact, chunk_tokens, rng)
                    prompt = prompts.update.assemble({"question": question, "memory": notes, "chunk": chunk})
                    rows.append(list(prompt) + prefix)
                targets.append(encode_text(tokenizer, " " + stated)[0])
                pairs.append((i, j))
    return rows, np.asarray(targets, np.int32), np.asarray(pairs, np.int32)


def key_confusion(
    params,
    config,
    tokenizer,
    prompts,
    keys,
    words,
    *,
    chunk_tokens: int,
    variants: int = 4,
    batch_size: int = 256,
    seed: int = 0,
    states: tuple[str, ...] = STATES,
    **templates,
) -> KeyConfusion:
    """The [K, K] probabilities of each of `states` (default all) for a model (params pytree + ModelConfig).
    `templates`: the fact / question / note templates of `confusion_rows`."""
    import jax
    import jax.numpy as jnp

    from memagent_jax.models.transformer import forward

    if not set(states) <= set(STATES):
        raise ValueError(f"states must be among {STATES}, got {tuple(states)}")

    @jax.jit
    def next_token_probs(params, ids, mask, last):
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        logits, _ = forward(params, ids, positions, mask, config=config)
        return jax.nn.softmax(logits[jnp.arange(ids.shape[0]), last].astype(jnp.float32), axis=-1)

    probability = {}
    for s, state in enumerate(STATES):
        if state not in states:
            continue
        rows, targets, pairs = confusion_rows(
            tokenizer,
            prompts,
            keys,
            words,
            state=state,
            chunk_tokens=chunk_tokens,
            variants=variants,
            seed=seed * len(STATES) + s,
            **templates,
        )
        width = max(len(r) for r in rows)
        events = np.zeros(len(rows), np.float64)
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            ids = np.zeros((batch_size, width), np.int32)  # one shape for every batch: one compilation
            mask = np.zeros((batch_size, width), bool)
            for r, row in enumerate(part):
                ids[r, : len(row)], mask[r, : len(row)] = row, True
            last = np.asarray([len(row) - 1 for row in part] + [0] * (batch_size - len(part)), np.int32)
            probs = np.asarray(next_token_probs(params, ids, mask, last))[: len(part)]
            stated = probs[np.arange(len(part)), targets[start : start + len(part)]]
            events[start : start + len(part)] = 1.0 - stated if state in ("wrong", "answer") else stated
        table = np.zeros((len(keys), len(keys)))
        counts = np.zeros((len(keys), len(keys)))
        np.add.at(table, (pairs[:, 0], pairs[:, 1]), events)
        np.add.at(counts, (pairs[:, 0], pairs[:, 1]), 1)
        with np.errstate(invalid="ignore"):
            probability[state] = np.where(counts > 0, table / np.maximum(counts, 1), np.nan)
    return KeyConfusion(tuple(keys), probability)
