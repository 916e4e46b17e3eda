"""Group-relative advantages (GRPO), dynamic-sampling filter, broadcast to conversations.

Pure functions on `jax.numpy` (NumPy inputs are accepted; results are JAX arrays). Shapes: Q questions (groups),
G trajectories per question (the group size), N conversations, T tokens.

One trajectory = one scalar reward = one scalar advantage, shared by every conversation (chunk step or final
step) of that trajectory, and by every response token of those conversations.

    plain:          A_i = r_i - mean_j r_j
    leave-one-out:  A_i = r_i - mean_{j != i} r_j  = G / (G - 1) * (r_i - mean_j r_j)
    std-normalised: A_i / (std_j r_j + eps), std with Bessel's correction (ddof = 1)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["group_advantages", "dynamic_sampling_mask", "broadcast_to_conversations"]


def group_advantages(
    rewards, *, normalize_std: bool = False, leave_one_out: bool = False, eps: float = 1e-6
) -> jax.Array:
    """Group-relative advantage of every trajectory.

    Args:
      rewards: [Q, G] (or [..., G]) rewards, one per trajectory; the last axis is the group.
      normalize_std: divide by the group's standard deviation (ddof = 1) plus `eps`.
      leave_one_out: baseline is the mean of the *other* G - 1 rewards of the group instead of the group mean.
      eps: added to the standard deviation (a group of equal rewards gets advantage 0, not NaN).
    Returns:
      [Q, G] f32 advantages. A group whose rewards are all equal gets all zeros in every mode.
    """
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim < 1:
        raise ValueError("rewards: expected shape [..., G], got a scalar")
    g = r.shape[-1]
    if g < 1:
        raise ValueError("rewards: empty group (G = 0)")
    if (leave_one_out or normalize_std) and g < 2:
        raise ValueError(f"rewards: leave_one_out / normalize_std need a group size G >= 2, got G = {g}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    centred = r - jnp.mean(r, axis=-1, keepdims=True)
    adv = centred * (g / (g - 1)) if leave_one_out else centred
    if normalize_std:
        std = jnp.std(r, axis=-1, keepdims=True, ddof=1)
        adv = adv / (std + eps)
    return adv


def dynamic_sampling_mask(rewards, *, atol: float = 0.0) -> jax.Array:
    """Which groups to keep under DAPO dynamic sampling: those whose rewards are not all equal.

    rewards: [Q, G]. Returns [Q] bool, True where max - min > atol (a group of identical rewards has zero
    advantage everywhere and so no gradient signal).
    """
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim < 1:
        raise ValueError("rewards: expected shape [..., G], got a scalar")
    return (jnp.max(r, axis=-1) - jnp.min(r, axis=-1)) > atol


def broadcast_to_conversations(trajectory_advantages, trajectory_index) -> jax.Array:
    """The advantage of each conversation, taken from its trajectory.

    Args:
      trajectory_advantages: [num_trajectories] (e.g. `group_advantages(...).reshape(-1)`).
      trajectory_index: [N] int, the trajectory each conversation belongs to; -1 marks a padding conversation
        (advantage 0).
    Returns:
      [N] f32 advantages.
    Raises:
      ValueError if a (concrete, host-known) index is out of range.
    """
    adv = jnp.asarray(trajectory_advantages, jnp.float32).reshape(-1)
    idx = trajectory_index
    if not isinstance(idx, jax.core.Tracer):
        idx_np = np.asarray(idx)
        if idx_np.ndim != 1:
            raise ValueError(f"trajectory_index: expected shape [N], got {idx_np.shape}")
        if not np.issubdtype(idx_np.dtype, np.integer):
            raise ValueError(f"trajectory_index: expected integers, got dtype {idx_np.dtype}")
        bad = (idx_np < -1) | (idx_np >= adv.shape[0])
        if bad.any():
            raise ValueError(
                f"trajectory_index: entry {int(np.nonzero(bad)[0][0])} = {int(idx_np[bad][0])} is "
                f"outside [-1, {adv.shape[0]})"
            )
    idx = jnp.asarray(idx, jnp.int32)
    return jnp.where(idx >= 0, adv[jnp.clip(idx, 0, None)], 0.0)
