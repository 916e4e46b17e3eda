"""Qwen2.5-14B-Instruct memory agent, RL on HotpotQA: the reference recipe (MemAgent, arXiv 2507.02259) at scale.

    python -m memagent_jax.plan  --config configs/qwen2_5_14b_hotpotqa.py:v5p-128
    python -m memagent_jax.train --config configs/qwen2_5_14b_hotpotqa.py:v5p-128 --workdir gs://bucket/runs/q14b \\
        --config.model.path=/ckpt/Qwen2.5-14B-Instruct --config.data.train_file=/data/hotpotqa_train.parquet

The argument names the hardware and sets the mesh and batch sizes that fit it (checked by `memagent_jax.plan`):

    v5p-64 | v5p-128 | v5p-256     TPU v5p slices of 32 / 64 / 128 chips (one JAX device per chip)
    16xh100 | 32xh100 | 64xh100    2 / 4 / 8 nodes of 8 H100-80GB GPUs

One node of 8 H100s is too tight: f32 params, AdamW moments, the KL reference, f32 gradients and their
accumulator take 41 GiB per GPU before activations, the step's batch and the update's temporaries; the planner
puts the peak at 70 of 72 usable GiB (mesh 1 x 1 x 8, rollout_batch_size 8).

Recipe, numerics and batch sizes: `grpo.scale_config` (configs/grpo.py).

Mesh: tensor = 8 (40 query / 8 KV heads: the largest size that splits the KV heads; the attention
scores, the largest buffers, shrink with it), FSDP over the remaining devices, data = 1.
The comments give the planner's peak per device and step-time estimate (MFU 0.4).
"""

import ml_collections

from memagent_jax.configs import grpo

PRESET = "qwen2.5-14b-instruct"
QUESTIONS_PER_STEP = 256

# hardware argument -> (config.hardware, mesh (data, fsdp, tensor), rl.rollout_batch_size, rl.micro_batch_size)
HARDWARE = {
    "v5p-64": ("tpu-v5p", (1, 4, 8), 64, 4),  # peak 49 of 86 GiB, ~3.2 h per step
    "v5p-128": ("tpu-v5p", (1, 8, 8), 128, 8),  # peak 46 of 86 GiB, ~1.6 h per step
    "v5p-256": ("tpu-v5p", (1, 16, 8), 256, 16),  # peak 44 of 86 GiB, ~48 min per step
    "16xh100": ("h100-80gb", (1, 2, 8), 32, 2),  # peak 56 of 72 GiB, ~3.4 h per step
    "32xh100": ("h100-80gb", (1, 4, 8), 64, 4),  # peak 49 of 72 GiB, ~1.7 h per step
    "64xh100": ("h100-80gb", (1, 8, 8), 128, 8),  # peak 46 of 72 GiB, ~51 min per step
}


def get_config(arg: str = "v5p-128") -> ml_collections.ConfigDict:
    # model.path is yours: --config.model.path=/ckpt/Qwen2.5-14B-Instruct
    return grpo.scale_config(PRESET, arg, HARDWARE, QUESTIONS_PER_STEP)
