"""The hand-wired induction circuit (memagent_jax.models.induction): a freshly initialised model that, before
any training, predicts the token that followed an earlier occurrence of the current token, through the real
forward (RMSNorm, RoPE, GQA, biases, random MLPs), where the same model with random weights does not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memagent_jax.models import ModelConfig, load_hf_params, save_hf_checkpoint
from memagent_jax.models.config import RopeConfig
from memagent_jax.models.induction import InductionWiringError, wire_induction_heads
from memagent_jax.models.transformer import forward, init_params

# The main job's model shape (configs/tiny_synthetic.py).
CONFIG = ModelConfig(
    model_type="qwen2",
    vocab_size=1024,
    hidden_size=128,
    intermediate_size=512,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    max_position_embeddings=512,
    tie_word_embeddings=True,
    attention_bias=True,
    eos_token_ids=(2,),
    pad_token_id=0,
    bos_token_id=None,
    rope=RopeConfig(theta=1e6),
)


def _planted_pairs(rng, rows=32, length=96, pairs=8):
    """Random tokens with `pairs` pairs (a, b) copied from earlier in the row: [rows, length] ids and the
    (row, position of the second a, b) triples whose b is predictable only by induction."""
    ids = rng.integers(3, CONFIG.vocab_size, (rows, length))
    targets = []
    for r in range(rows):
        for p in sorted(rng.choice(np.arange(length // 3, length - 2, 2), pairs, replace=False)):
            i = int(rng.integers(0, p - 2))
            ids[r, p], ids[r, p + 1] = ids[r, i], ids[r, i + 1]
            if ids[r, :p].tolist().count(ids[r, p]) == 1:  # one earlier occurrence: an unambiguous target
                targets.append((r, p, ids[r, p + 1]))
    return jnp.asarray(ids, jnp.int32), targets


def _induction_accuracy(params, ids, targets):
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    logits, _ = forward(params, ids, positions, jnp.ones(ids.shape, bool), config=CONFIG)
    predicted = np.asarray(jnp.argmax(logits, -1))
    return np.mean([predicted[r, p] == b for r, p, b in targets])


def test_wired_model_copies_what_followed_the_earlier_occurrence():
    ids, targets = _planted_pairs(np.random.default_rng(0))
    assert len(targets) > 150
    wired = wire_induction_heads(init_params(CONFIG, jax.random.key(0)), CONFIG, seed=0)
    assert _induction_accuracy(wired, ids, targets) > 0.9
    assert _induction_accuracy(init_params(CONFIG, jax.random.key(0)), ids, targets) < 0.05
    # Deterministic in the seed, and a plain parameter pytree of the usual shapes.
    again = wire_induction_heads(init_params(CONFIG, jax.random.key(0)), CONFIG, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(wired), jax.tree.leaves(again)))
    assert jax.tree.map(jnp.shape, wired) == jax.tree.map(jnp.shape, init_params(CONFIG, jax.random.key(0)))


def test_wired_model_survives_the_hf_round_trip(tmp_path):
    wired = wire_induction_heads(init_params(CONFIG, jax.random.key(1)), CONFIG, seed=1)
    save_hf_checkpoint(wired, CONFIG, str(tmp_path / "m"))
    loaded, config = load_hf_params(str(tmp_path / "m"))
    assert config.rope.theta == 1e6
    ids, targets = _planted_pairs(np.random.default_rng(1))
    assert _induction_accuracy(loaded, ids, targets) > 0.9


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_layers=1), "2 layers"),
        (dict(num_kv_heads=1, num_heads=4), "KV heads"),
        (dict(rope=RopeConfig(theta=1e3)), "rope.theta"),
        (dict(attention_bias=False), "attention_bias"),
    ],
)
def test_shapes_that_cannot_hold_the_circuit_are_refused(change, message):
    config = CONFIG.replace(**change)
    with pytest.raises(InductionWiringError, match=message):
        wire_induction_heads(init_params(config, jax.random.key(0)), config)


def _match_scores(params):
    """[V, V] the matching head's score of query token a against a key whose previous token is b (no RMSNorm)."""
    attn = params["layers"]["attn"]
    de = CONFIG.hidden_size - CONFIG.head_dim
    group = CONFIG.num_heads // CONFIG.num_kv_heads
    embed = np.asarray(params["embed"])[:, :de]
    queries = embed @ np.asarray(attn["q_proj"][1, :de, group, :])  # [V, Dh]
    carried = embed @ np.asarray(attn["v_proj"][0, :de, 0, :])  # [V, Dh] what the previous-token head writes
    keys = carried @ np.asarray(attn["k_proj"][1, de:, 1, :])  # [V, Dh]
    return queries @ keys.T


def test_every_token_matches_itself_most_strongly():
    """Equalised match codes: for every token the exact match outscores every other key token (with raw random
    embeddings short codes lose to longer look-alikes), and the embeddings outside the matched subspace are
    the same as without equalising."""
    params = init_params(CONFIG, jax.random.key(0))
    wired = wire_induction_heads(params, CONFIG, seed=0)
    raw = wire_induction_heads(params, CONFIG, seed=0, equal_match=False)
    scores, raw_scores = _match_scores(wired), _match_scores(raw)
    vocab = np.arange(CONFIG.vocab_size)
    assert np.all(np.argmax(scores, axis=1) == vocab)
    assert np.mean(np.argmax(raw_scores, axis=1) != vocab) > 0.1
    np.testing.assert_allclose(np.diag(scores), np.diag(scores).mean(), rtol=1e-4)
    # Only the rows' components in the matched subspace changed: the difference lies in that span.
    de = CONFIG.hidden_size - CONFIG.head_dim
    basis = np.asarray(wired["layers"]["attn"]["q_proj"][1, :de, CONFIG.num_heads // CONFIG.num_kv_heads, :])
    basis = basis[:, np.abs(basis).sum(0) > 0]
    delta = np.asarray(wired["embed"] - raw["embed"])[:, :de]
    residual = delta - delta @ basis @ np.linalg.pinv(basis)
    assert np.abs(residual).max() < 1e-6 and np.abs(delta).max() > 1e-3
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        np.testing.assert_array_equal(wired["layers"]["attn"][name], raw["layers"]["attn"][name])
