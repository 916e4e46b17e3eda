"""Test set-up: offline, CPU only, 8 simulated CPU devices for mesh tests.

This runs before any test module imports JAX, so the device count takes effect.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# 8 devices on 2 cores: XLA:CPU's default pool (8 threads) can be taken whole by collectives waiting on each other,
# and XLA then aborts the process after 40 s; 4 threads per device (see the function) before the backend starts.
from memagent_jax.distributed import size_cpu_thread_pool  # noqa: E402

size_cpu_thread_pool()
