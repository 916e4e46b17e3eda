"""A hand-wired induction circuit as the starting point of a tiny model trained from scratch.

A memory agent answers "what is the word for <key>?" by finding, in a chunk that holds several look-alike facts,
the one whose key is the asked one. A transformer does that with an *induction circuit*: a head in one layer that
copies each token's predecessor into its position, and a head in a later layer whose query is the current token
and whose keys are those copied predecessors, so it attends to the token that followed an earlier occurrence of
the current token and copies it ("... osprey Gal ... osprey" -> "Gal"). Pretrained LLMs have such heads; a tiny
model trained from random weights on a CPU budget does not find them (benchmarks/probe_key_matching.py: chance
after 2,500 updates). `wire_induction_heads` writes one such circuit into freshly initialised parameters, so the
main job's tiny model starts where a pretrained model would, and SFT and RL teach it what to do with it.

The circuit (L >= 2 layers, K >= 2 KV heads, hidden >= 2 * head_dim). The other attention heads of layers 0 and 1
start at zero (silent until training grows them); deeper layers and all MLPs keep their random init, the MLPs'
output scaled down so they do not drown the circuit at the start:

  residual stream  token embeddings use the first D - Dh dims; the last Dh dims carry "the previous token".
                   Every token's code in the subspace the matching head compares gets the same norm, so each
                   token matches itself more strongly than any other (a random short code would lose to a
                   longer look-alike, and the notes would keep a look-alike creature's word).
  layer 0, head 0  previous-token head: zero q/k projections and q/k biases whose rotary phases differ by one
                   position, so its score depends only on the distance and peaks at t - 1; its values are a
                   random projection R of the token embedding, written into the last Dh dims.
  layer 1, head G  (the first query head of KV group 1) token matching: its query is R applied to the current
                   token, its key reads the "previous token" dims; both live only in rotary pairs whose rotation
                   stays small over `max_distance` positions, so the match does not depend on where the pair is.
                   Its values copy the attended token's embedding (through a random projection and its
                   transpose) into the embedding dims, which the tied LM head reads.

Pure function of the parameter pytree (stacked layers, as `init_params` makes them); deterministic in `seed`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from memagent_jax.models.config import ModelConfig

__all__ = ["InductionWiringError", "wire_induction_heads"]


class InductionWiringError(ValueError):
    """The model's shape cannot hold the circuit."""


def _rotate(vec: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """RoPE's half-rotation of one [Dh] vector by per-pair angles [Dh / 2] (as `transformer.rotary_embedding`)."""
    half = vec.shape[0] // 2
    c, s = np.cos(angles), np.sin(angles)
    return np.concatenate([vec[:half] * c - vec[half:] * s, vec[half:] * c + vec[:half] * s])


def _equalise_match_norms(embed: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """`embed` [V, E] with each row's component in the column span of `basis` [E, M] rescaled so that every
    token's match code `basis.T @ row` has the mean norm (the rest of each row is unchanged).

    With random embeddings some tokens get short match codes; a short code matches itself weakly, so a look-alike
    key with a longer, partly aligned code can outscore the exact match. Equal norms make the exact match the
    strongest for every token: score(a, a) - score(a, b) = norm^2 * (1 - cos(a, b)) > 0.
    """
    codes = embed @ basis  # [V, M]
    norms = np.linalg.norm(codes, axis=1, keepdims=True)
    target = norms.mean()
    # Component of each row in span(basis): basis (basis^T basis)^-1 codes^T.
    coeffs = np.linalg.solve(basis.T @ basis, codes.T).T  # [V, M]
    parallel = coeffs @ basis.T  # [V, E]
    scale = target / np.maximum(norms, 1e-12)
    return embed - parallel + parallel * scale


def wire_induction_heads(
    params,
    config: ModelConfig,
    seed: int = 0,
    *,
    max_distance: int = 128,
    embed_std: float = 0.05,
    position_gain: float = 6.0,
    match_gain: float = 3.0,
    carry_gain: float = 0.08,
    copy_gain: float = 2.0,
    mlp_scale: float = 0.1,
    equal_match: bool = True,
):
    """`params` (stacked, from `init_params(config, ...)`) with the induction circuit of the module docstring.

    max_distance: the longest query-key distance (positions) the matching head must treat alike; rotary pairs
      that turn by more than 0.6 rad over it are left out of the match (at least 4 must remain: raise
      `rope.theta` if not). position_gain: sharpness of the previous-token head; match_gain, carry_gain,
      copy_gain: scales of the matching head's query, of the carried previous token and of the copy.
      embed_std: std of the token embeddings (tied: also the LM head's scale). mlp_scale: factor on every
      MLP's output projection. equal_match: give every token's embedding the same norm inside the subspace the
      matching head compares (see `_equalise_match_norms`).
    """
    c = config
    dh, half, d = c.head_dim, c.head_dim // 2, c.hidden_size
    if c.num_layers < 2 or c.num_kv_heads < 2 or d < 2 * dh or not c.tie_word_embeddings:
        raise InductionWiringError(
            f"the induction circuit needs >= 2 layers, >= 2 KV heads, hidden_size >= 2 * head_dim and tied "
            f"embeddings; got {c.num_layers} layers, {c.num_kv_heads} KV heads, hidden {d}, head_dim {dh}, "
            f"tie_word_embeddings={c.tie_word_embeddings}"
        )
    if not c.attention_bias:
        raise InductionWiringError("the previous-token head is made of q/k biases: needs attention_bias=True")
    inv_freq = np.asarray(c.rope.inverse_frequencies(dh), np.float64)
    flat = [i for i in range(half) if inv_freq[i] * max_distance < 0.6]
    if len(flat) < 4:
        raise InductionWiringError(
            f"only {len(flat)} rotary pairs turn by < 0.6 rad over {max_distance} positions "
            f"(rope theta {c.rope.theta}); raise rope.theta (e.g. 1e6)"
        )
    if inv_freq[0] < 0.5:
        raise InductionWiringError("the previous-token head needs a rotary pair turning by >= 0.5 rad per position")
    rng = np.random.default_rng(seed)
    p = jax.tree.map(lambda a: np.array(a, np.float32), params)
    de = d - dh  # embedding dims; the last dh dims carry the previous token
    group = c.num_heads // c.num_kv_heads  # query heads per KV head; head `group` is the first of KV group 1

    embed = np.zeros_like(p["embed"])
    embed[:, :de] = rng.normal(0.0, embed_std, (embed.shape[0], de))
    p["embed"] = embed
    carry = rng.normal(0.0, 1.0 / np.sqrt(de), (de, dh))
    dims = flat + [i + half for i in flat]  # the matching head's rotary dims
    if equal_match:
        embed[:, :de] = _equalise_match_norms(embed[:, :de], carry[:, : len(dims)])
    attn = p["layers"]["attn"]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_bias", "k_bias", "v_bias"):
        attn[name][:2] = 0.0  # layers 0 and 1: only the circuit's heads, every other head starts silent
    p["layers"]["mlp"]["down_proj"] *= mlp_scale

    # Layer 0, head 0: score(t, s) = sum_i w_i cos(theta_i (t - s - 1)), a peak at s = t - 1.
    k_vec = np.zeros(dh)
    k_vec[:4] = (1.0, 1.0, 0.7, 0.5)
    attn["k_bias"][0, 0] = position_gain * k_vec
    attn["q_bias"][0, 0] = position_gain * _rotate(k_vec, -inv_freq)
    attn["v_proj"][0, :de, 0, :] = carry
    attn["o_proj"][0, 0, :, de:] = carry_gain * np.eye(dh)

    # Layer 1, head `group` (KV group 1): query R(current token) . key (carried previous token), flat pairs only.
    for m, f in enumerate(dims):
        attn["q_proj"][1, :de, group, f] = match_gain * carry[:, m]
        attn["k_proj"][1, de + m, 1, f] = 1.0
    copy = rng.normal(0.0, 1.0 / np.sqrt(de), (de, dh))
    attn["v_proj"][1, :de, 1, :] = copy
    attn["o_proj"][1, group, :, :de] = copy_gain * copy.T
    return jax.tree.map(jnp.asarray, p)
