"""The reference recipe's RL details as options, each against a hand computation: per-token KL clamp, warm-up from
lr 0, old log-probs recomputed by the learner, centre truncation of training documents; and the recipe configs
that switch them on."""

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_rl_learner import CONFIG, random_batch, random_params

from memagent_jax.agent.chunking import centre_truncate
from memagent_jax.rl.learner import (
    Learner,
    LearnerConfig,
    LearnerConfigError,
    OptimizerConfig,
    learning_rate_schedule,
    minibatch_rows,
)
from memagent_jax.rl.losses import LossConfig, LossConfigError, k3_kl, policy_loss

ROOT = os.path.join(os.path.dirname(__file__), "..")


def load_config(name, arg=""):
    module = importlib.import_module(f"memagent_jax.configs.{name[:-3]}")
    return module.get_config(arg) if arg else module.get_config()


# ---------------------------------------------------------------------------------------------- KL clamp


def test_k3_kl_clamp_by_hand():
    logp = jnp.array([[-1.0, -2.0, -0.5, -3.0]])
    ref = jnp.array([[-1.0, 1.0, -0.6, -1.0]])  # d = ref - logp = 0, 3, -0.1, 2
    k3 = [0.0, math.exp(3) - 4, math.exp(-0.1) + 0.1 - 1, math.exp(2) - 3]  # 0, 16.0855, 0.0048374, 4.3891
    np.testing.assert_allclose(k3_kl(logp, ref)[0], k3, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(k3_kl(logp, ref, value_clamp=10.0)[0], [0.0, 10.0, k3[2], k3[3]], rtol=1e-6, atol=1e-7)

    mask = jnp.array([[True, True, True, False]])  # the last token is not a response token
    zeros = jnp.zeros((1,))  # advantage 0: the loss is kl_coef * KL only
    for clamp, kl_tokens, grads in (
        (None, [k3[0], k3[1], k3[2]], [0.0, -(math.exp(3) - 1), -(math.exp(-0.1) - 1)]),
        (10.0, [0.0, 10.0, k3[2]], [0.0, 0.0, -(math.exp(-0.1) - 1)]),
    ):  # clamped token: no gradient
        cfg = LossConfig(kl_coef=0.5, kl_clamp=clamp, dual_clip=None)

        def loss(lp):
            return policy_loss(lp, lp, zeros, mask, config=cfg, ref_logprobs=ref)

        value, metrics = loss(logp)
        assert float(metrics["kl"]) == pytest.approx(sum(kl_tokens) / 3, rel=1e-6)
        assert float(value) == pytest.approx(0.5 * sum(kl_tokens) / 3, rel=1e-6)
        # d k3 / d logp = -(e^d - 1); the pg term is 0 (A = 0); token mean over 3 response tokens.
        grad = jax.grad(lambda lp: loss(lp)[0])(logp)
        np.testing.assert_allclose(grad[0], [0.5 * g / 3 for g in grads] + [0.0], rtol=1e-5, atol=1e-7)
    assert LossConfig(kl_clamp=0.0).kl_clamp is None  # 0 = no clamp, as the configs write it
    for bad in (-1.0, float("inf"), True):
        with pytest.raises(LossConfigError, match="loss.kl_clamp"):
            LossConfig(kl_clamp=bad)


# -------------------------------------------------------------------------------------------- warm-up


def test_warmup_from_zero_by_hand():
    lr, w = 1e-3, 4
    default = learning_rate_schedule(OptimizerConfig(learning_rate=lr, warmup_steps=w))
    zero = learning_rate_schedule(OptimizerConfig(learning_rate=lr, warmup_steps=w, warmup_from_zero=True))
    steps = jnp.arange(7)
    np.testing.assert_allclose(default(steps), [lr * x for x in (0.25, 0.5, 0.75, 1, 1, 1, 1)], rtol=1e-6)
    np.testing.assert_allclose(zero(steps), [lr * x for x in (0.0, 0.25, 0.5, 0.75, 1, 1, 1)], rtol=1e-6)
    cos = learning_rate_schedule(
        OptimizerConfig(learning_rate=1.0, warmup_steps=2, warmup_from_zero=True, schedule="cosine", total_steps=6)
    )
    # warm-up 0, 0.5; then cosine over steps 2..6: 0.5 * (1 + cos(pi * (s - 2) / 4))
    np.testing.assert_allclose(
        cos(steps),
        [0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0],
        atol=1e-6,
    )
    with pytest.raises(LearnerConfigError, match="optimizer.warmup_from_zero must be True or False"):
        OptimizerConfig(warmup_from_zero="yes")


# ------------------------------------------------------- warm-up from 0 + recomputed old log-probs, in the learner


@pytest.fixture(scope="module")
def two_steps():
    """Two learners, 2 mini-batches each, warm-up from 0 over 2 steps (lr 0, then lr / 2), two train steps on the
    same batch: 'recompute' gets deliberately wrong stored old log-probs and recomputes them; 'given' gets the
    initial params' log-probs (the params do not move at lr 0, so they are right for both steps) and trusts them."""
    batch = random_batch(8, 6)
    params = random_params(CONFIG, 2)
    logps = np.asarray(Learner(CONFIG, LearnerConfig(logits_chunk_size=0)).logprobs(params, batch))
    batches = {
        "recompute": batch.replace(old_logprobs=np.where(batch.loss_mask, logps - 0.7, 0.0).astype(np.float32)),
        "given": batch.replace(old_logprobs=np.where(batch.loss_mask, logps, 0.0).astype(np.float32)),
    }
    opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, warmup_from_zero=True)
    out = {"batch": batch, "params0": jax.tree.map(np.asarray, params)}
    for name, b in batches.items():
        config = LearnerConfig(
            loss=LossConfig(kl_coef=0.0),
            num_minibatches=2,
            recompute_old_logprobs=name == "recompute",
            logits_chunk_size=0,
            compute_entropy=False,
            optimizer=opt,
        )
        learner = Learner(CONFIG, config)
        state = learner.init_state(random_params(CONFIG, 2))
        state, m0 = learner.train_step(state, b)
        after0 = jax.tree.map(np.asarray, state.params)
        mu = jax.tree.map(np.asarray, state.opt_state[1].inner_state[0].mu)
        state, m1 = learner.train_step(state, b)
        out[name] = dict(m0=m0, m1=m1, after0=after0, mu=mu, after1=jax.tree.map(np.asarray, state.params))
    return out


def test_warmup_from_zero_first_step_moves_nothing(two_steps):
    """Step 0 at lr 0: params stay bit for bit (AdamW's decay is scaled by the lr too) while Adam's moments take the
    first gradients; step 1 runs at lr / W and moves them."""
    r = two_steps["recompute"]
    assert r["m0"]["learning_rate"] == 0.0 and r["m1"]["learning_rate"] == pytest.approx(1e-2 / 2, rel=1e-6)
    for a, b in zip(jax.tree.leaves(two_steps["params0"]), jax.tree.leaves(r["after0"])):
        np.testing.assert_array_equal(a, b)
    assert any(np.abs(x).max() > 0 for x in jax.tree.leaves(r["mu"]))
    assert any(
        not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(two_steps["params0"]), jax.tree.leaves(r["after1"]))
    )


def test_recompute_old_logprobs_by_hand(two_steps):
    """The stored old log-probs are off by 0.7 per token. Recomputed, step 0 (params unmoved) is exactly on-policy
    in both mini-batches: ratio 1 on every token, nothing clipped, and pg_loss = mean over the 2 mini-batches of
    -(sum_rows A_r * n_r) / N_mb (token-mean of -A * 1)."""
    batch, m0 = two_steps["batch"], two_steps["recompute"]["m0"]
    n_r = batch.loss_mask.sum(axis=1)
    per_mb = [
        -(batch.advantages[rows] * n_r[rows]).sum() / n_r[rows].sum() for rows in minibatch_rows(8, 2, 1).reshape(2, -1)
    ]
    assert m0["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and m0["ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert m0["clipfrac_low"] == 0 and m0["clipfrac_high"] == 0
    assert m0["approx_kl_old"] == pytest.approx(0.0, abs=1e-7)
    assert m0["pg_loss"] == pytest.approx(float(np.mean(per_mb)), rel=1e-5, abs=1e-7)


def test_recompute_uses_the_params_before_the_first_update_for_every_minibatch(two_steps):
    """Step 1 (lr > 0): mini-batch 1 runs after mini-batch 0's update, and its old log-probs are still those of the
    params before the step's first update (computed once, as in the reference): the recomputing learner equals the
    one fed those log-probs, update for update."""
    r, g = two_steps["recompute"], two_steps["given"]
    for a, b in zip(jax.tree.leaves(r["after1"]), jax.tree.leaves(g["after1"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for name in ("loss", "pg_loss", "ratio_mean", "grad_norm"):
        assert r["m1"][name] == pytest.approx(g["m1"][name], rel=1e-5, abs=1e-7), name
    assert r["m1"]["ratio_mean"] != pytest.approx(1.0, abs=1e-6)  # mini-batch 1 is off-policy after the update


def test_one_update_per_step_reads_its_own_logprobs_as_the_old_ones():
    """One mini-batch (2 micro-batches), KL to a reference: with recompute on, the stored old log-probs (off by
    0.7 per token) are never read, and the step equals one fed the log-probs of a separate pass (recompute off),
    over two steps; its ratio is exactly 1."""
    batch = random_batch(8, 7)
    params = random_params(CONFIG, 3)
    logps = np.asarray(Learner(CONFIG, LearnerConfig(logits_chunk_size=0)).logprobs(params, batch))
    wrong = batch.replace(old_logprobs=np.where(batch.loss_mask, logps - 0.7, 0.0).astype(np.float32))
    base = LearnerConfig(
        loss=LossConfig(kl_coef=0.05, clip_high=0.1),
        micro_batch_size=4,
        logits_chunk_size=0,
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=0, eps=1e-4),
    )
    runs = {}
    for name in ("own", "given"):
        learner = Learner(CONFIG, base.replace(recompute_old_logprobs=name == "own"))
        ref = learner.copy_params(random_params(CONFIG, 4))
        state = learner.init_state(random_params(CONFIG, 3))
        metrics = []
        for _ in range(2):
            if name == "given":  # the params' log-probs now, from a pass of their own
                now = np.asarray(learner.logprobs(state.params, batch))
                b = batch.replace(old_logprobs=np.where(batch.loss_mask, now, 0.0).astype(np.float32))
            else:
                b = wrong
            state, m = learner.train_step(state, b, ref_params=ref)
            metrics.append(m)
        runs[name] = (jax.tree.map(np.asarray, state.params), metrics)
    (own, m_own), (given, m_given) = runs["own"], runs["given"]
    # eps 1e-4: Adam's update of a weight whose gradient is rounding noise stays as small as that noise (the two
    # steps' programs sum in other orders); each step moves a weight by up to 1e-2.
    for a, b in zip(jax.tree.leaves(own), jax.tree.leaves(given)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for step in range(2):
        assert m_own[step]["ratio_mean"] == 1.0 and m_own[step]["ratio_max"] == 1.0
        for name in ("loss", "pg_loss", "kl", "grad_norm"):
            assert m_own[step][name] == pytest.approx(m_given[step][name], rel=1e-5, abs=1e-7), name
    assert m_own[1]["kl"] > 0 and m_own[1]["grad_norm"] > 0


# ----------------------------------------------------------------------------------- document truncation


def test_training_document_centre_truncation_by_hand():
    from memagent_jax.rl.recipe import agent_settings

    ids = np.arange(11)
    np.testing.assert_array_equal(centre_truncate(ids, 6), [0, 1, 2, 8, 9, 10])  # first 3, last 3
    np.testing.assert_array_equal(centre_truncate(ids, 5), [0, 1, 8, 9, 10])  # first 2, last 3
    np.testing.assert_array_equal(centre_truncate(ids, 11), ids)
    cfg = load_config("grpo.py")
    budgets, _ = agent_settings(cfg)
    assert budgets.max_document_tokens == 40000
    doc = np.arange(45001)
    cut = centre_truncate(doc, budgets.max_document_tokens)
    np.testing.assert_array_equal(cut, np.concatenate([np.arange(20000), np.arange(25001, 45001)]))
    cpu_budgets, _ = agent_settings(load_config("grpo.py", "cpu"))
    assert cpu_budgets.max_document_tokens == 0


# ------------------------------------------------------------------------------------------ recipe configs


@pytest.mark.parametrize(
    "name",
    ["qwen2_5_7b_hotpotqa.py", "qwen2_5_14b_hotpotqa.py", "qwen3_4b_hotpotqa.py", "qwen3_8b_hotpotqa.py", "grpo.py"],
)
def test_recipe_configs_use_the_reference_values(name):
    from memagent_jax.rl.recipe import agent_settings, learner_config

    cfg = load_config(name)
    learner = learner_config(cfg)
    assert learner.recompute_old_logprobs is True
    assert learner.loss.kl_clamp == 10.0 and learner.loss.kl_coef == 0.001
    assert learner.optimizer.warmup_from_zero is True and learner.optimizer.warmup_steps == 20
    budgets, templates = agent_settings(cfg)
    assert budgets.max_document_tokens == 40000
    assert templates.prompt_mode == "pieces"
    cfg.agent.prompt_mode = "text"
    assert agent_settings(cfg)[1].prompt_mode == "text"


def test_cpu_variant_keeps_the_plain_settings():
    from memagent_jax.rl.recipe import learner_config

    learner = learner_config(load_config("grpo.py", "cpu"))
    assert learner.recompute_old_logprobs is False and learner.loss.kl_clamp is None
    assert learner.optimizer.warmup_from_zero is False


@pytest.mark.parametrize("variant", ["", "cpu"])
def test_learner_logprobs_are_at_the_rollout_temperature(variant):
    """The learner's log-probs (new, old, reference) and entropy are at config.agent.temperature, as verl's."""
    from memagent_jax.rl.recipe import learner_config

    cfg = load_config("grpo.py", variant)
    assert learner_config(cfg).logprob_temperature == cfg.agent.temperature == 1.0
    cfg.agent.temperature = 0.7
    assert learner_config(cfg).logprob_temperature == 0.7
