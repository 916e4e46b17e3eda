"""GRPO / SFT losses vs an independent NumPy hand computation (plain loops), and the chunked log-prob helper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memagent_jax.models import abstract_params, forward, positions_from_mask
from memagent_jax.models.presets import preset_config
from memagent_jax.rl.logprobs import token_logprobs
from memagent_jax.rl.losses import LossConfig, LossConfigError, aggregate, entropy_from_logits, policy_loss, sft_loss

T = 9
# (advantage, first response position, ratios of the response tokens). Chosen to hit every case with
# clip_low = 0.2, dual clip c = 3 and clip_high = 0.2 (or 0.28):
#   row 0, A > 0: r = 1.5 and 1.25 hit the high clip (1.25 only for clip_high 0.2), r = 0.5 stays unclipped.
#   row 1, A < 0: r = 0.7 hits the low clip, r = 4.0 and 3.5 hit the dual clip, r = 2.0 is above 1 + eps_high
#                 but below c (unclipped), r = 0.9 / 1.1 are inside the trust region.
#   row 2, A > 0: a single token.
#   row 3, A < 0: r = 0.85 inside, r = 0.6 hits the low clip.
#   row 4: a padding row (no tokens at all).
ROWS = [
    (1.0, 3, [1.0, 1.5, 0.5, 1.25, 1.1]),
    (-0.5, 2, [0.7, 4.0, 2.0, 0.9, 1.1, 3.5]),
    (0.3, 6, [1.02]),
    (-2.0, 1, [0.85, 0.6]),
    (0.0, None, []),
]


def _make_batch(seed=0):
    rng = np.random.default_rng(seed)
    n = len(ROWS)
    # Garbage everywhere first, so masked positions hold values that would change any sum that used them.
    old = rng.uniform(-30.0, 30.0, size=(n, T)).astype(np.float32)
    logp = rng.uniform(-30.0, 30.0, size=(n, T)).astype(np.float32)
    ref = rng.uniform(-30.0, 30.0, size=(n, T)).astype(np.float32)
    entropy = rng.uniform(0.0, 50.0, size=(n, T)).astype(np.float32)
    mask = np.zeros((n, T), bool)
    adv = np.zeros((n,), np.float32)
    for i, (a, start, ratios) in enumerate(ROWS):
        adv[i] = a
        for j, r in enumerate(ratios):
            t = start + j
            mask[i, t] = True
            old[i, t] = rng.uniform(-5.0, -0.1)
            logp[i, t] = old[i, t] + np.log(r)
            ref[i, t] = logp[i, t] + rng.uniform(-0.5, 0.5)
            entropy[i, t] = rng.uniform(0.5, 3.0)
    return dict(logp=logp, old=old, ref=ref, entropy=entropy, mask=mask, adv=adv)


def _reference(b, *, clip_low, clip_high, dual, kl_coef, ent_coef, aggregation):
    """Loss, metrics and d loss / d logp by hand, one token at a time."""
    n = b["mask"].shape[0]
    per_tok, kl_tok, d_tok, flags = {}, {}, {}, {"low": 0, "high": 0, "dual": 0}
    ratios, k3_old = [], []
    for i in range(n):
        a = float(b["adv"][i])
        for t in range(T):
            if not b["mask"][i, t]:
                continue
            lp, old, ref = float(b["logp"][i, t]), float(b["old"][i, t]), float(b["ref"][i, t])
            r = np.exp(lp - old)
            ratios.append(r)
            unclipped = -a * r
            clipped = -a * min(max(r, 1 - clip_low), 1 + clip_high)
            loss = max(unclipped, clipped)
            grad = -a * r if unclipped >= clipped else 0.0  # d loss / d logp (d r / d logp = r)
            if a < 0 and r < 1 - clip_low:
                flags["low"] += 1
            if a > 0 and r > 1 + clip_high:
                flags["high"] += 1
            if dual is not None and a < 0 and loss > -dual * a:
                loss, grad = -dual * a, 0.0
                flags["dual"] += 1
            d = ref - lp
            per_tok[i, t] = loss
            kl_tok[i, t] = np.exp(d) - d - 1
            d_tok[i, t] = grad + kl_coef * (1 - np.exp(d))
            k3_old.append(np.exp(old - lp) - (old - lp) - 1)
    ntok = len(per_tok)
    rows_with = [i for i in range(n) if b["mask"][i].any()]

    def agg(values):
        if aggregation == "token-mean":
            return sum(values.values()) / ntok
        total = 0.0
        for i in rows_with:
            toks = [v for (r, _), v in values.items() if r == i]
            total += sum(toks) / len(toks)
        return total / len(rows_with)

    ent_tok = {k: float(b["entropy"][k]) for k in per_tok}
    pg, kl, ent = agg(per_tok), agg(kl_tok), agg(ent_tok)
    grad = np.zeros((n, T))
    for (i, t), g in d_tok.items():
        if aggregation == "token-mean":
            grad[i, t] = g / ntok
        else:
            grad[i, t] = g / b["mask"][i].sum() / len(rows_with)
    metrics = dict(
        loss=pg + kl_coef * kl - ent_coef * ent,
        pg_loss=pg,
        kl=kl,
        entropy=ent,
        clipfrac_low=flags["low"] / ntok,
        clipfrac_high=flags["high"] / ntok,
        clipfrac_dual=flags["dual"] / ntok,
        ratio_mean=sum(ratios) / ntok,
        ratio_max=max(ratios),
        approx_kl_old=sum(k3_old) / ntok,
        response_tokens=ntok,
    )
    return metrics, grad


CASES = [
    dict(clip_low=0.2, clip_high=0.2, dual=3.0, kl_coef=0.001, ent_coef=0.0, aggregation="token-mean"),
    dict(clip_low=0.2, clip_high=0.28, dual=3.0, kl_coef=0.1, ent_coef=0.01, aggregation="token-mean"),
    dict(clip_low=0.2, clip_high=0.2, dual=None, kl_coef=0.0, ent_coef=0.0, aggregation="token-mean"),
    dict(clip_low=0.2, clip_high=0.28, dual=3.0, kl_coef=0.05, ent_coef=0.0, aggregation="seq-mean-token-mean"),
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: f"ch{c['clip_high']}-dual{c['dual']}-kl{c['kl_coef']}-{c['aggregation']}"
)
def test_policy_loss_matches_hand_computation(case):
    b = _make_batch()
    config = LossConfig(
        clip_low=case["clip_low"],
        clip_high=case["clip_high"],
        dual_clip=case["dual"],
        kl_coef=case["kl_coef"],
        entropy_coef=case["ent_coef"],
        aggregation=case["aggregation"],
    )
    want, want_grad = _reference(b, **case)

    def loss_fn(logp):
        return policy_loss(
            logp, b["old"], b["adv"], b["mask"], config=config, ref_logprobs=b["ref"], entropy=b["entropy"]
        )

    (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(b["logp"]))
    np.testing.assert_allclose(float(loss), want["loss"], rtol=1e-5, atol=1e-6)
    for name, value in want.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-6)
    # Every clip case really occurs in this batch (so the test can fail on each of them).
    assert want["clipfrac_low"] > 0 and want["clipfrac_high"] > 0
    if case["dual"] is not None:
        assert want["clipfrac_dual"] > 0


def test_asymmetric_clip_changes_only_the_high_side():
    b = _make_batch()
    args = (jnp.asarray(b["logp"]), b["old"], b["adv"], b["mask"])
    _, m20 = policy_loss(*args, config=LossConfig(clip_high=0.2, kl_coef=0.0))
    _, m28 = policy_loss(*args, config=LossConfig(clip_high=0.28, kl_coef=0.0))
    # r = 1.25 (row 0) is clipped at 0.2 but not at 0.28; nothing else changes.
    ntok = b["mask"].sum()
    np.testing.assert_allclose(float(m20["clipfrac_high"]) - float(m28["clipfrac_high"]), 1 / ntok, rtol=1e-6)
    assert float(m20["clipfrac_low"]) == float(m28["clipfrac_low"])


def test_masked_positions_do_not_matter():
    b = _make_batch(seed=1)
    config = LossConfig(kl_coef=0.1, entropy_coef=0.01)
    args = dict(config=config)
    loss_a, _ = policy_loss(
        b["logp"], b["old"], b["adv"], b["mask"], ref_logprobs=b["ref"], entropy=b["entropy"], **args
    )
    noisy = {k: np.where(b["mask"], b[k], b[k] + 17.0) for k in ("logp", "old", "ref", "entropy")}
    loss_b, _ = policy_loss(
        noisy["logp"], noisy["old"], b["adv"], b["mask"], ref_logprobs=noisy["ref"], entropy=noisy["entropy"], **args
    )
    assert float(loss_a) == float(loss_b)


def test_micro_batch_denominators_sum_to_the_full_loss():
    b = _make_batch()
    for aggregation in ("token-mean", "seq-mean-token-mean"):
        config = LossConfig(kl_coef=0.05, aggregation=aggregation)
        full, _ = policy_loss(b["logp"], b["old"], b["adv"], b["mask"], config=config, ref_logprobs=b["ref"])
        tok = b["mask"].sum()
        seq = b["mask"].any(axis=1).sum()
        parts = 0.0
        for rows in ([0, 3], [1], [2, 4]):
            part, _ = policy_loss(
                b["logp"][rows],
                b["old"][rows],
                b["adv"][rows],
                b["mask"][rows],
                config=config,
                ref_logprobs=b["ref"][rows],
                token_denominator=tok,
                seq_denominator=seq,
            )
            parts += float(part)
        np.testing.assert_allclose(parts, float(full), rtol=1e-6)


def test_sft_loss_is_mean_nll():
    b = _make_batch()
    loss, metrics = sft_loss(jnp.asarray(b["logp"]), b["mask"], config=LossConfig(kind="sft"))
    nll = [-float(b["logp"][i, t]) for i in range(len(ROWS)) for t in range(T) if b["mask"][i, t]]
    np.testing.assert_allclose(float(loss), sum(nll) / len(nll), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["response_tokens"]), len(nll))


def test_aggregate_and_entropy_by_hand():
    x = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = np.array([[False, True, True], [True, False, False]])
    assert float(aggregate(x, mask)) == pytest.approx((2 + 3 + 4) / 3)
    assert float(aggregate(x, mask, mode="seq-mean-token-mean")) == pytest.approx(((2 + 3) / 2 + 4) / 2)
    logits = np.array([[0.0, 1.0, -2.0, 0.5], [3.0, 3.0, 3.0, 3.0]])
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    want = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(np.asarray(entropy_from_logits(logits)), want, rtol=1e-6)


@pytest.mark.parametrize(
    "changes, match",
    [
        pytest.param(dict(clip_low=1.0), "loss.clip_low", id="clip-low-1"),
        pytest.param(dict(clip_high=-0.1), "loss.clip_high", id="negative-clip-high"),
        pytest.param(dict(dual_clip=1.0), "loss.dual_clip", id="dual-clip-1"),
        pytest.param(dict(aggregation="sum"), "loss.aggregation", id="unknown-aggregation"),
        pytest.param(dict(kind="ppo"), "loss.kind", id="unknown-kind"),
    ],
)
def test_loss_config_errors_name_the_field(changes, match):
    with pytest.raises(LossConfigError, match=match):
        LossConfig(**changes)


def test_kl_without_reference_logprobs_names_the_argument():
    b = _make_batch()
    with pytest.raises(LossConfigError, match="ref_logprobs"):
        policy_loss(b["logp"], b["old"], b["adv"], b["mask"], config=LossConfig(kl_coef=0.1))


def _random_params(config, seed):
    """Random params straight from NumPy (no init compile): small matrices, norm weights near 1."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        name = jax.tree_util.keystr(path)
        noise = rng.normal(size=a.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.1 * noise if "norm" in name else 0.05 * noise, a.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(config))


def test_token_logprobs_match_full_logits():
    config = preset_config("tiny", vocab_size=97)
    params = _random_params(config, 3)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 97, size=(3, 11)).astype(np.int32)
    mask = np.ones((3, 11), bool)
    mask[1, 7:] = False
    mask[2, 4:] = False
    logits, _ = jax.jit(lambda p: forward(p, tokens, positions_from_mask(mask), mask, config=config))(params)
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    probs = np.exp(logits - lse[..., None])
    for chunk in (0, 4, 5):  # one chunk, chunks dividing T + 1 ... and a ragged last chunk
        logp, ent = map(
            np.asarray,
            jax.jit(lambda p: token_logprobs(p, tokens, mask, config=config, chunk_size=chunk, with_entropy=True))(
                params
            ),
        )
        for i in range(3):
            assert logp[i, 0] == 0.0 and ent[i, 0] == 0.0
            for t in range(1, int(mask[i].sum())):
                want = logits[i, t - 1, tokens[i, t]] - lse[i, t - 1]
                assert logp[i, t] == pytest.approx(want, abs=1e-4), (chunk, i, t)
                want_ent = -(probs[i, t - 1] * np.log(probs[i, t - 1])).sum()
                assert ent[i, t] == pytest.approx(want_ent, abs=1e-4), (chunk, i, t)


def test_token_logprobs_in_a_response_window_equal_the_whole_row():
    """The head run only over W positions from each row's response: the same log-probs and entropies there (and in
    the gradient of a loss over them), 0 elsewhere; rows of different prompt and response lengths, one with none."""
    config = preset_config("tiny", vocab_size=97)
    params = _random_params(config, 4)
    rng = np.random.default_rng(1)
    t = 24
    tokens = rng.integers(0, 97, size=(4, t)).astype(np.int32)
    real = [24, 17, 9, 12]  # real tokens per row (right padding)
    first = [18, 10, 3, 12]  # first response token (row 3: no response)
    mask = np.arange(t)[None, :] < np.asarray(real)[:, None]
    loss_mask = mask & (np.arange(t)[None, :] >= np.asarray(first)[:, None])
    start = jnp.argmax(jnp.asarray(loss_mask), axis=-1)
    weights = jnp.asarray(rng.normal(size=(4, t)).astype(np.float32)) * loss_mask

    def run(p, window, chunk):
        kw = dict(response_start=start, response_window=window) if window else {}
        return token_logprobs(p, tokens, mask, config=config, chunk_size=chunk, with_entropy=True, **kw)

    def loss(p, window, chunk):
        logp, ent = run(p, window, chunk)
        return jnp.sum(weights * (logp + 0.5 * ent))

    full_lp, full_ent = map(np.asarray, jax.jit(lambda p: run(p, 0, 0))(params))
    full_grad = jax.jit(jax.grad(lambda p: loss(p, 0, 0)))(params)
    for window, chunk in ((8, 0), (8, 3), (16, 5)):
        lp, ent = map(np.asarray, jax.jit(lambda p: run(p, window, chunk))(params))
        inside = (np.arange(t)[None, :] >= np.asarray(first)[:, None]) & (
            np.arange(t)[None, :] < np.asarray(first)[:, None] + window
        )
        inside[3] = np.arange(t) < window  # no response: argmax gives 0, the window covers positions 1..W-1
        inside[:, 0] = False
        np.testing.assert_allclose(lp[inside], full_lp[inside], atol=1e-5)
        np.testing.assert_allclose(ent[inside], full_ent[inside], atol=1e-5)
        assert np.all(lp[~inside] == 0) and np.all(ent[~inside] == 0)
        assert np.all(inside[loss_mask])  # every response token is in the window
        grad = jax.jit(jax.grad(lambda p: loss(p, window, chunk)))(params)
        for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(grad)[0], jax.tree.leaves(full_grad)):
            w = np.asarray(w)
            np.testing.assert_allclose(
                np.asarray(g), w, rtol=0, atol=1e-5 * np.abs(w).max(), err_msg=jax.tree_util.keystr(path)
            )
