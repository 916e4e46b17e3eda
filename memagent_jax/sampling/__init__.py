"""Sampler: prefill + `lax.while_loop` decode with a KV cache, per-token log-probs, jit-composable core.

Pure core (compose inside your own jit, e.g. the agent's scan over chunks): `prefill`, `decode`,
`prefill_and_decode`, `sample_tokens`. Host API: `Sampler`, `generate`. Settings: `SamplingParams` (validated;
static: max_new_tokens, stop ids, pad id) and `RowSampling` (per-row
temperature / top-k / top-p arrays: one compile for any values).
"""

from memagent_jax.sampling.api import GenerateResult, Sampler, generate, generate_program, prompt_buckets, row_keys
from memagent_jax.sampling.params import RowSampling, SamplingError, SamplingParams
from memagent_jax.sampling.sampler import (
    PrefillOutput,
    SampleOutput,
    decode,
    prefill,
    prefill_and_decode,
    reset_cache,
    sample_tokens,
)

__all__ = [
    "GenerateResult",
    "PrefillOutput",
    "SampleOutput",
    "Sampler",
    "RowSampling",
    "SamplingError",
    "SamplingParams",
    "decode",
    "generate",
    "generate_program",
    "prefill",
    "prefill_and_decode",
    "prompt_buckets",
    "reset_cache",
    "row_keys",
    "sample_tokens",
]
