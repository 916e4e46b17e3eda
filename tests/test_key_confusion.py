"""The key-confusion probe (memagent_jax.evaluation.key_confusion): its rows are the agent's real memory-update
prompts, and its batched probabilities equal a plain one-row-at-a-time loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_tiny import task_tokenizer_and_prompts
from memagent_jax.agent.templates import encode_text
from memagent_jax.evaluation.key_confusion import STATES, confusion_rows, key_confusion

KEYS = ("falcon", "osprey", "badger")
WORDS = ("Ul", "Tor", "Sel", "Ra")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return task_tokenizer_and_prompts(tmp_path_factory.mktemp("tok"))


def _find(seq, part) -> int:
    """Start of the first occurrence of `part` in `seq`, or -1."""
    return next((i for i in range(len(seq) - len(part) + 1) if seq[i : i + len(part)] == part), -1)


@pytest.mark.parametrize("state", STATES)
def test_rows_are_the_update_prompt_with_the_fact_whole_in_a_chunk(setup, state):
    tok, prompts = setup
    rows, targets, pairs = confusion_rows(tok, prompts, KEYS, WORDS, state=state, chunk_tokens=32, variants=3)
    assert len(rows) == len(targets) == len(pairs) == 3 * 2 * 3  # ordered pairs x variants
    assert {tuple(p) for p in pairs} == {(i, j) for i in range(3) for j in range(3) if i != j}
    for row, target, (i, j) in zip(rows, targets, pairs):
        asked, other = KEYS[i], KEYS[j]
        question = encode_text(tok, f"What is the secret word for {asked}?")
        word = tok.decode([int(target)]).strip()
        if state == "answer":  # the final prompt over two-hop notes, the answer up to its word
            notes = encode_text(tok, f" for {asked} as {other} {word}")
            assert row == prompts.final.assemble({"question": question, "memory": notes}) + encode_text(tok, "\\boxed{")
            continue
        prefix = encode_text(tok, f" for {asked}")
        assert row[-len(prefix) :] == prefix  # the notes' prefix; the next token is the noted word
        prompt = row[: -len(prefix)]
        # The prompt is the real update prompt: question, notes, then a chunk of exactly 32 tokens.
        fact = encode_text(tok, f" Remember {asked if state == 'wrong' else other} {word}.")
        if state == "unknown":
            notes = encode_text(tok, f" for {asked} ?")
        else:  # a noted word, never the one the chunk states
            notes = next(
                encode_text(tok, f" for {asked} {w}")
                for w in WORDS
                if w != word and _find(prompt, encode_text(tok, f" for {asked} {w}")) >= 0
            )
        chunk = prompt[_chunk_slice(prompts, question, notes, prompt)]
        assert prompts.update.assemble({"question": question, "memory": notes, "chunk": chunk}) == prompt
        assert len(chunk) == 32 and _find(chunk, fact) >= 0, "the fact is whole in a chunk of 32 tokens"


def _chunk_slice(prompts, question, notes, prompt) -> slice:
    """Where the chunk sits in `prompt`: the assembled prompt with an empty chunk shares its head and tail."""
    empty = prompts.update.assemble({"question": question, "memory": notes, "chunk": []})
    head = next(i for i in range(len(empty) + 1) if i == len(empty) or empty[i] != prompt[i])
    return slice(head, head + len(prompt) - len(empty))


def test_probabilities_equal_a_plain_loop_over_single_rows(setup):
    """Batched (padded, one compiled shape) probe == each row alone through the model, averaged per pair; the
    'wrong' and 'answer' states report 1 - P(the word that should be noted / answered)."""
    from memagent_jax.models.config import ModelConfig, RopeConfig
    from memagent_jax.models.transformer import forward, init_params

    tok, prompts = setup
    config = ModelConfig(
        model_type="qwen2",
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attention_bias=True,
        eos_token_ids=(tok.eos_token_id,),
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        rope=RopeConfig(theta=1e4),
    )
    params = init_params(config, jax.random.key(0))
    one_row = jax.jit(
        lambda params, ids: forward(params, ids, jnp.arange(ids.shape[1])[None], ids >= 0, config=config)[0]
    )
    probe = key_confusion(params, config, tok, prompts, KEYS, WORDS, chunk_tokens=32, variants=1, batch_size=4)
    for s, state in enumerate(STATES):
        rows, targets, pairs = confusion_rows(
            tok, prompts, KEYS, WORDS, state=state, chunk_tokens=32, variants=1, seed=s
        )
        expected = np.full((3, 3), np.nan)
        sums, counts = np.zeros((3, 3)), np.zeros((3, 3))
        for row, target, (i, j) in zip(rows, targets, pairs):
            logits = one_row(params, jnp.asarray([row], jnp.int32))  # [1, T, V], no padding
            p = float(jax.nn.softmax(logits[0, -1])[target])
            sums[i, j] += 1.0 - p if state in ("wrong", "answer") else p
            counts[i, j] += 1
        np.divide(sums, counts, out=expected, where=counts > 0)
        np.testing.assert_allclose(probe.probability[state], expected, rtol=2e-4, atol=1e-7)
        assert np.isnan(np.diag(probe.probability[state])).all()
    summary = probe.summary()
    assert set(summary) == set(STATES) and all(v["pairs"] == 6 for v in summary.values())
    worst = probe.worst("unknown", count=1)[0]
    assert worst[2] == pytest.approx(np.nanmax(probe.probability["unknown"]))
