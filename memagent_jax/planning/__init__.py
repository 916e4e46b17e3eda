"""The capacity planner's arithmetic: bytes per device, FLOPs and step time of a training config on a mesh.

Pure functions of a config and a hardware description; importing the package loads no JAX (the functions that
read `models.sharding` or `models.attention` import them when called). `memagent_jax.plan` is the command that
prints a plan; its docstring says what is counted, phase by phase.

    errors     PlanError
    hardware   GiB, DTYPE_BYTES, the hardware table (HARDWARE, get_hardware, platform_of)
    mesh       MeshShape, resolve_mesh, per-device sizes under the sharding rules (sharded, local_numel)
    shapes     parameter shapes and counts, matmul weights per token, the agent's token Layout
    memory     bytes: parameter trees, KV caches, learner / rollout activations, the learner batch
    flops      FLOPs of learning and of the rollout, the time of one decode step
    plan       Plan, make_plan (the assembly), suggest_fixes and the config readers
    report     format_plan (the printed table)
"""

from memagent_jax.planning.errors import PlanError
from memagent_jax.planning.flops import decode_step_seconds, forward_flops_per_token, learning_flops, rollout_flops
from memagent_jax.planning.hardware import DTYPE_BYTES, HARDWARE, GiB, Hardware, get_hardware, platform_of
from memagent_jax.planning.memory import (
    BLOCK_BYTES_INFERENCE,
    BLOCK_BYTES_WORKING,
    SCORE_BYTES_INFERENCE,
    SCORE_BYTES_KEPT,
    SCORE_BYTES_WORKING,
    attention_path,
    decode_layout_of,
    gathered_param_bytes,
    kv_cache_bytes,
    layer_activation_bytes,
    layer_param_bytes_per_device,
    learner_activation_bytes,
    learner_batch_bytes,
    param_bytes_per_device,
    rollout_activation_bytes,
    working_weight_bytes,
)
from memagent_jax.planning.mesh import MeshShape, local_numel, resolve_mesh, sharded
from memagent_jax.planning.plan import (
    Plan,
    layout_from,
    make_plan,
    model_config_from,
    rollout_batch_size,
    rollout_mesh_of,
    suggest_fixes,
)
from memagent_jax.planning.report import format_plan
from memagent_jax.planning.shapes import Layout, layer_matmul_params, matmul_params, param_count, param_shapes

__all__ = [
    "PlanError",
    "GiB",
    "DTYPE_BYTES",
    "Hardware",
    "HARDWARE",
    "get_hardware",
    "platform_of",
    "MeshShape",
    "resolve_mesh",
    "sharded",
    "local_numel",
    "param_shapes",
    "param_count",
    "layer_matmul_params",
    "matmul_params",
    "Layout",
    "param_bytes_per_device",
    "gathered_param_bytes",
    "layer_param_bytes_per_device",
    "kv_cache_bytes",
    "SCORE_BYTES_INFERENCE",
    "SCORE_BYTES_KEPT",
    "SCORE_BYTES_WORKING",
    "BLOCK_BYTES_INFERENCE",
    "BLOCK_BYTES_WORKING",
    "attention_path",
    "decode_layout_of",
    "layer_activation_bytes",
    "working_weight_bytes",
    "learner_activation_bytes",
    "rollout_activation_bytes",
    "learner_batch_bytes",
    "forward_flops_per_token",
    "learning_flops",
    "rollout_flops",
    "decode_step_seconds",
    "Plan",
    "model_config_from",
    "layout_from",
    "rollout_batch_size",
    "rollout_mesh_of",
    "make_plan",
    "suggest_fixes",
    "format_plan",
]
