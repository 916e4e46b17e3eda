"""Group-relative advantages, dynamic-sampling filter and conversation broadcast vs plain NumPy loops."""

import numpy as np
import pytest

from memagent_jax.rl.advantages import broadcast_to_conversations, dynamic_sampling_mask, group_advantages

REWARDS = np.array(
    [
        [1.0, 0.0, 0.0, 1.0, 1.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],  # all equal: no signal
        [0.25, 1.0, 0.5, 0.0, 0.75],
        [1.0, 1.0, 1.0, 1.0, 1.0],  # all equal
    ],
    np.float64,
)


def _reference(rewards, normalize_std, leave_one_out, eps):
    q, g = rewards.shape
    out = np.zeros_like(rewards)
    for i in range(q):
        row = rewards[i]
        mean = sum(row) / g
        var = sum((x - mean) ** 2 for x in row) / (g - 1)
        for j in range(g):
            if leave_one_out:
                baseline = sum(row[k] for k in range(g) if k != j) / (g - 1)
            else:
                baseline = mean
            a = row[j] - baseline
            if normalize_std:
                a = a / (np.sqrt(var) + eps)
            out[i, j] = a
    return out


@pytest.mark.parametrize("normalize_std", [False, True])
@pytest.mark.parametrize("leave_one_out", [False, True])
def test_group_advantages_match_loops(normalize_std, leave_one_out):
    got = np.asarray(group_advantages(REWARDS, normalize_std=normalize_std, leave_one_out=leave_one_out, eps=1e-6))
    want = _reference(REWARDS, normalize_std, leave_one_out, 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Groups of identical rewards carry no signal in every mode (and no NaN from std = 0).
    assert np.all(got[1] == 0) and np.all(got[3] == 0)
    # Plain and leave-one-out advantages sum to zero over each group.
    np.testing.assert_allclose(got.sum(axis=1), 0.0, atol=1e-5)


def test_group_advantages_values_by_hand():
    # rewards [1, 0, 0, 1, 1]: mean 0.6 -> [0.4, -0.6, -0.6, 0.4, 0.4]; LOO scales by 5/4.
    got = np.asarray(group_advantages(REWARDS[:1]))
    np.testing.assert_allclose(got[0], [0.4, -0.6, -0.6, 0.4, 0.4], atol=1e-6)
    got = np.asarray(group_advantages(REWARDS[:1], leave_one_out=True))
    np.testing.assert_allclose(got[0], [0.5, -0.75, -0.75, 0.5, 0.5], atol=1e-6)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(np.ones((3, 1)), normalize_std=True)
    with pytest.raises(ValueError, match="eps"):
        group_advantages(REWARDS, eps=-1.0)
    # G = 1 without normalisation is allowed (advantage 0).
    assert np.all(np.asarray(group_advantages(np.ones((2, 1)))) == 0)


def test_dynamic_sampling_mask():
    keep = np.asarray(dynamic_sampling_mask(REWARDS))
    assert keep.tolist() == [True, False, True, False]
    near = np.array([[0.5, 0.5 + 1e-9], [0.0, 1.0]])
    assert np.asarray(dynamic_sampling_mask(near, atol=1e-6)).tolist() == [False, True]


def test_broadcast_to_conversations():
    traj_adv = np.array([0.5, -1.0, 2.0])
    # Trajectory 0 had 3 conversations (2 memory steps + final), 1 had 2, 2 had 1; -1 is a padding row.
    index = np.array([0, 0, 0, 1, 1, 2, -1])
    got = np.asarray(broadcast_to_conversations(traj_adv, index))
    want = [traj_adv[i] if i >= 0 else 0.0 for i in index]
    np.testing.assert_allclose(got, want)
    with pytest.raises(ValueError, match="trajectory_index"):
        broadcast_to_conversations(traj_adv, np.array([0, 3]))
    with pytest.raises(ValueError, match="trajectory_index"):
        broadcast_to_conversations(traj_adv, np.array([0.0, 1.0]))
