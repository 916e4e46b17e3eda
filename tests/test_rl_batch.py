"""ConversationBatch: host-side builder layout, bucketing, row padding, and validation errors naming the field."""

import jax
import numpy as np
import pytest

from memagent_jax.rl.batch import (
    BatchError,
    ConversationBatch,
    build_conversation_batch,
    pad_rows,
    shuffle_rows,
    validate_batch,
)

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


@pytest.mark.parametrize(
    "changes, match",
    [
        pytest.param(dict(response_logprobs=[[-1.0, -1.0], [-1.0], []]), r"response_logprobs\[1\]", id="logprob-count"),
        pytest.param(dict(prompt_ids=[[]] + PROMPTS[1:]), r"prompt_ids\[0\]: empty", id="empty-prompt"),
        pytest.param(dict(advantages=ADV[:2]), r"advantages", id="advantage-count"),
        pytest.param(dict(max_length=4), r"max_length=4", id="over-max-length"),
        pytest.param(dict(vocab_size=10), r"tokens: row 0", id="token-out-of-vocab"),
        pytest.param(
            dict(response_logprobs=[[0.5, -1.0], LOGPS[1], []]),
            r"old_logprobs: row 0 has a positive",
            id="positive-logprob",
        ),
    ],
)
def test_builder_errors_name_the_field(changes, match):
    kwargs = dict(prompt_ids=PROMPTS, response_ids=RESPONSES, response_logprobs=LOGPS, advantages=ADV) | changes
    with pytest.raises(BatchError, match=match):
        build_conversation_batch(**kwargs)


def _set(field, index, value):
    """A change to a valid batch: `field` with `value` written at `index`."""

    def change(b):
        a = getattr(b, field).copy()
        a[index] = value
        return {field: a}

    return change


def _hole_in_row_1(b):  # a real token missing inside row 1's prompt
    bad = b.token_mask.copy()
    bad[1, 1] = False
    return dict(token_mask=bad, loss_mask=b.loss_mask & bad)


@pytest.mark.parametrize(
    "change, match",
    [
        pytest.param(_set("loss_mask", (0, 0), True), "loss_mask: row 0", id="loss-on-position-0"),
        pytest.param(_hole_in_row_1, "token_mask: row 1", id="hole-in-real-tokens"),
        pytest.param(_set("loss_mask", (1, 2), False), "loss_mask: row 1", id="response-not-contiguous"),
        pytest.param(
            lambda b: dict(advantages=np.zeros((2,), np.float32)), "advantages: expected shape", id="advantages-shape"
        ),
        pytest.param(_set("advantages", 2, np.nan), "advantages: row 2", id="nan-advantage"),
        pytest.param(
            lambda b: dict(token_mask=b.token_mask.astype(np.int32)),
            "token_mask: expected dtype bool",
            id="token-mask-dtype",
        ),
    ],
)
def test_validate_catches_bad_layouts(change, match):
    b = build_conversation_batch(PROMPTS, RESPONSES, LOGPS, ADV, length_multiple=8)
    validate_batch(b)
    with pytest.raises(BatchError, match=match):
        validate_batch(b.replace(**change(b)))


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
