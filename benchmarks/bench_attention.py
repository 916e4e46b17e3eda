"""Attention paths side by side: XLA's peak temporary memory at Qwen2.5-0.5B shapes, and speed on this CPU.

    python benchmarks/bench_attention.py            # learner T = 8192, chunk prefill 8192 tokens (~4 minutes)
    python benchmarks/bench_attention.py --quick    # learner T = 4096, prefill 4096 tokens, smaller speed shape
    python benchmarks/bench_attention.py --cpu-blocks   # CPU: a chunk step's prefill, 512 x 512 blocks vs 'auto'

Memory (compile only, nothing is allocated: abstract params): `jax.jit(f).lower(...).compile().memory_analysis()`
temp_size_in_bytes of
  learner   the compiled GRPO learner step (`Learner`'s own step function: forward + backward + loss + AdamW),
            Qwen2.5-0.5B shapes, f32 params, bf16 compute, remat 'full' (the shipped configs' settings), one row
            of T tokens, no KL term. Its temporaries include param-sized f32 trees (gradients, the AdamW update)
            that do not depend on T: the line under it subtracts the same step at T = 128 (that floor) to show
            what grows with T;
  prefill   a chunk step's prefill: a T-token prompt written into a KV cache of T + 1024 slots (the memory
            update's room), same model, bf16 cache;
for attention_impl 'materialized' (scores [H, T, S] in memory) and 'blockwise' (online softmax over 512 x 512
blocks, custom VJP), with the ratio materialised / blockwise.

Speed (runs, f32, best of 3 after a warm-up, the two paths alternating run by run): Qwen2.5-0.5B widths with 2 layers (H
14 / KV 2 x 64, D 896, F 4864, V 8192), T = 2048 (1024 with --quick): a prefill of T tokens into T + 256 slots, and
value_and_grad of the learner's log-prob sum over one row of T tokens, for both paths (ratio blockwise / materialised
time; < 1 = blockwise faster). 'auto' on CPU takes 'materialized' when a call fits one block (T <= 512 and S <= 512) and
'blockwise' above.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from memagent_jax.models import abstract_params, init_cache, init_params  # noqa: E402
from memagent_jax.models.presets import preset_config  # noqa: E402
from memagent_jax.rl.batch import ConversationBatch  # noqa: E402
from memagent_jax.rl.learner import Learner, LearnerConfig  # noqa: E402
from memagent_jax.rl.logprobs import token_logprobs  # noqa: E402
from memagent_jax.rl.losses import LossConfig  # noqa: E402
from memagent_jax.sampling.sampler import prefill  # noqa: E402

IMPLS = ("materialized", "blockwise")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def learner_temp_bytes(config, length: int) -> tuple[int, float]:
    """(temp bytes, compile seconds) of the learner's compiled train step on one row of `length` tokens."""
    learner = Learner(config, LearnerConfig(loss=LossConfig(kl_coef=0.0), compute_entropy=False, logits_chunk_size=512))
    spec = lambda dt: jax.ShapeDtypeStruct((1, length), dt)  # noqa: E731
    batch = ConversationBatch(
        tokens=spec(jnp.int32),
        token_mask=spec(bool),
        loss_mask=spec(bool),
        old_logprobs=spec(jnp.float32),
        advantages=jax.ShapeDtypeStruct((1,), jnp.float32),
    )
    t0 = time.perf_counter()
    compiled = learner._compiled_step(batch, False).lower(learner.abstract_state(), batch, None).compile()
    return compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - t0


def prefill_temp_bytes(config, tokens: int, slots: int) -> tuple[int, float]:
    """(temp bytes, compile seconds) of a prefill of `tokens` tokens into a cache of `slots` slots."""
    ap = abstract_params(config)
    cache = jax.eval_shape(lambda: init_cache(config, 1, slots))
    tok = jax.ShapeDtypeStruct((1, tokens), jnp.int32), jax.ShapeDtypeStruct((1, tokens), bool)
    fill = jax.jit(lambda p, a, b, kv: prefill(p, config, a, b, kv), donate_argnums=(3,))
    t0 = time.perf_counter()
    compiled = fill.lower(ap, *tok, cache).compile()
    return compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - t0


def speed(config, tokens: int, repeats: int) -> dict[tuple[str, str], float]:
    """Best seconds of a prefill (tokens into tokens + 256 slots) and of a learner-style gradient, per path. The
    two paths alternate run by run, so background load on a shared machine hits both alike."""
    params = init_params(config, 0)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, config.vocab_size, (1, tokens)).astype(np.int32))
    mask = jnp.ones((1, tokens), bool)
    programs = {}
    for impl in IMPLS:
        c = config.replace(attention_impl=impl)
        fill = jax.jit(lambda p, a, b, kv, c=c: prefill(p, c, a, b, kv).last_logits)
        cache = init_cache(c, 1, tokens + 256)
        programs[("prefill", impl)] = lambda fill=fill, cache=cache: fill(params, ids, mask, cache)

        def loss(p, c=c):
            lp, _ = token_logprobs(p, ids, mask, config=c, chunk_size=512)
            return jnp.sum(lp)

        grad = jax.jit(jax.value_and_grad(loss))
        programs[("learner grad", impl)] = lambda grad=grad: grad(params)
    for run in programs.values():
        jax.block_until_ready(run())  # compile + warm up
    best = {key: float("inf") for key in programs}
    for _ in range(repeats):
        for key, run in programs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            best[key] = min(best[key], time.perf_counter() - t0)
    return best


def cpu_blocks(repeats: int = 7) -> None:
    """A memory-agent chunk step's prefill (600 tokens into 728 slots: prefix 64, rest 600, 64 for the new memory)
    with the blockwise path in the configured 512 x 512 blocks against 'auto' on CPU, which sizes its blocks to the
    cache (`attention.cpu_block_sizes`); both skip the key blocks no query sees (a prefill over a cache). Medians of
    interleaved runs."""
    from memagent_jax.models.attention import cpu_block_sizes
    from memagent_jax.sampling.sampler import prefill, reset_cache

    tokens, slots = 600, 728
    shapes = [
        (
            "tiny (2 layers, width 128, 4 heads)",
            dict(
                num_layers=2,
                hidden_size=128,
                intermediate_size=256,
                num_heads=4,
                num_kv_heads=2,
                head_dim=32,
                vocab_size=1024,
            ),
        ),
        ("Qwen2.5-0.5B widths, 4 layers", dict(num_layers=4)),
    ]
    print(f"\n== chunk-step prefill on CPU: {tokens} tokens into {slots} slots, f32, median of {repeats} ==")
    print(f"{'shape':<38} {'batch':>5} {'512 x 512 ms':>13} {'auto ms':>9} {'blocks':>9} {'speed-up':>9}")
    for name, overrides in shapes:
        base = "tiny" if "tiny" in name else "qwen2.5-0.5b-instruct"
        config = preset_config(base, param_dtype="float32", compute_dtype="float32", **overrides)
        params = init_params(config, 0)
        for batch in (1, 4, 16) if base == "tiny" else (1, 4):
            ids = jnp.asarray(np.random.default_rng(0).integers(3, 1000, (batch, tokens)), jnp.int32)
            mask = jnp.ones((batch, tokens), bool)
            runs = {}
            for label, impl in (("fixed", "blockwise"), ("auto", "auto")):
                c = config.replace(attention_impl=impl)
                cache = init_cache(c, batch, slots)
                fn = jax.jit(lambda p, t, m, ca, c=c: prefill(p, c, t, m, reset_cache(ca)).last_logits)
                runs[label] = (fn, cache)
            times = {label: [] for label in runs}
            for fn, cache in runs.values():
                jax.block_until_ready(fn(params, ids, mask, cache))
            for _ in range(repeats):
                for label, (fn, cache) in runs.items():
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(params, ids, mask, cache))
                    times[label].append(time.perf_counter() - t0)
            fixed, auto = (float(np.median(times[k])) for k in ("fixed", "auto"))
            blocks = "x".join(map(str, cpu_block_sizes(batch, config.num_heads, tokens, slots)))
            print(
                f"{name:<38} {batch:>5} {fixed * 1e3:>13.1f} {auto * 1e3:>9.1f} {blocks:>9} {fixed / auto:>8.2f}x",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T = 4096 for memory, smaller speed shape")
    parser.add_argument(
        "--cpu-blocks", action="store_true", help="only the chunk-step prefill in 512 x 512 blocks against 'auto'"
    )
    args = parser.parse_args()
    if args.cpu_blocks:
        print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} cores")
        cpu_blocks()
        return
    length = 4096 if args.quick else 8192
    speed_tokens = 1024 if args.quick else 2048
    repeats = 3
    print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} cores")

    big = preset_config("qwen2.5-0.5b-instruct", param_dtype="float32", compute_dtype="bfloat16", remat="full")
    print(
        "\n== peak temporary bytes (XLA memory analysis, compile only): Qwen2.5-0.5B shapes, f32 params, bf16 "
        "compute, remat full, 1 row =="
    )
    print(f"{'program':<44} {'materialized':>14} {'blockwise':>14} {'ratio':>7}   compile s (mat / blk)")
    floor, _ = learner_temp_bytes(big.replace(attention_impl="materialized"), 128)
    rows = [
        (f"learner step, T = {length}", lambda c: learner_temp_bytes(c, length)),
        (
            f"chunk prefill, {length} tokens into {length + 1024} slots",
            lambda c: prefill_temp_bytes(c, length, length + 1024),
        ),
    ]
    for name, measure in rows:
        got = {impl: measure(big.replace(attention_impl=impl)) for impl in IMPLS}
        (mat, mat_s), (blk, blk_s) = got["materialized"], got["blockwise"]
        print(f"{name:<44} {_mib(mat):>14} {_mib(blk):>14} {mat / blk:>6.1f}x   {mat_s:.0f} / {blk_s:.0f}", flush=True)
        if name.startswith("learner"):
            print(
                f"{'  minus the T = 128 step (' + _mib(floor) + ')':<44} {_mib(mat - floor):>14} "
                f"{_mib(blk - floor):>14} {(mat - floor) / (blk - floor):>6.1f}x",
                flush=True,
            )

    small = preset_config(
        "qwen2.5-0.5b-instruct", num_layers=2, vocab_size=8192, param_dtype="float32", compute_dtype="float32"
    )
    print(f"\n== speed on this CPU (f32, best of {repeats}): Qwen2.5-0.5B widths, 2 layers, V 8192, 1 row ==")
    print(f"{'program':<44} {'materialized':>14} {'blockwise':>14} {'blk/mat':>7}")
    times = speed(small, speed_tokens, repeats)
    for what, label in (
        ("prefill", f"prefill, {speed_tokens} tokens into {speed_tokens + 256} slots"),
        ("learner grad", f"log-prob value_and_grad, T = {speed_tokens}"),
    ):
        mat, blk = times[(what, "materialized")], times[(what, "blockwise")]
        print(f"{label:<44} {mat * 1e3:>11.0f} ms {blk * 1e3:>11.0f} ms {blk / mat:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
