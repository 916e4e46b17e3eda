"""The learner: gradient accumulation, the AdamW step by hand, 8-device vs 1-device, NaN skip, warm start, GRPO."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memagent_jax.models import abstract_params, forward, positions_from_mask
from memagent_jax.models.presets import preset_config
from memagent_jax.models.sharding import make_mesh
from memagent_jax.models.tiling import rows_per_tile
from memagent_jax.rl.advantages import broadcast_to_conversations, group_advantages
from memagent_jax.rl.batch import BatchError, build_conversation_batch
from memagent_jax.rl.learner import (
    Learner,
    LearnerConfig,
    LearnerConfigError,
    NonFiniteError,
    OptimizerConfig,
    accumulate_gradients,
    learning_rate_schedule,
    minibatch_rows,
    response_window_for,
)
from memagent_jax.rl.losses import LossConfig

CONFIG = preset_config("tiny", vocab_size=128)


def random_params(config, seed):
    """Random params straight from NumPy (no init compile): small matrices, norm weights near 1."""
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        noise = rng.normal(size=a.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.1 * noise if "norm" in jax.tree_util.keystr(path) else 0.05 * noise, a.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(config))


def random_batch(n, seed, *, vocab=128, rows_multiple=1, length_multiple=8, with_ref=False, prompt_tokens=(2, 9)):
    """n conversations of different prompt / response lengths, sampler log-probs near the model's scale."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, size=rng.integers(*prompt_tokens)) for _ in range(n)]
    responses = [rng.integers(3, vocab, size=rng.integers(1, 8)) for _ in range(n)]
    logps = [-np.log(vocab) + rng.uniform(-0.4, 0.4, size=len(r)) for r in responses]
    refs = [-np.log(vocab) + rng.uniform(-0.4, 0.4, size=len(r)) for r in responses] if with_ref else None
    adv = rng.normal(size=n)
    return build_conversation_batch(
        prompts, responses, logps, adv, ref_logprobs=refs, length_multiple=length_multiple, rows_multiple=rows_multiple
    )


def tree_close(a, b, rtol=1e-5, atol=1e-6, scale_atol=0.0):
    """Leaf-wise allclose; scale_atol adds scale_atol * max|leaf of b| to atol (for values whose size is set by
    float cancellation, e.g. Adam moments of embedding rows no token of the batch touches)."""
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        y = np.asarray(y)
        bound = atol + scale_atol * float(np.max(np.abs(y))) if y.size else atol
        np.testing.assert_allclose(np.asarray(x), y, rtol=rtol, atol=bound, err_msg=jax.tree_util.keystr(path))


def direct_loss(params, b, loss: LossConfig):
    """The mini-batch GRPO loss written out directly on full logits (an independent path to the gradient)."""
    mask = jnp.asarray(b.token_mask)
    logits, _ = forward(params, jnp.asarray(b.tokens), positions_from_mask(mask), mask, config=CONFIG)
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    lp = jnp.take_along_axis(logp_all[:, :-1], jnp.asarray(b.tokens)[:, 1:, None], axis=-1)[..., 0]
    lp = jnp.pad(lp, ((0, 0), (1, 0)))
    probs = jnp.exp(logp_all)
    ent = -jnp.sum(probs * logp_all, axis=-1)
    ent = jnp.pad(ent[:, :-1], ((0, 0), (1, 0)))
    lm = jnp.asarray(b.loss_mask)
    a = jnp.asarray(b.advantages)[:, None]
    r = jnp.exp(lp - b.old_logprobs)
    pg = jnp.maximum(-a * r, -a * jnp.clip(r, 1 - loss.clip_low, 1 + loss.clip_high))
    pg = jnp.where(a < 0, jnp.minimum(pg, -loss.dual_clip * a), pg)
    d = b.ref_logprobs - lp
    per_token = pg + loss.kl_coef * (jnp.exp(d) - d - 1) - loss.entropy_coef * ent
    if loss.aggregation == "token-mean":
        return jnp.sum(jnp.where(lm, per_token, 0)) / jnp.sum(lm)
    rows = jnp.sum(jnp.where(lm, per_token, 0), axis=1) / jnp.maximum(jnp.sum(lm, axis=1), 1)
    return jnp.sum(rows) / jnp.sum(jnp.any(lm, axis=1))


# ------------------------------------------------------------------------------------ accumulation


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_gradient_accumulation_equals_full_batch(aggregation):
    loss = LossConfig(kl_coef=0.05, entropy_coef=0.01, aggregation=aggregation, clip_high=0.28)
    # The seq-mean case also runs the layer scan rematerialised: same gradient, recomputed activations.
    config = LearnerConfig(loss=loss, logits_chunk_size=8, remat="dots" if aggregation != "token-mean" else None)
    params = random_params(CONFIG, 0)
    b = random_batch(8, 1, with_ref=True)
    assert len(set(b.loss_mask.sum(axis=1))) > 2  # conversations of different lengths
    want = jax.jit(jax.grad(functools.partial(direct_loss, loss=loss)))(params, b)
    # 4 micro-batches of 2 rows, of different token counts. (One micro-batch = the whole batch is the
    # M = K = 1 path, checked against the same direct gradient in test_train_step_is_adamw_by_hand.)
    grads, metrics = jax.jit(
        functools.partial(accumulate_gradients, model_config=CONFIG, config=config, micro_batch_size=2)
    )(params, b)
    # f32: every gradient leaf within 1e-5 of its own largest entry (typically ~1e-6).
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want)):
        w = np.asarray(w)
        np.testing.assert_allclose(
            np.asarray(g), w, rtol=0, atol=1e-5 * np.abs(w).max(), err_msg=jax.tree_util.keystr(path)
        )
    np.testing.assert_allclose(float(metrics["loss"]), float(direct_loss(params, b, loss)), rtol=1e-5)
    assert float(metrics["response_tokens"]) == b.loss_mask.sum()


def test_minibatch_row_layout():
    rows = minibatch_rows(16, 2, 2)  # [M, K, mb]
    assert rows.shape == (2, 2, 4)
    assert sorted(rows.reshape(-1).tolist()) == list(range(16))
    assert all(n % 2 == 0 for n in rows[0].reshape(-1))  # mini-batch m = rows n % M == m
    # Each device block of 4 contiguous rows (4 batch shards) feeds both mini-batches and both micro-batches.
    for block in range(4):
        members = set(range(4 * block, 4 * block + 4))
        assert all(members & set(rows[m, k].tolist()) for m in range(2) for k in range(2))


# ------------------------------------------------------------------------------------ optimiser


def test_learning_rate_schedule_by_hand():
    warm = learning_rate_schedule(OptimizerConfig(learning_rate=1e-3, warmup_steps=4))
    assert [float(warm(s)) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    cos = learning_rate_schedule(
        OptimizerConfig(learning_rate=1.0, warmup_steps=2, schedule="cosine", total_steps=6, min_lr_ratio=0.1)
    )
    # after warm-up: progress p = min(1, (s - 2) / 4) -> 0.1 + 0.9 * (1 + cos(pi * p)) / 2 (floor after step 6)
    want = [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, (s - 2) / 4))) for s in range(2, 8)]
    assert [float(cos(s)) for s in range(8)] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(
    "make, error, match",
    [
        pytest.param(
            lambda: OptimizerConfig(schedule="cosine"),
            LearnerConfigError,
            "optimizer.total_steps",
            id="cosine-without-total-steps",
        ),
        pytest.param(
            lambda: OptimizerConfig(learning_rate=float("nan")),
            LearnerConfigError,
            "optimizer.learning_rate",
            id="nan-learning-rate",
        ),
        pytest.param(lambda: OptimizerConfig(b2=1.5), LearnerConfigError, "optimizer.b2", id="b2-above-1"),
        pytest.param(
            lambda: LearnerConfig(num_minibatches=0),
            LearnerConfigError,
            "learner.num_minibatches",
            id="zero-minibatches",
        ),
        pytest.param(
            lambda: LearnerConfig(on_nonfinite="ignore"),
            LearnerConfigError,
            "learner.on_nonfinite",
            id="unknown-on-nonfinite",
        ),
        pytest.param(lambda: LearnerConfig(remat="some"), LearnerConfigError, "learner.remat", id="unknown-remat"),
        pytest.param(
            lambda: LearnerConfig(micro_batch_tokens=-5),
            LearnerConfigError,
            "learner.micro_batch_tokens",
            id="negative-micro-batch-tokens",
        ),
        pytest.param(
            lambda: LearnerConfig(response_window=-1),
            LearnerConfigError,
            "learner.response_window",
            id="negative-response-window",
        ),
        *[
            pytest.param(
                lambda t=t: LearnerConfig(logprob_temperature=t),
                LearnerConfigError,
                r"^learner\.logprob_temperature must be a finite number > 0, got ",
                id=f"logprob-temperature-{t}",
                marks=pytest.mark.faults,
            )
            for t in (0.0, -0.7, float("nan"), float("inf"))
        ],
        pytest.param(
            lambda: LearnerConfig(micro_batch_size=3).split(8),
            BatchError,
            "learner.micro_batch_size=3",
            id="micro-batch-does-not-divide",
        ),
    ],
)
def test_config_errors_name_the_field(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_train_step_is_adamw_by_hand():
    """M = K = 1: the update is exactly clip -> Adam (bias-corrected) -> decoupled weight decay, at warm-up lr."""
    loss = LossConfig(kl_coef=0.05, entropy_coef=0.0)
    # eps = 1e-4 keeps g / (|g| + eps) smooth in g (with eps ~ 1e-8, elements with |g| ~ 1e-8 turn f32 rounding
    # of the gradient into O(1) changes of the update, in any implementation).
    opt = OptimizerConfig(
        learning_rate=1e-2, warmup_steps=4, weight_decay=0.1, max_grad_norm=0.05, b1=0.9, b2=0.95, eps=1e-4
    )
    learner = Learner(CONFIG, LearnerConfig(loss=loss, optimizer=opt, compute_entropy=False))
    params = random_params(CONFIG, 0)
    b = random_batch(8, 1, with_ref=True)
    p0 = jax.tree.map(np.asarray, params)
    g = jax.tree.map(np.asarray, jax.jit(jax.grad(functools.partial(direct_loss, loss=loss)))(params, b))
    norm = np.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in jax.tree.leaves(g)))
    assert norm > 0.05  # the clip is active
    lr = 1e-2 / 4
    expected = {}
    for (path, p), gi in zip(jax.tree_util.tree_flatten_with_path(p0)[0], jax.tree.leaves(g)):
        gc = gi.astype(np.float64) * 0.05 / norm
        m, v = 0.1 * gc, 0.05 * gc * gc
        update = (m / 0.1) / (np.sqrt(v / 0.05) + 1e-4) + 0.1 * p
        expected[jax.tree_util.keystr(path)] = p - lr * update

    state = learner.init_state(params)
    state, metrics = learner.train_step(state, b)
    assert metrics["learning_rate"] == pytest.approx(lr)
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-4)
    assert int(state.step) == 1 and int(state.skipped_updates) == 0
    for path, p in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        np.testing.assert_allclose(np.asarray(p), expected[jax.tree_util.keystr(path)], rtol=1e-5, atol=1e-7)


def test_head_in_the_response_window_trains_as_on_every_position():
    """Long prompts, short responses: the step that runs the LM head over a 16-position response window (picked per
    batch) moves the params as the one over every position, and a fixed window too short for a response is an
    error naming the row."""
    loss = LossConfig(kl_coef=0.05, entropy_coef=0.01)
    opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=0)
    b = random_batch(8, 5, with_ref=True, prompt_tokens=(20, 40))
    assert b.tokens.shape[1] == 40 and b.loss_mask.sum(axis=1).max() == 7
    auto, whole = LearnerConfig(loss=loss, optimizer=opt), LearnerConfig(loss=loss, optimizer=opt, response_window=0)
    assert response_window_for(b, auto) == 16 and response_window_for(b, whole) == 0
    assert response_window_for(b, LearnerConfig(response_window=64)) == 0  # not shorter than the rows
    # The windowed gradient against the direct one on full logits.
    want = jax.jit(jax.grad(functools.partial(direct_loss, loss=loss)))(random_params(CONFIG, 0), b)
    grads, _ = jax.jit(functools.partial(accumulate_gradients, model_config=CONFIG, config=auto, window=16))(
        random_params(CONFIG, 0), b
    )
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want)):
        w = np.asarray(w)
        np.testing.assert_allclose(
            np.asarray(g), w, rtol=0, atol=1e-5 * np.abs(w).max(), err_msg=jax.tree_util.keystr(path)
        )
    states = []
    for config in (auto, whole):
        learner = Learner(CONFIG, config)
        state, metrics = learner.train_step(learner.init_state(random_params(CONFIG, 0)), b)
        states.append((state, metrics))
    tree_close(states[0][0].params, states[1][0].params, rtol=1e-4, atol=1e-6)
    for name in ("loss", "kl", "entropy", "grad_norm"):
        assert states[0][1][name] == pytest.approx(states[1][1][name], rel=1e-4), name
    longest = int(np.argmax(b.loss_mask.sum(axis=1)))
    learner = Learner(CONFIG, LearnerConfig(loss=loss, optimizer=opt, response_window=4))
    with pytest.raises(BatchError, match=f"loss_mask row {longest}: a response of 7 positions"):
        learner.train_step(learner.init_state(random_params(CONFIG, 0)), b)


def test_micro_batches_sized_by_tokens():
    """rows_per_tile by hand; the learner's step config (CPU default, off, a set size); and a step in micro-batches
    of at most 96 tokens moving the params as the whole mini-batch's."""
    assert rows_per_tile(1152, 112, 4096) == 36  # the most divisor rows with rows x 112 <= 4096
    assert rows_per_tile(640, 96, 4096) == 40
    assert rows_per_tile(1152, 112, 0) == 1152 and rows_per_tile(8, 16, 4096) == 8
    assert rows_per_tile(12, 100, 450, multiple=2) == 4  # a multiple of the shards: 2 or 4 rows, not 3
    assert rows_per_tile(7, 100, 150) == 1 and rows_per_tile(6, 1000, 10, multiple=3) == 3  # at least one row
    learner = Learner(CONFIG, LearnerConfig())
    assert learner.step_config(1152, 112).micro_batch_size == 36  # this suite runs on CPU
    assert Learner(CONFIG, LearnerConfig(micro_batch_tokens=0)).step_config(1152, 112).micro_batch_size is None
    assert Learner(CONFIG, LearnerConfig(micro_batch_size=64)).step_config(1152, 112).micro_batch_size == 64
    loss = LossConfig(kl_coef=0.05)
    # eps = 1e-4: Adam's g / (|g| + eps) stays smooth where the gradient is float noise around 0 (the k bias's:
    # softmax does not see a shift that every key of a query shares).
    opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, eps=1e-4)
    b = random_batch(8, 6, with_ref=True, prompt_tokens=(5, 9))
    assert b.tokens.shape == (8, 16)
    out = []
    for tokens in (0, 96):  # the whole mini-batch; micro-batches of 4 rows (4 x 16 <= 96 < 8 x 16)
        learner = Learner(CONFIG, LearnerConfig(loss=loss, optimizer=opt, micro_batch_tokens=tokens))
        assert learner.step_config(8, 16).micro_batch_size == (None if tokens == 0 else 4)
        out.append(learner.train_step(learner.init_state(random_params(CONFIG, 0)), b))
    tree_close(out[0][0].params, out[1][0].params, rtol=1e-4, atol=1e-6)
    assert out[0][1]["loss"] == pytest.approx(out[1][1]["loss"], rel=1e-5)
    assert out[0][1]["grad_norm"] == pytest.approx(out[1][1]["grad_norm"], rel=1e-4)


# ------------------------------------------------------------------------------------ temperature


def tempered_reference(params, b, temperature):
    """float64 NumPy from a full forward: per-token log-prob and entropy of softmax(logits / temperature), aligned
    with the tokens (0 at position 0)."""
    mask = jnp.asarray(b.token_mask)
    logits, _ = forward(params, jnp.asarray(b.tokens), positions_from_mask(mask), mask, config=CONFIG)
    z = np.asarray(logits, np.float64)[:, :-1] / temperature
    logp_all = z - z.max(-1, keepdims=True)
    logp_all -= np.log(np.exp(logp_all).sum(-1, keepdims=True))
    lp = np.take_along_axis(logp_all, np.asarray(b.tokens)[:, 1:, None], axis=-1)[..., 0]
    ent = -(np.exp(logp_all) * logp_all).sum(-1)
    return np.pad(lp, ((0, 0), (1, 0))), np.pad(ent, ((0, 0), (1, 0)))


def test_learner_logprobs_are_those_of_logits_over_the_rollout_temperature():
    params = random_params(CONFIG, 0)
    b = random_batch(6, 2)
    mask = np.asarray(b.token_mask)
    mask[:, 0] = False
    want, _ = tempered_reference(params, b, 0.7)
    # Chunked (4 positions per logits chunk) and in one piece: the same numbers.
    for chunk in (4, 0):
        got = np.asarray(
            Learner(CONFIG, LearnerConfig(logprob_temperature=0.7, logits_chunk_size=chunk)).logprobs(params, b)
        )
        np.testing.assert_allclose(got[mask], want[mask], rtol=0, atol=1e-5)
    plain = np.asarray(Learner(CONFIG, LearnerConfig()).logprobs(params, b))
    np.testing.assert_allclose(plain[mask], tempered_reference(params, b, 1.0)[0][mask], rtol=0, atol=1e-5)
    assert np.abs(plain - want)[mask].max() > 0.05  # the temperature matters on this model


def test_kl_and_entropy_are_those_of_the_tempered_distribution():
    """A GRPO step at logprob_temperature 0.7 with recomputed old log-probs and reference params: its KL (k3 to the
    reference), entropy and log-prob metrics are those of softmax(logits / 0.7) for the policy and the reference
    alike, computed by hand; the recomputed old log-probs equal the new ones (ratio 1)."""
    t = 0.7
    loss = LossConfig(kl_coef=0.05, entropy_coef=0.01)
    config = LearnerConfig(loss=loss, recompute_old_logprobs=True, logprob_temperature=t, logits_chunk_size=4)
    params, ref = random_params(CONFIG, 0), random_params(CONFIG, 1)
    b = random_batch(8, 3)
    lp, ent = tempered_reference(params, b, t)
    ref_lp, _ = tempered_reference(ref, b, t)
    lm = np.asarray(b.loss_mask)
    d = ref_lp - lp
    want = {
        "kl": (np.exp(d) - d - 1)[lm].mean(),
        "entropy": ent[lm].mean(),
        "logprob_mean": lp[lm].mean(),
        "ratio_mean": 1.0,
        "approx_kl_old": 0.0,
    }
    # At temperature 1 these are other numbers (the hand computation above is not the untempered one).
    lp1, ent1 = tempered_reference(params, b, 1.0)
    d1 = tempered_reference(ref, b, 1.0)[0] - lp1
    assert abs((np.exp(d1) - d1 - 1)[lm].mean() - want["kl"]) > 0.05 * want["kl"]
    assert abs(ent1[lm].mean() - want["entropy"]) > 0.05
    learner = Learner(CONFIG, config)
    _, metrics = learner.train_step(learner.init_state(params), b, ref_params=ref)  # the state takes `params`
    for name, value in want.items():
        assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


# ------------------------------------------------------------------------------------ sharding


def test_sharded_step_matches_single_device():
    """data 2 x fsdp 2 x tensor 2 on 8 CPU devices == no mesh, over two steps (2 mini-batches x 2 micro-batches,
    old log-probs recomputed, KL to a reference computed in the step, entropy bonus)."""
    loss = LossConfig(kl_coef=0.05, entropy_coef=0.01, clip_high=0.28)
    # eps = 1e-4: see test_train_step_is_adamw_by_hand (reduction order differs between the two layouts).
    config = LearnerConfig(
        loss=loss,
        optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=2, eps=1e-4),
        num_minibatches=2,
        micro_batch_size=4,
        recompute_old_logprobs=True,
        logits_chunk_size=8,
    )
    batches = [random_batch(16, 10 + i) for i in range(2)]
    results = []
    for mesh in (None, make_mesh(2, 2, 2)):
        learner = Learner(CONFIG, config, mesh=mesh)
        assert learner.rows_multiple == 8
        ref = learner.copy_params(random_params(CONFIG, 5))
        state = learner.init_state(random_params(CONFIG, 4))
        metrics = []
        for b in batches:
            state, m = learner.train_step(state, b, ref_params=ref)
            metrics.append(m)
        results.append((jax.tree.map(np.asarray, state), metrics))
        if mesh is not None:
            spec = state.params["layers"]["mlp"]["gate_proj"].sharding.spec
            assert tuple(spec) == (None, "fsdp", "tensor")
            mu = state.opt_state[1].inner_state[0].mu["layers"]["mlp"]["gate_proj"]
            assert mu.sharding == state.params["layers"]["mlp"]["gate_proj"].sharding
    (single, m1), (sharded, m8) = results
    tree_close(sharded.params, single.params, rtol=1e-4, atol=1e-6)
    # Moments of untouched embedding rows are sums of cancelling terms (~1e-9, order-dependent between layouts):
    # they are compared to 1e-6 of each leaf's largest moment.
    tree_close(sharded.opt_state, single.opt_state, rtol=1e-3, atol=1e-9, scale_atol=1e-6)
    for a, b in zip(m1, m8):
        for name in ("loss", "pg_loss", "kl", "entropy", "grad_norm", "clipfrac_high", "ratio_mean", "response_tokens"):
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-6), name
    # The step moved the params, and recomputing the old log-probs makes the first mini-batch on-policy.
    assert m1[0]["kl"] > 0 and 0 < m1[0]["ratio_mean"] < 2


# ------------------------------------------------------------------------------------ NaN / inf


def test_nonfinite_update_is_skipped_and_counted():
    config = LearnerConfig(
        loss=LossConfig(kl_coef=0.0), num_minibatches=2, optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=0)
    )
    b = random_batch(8, 3)
    bad = b.replace(advantages=b.advantages.copy())
    bad.advantages[0] = np.nan  # row 0 belongs to mini-batch 0 (rows n % 2 == 0)
    learner = Learner(CONFIG, config)
    state = learner.init_state(random_params(CONFIG, 0))
    state, metrics = learner.train_step(state, bad)
    assert metrics["nonfinite_updates"] == 1 and int(state.skipped_updates) == 1 and int(state.step) == 1
    assert np.isfinite(metrics["loss"])  # metrics average the applied update only
    # Skipping mini-batch 0 leaves exactly the update of mini-batch 1 alone (same lr, fresh Adam state).
    only = Learner(CONFIG, config.replace(num_minibatches=1))
    rows = minibatch_rows(8, 2, 1)[1].reshape(-1)
    ref_state = only.init_state(random_params(CONFIG, 0))
    ref_state, _ = only.train_step(ref_state, jax.tree.map(lambda x: x[rows], b))
    tree_close(state.params, ref_state.params, rtol=1e-6, atol=1e-8)

    # Every update non-finite: params and optimiser state unchanged bit for bit, the step still advances.
    all_bad = b.replace(advantages=np.full_like(b.advantages, np.inf))
    before = jax.tree.map(np.asarray, state)
    state, metrics = learner.train_step(state, all_bad)
    assert metrics["nonfinite_updates"] == 2 and int(state.skipped_updates) == 3 and int(state.step) == 2
    for x, y in zip(
        jax.tree.leaves(before.params) + jax.tree.leaves(before.opt_state),
        jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state),
    ):
        np.testing.assert_array_equal(x, np.asarray(y))

    # on_nonfinite='raise': a clear error after the step; the returned state excludes the bad update.
    raising = Learner(CONFIG, config.replace(on_nonfinite="raise"))
    state = raising.init_state(random_params(CONFIG, 0))
    with pytest.raises(NonFiniteError, match="non-finite loss or gradient") as err:
        raising.train_step(state, bad)
    assert int(err.value.state.skipped_updates) == 1
    tree_close(err.value.state.params, ref_state.params, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------ learning


def test_supervised_warm_start_loss_decreases():
    config = LearnerConfig(
        loss=LossConfig(kind="sft"),
        num_minibatches=2,
        micro_batch_size=2,
        optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=0, weight_decay=0.0),
    )
    learner = Learner(CONFIG, config)
    state = learner.init_state(random_params(CONFIG, 0))
    b = random_batch(8, 7)
    losses = []
    for _ in range(8):
        state, m = learner.train_step(state, b)
        losses.append(m["loss"])
    assert losses[0] == pytest.approx(np.log(128), abs=0.5)  # near-uniform at the start
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0] - 1.0, losses


def _sampler(config, steps):
    """A plain ancestral sampler for the toy task: prompt [B, P] -> (response [B, steps], log-probs [B, steps]).

    Each new token is sampled from the full forward over prompt + the response so far (a [B, P + steps] buffer
    whose mask grows), so its log-prob is exactly what the learner recomputes on the same conversation."""

    @jax.jit
    def sample(params, prompt, key):
        b, p = prompt.shape
        buf = jnp.concatenate([prompt, jnp.zeros((b, steps), prompt.dtype)], axis=1)

        def body(buf, xs):
            i, k = xs
            mask = jnp.arange(p + steps)[None, :] < p + i
            logits, _ = forward(params, buf, positions_from_mask(mask), mask, config=config)
            logp = jax.nn.log_softmax(jax.lax.dynamic_index_in_dim(logits, p + i - 1, axis=1, keepdims=False))
            nxt = jax.random.categorical(k, logp)
            lp = jnp.take_along_axis(logp, nxt[:, None], axis=-1)[:, 0]
            buf = jax.lax.dynamic_update_slice_in_dim(buf, nxt[:, None].astype(buf.dtype), p + i, axis=1)
            return buf, lp

        buf, lps = jax.lax.scan(body, buf, (jnp.arange(steps), jax.random.split(key, steps)))
        return buf[:, p:], lps.T

    return sample


def test_grpo_raises_toy_reward():
    """Multi-conversation GRPO on a toy reward: each trajectory is 2 conversations (a 'memory' step and a
    'final' step), reward = fraction of response tokens below 8 (chance ~ 8 / 128). A few dozen steps."""
    groups, g, resp, plen = 4, 8, 3, 4
    config = LearnerConfig(
        loss=LossConfig(kl_coef=0.0, clip_high=0.28),
        num_minibatches=2,
        logits_chunk_size=0,
        compute_entropy=False,
        optimizer=OptimizerConfig(learning_rate=2e-3, warmup_steps=2, weight_decay=0.0),
    )
    learner = Learner(CONFIG, config)
    state = learner.init_state(random_params(CONFIG, 0))
    sample = _sampler(CONFIG, resp)
    rng = np.random.default_rng(0)
    key = jax.random.key(0)
    history = []
    for step in range(30):
        questions = rng.integers(8, 128, size=(groups, plen))
        prompts = np.repeat(questions, g, axis=0)  # [groups * g, plen], trajectory t = group t // g
        key, k1, k2 = jax.random.split(key, 3)
        mem, mem_lp = map(np.asarray, sample(state.params, jnp.asarray(prompts, jnp.int32), k1))
        final_prompt = np.concatenate([prompts[:, :2], mem[:, :2]], axis=1)
        ans, ans_lp = map(np.asarray, sample(state.params, jnp.asarray(final_prompt, jnp.int32), k2))
        rewards = ((mem < 8).sum(1) + (ans < 8).sum(1)) / (2 * resp)
        history.append(rewards.mean())
        adv = np.asarray(group_advantages(rewards.reshape(groups, g))).reshape(-1)
        traj = np.concatenate([np.arange(groups * g)] * 2)  # conversation -> trajectory
        conv_adv = np.asarray(broadcast_to_conversations(adv, traj))
        b = build_conversation_batch(
            list(prompts) + list(final_prompt),
            list(mem) + list(ans),
            list(mem_lp) + list(ans_lp),
            conv_adv,
            length_multiple=8,
            rows_multiple=learner.rows_multiple,
        )
        if step == 0:  # the sampler's log-probs are the learner's on the same tokens (alignment check)
            lp = np.asarray(learner.logprobs(state.params, b))
            np.testing.assert_allclose(lp[b.loss_mask], b.old_logprobs[b.loss_mask], atol=1e-4)
        state, m = learner.train_step(state, b)
        assert m["nonfinite_updates"] == 0
    start, end = np.mean(history[:3]), np.mean(history[-3:])
    print("toy reward per step:", np.round(history, 3).tolist())
    assert start < 0.15 and end > 0.6, history  # chance ~ 8 / 128; noise of a step mean ~ 0.02
