"""ConversationBatch: host-side builder layout, bucketing, row padding, and validation errors naming the field."""

import jax
import numpy as np
import pytest

from memagent_jax.rl.batch import (BatchError, ConversationBatch, build_conversation_batch, pad_rows, shuffle_rows,
                                   validate_batch)

PROMPTS = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
RESPONSES = [[20, 21], [22, 23, 24, 25], []]
LOGPS = [[-0.5, -1.5], [-0.1, -0.2, -0.3, -0.4], []]
ADV = [1.0, -0.5, 0.25]


def test_builder_layout():
    b = build_conversation_batch(PROMPTS, RESPONSES, LOGPS, ADV, length_multiple=4, rows_multiple=4, pad_id=0)
    assert b.tokens.shape == (4, 8) and b.tokens.dtype == np.int32  # longest 5 -> 8; 3 rows -> 4
    assert b.tokens[0].tolist() == [5, 6, 7, 20, 21, 0, 0, 0]
    assert b.token_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert b.loss_mask[0].tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    np.testing.assert_allclose(b.old_logprobs[0], [0, 0, 0, -0.5, -1.5, 0, 0, 0])
    assert b.tokens[1].tolist() == [8, 22, 23, 24, 25, 0, 0, 0]
    assert b.loss_mask[1].tolist() == [0, 1, 1, 1, 1, 0, 0, 0]
    assert not b.loss_mask[2].any() and b.token_mask[2].sum() == 5  # empty response
    assert not b.token_mask[3].any()  # padding row
    np.testing.assert_allclose(b.advantages, [1.0, -0.5, 0.25, 0.0])
    assert b.ref_logprobs is None
    assert b.num_response_tokens() == 6 and b.num_real_tokens() == 5 + 5 + 5
    # A pytree: leaves map through jax.tree (ref_logprobs None is an empty subtree).
    assert len(jax.tree.leaves(b)) == 5


def test_builder_errors_name_the_field():
    with pytest.raises(BatchError, match="response_logprobs\\[1\\]"):
        build_conversation_batch(PROMPTS, RESPONSES, [[-1.0, -1.0], [-1.0], []], ADV)
    with pytest.raises(BatchError, match="prompt_ids\\[0\\]: empty"):
        build_conversation_batch([[]] + PROMPTS[1:], RESPONSES, LOGPS, ADV)
    with pytest.raises(BatchError, match="advantages"):
        build_conversation_batch(PROMPTS, RESPONSES, LOGPS, ADV[:2])
    with pytest.raises(BatchError, match="max_length=4"):
        build_conversation_batch(PROMPTS, RESPONSES, LOGPS, ADV, max_length=4)
    with pytest.raises(BatchError, match="tokens: row 0"):
        build_conversation_batch(PROMPTS, RESPONSES, LOGPS, ADV, vocab_size=10)
    with pytest.raises(BatchError, match="old_logprobs: row 0 has a positive"):
        build_conversation_batch(PROMPTS, RESPONSES, [[0.5, -1.0], LOGPS[1], []], ADV)


def test_validate_catches_bad_layouts():
    b = build_conversation_batch(PROMPTS, RESPONSES, LOGPS, ADV, length_multiple=8)
    validate_batch(b)
    bad = b.loss_mask.copy()
    bad[0, 0] = True
    with pytest.raises(BatchError, match="loss_mask: row 0"):
        validate_batch(b.replace(loss_mask=bad))
    bad = b.token_mask.copy()
    bad[1, 1] = False  # a hole in the real tokens
    with pytest.raises(BatchError, match="token_mask: row 1"):
        validate_batch(b.replace(token_mask=bad, loss_mask=b.loss_mask & bad))
    bad = b.loss_mask.copy()
    bad[1, 2] = False  # response not contiguous
    with pytest.raises(BatchError, match="loss_mask: row 1"):
        validate_batch(b.replace(loss_mask=bad))
    with pytest.raises(BatchError, match="advantages: expected shape"):
        validate_batch(b.replace(advantages=np.zeros((2,), np.float32)))
    adv = b.advantages.copy()
    adv[2] = np.nan
    with pytest.raises(BatchError, match="advantages: row 2"):
        validate_batch(b.replace(advantages=adv))
    with pytest.raises(BatchError, match="token_mask: expected dtype bool"):
        validate_batch(b.replace(token_mask=b.token_mask.astype(np.int32)))


def test_shuffle_and_pad_rows_keep_rows_intact():
    b = build_conversation_batch(PROMPTS, RESPONSES, LOGPS, ADV, length_multiple=8)
    s = shuffle_rows(b, 3)
    assert sorted(map(tuple, s.tokens.tolist())) == sorted(map(tuple, b.tokens.tolist()))
    for i in range(3):
        j = [tuple(r) for r in b.tokens.tolist()].index(tuple(s.tokens[i].tolist()))
        assert s.advantages[i] == b.advantages[j] and (s.loss_mask[i] == b.loss_mask[j]).all()
    p = pad_rows(b, 8)
    assert p.num_rows == 8 and not p.token_mask[3:].any()
    validate_batch(p)
    assert isinstance(p, ConversationBatch)
