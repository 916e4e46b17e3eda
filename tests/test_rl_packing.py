"""Packed learner batches: several conversations per row give the loss, gradients, metrics and updates of one
conversation per row; the packing itself (first-fit decreasing, nothing lost or cut) and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_rl_learner import CONFIG, random_batch, random_params, tree_close

from memagent_jax.models import forward, positions_from_mask
from memagent_jax.rl.batch import (
    BatchError,
    build_conversation_batch,
    pack_conversations,
    segment_positions,
    validate_batch,
)
from memagent_jax.rl.learner import Learner, LearnerConfig, LearnerConfigError, OptimizerConfig, accumulate_gradients
from memagent_jax.rl.logprobs import token_logprobs
from memagent_jax.rl.losses import LossConfig


def test_packing_keeps_every_conversation_whole():
    batch = random_batch(23, seed=3, rows_multiple=4)  # 23 conversations + 1 empty pad row
    lengths = np.asarray(batch.token_mask).sum(axis=1)
    packed = pack_conversations(batch, 16, rows_multiple=4)
    validate_batch(packed)
    assert packed.length == 16 and packed.num_rows % 4 == 0
    assert packed.num_rows < batch.num_rows  # fewer rows, fewer pads
    assert np.asarray(packed.token_mask).sum() == lengths.sum()
    # Every conversation appears exactly once as one contiguous segment, with its own tokens, masks, log-probs and
    # its trajectory's advantage on every token.
    found = []
    for r in range(packed.num_rows):
        seg = np.asarray(packed.segment_ids[r])
        for s in range(1, seg.max() + 1):
            span = np.nonzero(seg == s)[0]
            assert np.all(np.diff(span) == 1)
            toks = packed.tokens[r, span]
            match = [
                i
                for i in range(batch.num_rows)
                if lengths[i] == span.size and np.array_equal(batch.tokens[i, : span.size], toks) and i not in found
            ]
            assert match, (r, s)
            i = match[0]
            found.append(i)
            np.testing.assert_array_equal(packed.loss_mask[r, span], batch.loss_mask[i, : span.size])
            np.testing.assert_array_equal(packed.old_logprobs[r, span], batch.old_logprobs[i, : span.size])
            assert np.all(packed.advantages[r, span] == batch.advantages[i])
    assert sorted(found) == [i for i in range(batch.num_rows) if lengths[i] > 0]
    # First-fit decreasing by hand: lengths 9, 7, 5, 5, 3 into rows of 12 -> [9, 3], [7, 5], [5].
    hand = build_conversation_batch(
        [[1] * 8, [2] * 6, [3] * 4, [4] * 4, [5] * 2],
        [[6], [6], [6], [6], [6]],
        None,
        [0.5, 1.0, 1.5, 2.0, 2.5],
        length_multiple=4,
    )
    rows = pack_conversations(hand, 12)
    assert [list(np.asarray(rows.tokens[r])[np.asarray(rows.token_mask[r])][::1]) for r in range(3)] == [
        [1] * 8 + [6] + [5] * 2 + [6],
        [2] * 6 + [6] + [3] * 4 + [6],
        [4] * 4 + [6],
    ]
    np.testing.assert_array_equal(segment_positions(rows.segment_ids)[0], list(range(9)) + [0, 1, 2])
    # A conversation longer than the packing length gets a row of its own (never cut) and the rows take the
    # unpacked batch's padded length (12: 9 tokens rounded to length_multiple=4); min_rows pads with rows.
    wide = pack_conversations(hand, 6, min_rows=8)
    assert hand.length == 12 and wide.length == 12 and wide.num_rows == 8
    assert np.asarray(wide.token_mask).sum() == 29


def test_packing_errors_name_the_problem():
    batch = random_batch(4, seed=1)
    with pytest.raises(BatchError, match="already packed"):
        pack_conversations(pack_conversations(batch, 32), 32)
    with pytest.raises(BatchError, match="length must be >= 1"):
        pack_conversations(batch, 0)
    packed = pack_conversations(batch, 32)
    bad = packed.replace(segment_ids=np.where(np.asarray(packed.segment_ids) == 1, 0, packed.segment_ids))
    with pytest.raises(BatchError, match="segment_ids: row 0"):
        validate_batch(bad)
    lm = np.asarray(packed.loss_mask).copy()
    lm[0, 0] = True
    with pytest.raises(BatchError, match="first token of a conversation"):
        validate_batch(packed.replace(loss_mask=lm))
    with pytest.raises(BatchError, match=r"advantages: expected shape \[1, 32\]"):
        validate_batch(packed.replace(advantages=np.zeros((1,), np.float32)))


def test_packed_logprobs_equal_one_conversation_per_row():
    params = random_params(CONFIG, 0)
    batch = random_batch(12, seed=5)
    packed = pack_conversations(batch, 24)
    lp, _ = token_logprobs(params, jnp.asarray(batch.tokens), jnp.asarray(batch.token_mask), config=CONFIG)
    plp, _ = token_logprobs(
        params,
        jnp.asarray(packed.tokens),
        jnp.asarray(packed.token_mask),
        config=CONFIG,
        positions=segment_positions(packed.segment_ids),
        segment_ids=jnp.asarray(packed.segment_ids),
    )
    # Response tokens of the packed rows carry the same log-probs as in their own rows (an independent forward).
    mask = jnp.asarray(batch.token_mask)
    logits, _ = forward(params, jnp.asarray(batch.tokens), positions_from_mask(mask), mask, config=CONFIG)
    np.testing.assert_allclose(
        np.sort(np.asarray(plp)[np.asarray(packed.loss_mask)]),
        np.sort(np.asarray(lp)[np.asarray(batch.loss_mask)]),
        atol=1e-5,
    )
    # The learner's own log-prob pass (e.g. reference log-probs) on the packed rows: the same values.
    learner_lp = Learner(CONFIG, LearnerConfig()).logprobs(params, packed)
    np.testing.assert_allclose(
        np.asarray(learner_lp)[np.asarray(packed.loss_mask)], np.asarray(plp)[np.asarray(packed.loss_mask)], atol=1e-6
    )
    ref = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), jnp.asarray(batch.tokens)[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(
        np.asarray(lp)[:, 1:][np.asarray(batch.loss_mask)[:, 1:]],
        np.asarray(ref)[np.asarray(batch.loss_mask)[:, 1:]],
        atol=1e-5,
    )


@pytest.mark.parametrize("kind", ["grpo", "sft"])
def test_packed_gradients_and_metrics_equal_unpacked(kind):
    params = random_params(CONFIG, 1)
    batch = random_batch(16, seed=7, with_ref=True)
    loss = LossConfig(kind=kind, kl_coef=0.01 if kind == "grpo" else 0.0, entropy_coef=0.0)
    config = LearnerConfig(loss=loss, compute_entropy=True)
    packed = pack_conversations(batch, 32)
    assert packed.num_rows < batch.num_rows
    g0, m0 = accumulate_gradients(params, batch, model_config=CONFIG, config=config)
    g1, m1 = accumulate_gradients(params, packed, model_config=CONFIG, config=config)
    tree_close(g1, g0, rtol=1e-4, atol=1e-6)
    for name in m0:
        np.testing.assert_allclose(float(m1[name]), float(m0[name]), rtol=1e-4, atol=1e-6, err_msg=name)


def test_packed_train_steps_follow_the_unpacked_ones():
    params = random_params(CONFIG, 2)
    config = LearnerConfig(
        loss=LossConfig(kind="grpo", kl_coef=0.01), num_minibatches=2, optimizer=OptimizerConfig(learning_rate=1e-3)
    )
    batch = random_batch(16, seed=9, rows_multiple=2, with_ref=True)
    packed = pack_conversations(batch, 40, rows_multiple=2)
    # Two mini-batches: packing moves conversations between them, so compare one mini-batch of whole rows: the
    # packed rows' conversations, unpacked, in their own batch.
    learner = Learner(CONFIG, config)
    s_packed, m_packed = learner.train_step(learner.init_state(jax.tree.map(jnp.copy, params)), packed)
    assert m_packed["updates"] == 2 and m_packed["real_tokens"] == np.asarray(batch.token_mask).sum()
    one = Learner(CONFIG, LearnerConfig(loss=config.loss, optimizer=config.optimizer))
    s_a, _ = one.train_step(one.init_state(jax.tree.map(jnp.copy, params)), pack_conversations(batch, 40))
    s_b, _ = one.train_step(one.init_state(jax.tree.map(jnp.copy, params)), batch)
    tree_close(s_a.params, s_b.params, rtol=1e-4, atol=1e-6)
    with pytest.raises(LearnerConfigError, match="token-mean"):
        bad = Learner(CONFIG, LearnerConfig(loss=LossConfig(kind="grpo", aggregation="seq-mean-token-mean")))
        bad.train_step(bad.init_state(params), packed)
