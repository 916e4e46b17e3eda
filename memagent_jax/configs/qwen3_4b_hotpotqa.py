"""Qwen3-4B memory agent, RL on HotpotQA: the reference recipe (MemAgent, arXiv 2507.02259) at scale.

    python -m memagent_jax.plan  --config configs/qwen3_4b_hotpotqa.py:v5p-128
    python -m memagent_jax.train --config configs/qwen3_4b_hotpotqa.py:v5p-128 --workdir gs://bucket/runs/qwen3_4b \\
        --config.model.path=/ckpt/Qwen3-4B --config.data.train_file=/data/hotpotqa_train.parquet

The argument names the hardware and sets the mesh and batch sizes that fit it (checked by `memagent_jax.plan`):

    v5p-64 | v5p-128 | v5p-256     TPU v5p slices of 32 / 64 / 128 chips (one JAX device per chip)
    8xh100 | 16xh100 | 32xh100     1 / 2 / 4 nodes of 8 H100-80GB GPUs

Recipe, numerics and batch sizes: `grpo.scale_config` (configs/grpo.py).

Mesh: tensor = 8 (32 query / 8 KV heads: the largest size that splits the KV heads; the attention
scores, the largest buffers, shrink with it), FSDP over the remaining devices, data = 1.
The comments give the planner's peak per device and step-time estimate (MFU 0.4).
"""

import ml_collections

from memagent_jax.configs import grpo

PRESET = "qwen3-4b"
QUESTIONS_PER_STEP = 128

# hardware argument -> (config.hardware, mesh (data, fsdp, tensor), rl.rollout_batch_size, rl.micro_batch_size)
HARDWARE = {
    "v5p-64": ("tpu-v5p", (1, 4, 8), 128, 4),  # peak 66 of 86 GiB, ~34 min per step
    "v5p-128": ("tpu-v5p", (1, 8, 8), 256, 8),  # peak 65 of 86 GiB, ~17 min per step
    "v5p-256": ("tpu-v5p", (1, 16, 8), 512, 16),  # peak 64 of 86 GiB, ~8 min per step
    "8xh100": ("h100-80gb", (1, 1, 8), 16, 1),  # peak 40 of 72 GiB, ~1.3 h per step
    "16xh100": ("h100-80gb", (1, 2, 8), 32, 2),  # peak 36 of 72 GiB, ~38 min per step
    "32xh100": ("h100-80gb", (1, 4, 8), 64, 4),  # peak 34 of 72 GiB, ~19 min per step
}


def get_config(arg: str = "v5p-128") -> ml_collections.ConfigDict:
    # model.path is yours: --config.model.path=/ckpt/Qwen3-4B
    return grpo.scale_config(PRESET, arg, HARDWARE, QUESTIONS_PER_STEP)
