"""Model presets as ml_collections configs (shapes only; weights come from `path`).

    --config=configs/models.py:qwen2.5-7b-instruct --config.path=/ckpt/Qwen2.5-7B-Instruct

Fields:
  preset         name of the architecture preset (memagent_jax.models.presets.PRESETS)
  path           local Hugging Face folder with the weights ('' = random init, for tests/benchmarks)
  param_dtype    dtype params are held in ('bfloat16' for real models, 'float32' on CPU)
  compute_dtype  dtype of matmuls (norms, softmax and logits are always f32)
  remat          activation rematerialisation of the layer scan: 'none' | 'full' | 'dots'
  attention_impl attention kernel: 'auto' | 'materialized' | 'blockwise' | 'cudnn' (models/attention.py)
"""

import ml_collections


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    from memagent_jax.models.presets import PRESETS

    name = (arg or "tiny").lower()
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {arg!r}; known: {', '.join(sorted(PRESETS))}")
    cpu = name == "tiny"
    return ml_collections.ConfigDict(
        dict(
            preset=name,
            path="",
            param_dtype="float32" if cpu else "bfloat16",
            compute_dtype="float32" if cpu else "bfloat16",
            remat="none" if cpu else "full",
            attention_impl="auto",
        )
    )
