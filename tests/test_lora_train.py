"""LoRA end to end: a GRPO run through `train()` that trains adapters only, interrupted and resumed bit-equal to an
uninterrupted run, its checkpoint holding adapter-sized state, its export the merged HF folder (memagent_jax and
transformers agree with base + adapters) beside the PEFT adapters; the refusal to resume a checkpoint of the other
kind; the warm start's SFT with adapters."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_tiny import grpo_cpu_config, hf_logits, make_agent_model_dir
from memagent_jax.models import forward, load_hf_params, positions_from_mask
from memagent_jax.models import lora as lora_lib
from memagent_jax.rl.learner import Learner
from memagent_jax.rl.recipe import TrainConfigError, learner_config
from memagent_jax.rl.trainer import train
from memagent_jax.storage.checkpoint import Checkpointer

LORA = {"lora.rank": 4, "lora.alpha": 8.0, "lora.save_adapters": True}


def lora_run_config(model_dir, **overrides):
    return grpo_cpu_config(model_dir, **{"rl.learning_rate": 1e-2, **LORA, **overrides})


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {m["step"]: m for m in map(json.loads, f)}


def _learner(cfg):
    _, model_config = load_hf_params(cfg.model.path)
    return Learner(model_config, learner_config(cfg))


def _restore(workdir, learner):
    with Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False) as ckpt:
        return ckpt.restore(learner.abstract_state())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(model folder, uninterrupted 3-step LoRA run, the same run stopped after step 2 and resumed to step 3)."""
    root = tmp_path_factory.mktemp("lora_train")
    model_dir = make_agent_model_dir(root / "model", seed=2)
    full, split = str(root / "full"), str(root / "split")
    train(lora_run_config(model_dir, steps=3), full)
    train(lora_run_config(model_dir, steps=2), split)  # stopped after step 2 (its checkpoint)
    train(lora_run_config(model_dir, steps=3), split)  # resumed at step 2
    return model_dir, full, split


@pytest.mark.slow
def test_lora_run_resumes_bit_equal_with_adapter_only_checkpoint(runs):
    model_dir, full, split = runs
    cfg = lora_run_config(model_dir)
    learner = _learner(cfg)
    a, b = _restore(full, learner), _restore(split, learner)
    assert a.step == b.step == 3
    # The checkpoint holds the adapters, their AdamW moments and the counters only: nothing model-sized.
    adapter_shapes = {x.shape for x in jax.tree.leaves(a.state.params)}
    n_adapters = sum(x.size for x in jax.tree.leaves(a.state.params))
    assert n_adapters == lora_lib.num_adapter_params(learner.model_config, learner.lora)
    for leaf in jax.tree.leaves(a.state.opt_state):
        assert leaf.ndim == 0 or leaf.shape in adapter_shapes
    assert sum(x.size for x in jax.tree.leaves(a.state)) < 2 * n_adapters + n_adapters + 64
    # Resumed == uninterrupted, bit for bit: adapters, optimiser state, counters, the exported weights.
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    ea, _ = load_hf_params(os.path.join(full, "export"))
    eb, _ = load_hf_params(os.path.join(split, "export"))
    for x, y in zip(jax.tree.leaves(ea), jax.tree.leaves(eb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    fm, sm = _metrics(full), _metrics(split)
    assert sorted(fm) == sorted(sm) == [1, 2, 3]
    for key in ("reward_mean", "accuracy", "loss", "conversations"):
        assert fm[3][key] == pytest.approx(sm[3][key], abs=1e-6), key
    # The adapters learned (B starts at zero).
    assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(a.state.params["layers"])) > 0
    bs = [np.asarray(ab["b"]) for named in a.state.params["layers"].values() for ab in named.values()]
    assert max(float(np.abs(x).max()) for x in bs) > 1e-4


@pytest.mark.slow
def test_lora_export_is_the_merged_model_and_the_peft_adapters(runs):
    transformers = pytest.importorskip("transformers")
    import torch

    model_dir, full, _ = runs
    cfg = lora_run_config(model_dir)
    learner = _learner(cfg)
    adapters = _restore(full, learner).state.params
    base, config = load_hf_params(model_dir)
    exported, exported_config = load_hf_params(os.path.join(full, "export"))
    assert exported_config.num_layers == config.num_layers
    merged = lora_lib.merge(base, adapters, learner.lora)
    for x, y in zip(jax.tree.leaves(exported), jax.tree.leaves(merged)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    moved = [float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(*map(jax.tree.leaves, (merged, base)))]
    assert max(moved) > 1e-5  # the export is not the base
    # transformers reads the plain HF folder and computes base + adapters' logits.
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(full, "export"), dtype=torch.float32)
    tokens = np.random.default_rng(0).integers(3, config.vocab_size, 11)
    t = jnp.asarray(tokens[None], jnp.int32)
    mask = jnp.ones(t.shape, bool)
    want, _ = forward(merged, t, positions_from_mask(mask), mask, config=config)
    np.testing.assert_allclose(hf_logits(model.eval(), tokens), np.asarray(want[0]), rtol=1e-4, atol=1e-4)
    # <workdir>/adapters: PEFT's layout; B @ A * alpha / r + the base weight is the exported weight.
    tensors, meta = lora_lib.load_adapters(os.path.join(full, "adapters"))
    assert meta["r"] == 4 and meta["lora_alpha"] == 8.0 and meta["peft_type"] == "LORA"
    assert set(meta["target_modules"]) == set(lora_lib.ALL_TARGETS)
    assert len(tensors) == 2 * len(lora_lib.ALL_TARGETS) * config.num_layers
    for layer in range(config.num_layers):
        prefix = f"base_model.model.model.layers.{layer}.mlp.down_proj"
        delta = tensors[f"{prefix}.lora_B.weight"] @ tensors[f"{prefix}.lora_A.weight"]  # [out, in]
        w = np.asarray(base["layers"]["mlp"]["down_proj"][layer]).T + learner.lora.scale * delta
        hf_w = model.model.layers[layer].mlp.down_proj.weight.detach().numpy()
        np.testing.assert_allclose(w, hf_w, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.faults
def test_resuming_a_checkpoint_of_the_other_kind_names_lora_rank_and_the_workdir(runs, tmp_path):
    model_dir, full, _ = runs
    # A LoRA checkpoint resumed as a full fine-tune, or with another rank: refused before any restore, in one
    # line, and the checkpoints stay where they are (not set aside as damaged).
    workdir = str(tmp_path / "lora_run")
    shutil.copytree(os.path.join(full, "checkpoints"), os.path.join(workdir, "checkpoints"))
    kept = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    assert "3" in kept
    for overrides, kind in (
        ({"lora.rank": 0}, "which trains full model params"),
        ({"lora.rank": 8}, "which trains LoRA adapters of rank 8"),
        ({"lora.targets": ("q_proj", "v_proj")}, "config.lora.rank=4 with other config.lora.targets"),
    ):
        with pytest.raises(TrainConfigError) as info:
            train(lora_run_config(model_dir, steps=4, **overrides), workdir)
        message = str(info.value)
        assert message.startswith("config.lora.rank: ") and "\n" not in message
        assert workdir in message and "holds LoRA adapters of rank 4" in message and kind in message
        assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == kept
    # A full fine-tune's checkpoint resumed with LoRA.
    cfg = lora_run_config(model_dir, **{"lora.rank": 0})
    learner = _learner(cfg)
    params, _ = load_hf_params(model_dir)
    other = str(tmp_path / "full_run")
    with Checkpointer(os.path.join(other, "checkpoints"), async_save=False) as ckpt:
        ckpt.save(1, learner.init_state(params), data_state={}, rng=None, metadata={})
    with pytest.raises(
        TrainConfigError,
        match=r"^config\.lora\.rank: .* holds full model params, not what this run trains \(config\.lora\.rank=4, wh",
    ):
        train(lora_run_config(model_dir, steps=2), other)
    assert os.path.isdir(os.path.join(other, "checkpoints", "1"))


def test_sft_with_adapters_lowers_the_loss_and_keeps_the_base():
    from memagent_jax.models.presets import preset_config
    from memagent_jax.rl.warm_start import ScriptedConversation, conversations_to_sft_batch, sft_learner_config
    from tests.test_rl_learner import random_params

    config = preset_config("tiny", vocab_size=128)
    rng = np.random.default_rng(0)
    convs = [
        ScriptedConversation("memory", i, rng.integers(3, 128, 6 + i % 3), np.array([7, 11, 13, 2][: 2 + i % 3]))
        for i in range(8)
    ]
    batch = conversations_to_sft_batch(convs, rows_multiple=4, length_multiple=8)
    lcfg = sft_learner_config(learning_rate=3e-2, updates=6, warmup=1, updates_per_call=2, lora={"rank": 4})
    assert lcfg.loss.kind == "sft" and lcfg.lora.rank == 4 and lcfg.num_minibatches == 2
    learner = Learner(config, lcfg)
    params = random_params(config, 0)
    base_copy = jax.tree.map(np.array, params)
    state = learner.init_state(params)
    losses = []
    for _ in range(4):
        state, metrics = learner.train_step(state, batch)
        losses.append(metrics["loss"])
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.8 * losses[0]  # the adapters fit the responses
    for x, y in zip(jax.tree.leaves(learner.base_params), jax.tree.leaves(base_copy)):
        np.testing.assert_array_equal(np.asarray(x), y)  # the base is bit-identical
    assert {k for k in state.params} == {"layers"}  # the state holds adapters only
    merged = learner.policy_params(state)
    assert float(jnp.abs(merged["layers"]["mlp"]["up_proj"] - params["layers"]["mlp"]["up_proj"]).max()) > 0


@pytest.mark.faults
def test_sft_lora_section_errors_name_the_field():
    from memagent_jax import settings
    from memagent_jax.rl.warm_start import sft_learner_config

    with pytest.raises(settings.ConfigError, match=r"^config\.lora\.rank "):
        sft_learner_config(learning_rate=1e-3, updates=2, lora={"rank": -2})
    assert not sft_learner_config(learning_rate=1e-3, updates=2).lora.enabled


@pytest.mark.slow
def test_evaluation_during_a_lora_run_runs_and_exports_the_merged_model(runs, tmp_path):
    """config.eval with LoRA: the evaluation agent and the best/ export get the merged params, not the adapters."""
    from memagent_jax.data.formats import write_eval_file
    from memagent_jax.data.records import QARecord
    from memagent_jax.rl import validation

    model_dir, _, _ = runs
    path = str(tmp_path / "qa.jsonl")
    rows = [
        QARecord(question=f"What is fact {i}?", document="The river. " * 8, answers=("e",), index=i) for i in (1, 2)
    ]
    write_eval_file(rows, path)
    evals = {"eval.files": path, "eval.every_steps": 1, "eval.extract": "raw", "eval.batch_size": 2}
    workdir = str(tmp_path / "run")
    train(lora_run_config(model_dir, steps=1, **{"eval.at_start": True, **evals}), workdir)
    metrics = _metrics(workdir)
    assert sorted(metrics) == [0, 1] and all("eval/accuracy_mean" in m for m in metrics.values())
    best, _ = load_hf_params(os.path.join(workdir, validation.BEST_DIR))
    base, _ = load_hf_params(model_dir)
    assert jax.tree.structure(best) == jax.tree.structure(base)
