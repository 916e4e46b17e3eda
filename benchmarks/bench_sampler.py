"""Sampler benchmark: prefill and decode tokens/s of our jitted generate against transformers' PyTorch `generate`.

    python benchmarks/bench_sampler.py            # tiny + Qwen2.5-0.5B shapes, batch 1 and 8 (~3-4 min on 2 cores)
    python benchmarks/bench_sampler.py --quick    # same table, 1 repeat, fewer new tokens (~2 min)
    python -m benchmarks.bench_sampler --shapes tiny
    python benchmarks/bench_sampler.py --token-selection   # top-p token selection alone: probes vs full sort

Same random weights on both sides (our params exported as an HF folder and loaded by transformers), f32,
greedy, the same prompts (equal lengths, so neither side pads), a fixed number of new tokens (no stop id on
our side; `min_new_tokens` = `max_new_tokens` on torch's). torch uses as many threads as XLA (all cores).
Each side is warmed up (compiles, allocator) first; the repeats are interleaved (ours, torch, ours, ...) and
each time is the best of the repeats (the least disturbed run on a shared machine):

    prefill tok/s = batch * prompt_len / t(1 new token)
    decode  tok/s = batch * (N - 1) / (t(N new tokens) - t(1 new token))

Both times are end to end from Python token ids to Python token ids (our host-side padding, transfer and
trimming included; torch's generate loop included).

--token-selection: one top-p pick (`sample_tokens`, temperature 0.7, top-p 0.95) of a [256, 1024] batch, the
nucleus searched among the top 16 / 128 tokens first (`sampler.NUCLEUS_PROBES`) against the same pick over the
fully sorted vocabulary (`probes=()`, a plain sort-based top-p), on logits whose nucleus is a few tokens (a
trained model), tens, or hundreds (a nearly flat row: the sort runs on both sides), interleaved, medians; and
whether both sides picked the same tokens.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from memagent_jax.models import init_params, save_hf_checkpoint  # noqa: E402
from memagent_jax.models.presets import preset_config  # noqa: E402
from memagent_jax.sampling import Sampler, SamplingParams  # noqa: E402


def _shape_cases(quick: bool):
    tiny = preset_config("tiny")
    qwen = preset_config("qwen2.5-0.5b-instruct", param_dtype="float32", compute_dtype="float32")
    # (name, config, prompt length, new tokens)
    return {
        "tiny": ("tiny (64w, 2L, vocab 512)", tiny, 64, 64 if quick else 128),
        "0.5b": ("Qwen2.5-0.5B shapes", qwen, 128, 16 if quick else 32),
    }


def run(shapes, batches, repeats: int | None, quick: bool, top_p: float | None = None) -> list[dict]:
    import torch
    import transformers

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    rows = []
    cases = _shape_cases(quick)
    for key in shapes:
        name, config, prompt_len, new = cases[key]
        params = init_params(config, 0)
        with tempfile.TemporaryDirectory() as tmp:
            save_hf_checkpoint(params, config, tmp)
            torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        sampler = Sampler(params, config, buckets=(prompt_len,))
        for batch in batches:
            rng = np.random.default_rng(batch)
            prompts = rng.integers(3, config.vocab_size, size=(batch, prompt_len))
            ids = torch.tensor(prompts, dtype=torch.long)
            mask = torch.ones_like(ids)

            def ours(n):
                sp = SamplingParams(max_new_tokens=n, temperature=1.0 if top_p else 0.0, top_p=top_p or 1.0)
                return sampler.generate(prompts.tolist(), sp, rng=0)  # noqa: F821 (deleted after the shape)

            def theirs(n):
                cfg = transformers.GenerationConfig(
                    do_sample=bool(top_p),
                    top_p=top_p or 1.0,
                    top_k=0,
                    temperature=1.0,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    eos_token_id=None,
                    pad_token_id=0,
                )
                with torch.no_grad():
                    return torch_model.generate(ids, attention_mask=mask, generation_config=cfg)  # noqa: F821

            t0 = time.perf_counter()
            ours(new)  # warm-up: compiles both programs
            ours(1)
            compile_s = time.perf_counter() - t0
            theirs(2)  # warm-up

            # Interleaved repeats (ours, torch, ours, torch, ...) so that drifts of the machine hit both sides.
            times = {(side, n): [] for side in ("ours", "torch") for n in (1, new)}
            outputs = {}
            for _ in range(repeats if repeats else (3 if key == "tiny" else 2)):
                for side, fn in (("ours", ours), ("torch", theirs)):
                    for n in (1, new):
                        t0 = time.perf_counter()
                        outputs[side, n] = fn(n)
                        times[side, n].append(time.perf_counter() - t0)
            ours_out, torch_out = outputs["ours", new], outputs["torch", new]
            agree = float(np.mean([ours_out.tokens[i] == torch_out[i, prompt_len:].tolist() for i in range(batch)]))
            figures = {}
            for side in ("ours", "torch"):
                t1, tn = min(times[side, 1]), min(times[side, new])
                figures[side] = (batch * prompt_len / t1, batch * (new - 1) / max(tn - t1, 1e-9))
            row = dict(
                shape=name,
                batch=batch,
                prompt=prompt_len,
                new=new,
                compile_s=compile_s,
                agree=agree,
                ours_prefill=figures["ours"][0],
                torch_prefill=figures["torch"][0],
                ours_decode=figures["ours"][1],
                torch_decode=figures["torch"][1],
            )
            rows.append(row)
            print(_format_row(row), flush=True)
        del torch_model, sampler, params
    return rows


HEADER = (
    f"| {'shape':<26} | {'batch':>5} | {'prompt+new':>10} | {'prefill ours':>12} | {'prefill torch':>13} "
    f"| {'ratio':>6} | {'decode ours':>11} | {'decode torch':>12} | {'ratio':>6} | {'greedy =':>8} |"
)


def _format_row(r: dict) -> str:
    return (
        f"| {r['shape']:<26} | {r['batch']:>5} | {str(r['prompt']) + '+' + str(r['new']):>10} "
        f"| {r['ours_prefill']:>12.0f} | {r['torch_prefill']:>13.0f} "
        f"| {r['ours_prefill'] / r['torch_prefill']:>5.2f}x "
        f"| {r['ours_decode']:>11.1f} | {r['torch_decode']:>12.1f} | {r['ours_decode'] / r['torch_decode']:>5.2f}x "
        f"| {r['agree'] * 100:>7.0f}% |"
    )


def token_selection(repeats: int = 30) -> None:
    import jax.numpy as jnp

    from memagent_jax.sampling.sampler import _nucleus_pick

    batch, vocab, top_p, temperature = 256, 1024, 0.95, 0.7
    probed = jax.jit(lambda s, k: _nucleus_pick(s, k, top_p))
    full = jax.jit(lambda s, k: _nucleus_pick(s, k, top_p, probes=()))
    keys = jax.random.split(jax.random.key(0), batch)
    print(f"top-p {top_p} pick of a [{batch}, {vocab}] batch at temperature {temperature}, median of {repeats}")
    print("| logits | nucleus (median) | probes ms | full sort ms | speed-up | same tokens |")
    print("|---|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for name, scale in (("peaked (trained model)", 8.0), ("spread", 3.0), ("nearly flat", 0.3)):
        scaled = jnp.asarray(rng.normal(size=(batch, vocab)) * scale / temperature, jnp.float32)
        p = np.sort(np.asarray(jax.nn.softmax(scaled, axis=-1), np.float64), axis=-1)[:, ::-1]
        nucleus = int(np.median((np.cumsum(p, axis=-1) - p < top_p).sum(axis=-1)))
        times = {"probes": [], "full": []}
        for fn in (probed, full):
            jax.block_until_ready(fn(scaled, keys))
        for _ in range(repeats):
            for name_fn, fn in (("probes", probed), ("full", full)):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(scaled, keys))
                times[name_fn].append(time.perf_counter() - t0)
        a, b = (float(np.median(times[k])) * 1e3 for k in ("probes", "full"))
        same = bool((np.asarray(probed(scaled, keys)[0]) == np.asarray(full(scaled, keys)[0])).all())
        print(f"| {name} | {nucleus} | {a:.2f} | {b:.2f} | {b / a:.1f}x | {'yes' if same else 'NO'} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 repeat, fewer new tokens")
    parser.add_argument("--shapes", nargs="+", default=["tiny", "0.5b"], choices=["tiny", "0.5b"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--top-p", type=float, default=None, help="sample (temperature 1, this top_p) on both sides instead of greedy"
    )
    parser.add_argument(
        "--token-selection",
        action="store_true",
        help="time the top-p token selection alone (nucleus probes against the full sort)",
    )
    args = parser.parse_args(argv)
    if args.token_selection:
        token_selection()
        return 0
    repeats = args.repeats or (1 if args.quick else None)  # None: 3 on the tiny shape, 2 on 0.5B
    threads = os.cpu_count() or 1
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s)); "
        f"{os.cpu_count()} CPU cores; torch {threads} threads; f32; "
        f"{'top-p ' + str(args.top_p) if args.top_p else 'greedy'}; tokens/s, "
        f"best of {repeats or '3 (tiny) / 2 (0.5B)'} interleaved repeats"
    )
    print("'greedy =': share of rows whose greedy tokens are identical on both sides (meaningless when sampling)")
    print(HEADER)
    print("|" + "|".join("-" * (len(c)) for c in HEADER.split("|")[1:-1]) + "|")
    load_before = os.getloadavg()[0]
    run(args.shapes, args.batches, repeats, args.quick, args.top_p)
    load_after = os.getloadavg()[0]
    print(
        f"1-minute load average: {load_before:.2f} before, {load_after:.2f} after "
        f"(well above 0 means other processes shared the cores: figures are then noisy)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
