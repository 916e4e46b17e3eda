"""LoRA adapters: merge arithmetic vs qwix's activation-side LoRA, gradients vs a hand-written LoRA, adapter-only
learner steps (base bit-identical, base as the KL reference), exact resume, export round-trip, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memagent_jax import settings
from memagent_jax.models import forward, positions_from_mask
from memagent_jax.models import lora as lora_lib
from memagent_jax.models.presets import preset_config
from memagent_jax.rl.learner import Learner, LearnerConfig, OptimizerConfig
from memagent_jax.rl.losses import LossConfig
from tests.test_rl_learner import random_batch, random_params

CONFIG = preset_config("tiny", vocab_size=128)
LORA = lora_lib.LoraConfig(rank=4, alpha=8.0)


def nonzero_adapters(params, config=LORA, seed=3):
    """Adapters with random non-zero B (a fresh B is zero, which would hide any error in the B path)."""
    adapters = lora_lib.init_adapters(params, CONFIG, config, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (
            jnp.asarray(rng.normal(size=x.shape) * 0.05, jnp.float32)
            if jax.tree_util.keystr(path).endswith("['b']")
            else x
        ),
        adapters,
    )


def test_merged_weight_equals_qwix_activation_lora():
    """x.W' (merged) == x.W + alpha/r (x.A).B with the LoRA einsum qwix's LoraProvider computes, every target."""
    from qwix._src.providers.lora import _parse_einsum_str_for_lora

    params = random_params(CONFIG, 0)
    adapters = nonzero_adapters(params)
    merged = lora_lib.merge(params, adapters, LORA)
    rng = np.random.default_rng(1)
    for name, (module, eq) in lora_lib.TARGETS.items():
        w = params["layers"][module][name][1]
        lhs = eq.split(",")[0]
        x_shape = {
            "btd": (2, 3, w.shape[0]),
            "bthk": (2, 3) + w.shape[:2],
            "bd": (5, w.shape[0]),
            "bf": (5, w.shape[0]),
        }
        x = jnp.asarray(rng.normal(size=x_shape[lhs]), jnp.float32)
        _, _, lora_eq, _, _ = _parse_einsum_str_for_lora(x.shape, w.shape, eq, LORA.rank)
        ab = adapters["layers"][module][name]
        want = jnp.einsum(eq, x, w) + LORA.scale * jnp.einsum(lora_eq, x, ab["a"][1], ab["b"][1])
        got = jnp.einsum(eq, x, merged["layers"][module][name][1])
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=name)
        assert float(jnp.max(jnp.abs(got - jnp.einsum(eq, x, w)))) > 1e-3  # the adapter really contributes


def test_lora_model_logits_equal_merged_model_and_fresh_adapters_change_nothing():
    params = random_params(CONFIG, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 7)), jnp.int32)
    mask = jnp.ones(tokens.shape, bool)
    pos = positions_from_mask(mask)
    fresh = lora_lib.init_adapters(params, CONFIG, LORA)
    base_logits, _ = forward(params, tokens, pos, mask, config=CONFIG)
    fresh_logits, _ = forward(lora_lib.merge(params, fresh, LORA), tokens, pos, mask, config=CONFIG)
    np.testing.assert_array_equal(np.asarray(fresh_logits), np.asarray(base_logits))  # B = 0 at init
    # Hand merge in NumPy (W + alpha/r A.B per layer, flattened) against lora.merge.
    adapters = nonzero_adapters(params)
    hand = jax.tree.map(np.asarray, params)
    for module, named in adapters["layers"].items():
        for name, ab in named.items():
            w = hand["layers"][module][name]
            a, b = np.asarray(ab["a"]), np.asarray(ab["b"])
            lay = w.shape[0]
            fan_in = a.shape[1:-1]
            delta = a.reshape(lay, -1, LORA.rank) @ b.reshape(lay, LORA.rank, -1)
            hand["layers"][module][name] = w + LORA.scale * delta.reshape((lay,) + fan_in + b.shape[2:])
    got, _ = forward(lora_lib.merge(params, adapters, LORA), tokens, pos, mask, config=CONFIG)
    want, _ = forward(jax.tree.map(jnp.asarray, hand), tokens, pos, mask, config=CONFIG)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(got), np.asarray(base_logits), atol=1e-4)


def test_adapter_gradients_equal_hand_written_lora():
    """d/dA, d/dB of sum((x.W')^2) with W' = W + s.A.B on the MLP gate, against the closed form."""
    params = random_params(CONFIG, 0)
    cfg = lora_lib.LoraConfig(rank=3, alpha=6.0, targets=("gate_proj",))
    adapters = nonzero_adapters(params, cfg)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(5, CONFIG.hidden_size)), jnp.float32)

    def loss(ad):
        w = lora_lib.merge(params, ad, cfg)["layers"]["mlp"]["gate_proj"]
        return jnp.sum(jnp.einsum("bd,ldf->lbf", x, w) ** 2)

    grads = jax.grad(loss)(adapters)["layers"]["mlp"]["gate_proj"]
    w = np.asarray(params["layers"]["mlp"]["gate_proj"], np.float64)
    a = np.asarray(adapters["layers"]["mlp"]["gate_proj"]["a"], np.float64)
    b = np.asarray(adapters["layers"]["mlp"]["gate_proj"]["b"], np.float64)
    xn = np.asarray(x, np.float64)
    for layer in range(w.shape[0]):
        wm = w[layer] + cfg.scale * a[layer] @ b[layer]
        dw = 2 * xn.T @ (xn @ wm)  # dL/dW'
        np.testing.assert_allclose(grads["a"][layer], cfg.scale * dw @ b[layer].T, rtol=2e-4, atol=1e-5)
        np.testing.assert_allclose(grads["b"][layer], cfg.scale * a[layer].T @ dw, rtol=2e-4, atol=1e-5)


def _learner(kl_coef=0.01, lr=3e-2):
    config = LearnerConfig(
        loss=LossConfig(kind="grpo", kl_coef=kl_coef),
        optimizer=OptimizerConfig(learning_rate=lr, warmup_steps=0, weight_decay=0.0),
        lora=LORA,
    )
    return Learner(CONFIG, config)


def _reward_batch():
    """Every response is token 5 with advantage +1, or token 9 with advantage -1 (the reward: saying 5)."""
    batch = random_batch(8, 0)
    resp = np.asarray(batch.loss_mask)
    tokens = np.where(resp, np.where(np.arange(8)[:, None] % 2 == 0, 5, 9), np.asarray(batch.tokens))
    adv = np.where(np.arange(8) % 2 == 0, 1.0, -1.0).astype(np.float32)
    return batch.replace(tokens=tokens.astype(np.int32), advantages=adv)


def _mean_logp(learner, state, batch, token):
    params = learner.policy_params(state)
    logp = np.asarray(learner.logprobs(params, batch))
    rows = np.asarray(batch.tokens) == token
    return float(logp[rows & np.asarray(batch.loss_mask)].mean())


@pytest.mark.slow
def test_grpo_trains_adapters_only_base_bit_identical_and_reward_rises():
    params = random_params(CONFIG, 0)
    base_copy = jax.tree.map(np.array, params)
    learner = _learner()
    assert not learner.needs_reference  # the base is the KL reference: no copy of the weights
    state = learner.init_state(params)
    # The optimiser state holds adapter-shaped leaves only.
    adapter_shapes = {x.shape for x in jax.tree.leaves(state.params)}
    for leaf in jax.tree.leaves(state.opt_state):
        assert leaf.ndim == 0 or leaf.shape in adapter_shapes
    assert sum(x.size for x in jax.tree.leaves(state.params)) == lora_lib.num_adapter_params(CONFIG, LORA)
    batch = _reward_batch()
    before = _mean_logp(learner, state, batch, 5)
    for _ in range(4):
        state, metrics = learner.train_step(state, batch)
        assert metrics["nonfinite_updates"] == 0
    assert _mean_logp(learner, state, batch, 5) > before + 0.5  # P(rewarded answer) rises
    for x, y in zip(jax.tree.leaves(learner.base_params), jax.tree.leaves(base_copy)):
        np.testing.assert_array_equal(np.asarray(x), y)  # bit-identical base


def test_exact_resume_of_adapter_state():
    batch = _reward_batch()
    whole = _learner()
    state = whole.init_state(random_params(CONFIG, 0))
    for _ in range(3):
        state, _ = whole.train_step(state, batch)
    first = _learner()
    part = first.init_state(random_params(CONFIG, 0))
    part, _ = first.train_step(part, batch)
    saved = jax.device_get(part)  # what a checkpoint holds: adapters, their optimiser state, counters
    resumed = _learner()
    resumed.init_state(random_params(CONFIG, 0))  # the base again, from the same model
    state2 = jax.tree.map(jnp.asarray, saved)
    for _ in range(2):
        state2, _ = resumed.train_step(state2, batch)
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(state2)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_merged_folder_loads_in_transformers_with_lora_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    from memagent_jax.models import load_hf_params, save_hf_checkpoint
    from tests.hf_tiny import hf_logits, make_hf_model, save_hf_model

    base_dir = save_hf_model(make_hf_model("qwen2"), str(tmp_path / "base"))
    params, config = load_hf_params(base_dir)
    adapters = lora_lib.init_adapters(params, config, LORA)
    rng = np.random.default_rng(4)
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: (
            jnp.asarray(rng.normal(size=x.shape) * 0.05, jnp.float32)
            if jax.tree_util.keystr(path).endswith("['b']")
            else x
        ),
        adapters,
    )
    merged = lora_lib.merge(params, adapters, LORA)
    out = save_hf_checkpoint(merged, config, str(tmp_path / "export"), base_folder=base_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(3, 128, 9)
    want = hf_logits(model, tokens)
    t = jnp.asarray(tokens[None], jnp.int32)
    mask = jnp.ones(t.shape, bool)
    got, _ = forward(merged, t, positions_from_mask(mask), mask, config=config)
    np.testing.assert_allclose(np.asarray(got[0]), want, rtol=1e-4, atol=1e-4)
    base_logits, _ = forward(params, t, positions_from_mask(mask), mask, config=config)
    assert not np.allclose(np.asarray(base_logits[0]), want, atol=1e-3)
    # The adapters alone, PEFT's layout: lora_A [r, in], lora_B [out, r] rebuild the merged q_proj of layer 1.
    folder = lora_lib.save_adapters(adapters, config, LORA, str(tmp_path / "adapters"))
    tensors, meta = lora_lib.load_adapters(folder)
    assert meta["r"] == LORA.rank and meta["lora_alpha"] == LORA.alpha and "q_proj" in meta["target_modules"]
    prefix = "base_model.model.model.layers.1.self_attn.q_proj"
    delta = tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"]  # [out, in] like nn.Linear
    hf_q = model.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    base_q = np.asarray(params["layers"]["attn"]["q_proj"][1]).reshape(config.hidden_size, -1).T
    np.testing.assert_allclose(base_q + LORA.scale * delta, hf_q, rtol=1e-4, atol=1e-5)


@pytest.mark.faults
@pytest.mark.parametrize(
    "section, field",
    [
        ({"rank": -1}, "config.lora.rank"),
        ({"rank": 4, "alpha": 0.0}, "config.lora.alpha"),
        ({"rank": 4, "dropout": 0.1}, "config.lora.dropout"),
        ({"rank": 4, "targets": ("qproj",)}, "config.lora.targets"),
        ({"rank": 4, "targets": ("q_proj[",)}, "config.lora.targets"),
    ],
)
def test_bad_lora_config_names_the_field(section, field):
    with pytest.raises(settings.ConfigError, match=rf"^{field} "):
        lora_lib.lora_config(section)


@pytest.mark.faults
def test_bad_lora_config_in_a_recipe_is_a_train_config_error():
    from memagent_jax.configs.grpo import get_config
    from memagent_jax.rl.recipe import TrainConfigError, learner_config

    cfg = get_config()
    assert not learner_config(cfg).lora.enabled  # off by default
    cfg.lora.rank = 8
    cfg.lora.targets = ("attention",)
    with pytest.raises(TrainConfigError, match=r"^config\.lora\.targets 'attention' matches none"):
        learner_config(cfg)


def test_plan_counts_adapter_only_optimizer_and_no_reference():
    from memagent_jax import planning
    from memagent_jax.configs import qwen2_5_14b_hotpotqa

    cfg = qwen2_5_14b_hotpotqa.get_config("16xh100")
    cfg.mesh.tensor, cfg.mesh.fsdp = 4, -1
    full = planning.make_plan(cfg, devices=8, suggest=False)
    cfg.lora.rank = 16
    lora = planning.make_plan(cfg, devices=8, suggest=False)
    adapters = 4 * lora_lib.num_adapter_params(full.model, lora_lib.LoraConfig(rank=16))
    assert lora.memory["adapters"] == adapters
    assert lora.memory["optimizer"] == 2 * adapters and full.memory["optimizer"] == 2 * full.memory["params"]
    assert lora.memory["reference"] == 0 < full.memory["reference"]
    assert lora.memory["merged_params"] == full.memory["params"]
    assert full.memory["peak"] > 0.9 * 71.7 * 2**30 > lora.memory["peak"]  # 14B on 8 H100s: only with LoRA
