"""Foundation benchmarks: forward compile time vs depth, and forward throughput vs transformers PyTorch.

    python benchmarks/bench_model.py            # both parts (a few minutes on 2 CPU cores)
    python benchmarks/bench_model.py --part compile
    python benchmarks/bench_model.py --part throughput --quick

compile:    jit compile time of the forward for 2, 8 and 32 layers, scanned layers (ours) side by side
            with the same model unrolled (`scan_layers=False`, the baseline), and their ratio.
throughput: forward tokens/s of our jitted forward and of transformers' PyTorch model on the same
            random weights and the same batch, f32, same thread count, and their ratio; on a small
            shape and on Qwen2.5-0.5B's shapes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from memagent_jax.models import forward, init_params, positions_from_mask, save_hf_checkpoint  # noqa: E402
from memagent_jax.models.presets import preset_config  # noqa: E402


def _forward_fn(config):
    return jax.jit(lambda p, t, q, m: forward(p, t, q, m, config=config)[0])


def bench_compile(layer_counts=(2, 8, 32)) -> None:
    print("\n== forward compile time vs depth (hidden 256, batch 2 x 128 tokens, f32) ==")
    print(f"{'layers':>6} {'scanned (s)':>12} {'unrolled (s)':>13} {'unrolled/scanned':>17}")
    tokens = jnp.ones((2, 128), jnp.int32)
    mask = jnp.ones((2, 128), bool)
    positions = positions_from_mask(mask)
    for layers in layer_counts:
        row = []
        for scan in (True, False):
            config = preset_config(
                "tiny",
                num_layers=layers,
                hidden_size=256,
                intermediate_size=512,
                num_heads=8,
                num_kv_heads=4,
                head_dim=32,
                scan_layers=scan,
            )
            params = jax.eval_shape(lambda: init_params(config, 0))
            fn = _forward_fn(config)
            t0 = time.perf_counter()
            fn.lower(params, tokens, positions, mask).compile()
            row.append(time.perf_counter() - t0)
        print(f"{layers:>6} {row[0]:>12.2f} {row[1]:>13.2f} {row[1] / row[0]:>16.1f}x")


def _time(fn, iters: int) -> float:
    fn()  # warm-up (compile / allocator)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def bench_throughput(quick: bool) -> None:
    import torch
    import transformers

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(f"\n== forward throughput, f32, same random weights, same batch; torch threads = {threads} ==")
    print(f"{'shape':<22} {'batch x seq':>12} {'ours tok/s':>11} {'torch tok/s':>12} {'ours/torch':>11}")
    cases = [
        (
            "small (256w, 4L)",
            preset_config(
                "tiny",
                num_layers=4,
                hidden_size=256,
                intermediate_size=768,
                num_heads=8,
                num_kv_heads=2,
                head_dim=32,
                vocab_size=4096,
            ),
            4,
            256,
        )
    ]
    if not quick:
        cases.append(
            (
                "qwen2.5-0.5b shapes",
                preset_config("qwen2.5-0.5b-instruct", param_dtype="float32", compute_dtype="float32"),
                2,
                256,
            )
        )
    for name, config, batch, seq in cases:
        params = init_params(config, 0)
        with tempfile.TemporaryDirectory() as tmp:
            save_hf_checkpoint(params, config, tmp)
            torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        rng = np.random.default_rng(0)
        tokens = rng.integers(3, config.vocab_size, (batch, seq)).astype(np.int32)
        mask = np.ones_like(tokens, bool)
        positions = positions_from_mask(jnp.asarray(mask))
        fn = _forward_fn(config)
        ours = _time(lambda: jax.block_until_ready(fn(params, tokens, positions, mask)), 3 if quick else 5)  # noqa: F821
        ids = torch.tensor(tokens, dtype=torch.long)

        def run_torch():
            with torch.inference_mode():
                torch_model(input_ids=ids)  # noqa: F821 (deleted after the timing)

        ref = _time(run_torch, 3 if quick else 5)
        n = batch * seq
        print(f"{name:<22} {f'{batch} x {seq}':>12} {n / ours:>11.0f} {n / ref:>12.0f} {ref / ours:>10.2f}x")
        del params, torch_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "compile", "throughput"], default="all")
    parser.add_argument("--quick", action="store_true", help="skip the 0.5B shape")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores")
    if args.part in ("all", "compile"):
        bench_compile()
    if args.part in ("all", "throughput"):
        bench_throughput(args.quick)


if __name__ == "__main__":
    main()
