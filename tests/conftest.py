"""Test set-up: offline, CPU only, 8 simulated CPU devices for mesh tests.

This runs before any test module imports JAX, so the device count takes effect.
"""

import gc
import os

import pytest

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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module.

    XLA:CPU maps each executable's code and data into its own memory regions, and a process may hold at most
    `vm.max_map_count` of them (65,530 by default). One pytest process runs a whole group of test modules and so
    compiles thousands of programs; kept alive by JAX's caches, they reach that limit, and the next compile dies in
    a segfault. Modules share few programs, so the recompiles cost little: test_sampling, test_rl_batch and
    test_trace_report ran in 161 s with this against 158 s without, ending with 1,393 regions against 12,604.
    """
    yield
    jax.clear_caches()
    gc.collect()
