"""Model parity with transformers' PyTorch models, HF round trip, KV cache, sharded loading, bad input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hf_tiny import VARIANTS, hf_logits, make_hf_model, save_hf_model
from memagent_jax.models import (
    CheckpointError,
    ConfigError,
    ModelConfig,
    forward,
    init_cache,
    load_hf_params,
    positions_from_mask,
    save_hf_checkpoint,
)
from memagent_jax.models import sharding as sharding_lib
from memagent_jax.models.safetensors_io import SafetensorsFile, write_safetensors

TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """variant -> (hf_model, folder)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, variant in enumerate(VARIANTS):
        model = make_hf_model(variant, seed=i)
        out[variant] = (model, save_hf_model(model, str(root / variant)))
    return out


def padded_batch(rng: np.random.Generator, vocab: int):
    """Three rows in one [3, 12] batch: left pads, no pads, pads in the middle (template layout)."""
    t = 12
    mask = np.ones((3, t), bool)
    mask[0, :5] = False
    mask[2, 3:6] = False
    tokens = rng.integers(3, vocab, size=(3, t)).astype(np.int32)
    tokens[~mask] = 0
    return tokens, mask


def our_logits(params, config, tokens, mask, offset=0):
    positions = positions_from_mask(jnp.asarray(mask), offset)
    fn = jax.jit(lambda p, t, q, m: forward(p, t, q, m, config=config)[0])
    return np.asarray(fn(params, jnp.asarray(tokens), positions, jnp.asarray(mask)))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_padded_batch_matches_transformers_unpadded(checkpoints, variant):
    model, folder = checkpoints[variant]
    params, config = load_hf_params(folder)
    assert config.param_dtype == "float32"
    tokens, mask = padded_batch(np.random.default_rng(0), config.vocab_size)
    ours = our_logits(params, config, tokens, mask)
    for row in range(tokens.shape[0]):
        ref = hf_logits(model, tokens[row][mask[row]])
        got = ours[row][mask[row]]
        assert np.abs(got - ref).max() <= TOL, (variant, row, np.abs(got - ref).max())
        assert np.isfinite(ours[row]).all()  # pad rows stay finite


def test_positions_offset_matches_transformers(checkpoints):
    """Rope scaling (llama3) exercised at positions past the original context."""
    model, folder = checkpoints["llama3"]
    params, config = load_hf_params(folder)
    tokens = np.random.default_rng(1).integers(3, 128, size=(1, 9)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    ours = our_logits(params, config, tokens, mask, offset=300)
    ref = hf_logits(model, tokens[0], positions=np.arange(300, 309))
    assert np.abs(ours[0] - ref).max() <= TOL


@pytest.mark.parametrize("variant", ["qwen2", "qwen2_tied", "qwen3", "llama3"])
def test_round_trip_export_load(checkpoints, tmp_path, variant):
    model, folder = checkpoints[variant]
    params, config = load_hf_params(folder)
    out = save_hf_checkpoint(params, config, str(tmp_path / "export"), base_folder=folder, max_shard_bytes=40_000)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.random.default_rng(2).integers(3, 128, size=10)
    assert np.abs(hf_logits(reloaded, tokens) - hf_logits(model, tokens)).max() <= TOL
    # Load the export again: identical params; export again: identical tensors.
    params2, config2 = load_hf_params(out)
    assert config2 == config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)
    out2 = save_hf_checkpoint(params2, config2, str(tmp_path / "export2"), base_folder=out)
    first = {n: f for n, f in _tensors(out).items()}
    second = _tensors(out2)
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])


def _tensors(folder):
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    return {n: SafetensorsFile(os.path.join(folder, f)).read(n) for n, f in index["weight_map"].items()}


def test_export_bf16_loads_in_transformers(checkpoints, tmp_path):
    model, folder = checkpoints["qwen3"]
    params, config = load_hf_params(folder)
    out = save_hf_checkpoint(params, config, str(tmp_path / "bf16"), dtype="bfloat16")
    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == torch.bfloat16
    params_bf16, config_bf16 = load_hf_params(out)
    assert config_bf16.param_dtype == "bfloat16"
    assert params_bf16["embed"].dtype == jnp.bfloat16


def test_kv_cache_prefill_then_decode_matches_full_forward(checkpoints):
    _, folder = checkpoints["qwen3"]
    params, config = load_hf_params(folder)
    tokens, mask = padded_batch(np.random.default_rng(3), config.vocab_size)
    full = our_logits(params, config, tokens, mask)
    positions = np.asarray(positions_from_mask(jnp.asarray(mask)))
    step = jax.jit(lambda p, t, q, m, c: forward(p, t, q, m, config=config, cache=c))
    cache = init_cache(config, batch_size=3, max_length=16)
    prefill = 6
    logits, cache = step(params, tokens[:, :prefill], positions[:, :prefill], mask[:, :prefill], cache)
    pieces = [np.asarray(logits)]
    for i in range(prefill, tokens.shape[1]):
        logits, cache = step(params, tokens[:, i : i + 1], positions[:, i : i + 1], mask[:, i : i + 1], cache)
        pieces.append(np.asarray(logits))
    assert int(cache.length) == tokens.shape[1]
    decoded = np.concatenate(pieces, axis=1)
    assert np.abs(decoded[mask] - full[mask]).max() <= TOL


def test_bf16_compute_close_to_f32(checkpoints):
    _, folder = checkpoints["qwen2"]
    params, config = load_hf_params(folder)
    params16, config16 = load_hf_params(folder, param_dtype="bfloat16")
    config16 = config16.replace(compute_dtype="bfloat16")
    assert params16["layers"]["attn"]["q_proj"].dtype == jnp.bfloat16
    tokens, mask = padded_batch(np.random.default_rng(4), config.vocab_size)
    ref = our_logits(params, config, tokens, mask)
    got = our_logits(params16, config16, tokens, mask)
    assert got.dtype == np.float32
    err = np.abs(got - ref)[mask].max()
    assert 0 < err < 0.05 * np.abs(ref).max()


def test_sharded_load_on_8_devices_matches_unsharded(checkpoints):
    assert jax.device_count() == 8
    _, folder = checkpoints["qwen2"]
    params, config = load_hf_params(folder)
    mesh = sharding_lib.make_mesh(data=2, fsdp=2, tensor=2)
    sharded, _ = load_hf_params(folder, mesh=mesh)
    q_proj = sharded["layers"]["attn"]["q_proj"]
    assert q_proj.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len({s.device for s in q_proj.addressable_shards}) == 8
    assert q_proj.addressable_shards[0].data.shape == (2, 32, 2, 16)
    assert sharded["embed"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    tokens, mask = padded_batch(np.random.default_rng(5), config.vocab_size)
    tokens, mask = np.concatenate([tokens, tokens[:1]]), np.concatenate([mask, mask[:1]])  # batch 4
    ref = our_logits(params, config, tokens, mask)
    batch = sharding_lib.batch_sharding(mesh, rank=2, batch_size=4)
    positions = jax.device_put(positions_from_mask(jnp.asarray(mask)), batch)
    fn = jax.jit(lambda p, t, q, m: forward(p, t, q, m, config=config)[0])
    with jax.set_mesh(mesh):
        got = fn(sharded, jax.device_put(tokens, batch), positions, jax.device_put(mask, batch))
    assert np.abs(np.asarray(got) - ref).max() <= TOL


def test_indivisible_dims_fall_back_to_replication():
    mesh = sharding_lib.make_mesh(data=1, fsdp=2, tensor=4)
    spec = sharding_lib.logical_to_spec(("layer", "embed", "kv_heads", "head_dim"), (2, 64, 2, 16), mesh)
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
    with pytest.raises(sharding_lib.MeshError, match="8 are available"):
        sharding_lib.make_mesh(data=2, fsdp=2, tensor=4)


# ---------------------------------------------------------------------------------------- bad input


def _copy(folder, tmp_path, name="bad"):
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    return str(dst)


def test_missing_config_json(checkpoints, tmp_path):
    folder = _copy(checkpoints["qwen2"][1], tmp_path)
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        load_hf_params(folder)


def test_unsupported_model_type(checkpoints, tmp_path):
    folder = _copy(checkpoints["qwen2"][1], tmp_path)
    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    cfg["model_type"] = "gpt2"
    json.dump(cfg, open(path, "w"))
    with pytest.raises(ConfigError, match=r"config\.json: model_type 'gpt2' is not supported"):
        load_hf_params(folder)


def _rewrite_weights(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    f = SafetensorsFile(path)
    tensors = {n: np.array(f.read(n)) for n in f.names()}
    del f
    edit(tensors)
    specs = [(n, a.shape, a.dtype) for n, a in tensors.items()]
    write_safetensors(path, specs, list(tensors.items()))


def test_missing_tensor(checkpoints, tmp_path):
    folder = _copy(checkpoints["qwen2"][1], tmp_path)
    _rewrite_weights(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        load_hf_params(folder)


def test_misshapen_tensor(checkpoints, tmp_path):
    folder = _copy(checkpoints["qwen2"][1], tmp_path)

    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:-1]

    _rewrite_weights(folder, shrink)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj"
        r"\.weight' has shape \(31, 64\), but config\.json implies \(32, 64\)",
    ):
        load_hf_params(folder)


def test_index_names_missing_shard(checkpoints, tmp_path):
    params, config = load_hf_params(checkpoints["qwen2"][1])
    out = save_hf_checkpoint(params, config, str(tmp_path / "sharded"), max_shard_bytes=40_000)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        shards = len(set(json.load(f)["weight_map"].values()))
    os.remove(os.path.join(out, f"model-00002-of-{shards:05d}.safetensors"))
    with pytest.raises(CheckpointError, match=r"names shard 'model-00002-of-\d+\.safetensors'.*does not exist"):
        load_hf_params(out)


def test_pickle_only_checkpoint_is_refused(checkpoints, tmp_path):
    model, _ = checkpoints["qwen2"]
    folder = str(tmp_path / "pickle")
    model.save_pretrained(folder, safe_serialization=False) if _supports_unsafe() else _write_bin(model, folder)
    assert any(n.endswith(".bin") for n in os.listdir(folder))
    assert not any(n.endswith(".safetensors") for n in os.listdir(folder))
    with pytest.raises(CheckpointError, match=r"only pickle weight files found \(pytorch_model\.bin\).*safetensors"):
        load_hf_params(folder)


def _supports_unsafe():
    import inspect

    return "safe_serialization" in inspect.signature(transformers.PreTrainedModel.save_pretrained).parameters


def _write_bin(model, folder):
    os.makedirs(folder, exist_ok=True)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))


def test_config_reads_old_dialect():
    old = {
        "model_type": "qwen2",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rope_theta": 12345.0,
        "torch_dtype": "bfloat16",
        "rope_scaling": {"type": "linear", "factor": 4.0},
    }
    c = ModelConfig.from_hf_dict(old)
    assert (c.rope.theta, c.rope.rope_type, c.rope.factor) == (12345.0, "linear", 4.0)
    assert c.param_dtype == "bfloat16" and c.attention_bias and not c.qk_norm
    with pytest.raises(ConfigError, match=r"config\.json: required field 'hidden_size' is missing"):
        ModelConfig.from_hf_dict({k: v for k, v in old.items() if k != "hidden_size"})
    with pytest.raises(ConfigError, match=r"rope type 'yarn'"):
        ModelConfig.from_hf_dict(dict(old, rope_scaling={"type": "yarn", "factor": 4.0}))


def test_rewind_cache_reuses_prefix(checkpoints):
    """Prefix prefilled once, rewound, then two different continuations: each equals its full forward."""
    from memagent_jax.models import rewind_cache

    _, folder = checkpoints["qwen2"]
    params, config = load_hf_params(folder)
    rng = np.random.default_rng(6)
    prefix = rng.integers(3, 128, (2, 5)).astype(np.int32)
    step = jax.jit(lambda p, t, q, m, c: forward(p, t, q, m, config=config, cache=c))
    ones = np.ones((2, 5), bool)
    _, cache = step(params, prefix, positions_from_mask(jnp.asarray(ones)), ones, init_cache(config, 2, 16))
    for trial in range(2):
        tail = rng.integers(3, 128, (2, 4 + 3 * trial)).astype(np.int32)
        tail_mask = np.ones_like(tail, bool)
        logits, _ = step(
            params, tail, positions_from_mask(jnp.asarray(tail_mask), 5), tail_mask, rewind_cache(cache, 5)
        )
        full = np.concatenate([prefix, tail], axis=1)
        ref = our_logits(params, config, full, np.ones_like(full, bool))[:, 5:]
        assert np.abs(np.asarray(logits) - ref).max() <= TOL
