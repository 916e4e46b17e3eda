"""Accelerator figures in one run: bf16, ours against transformers on the same device, each part side by side.

    python benchmarks/bench_gpu.py                  # every part, each in a child process with its own time limit
    python benchmarks/bench_gpu.py --part agent     # one part, in this process
    python benchmarks/bench_gpu.py --quick          # small shapes: a check of the script (runs on CPU), no figures

Written for one CUDA GPU (the parts run anywhere, but cuDNN attention exists on CUDA only: elsewhere its column
runs the same `jax.nn.dot_product_attention` call through XLA, which checks our arguments and nothing else).
Parts, in this order of priority (`--budget` seconds in all; a part that no longer fits is skipped and says so):

  peaks    the ceilings the other parts are measured against, measured here: bf16 matmul TFLOP/s (a jitted
           8192^3 product, f32 accumulation) and copy GB/s (a 2 GiB bf16 array read and written once).
  parity   the attention paths on this device, on the same bf16 q/k/v (Qwen2.5-0.5B head layout: 14 query heads,
           2 KV heads, head dim 64) with pads anywhere (left, inside, whole rows) and packed segments, against a
           f32 reference computed at 'highest' matmul precision: max abs error of the output and of the input
           gradients over query rows that see at least one key, and whether every output is finite. Then f32
           blockwise against f32 materialised, and a whole random model in bf16: logits and the learner's
           log-prob gradients with each path against the f32 materialised model.
  agent    document tokens/s of our chunk scan and of the transformers agent loop (`bench_agent`'s loop, the
           model on the same device), bf16 weights and compute on both sides, greedy, fixed-length memory and
           answer (no stop token, so both sides do the same work): tiny shape and Qwen2.5-0.5B shapes, batch 1
           and 4; ours with the decode layouts of `--layouts` (default 'auto': 'scan' on TPU, else 'unstacked');
           `--shapes` picks the shapes, `--no-torch` leaves the transformers side out.
  learner  one GRPO learner step (forward, backward, clipped loss, AdamW), ours against PyTorch (`bench_learner`'s
           step, on the same device): Qwen2.5-0.5B shapes, f32 weights, bf16 compute (`torch.autocast` on
           torch's side, SDPA attention), 4 rows x 2048 tokens (512 response); ours per attention path
           (`--impls`, default cudnn,blockwise,materialized; elsewhere than CUDA 'cudnn' runs as blockwise); tokens/s
           and MFU (bench_learner's FLOP count) against the measured matmul peak.
  prefill  a chunk prefill (4096 tokens into 4096 + 1024 slots, batch 1 and 4) at Qwen2.5-0.5B shapes, bf16, per
           attention path: ms, tokens/s, MFU against the measured matmul peak, with
           FLOPs = 2 * layer matmul params * tokens + 4 * L * H * Dh * visible query-key pairs (causal: T(T+1)/2
           per row and head) + the LM head at each row's last token.
  decode   the decode loop alone (Qwen2.5-0.5B shapes, bf16, 64 tokens after a 2048-token prompt): ms per token
           for the 'scan' and 'unstacked' decode layouts at batch 1 and 4, and the bandwidth it reaches:
           bytes per token = every parameter once (bf16) + every slot of the KV cache (the decode attention
           reads the whole cache) / time per token, against the measured copy bandwidth.
  memory   XLA's peak temporary bytes of the compiled learner step and of a chunk prefill at 8192 tokens
           (Qwen2.5-0.5B shapes, bf16 compute, remat full), per attention path (`bench_attention`'s
           measurement: compile only, nothing allocated).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import bench_agent  # noqa: E402
import bench_learner  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_agent import TINY  # noqa: E402

from memagent_jax.models import attention as attn  # noqa: E402
from memagent_jax.models import init_cache, init_params  # noqa: E402
from memagent_jax.models.presets import preset_config  # noqa: E402

# part: its time limit in seconds (a child process is stopped there; the whole run is bounded by --budget)
PARTS = {"peaks": 60, "parity": 150, "agent": 260, "learner": 240, "prefill": 150, "decode": 180, "memory": 240}
DATASHEET = "H200 datasheet: 989 TFLOP/s dense bf16, 4.8 TB/s"
IMPLS = ("materialized", "blockwise", "cudnn")


def _half_config(name: str = "qwen2.5-0.5b-instruct", **kw):
    """A preset with bf16 weights and compute."""
    return preset_config(name, **dict(dict(param_dtype="bfloat16", compute_dtype="bfloat16"), **kw))


def _best(fn, repeats: int) -> float:
    """Best wall seconds of `repeats` synchronised calls (after one warm-up call)."""
    jax.block_until_ready(fn())
    return bench_agent._timed(lambda: jax.block_until_ready(fn()), repeats)


# ------------------------------------------------------------------------------------------------ peaks


def measure_peaks(quick: bool) -> dict:
    tflops = bench_learner.matmul_peak_gflops(1024 if quick else 8192, 10, jnp.bfloat16) / 1e3
    size = 2**22 if quick else 2**30
    x = jnp.zeros((size,), jnp.bfloat16)
    copy = jax.jit(lambda x: x + 1)
    gbps = 2 * 2 * size / _best(lambda: copy(x), 10) / 1e9  # noqa: F821 (x is deleted after the timing)
    del x
    return dict(tflops=tflops, gbps=gbps)


def _peaks(args) -> dict:
    if args.peaks_file and os.path.exists(args.peaks_file):
        with open(args.peaks_file) as f:
            return json.load(f)
    return measure_peaks(args.quick)


def part_peaks(args) -> None:
    peaks = measure_peaks(args.quick)
    print(
        f"bf16 matmul ({'1024' if args.quick else '8192'}^3, f32 accumulation): {peaks['tflops']:.0f} TFLOP/s; "
        f"copy (read + write): {peaks['gbps']:.0f} GB/s   [{DATASHEET}]"
    )
    if args.peaks_file:
        with open(args.peaks_file, "w") as f:
            json.dump(peaks, f)


# ------------------------------------------------------------------------------------------------ parity


def _chunk_step_case(rng, b: int, cached: int, t: int):
    """A chunk step: t new tokens over `cached` earlier slots + themselves. Row 0: left pads, pads inside and
    invalid cached slots; row 1: everything real; row 2: nothing real at all (a fully padded row)."""
    s = cached + t
    valid = np.ones((b, s), bool)
    valid[0, : cached // 3] = False
    valid[0, cached : cached + t // 8] = False  # left pads of the new tokens
    valid[0, cached + t // 8 :] &= rng.random(t - t // 8) > 0.05  # pads inside
    valid[2] = False
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    return valid, positions, None, cached


def _packed_case(rng, b: int, t: int):
    """Packed learner rows: segments of random lengths, positions restarting per segment, pads at segment ends."""
    valid = np.ones((b, t), bool)
    segments = np.zeros((b, t), np.int32)
    positions = np.zeros((b, t), np.int32)
    for r in range(b):
        start, seg = 0, 1
        while start < t:
            n = int(min(t - start, rng.integers(t // 8, t // 2)))
            real = max(1, n - int(rng.integers(0, 16)))
            segments[r, start : start + n] = seg
            positions[r, start : start + n] = np.arange(n)
            valid[r, start + real : start + n] = False
            start, seg = start + n, seg + 1
    return valid, positions, segments, 0


def _attention_errors(keys, q, k, v, cot, impl: str, dtype, reference) -> dict:
    """Output and gradient errors of one path against `reference` (f32 highest-precision outputs and grads)."""
    visible = np.asarray(attn.attention_mask(keys).any(-1))  # [B, T] rows that see a key

    def run(q, k, v):
        if impl == "cudnn":
            return attn.cudnn_attention(q, k, v, keys, implementation="cudnn" if attn._is_cuda() else "xla")
        if impl == "blockwise":
            return attn.blockwise_attention(q, k, v, keys, query_block=256, key_block=256)
        return attn.materialized_attention(q, k, v, attn.attention_mask(keys))

    def loss(q, k, v):
        out = run(q, k, v).astype(jnp.float32)
        return jnp.sum(out * cot * visible[:, :, None, None]), out

    args = tuple(a.astype(dtype) for a in (q, k, v))
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)
    ref_out, ref_grads = reference
    out, ref_out = np.asarray(out, np.float64), np.asarray(ref_out, np.float64)
    errors = dict(finite=bool(np.isfinite(out).all()), out=float(np.abs(out - ref_out)[visible].max()))
    for name, g, r in zip("qkv", grads, ref_grads):
        g, r = np.asarray(g.astype(jnp.float32), np.float64), np.asarray(r, np.float64)
        errors[f"d{name}"] = float(np.abs(g - r).max() / np.abs(r).max())
    return errors


def _reference(keys, q, k, v, cot):
    visible = np.asarray(attn.attention_mask(keys).any(-1))

    def loss(q, k, v):
        out = attn.materialized_attention(q, k, v, attn.attention_mask(keys))
        return jnp.sum(out * cot * visible[:, :, None, None]), out

    with jax.default_matmul_precision("highest"):
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def part_parity(args) -> None:
    from memagent_jax.rl.logprobs import token_logprobs

    rng = np.random.default_rng(0)
    h, kv, dh = 14, 2, 64
    t = 256 if args.quick else 1024
    cases = {
        f"chunk step: {t} tokens over {t // 4} cached slots": _chunk_step_case(rng, 3, t // 4, t),
        f"packed learner rows: {t} tokens, segments": _packed_case(rng, 2, t),
    }
    cudnn_note = "cuDNN kernel" if attn._is_cuda() else "the cuDNN call through XLA (no CUDA here)"
    print(f"attention paths against a f32 'highest' reference; H {h} / KV {kv} / Dh {dh}; 'cudnn' = {cudnn_note}")
    print("max abs error of the output over rows that see a key; gradients: max abs error / max abs reference")
    print(f"{'case':<44} {'path':<13} {'dtype':<9} {'finite':>6} {'out':>9} {'dq':>9} {'dk':>9} {'dv':>9}")
    for name, (valid, positions, segments, cached) in cases.items():
        b, s = valid.shape
        keys = attn.AttentionKeys(
            query_positions=jnp.asarray(positions[:, cached:]),
            key_positions=jnp.asarray(positions),
            key_valid=jnp.asarray(valid),
            query_segments=None if segments is None else jnp.asarray(segments[:, cached:]),
            key_segments=None if segments is None else jnp.asarray(segments),
        )
        tq = s - cached
        q = jnp.asarray(rng.normal(size=(b, tq, h, dh)), jnp.float32)
        k, v = (jnp.asarray(rng.normal(size=(b, kv, s, dh)), jnp.float32) for _ in range(2))
        cot = jnp.asarray(rng.normal(size=(b, tq, h, dh)), jnp.float32)
        reference = _reference(keys, q, k, v, cot)
        runs = [(impl, jnp.bfloat16) for impl in IMPLS] + [("blockwise", jnp.float32), ("materialized", jnp.float32)]
        for impl, dtype in runs:
            try:
                if dtype == jnp.float32:
                    with jax.default_matmul_precision("highest"):
                        e = _attention_errors(keys, q, k, v, cot, impl, dtype, reference)
                else:
                    e = _attention_errors(keys, q, k, v, cot, impl, dtype, reference)
                print(
                    f"{name:<44} {impl:<13} {jnp.dtype(dtype).name:<9} {str(e['finite']):>6} {e['out']:>9.2e} "
                    f"{e['dq']:>9.2e} {e['dk']:>9.2e} {e['dv']:>9.2e}",
                    flush=True,
                )
            except Exception as exc:  # a path this device refuses: say so, go on with the others
                print(
                    f"{name:<44} {impl:<13} {jnp.dtype(dtype).name:<9} FAILED: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0][:200]}",
                    flush=True,
                )

    # A whole model: bf16 logits and log-prob gradients per path against the f32 materialised model.
    config = preset_config("tiny", vocab_size=512, **dict(TINY, head_dim=64))
    params = init_params(config, 0)
    n = 128 if args.quick else 512
    tokens = jnp.asarray(rng.integers(3, 512, (3, n)), jnp.int32)
    mask = np.ones((3, n), bool)
    mask[0, : n // 4] = False  # left pads
    mask[1] &= rng.random(n) > 0.1  # pads inside
    mask = jnp.asarray(mask)

    def logits_and_grads(cfg, p):
        def total(p):
            lp, _ = token_logprobs(p, tokens, mask, config=cfg, chunk_size=0)
            return jnp.sum(jnp.where(mask, lp, 0.0))

        from memagent_jax.models import forward, positions_from_mask

        logits = jax.jit(lambda p: forward(p, tokens, positions_from_mask(mask), mask, config=cfg)[0])(p)
        return np.asarray(logits, np.float64), jax.jit(jax.grad(total))(p)

    with jax.default_matmul_precision("highest"):
        ref_logits, ref_grads = logits_and_grads(config.replace(attention_impl="materialized"), params)
    ref_flat = np.concatenate([np.asarray(g, np.float64).ravel() for g in jax.tree.leaves(ref_grads)])
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    print(
        f"\nwhole model (Qwen2 architecture, 2 layers, width 128, H 4 / KV 2 / Dh 64), 3 rows x {n} tokens, pads "
        f"left and inside; bf16 weights and compute against the f32 materialised model"
    )
    print(f"{'path':<13} {'max |logit error|':>18} {'top-1 agreement':>16} {'grad rel. error':>16} {'grad cosine':>12}")
    real = np.asarray(mask)
    for impl in IMPLS:
        try:
            logits, grads = logits_and_grads(
                config.replace(attention_impl=impl, param_dtype="bfloat16", compute_dtype="bfloat16"), half
            )
            flat = np.concatenate(
                [np.asarray(g.astype(jnp.float32), np.float64).ravel() for g in jax.tree.leaves(grads)]
            )
            err = np.abs(logits - ref_logits)[real].max()
            top1 = (logits.argmax(-1) == ref_logits.argmax(-1))[real].mean()
            rel = np.linalg.norm(flat - ref_flat) / np.linalg.norm(ref_flat)
            cos = flat @ ref_flat / np.linalg.norm(flat) / np.linalg.norm(ref_flat)
            print(f"{impl:<13} {err:>18.4f} {top1:>16.3f} {rel:>16.4f} {cos:>12.6f}", flush=True)
        except Exception as exc:
            print(f"{impl:<13} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
    print("bounds (tests/test_bf16.py, on CPU): logits within 0.06, top-1 >= 0.9; f32 blockwise within 1e-5")


# ------------------------------------------------------------------------------------------------ agent


def part_agent(args) -> None:
    import torch
    import transformers

    from memagent_jax.agent import AgentBudgets
    from memagent_jax.models import save_hf_checkpoint

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = tempfile.mkdtemp()
    tokenizer = bench_agent._tokenizer(os.path.join(tmp, "tok"))
    cases = []
    if "tiny" in args.shapes.split(","):
        cases.append(
            (
                "tiny",
                _half_config("tiny", vocab_size=len(tokenizer), **TINY),
                AgentBudgets(
                    question_tokens=32, chunk_tokens=512, memory_tokens=64, answer_tokens=16, chunks_per_segment=4
                ),
                4096,
            )
        )
    if "0.5b" in args.shapes.split(",") and not args.quick:
        cases.append(
            (
                "qwen2.5-0.5b shapes",
                _half_config(),
                AgentBudgets(
                    question_tokens=32, chunk_tokens=1024, memory_tokens=128, answer_tokens=16, chunks_per_segment=4
                ),
                8192,
            )
        )
    repeats = 1 if args.quick else 2  # ours; torch's loop (seconds a run at 0.5B) runs once after its warm-up
    layouts = args.layouts.split(",")
    print(
        f"document tokens/s, bf16 on {device} (ours: jax on {jax.default_backend()}); greedy, fixed-length memory "
        f"and answer; ours best of {repeats}, with decode layouts {layouts} (compile: the first call's seconds)"
    )
    print(
        f"{'shape':<21} {'C/M/A':>11} {'doc tokens':>10} {'batch':>5} {'side':<16} {'tokens/s':>9} {'compile s':>9} "
        f"{'ours/torch':>10}"
    )
    for name, config, budgets, doc_tokens in cases:
        rng = np.random.default_rng(0)
        docs = [rng.integers(3, len(tokenizer), doc_tokens).astype(np.int32) for _ in range(4)]
        questions = ["Where is the red key?"] * 4
        ours = {}
        for layout in layouts:
            agent = bench_agent._agent(config.replace(decode_layout=layout), tokenizer, budgets)
            for batch in (1, 4):
                ours[layout, batch] = bench_agent.ours_tokens_per_s(agent, questions[:batch], docs[:batch], repeats)
        ref = {}
        if not args.no_torch:
            folder = os.path.join(tmp, name.replace(" ", "_"))
            save_hf_checkpoint(agent.params, config, folder)
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
            model.generation_config.eos_token_id = None
            ref = bench_agent.torch_tokens_per_s(model, agent, questions, docs, 1)
            del model
        b = budgets
        for batch in (1, 4):
            budget = f"{b.chunk_tokens}/{b.memory_tokens}/{b.answer_tokens}"
            lead = f"{name:<21} {budget:>11} {doc_tokens:>10} {batch:>5}"
            for layout in layouts:
                speed, first = ours[layout, batch]
                ratio = f"{speed / ref[batch]:>9.2f}x" if batch in ref else f"{'-':>10}"
                print(f"{lead} {'ours, ' + layout:<16} {speed:>9.0f} {first:>9.1f} {ratio}", flush=True)
            if batch in ref:
                print(f"{lead} {'transformers':<16} {ref[batch]:>9.0f} {'-':>9} {'1.00x':>10}", flush=True)
        del agent


# ------------------------------------------------------------------------------------------------ decode


def _param_bytes(params) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(params))


def part_decode(args) -> None:
    peaks = _peaks(args)
    config = _half_config("tiny", vocab_size=512, **TINY) if args.quick else _half_config()
    n, prompt = (16, 128) if args.quick else (64, 2048)
    params = init_params(config, 0)
    weight_bytes = _param_bytes(params)
    c = config
    print(
        f"decode loop alone: {n} tokens after a {prompt}-token prompt, greedy, bf16; {weight_bytes / 1e9:.3f} GB "
        f"of weights; bandwidth use against the measured copy bandwidth {peaks['gbps']:.0f} GB/s"
    )
    print(f"{'batch':>5} {'layout':<10} {'ms/token':>9} {'GB/token':>9} {'GB/s':>8} {'of copy bw':>10}")
    for batch in (1, 4):
        for layout in ("scan", "unstacked"):
            seconds = bench_agent.decode_seconds_per_token(
                params, config.replace(decode_layout=layout), batch, prompt, n
            )
            kv_bytes = 2 * c.num_layers * batch * c.num_kv_heads * (prompt + n) * c.head_dim * 2
            moved = weight_bytes + kv_bytes
            print(
                f"{batch:>5} {layout:<10} {seconds * 1e3:>9.3f} {moved / 1e9:>9.3f} {moved / seconds / 1e9:>8.0f} "
                f"{moved / seconds / 1e9 / peaks['gbps']:>9.1%}",
                flush=True,
            )


# ------------------------------------------------------------------------------------------------ prefill


def part_prefill(args) -> None:
    from memagent_jax.sampling.sampler import prefill

    peaks = _peaks(args)
    config = _half_config("tiny", vocab_size=512, **TINY) if args.quick else _half_config()
    t, extra = (256, 64) if args.quick else (4096, 1024)
    params = init_params(config, 0)
    c = config
    print(
        f"chunk prefill: {t} tokens into {t + extra} slots, bf16; MFU against the measured matmul peak "
        f"{peaks['tflops']:.0f} TFLOP/s"
    )
    print(f"{'batch':>5} {'path':<13} {'ms':>9} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>6}")
    rng = np.random.default_rng(0)
    for batch in (1, 4):
        tokens = jnp.asarray(rng.integers(3, c.vocab_size, (batch, t)), jnp.int32)
        mask = jnp.ones((batch, t), bool)
        flops = (
            2 * bench_learner.layer_matmul_params(c) * batch * t
            + 4 * c.num_layers * c.num_heads * c.head_dim * batch * t * (t + 1) / 2
            + 2 * c.hidden_size * c.vocab_size * batch
        )
        for impl in IMPLS:
            cfg = config.replace(attention_impl=impl)
            try:
                fill = jax.jit(lambda p, a, m, kv, cfg=cfg: prefill(p, cfg, a, m, kv).last_logits)
                cache = init_cache(cfg, batch, t + extra)
                seconds = _best(lambda: fill(params, tokens, mask, cache), 3)
                print(
                    f"{batch:>5} {impl:<13} {seconds * 1e3:>9.2f} {batch * t / seconds:>11.0f} "
                    f"{flops / seconds / 1e12:>8.1f} {flops / seconds / 1e12 / peaks['tflops']:>5.1%}",
                    flush=True,
                )
            except Exception as exc:
                print(f"{batch:>5} {impl:<13} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")


# ------------------------------------------------------------------------------------------------ learner


def part_learner(args) -> None:
    import torch

    from memagent_jax.models import save_hf_checkpoint

    peaks = _peaks(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        config, (n, t, r) = preset_config("tiny", vocab_size=512, compute_dtype="bfloat16", **TINY), (2, 128, 32)
    else:
        config, (n, t, r) = _half_config(param_dtype="float32"), (4, 2048, 512)
    iters = 3 if args.quick else 5
    batch = bench_learner.make_batch(config, n, t, r)
    params = init_params(config, 0)
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(params, config, tmp)
        torch_step, torch_loss = bench_learner.make_torch(tmp, batch, device=device, compute_dtype=torch.bfloat16)
    flops = bench_learner.model_flops_per_step(config, n, t)
    tokens = n * t
    print(
        f"GRPO learner step, f32 weights, bf16 compute, {n} x {t} tokens ({r} response), on {device}; "
        f"{iters} steps per side, ours interleaved with torch's; tokens/s of the best step (median in brackets); "
        f"MFU against the measured matmul peak {peaks['tflops']:.0f} TFLOP/s"
    )
    print(f"{'side':<22} {'tokens/s':>18} {'ms':>8} {'MFU':>6} {'vs torch':>8} {'first loss':>11} {'compile s':>9}")

    def row(label, times, loss, compile_s, torch_best):
        b, m = times.min(), np.median(times)
        print(
            f"{label:<22} {f'{tokens / b:.0f} ({tokens / m:.0f})':>18} {b * 1e3:>8.1f} "
            f"{flops / b / 1e12 / peaks['tflops']:>5.1%} {torch_best / b:>7.2f}x {loss:>11.6f} {compile_s:>9.1f}",
            flush=True,
        )

    torch_times = np.array([torch_step() for _ in range(iters)])
    row("torch (autocast, SDPA)", torch_times, torch_loss, 0.0, torch_times.min())
    for impl in args.impls.split(","):
        try:
            step, loss, compile_s = bench_learner.make_ours(
                config.replace(attention_impl=impl), jax.tree.map(jnp.copy, params), batch
            )
            ours, ref = bench_learner.interleaved(step, torch_step, iters)
            torch_times = np.concatenate([torch_times, ref])
            row(f"ours, {impl}", ours, loss, compile_s, torch_times.min())
            del step
        except Exception as exc:
            print(f"ours, {impl:<16} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
    print(
        f"torch's best step over all its runs: {torch_times.min() * 1e3:.1f} ms ({tokens / torch_times.min():.0f} "
        f"tokens/s); 'vs torch' uses the best torch step measured up to that line"
    )


# ------------------------------------------------------------------------------------------------ memory


def part_memory(args) -> None:
    import bench_attention

    length = 1024 if args.quick else 8192
    config = preset_config("qwen2.5-0.5b-instruct", param_dtype="float32", compute_dtype="bfloat16", remat="full")
    if args.quick:
        config = config.replace(num_layers=2)
    print(
        f"peak temporary bytes (XLA memory analysis of the compiled program, nothing allocated): Qwen2.5-0.5B "
        f"shapes{' (2 layers)' if args.quick else ''}, f32 params, bf16 compute, remat full, 1 row"
    )
    print(f"{'program':<46} " + " ".join(f"{impl:>14}" for impl in IMPLS) + "   materialised / each")
    rows = [
        (f"learner step, T = {length}", lambda c: bench_attention.learner_temp_bytes(c, length)),
        (
            f"chunk prefill, {length} tokens into {length + 1024} slots",
            lambda c: bench_attention.prefill_temp_bytes(c, length, length + 1024),
        ),
    ]
    for name, measure in rows:
        got = {}
        for impl in IMPLS:
            try:
                got[impl] = measure(config.replace(attention_impl=impl))[0]
            except Exception as exc:
                print(f"{name}: {impl} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        cells = " ".join(f"{bench_attention._mib(got[i]) if i in got else '-':>14}" for i in IMPLS)
        ratios = " / ".join(
            f"{got['materialized'] / got[i]:.1f}x" for i in IMPLS[1:] if i in got and "materialized" in got
        )
        print(f"{name:<46} {cells}   {ratios}", flush=True)


# ------------------------------------------------------------------------------------------------ driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", *PARTS], default="all")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out of 'all'")
    parser.add_argument("--quick", action="store_true", help="small shapes: checks the script, gives no figures")
    parser.add_argument("--budget", type=float, default=1800.0, help="seconds for all parts together")
    parser.add_argument("--layouts", default="auto", help="agent: decode layouts of ours, comma-separated")
    parser.add_argument("--shapes", default="tiny,0.5b", help="agent: shapes, comma-separated (tiny, 0.5b)")
    parser.add_argument("--no-torch", action="store_true", help="agent: ours only")
    parser.add_argument("--impls", default="cudnn,blockwise,materialized", help="learner: attention paths of ours")
    parser.add_argument("--peaks-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part != "all":
        {
            "peaks": part_peaks,
            "parity": part_parity,
            "agent": part_agent,
            "decode": part_decode,
            "prefill": part_prefill,
            "learner": part_learner,
            "memory": part_memory,
        }[args.part](args)
        return
    device = jax.devices()[0]
    print(
        f"jax {jax.__version__} on {device.platform} ({getattr(device, 'device_kind', '?')}), "
        f"{os.cpu_count()} CPU cores",
        flush=True,
    )
    deadline = time.monotonic() + args.budget
    peaks_file = os.path.join(tempfile.mkdtemp(), "peaks.json")
    skip = {p for p in args.skip.split(",") if p}
    for part, limit in PARTS.items():
        if part in skip:
            continue
        left = deadline - time.monotonic()
        print(f"\n== {part} ==", flush=True)
        if left < 30:
            print(f"skipped: {left:.0f} s of the budget left")
            continue
        command = (
            [
                sys.executable,
                __file__,
                "--part",
                part,
                "--peaks-file",
                peaks_file,
                "--layouts",
                args.layouts,
                "--shapes",
                args.shapes,
                "--impls",
                args.impls,
            ]
            + (["--quick"] if args.quick else [])
            + (["--no-torch"] if args.no_torch else [])
        )
        t0 = time.monotonic()
        try:
            rc = subprocess.run(command, timeout=min(limit, left)).returncode
            print(f"[{part}: {time.monotonic() - t0:.0f} s, exit {rc}]", flush=True)
        except subprocess.TimeoutExpired:
            print(f"[{part}: stopped at its limit of {min(limit, left):.0f} s]", flush=True)


if __name__ == "__main__":
    main()
