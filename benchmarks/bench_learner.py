"""Learner benchmark: one GRPO train step (forward + backward + clipped loss + AdamW), ours vs PyTorch, side by side.

    python benchmarks/bench_learner.py            # two shapes (a few minutes on 2 CPU cores)
    python benchmarks/bench_learner.py --quick    # the small shape only, fewer timed steps
    python benchmarks/bench_learner.py --packing  # our step on packed rows vs one conversation per row
    python benchmarks/bench_learner.py --micro    # our step: micro-batch sizes and the LM head's response window

Both sides run the same model (our random init, exported with `save_hf_checkpoint` and loaded by transformers'
`AutoModelForCausalLM`, f32, SDPA attention), on the same batch of N conversations x T tokens (no padding; the
last R tokens of each row are the response), with the same loss and optimiser:

    per response token: r = exp(logp - old_logp);  l = max(-A r, -A clip(r, 1 - 0.2, 1 + 0.28)), dual clip 3 for A < 0
    loss = token-mean over all response tokens;  AdamW (b = 0.9/0.999, eps 1e-8, wd 0.01), global-norm clip 1.0.
    (No KL term, no entropy: kl_coef = 0, entropy off on our side; old log-probs given, not recomputed.)

Ours: `Learner.train_step` (one jit, one mini-batch, its defaults: on CPU micro-batches of at most 4,096 tokens,
the LM head on a window over the responses). PyTorch: model(input_ids).logits ->
log_softmax -> gather -> the same loss -> backward -> clip_grad_norm_ -> torch.optim.AdamW.step.

Timing: after a warm-up step each, the two sides alternate step by step (so background load on a shared machine
hits both alike); tokens/s uses the best step (the median is shown in brackets), all N * T tokens (each goes
through forward and backward).
Model FLOPs per step (PaLM-style, counting the full attention square, not halved for causality):

    FLOPs per step = 6 * P * tokens  +  12 * L * H * Dh * T * tokens,      tokens = N * T

with P the matmul parameters (attention + MLP of every layer + the LM head, embedding lookup excluded), L
layers, H query heads, Dh head dim. MFU = FLOPs / seconds / peak, with peak = the best f32 GFLOP/s of a jitted
2048^3 matmul measured here before and after the runs (the CPU's practical peak).
The first-step losses of both sides are printed as a check that they compute the same thing.

--packing: our learner step (GRPO loss, AdamW) on the same conversations laid out one per row (padded to the
longest, rounded up to 16) and packed by `rl.batch.pack_conversations`, steps interleaved, medians; for two length
mixes at the main job's model shape (width 128, 2 layers, vocab 1024): the main job's own (2/3 memory updates of
74-78 tokens, 1/3 final answers of 42-47) and a wide spread (memory updates of 300-700 tokens, final answers of
60-150: a memory that grows over a document, a short answer prompt). The first-step losses agree.

--micro: our learner step (GRPO loss with the main job's k3 KL, AdamW) on the main job's GRPO batch with 8-chunk rows
(1,024 memory updates of 74-100 tokens and 128 final answers of 42-47, responses of 2-8 tokens; 1,152 rows), at the
main job's model shape, for micro-batches of several token sizes (0: the whole mini-batch) with the LM head's
response window on, and the whole mini-batch with it off; steps interleaved, medians.
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

from memagent_jax.models import init_params, save_hf_checkpoint  # noqa: E402
from memagent_jax.models.presets import preset_config  # noqa: E402
from memagent_jax.rl.batch import ConversationBatch  # noqa: E402
from memagent_jax.rl.learner import Learner, LearnerConfig, OptimizerConfig  # noqa: E402
from memagent_jax.rl.losses import LossConfig  # noqa: E402

CLIP_LOW, CLIP_HIGH, DUAL, LR = 0.2, 0.28, 3.0, 1e-5


def matmul_peak_gflops(n: int = 2048, iters: int = 10, dtype=jnp.float32) -> float:
    """Best GFLOP/s of a jitted n^3 matmul in `dtype` (f32 accumulation) over `iters` calls after a warm-up."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    jax.block_until_ready(f(a))
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a))
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def layer_matmul_params(config) -> int:
    """Weights of every layer's attention and MLP matmuls (no embedding, no LM head)."""
    c = config
    attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    return c.num_layers * (attn + 3 * c.hidden_size * c.intermediate_size)


def model_flops_per_step(config, batch: int, seq: int) -> float:
    c = config
    matmul_params = layer_matmul_params(c) + c.hidden_size * c.vocab_size
    tokens = batch * seq
    return 6.0 * matmul_params * tokens + 12.0 * c.num_layers * c.num_heads * c.head_dim * seq * tokens


def make_batch(config, batch: int, seq: int, response: int, seed: int = 0) -> ConversationBatch:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, config.vocab_size, (batch, seq)).astype(np.int32)
    token_mask = np.ones((batch, seq), bool)
    loss_mask = np.zeros((batch, seq), bool)
    loss_mask[:, seq - response :] = True
    old = np.where(loss_mask, -np.log(config.vocab_size) + rng.uniform(-0.3, 0.3, (batch, seq)), 0.0)
    adv = rng.normal(size=batch).astype(np.float32)
    return ConversationBatch(
        tokens=tokens, token_mask=token_mask, loss_mask=loss_mask, old_logprobs=old.astype(np.float32), advantages=adv
    )


def make_ours(config, params, batch: ConversationBatch, **learner_settings):
    """Returns (step() -> seconds, first-step loss, compile seconds) for our learner (`learner_settings`: other
    `LearnerConfig` fields)."""
    settings = dict(
        loss=LossConfig(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=DUAL, kl_coef=0.0),
        optimizer=OptimizerConfig(learning_rate=LR, warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0),
        compute_entropy=False,
        logits_chunk_size=512,
    )
    learner = Learner(config, LearnerConfig(**{**settings, **learner_settings}))
    holder = {"state": learner.init_state(params)}
    holder["state"], first = learner.train_step(holder["state"], batch)  # compiles

    def step() -> float:
        holder["state"], m = learner.train_step(holder["state"], batch)
        return m["learner_time_s"]

    return step, first["loss"], first["compile_time_s"]


def make_torch(folder: str, batch: ConversationBatch, device: str = "cpu", compute_dtype=None):
    """Returns (step() -> seconds, first-step loss) for the PyTorch baseline: f32 weights on `device`;
    compute_dtype (e.g. torch.bfloat16): the forward under `torch.autocast` in that dtype (mixed precision, the
    counterpart of our f32 params with bf16 compute)."""
    import contextlib

    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="sdpa"
    ).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ids = torch.tensor(batch.tokens, dtype=torch.long, device=device)
    targets = ids[:, 1:]
    old = torch.tensor(batch.old_logprobs[:, 1:], device=device)
    mask = torch.tensor(batch.loss_mask[:, 1:], dtype=torch.float32, device=device)
    adv = torch.tensor(batch.advantages, device=device)[:, None]
    autocast = (
        (lambda: torch.autocast(device_type=device.split(":")[0], dtype=compute_dtype))
        if compute_dtype is not None
        else contextlib.nullcontext
    )

    def train() -> float:
        with autocast():
            logits = model(input_ids=ids).logits[:, :-1]
        logits = logits.float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
        ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
        loss_tok = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH))
        loss_tok = torch.where(adv < 0, torch.minimum(loss_tok, -DUAL * adv), loss_tok)
        loss = (loss_tok * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    first = train()  # warm-up (allocator, kernels)

    def step() -> float:
        t0 = time.perf_counter()
        train()
        return time.perf_counter() - t0

    return step, first


def interleaved(ours, torch_step, iters: int):
    """Alternates the two sides step by step, so background load hits both alike. Returns the times."""
    a, b = [], []
    for _ in range(iters):
        a.append(ours())
        b.append(torch_step())
    return np.array(a), np.array(b)


def _conversations(rng, count, low, high, vocab, response=8):
    """`count` conversations of low..high tokens (the last `response` of each are the response)."""
    prompts, responses, logps = [], [], []
    for _ in range(count):
        n = int(rng.integers(low, high + 1))
        prompts.append(rng.integers(3, vocab, n - response))
        responses.append(rng.integers(3, vocab, response))
        logps.append(-np.log(vocab) + rng.uniform(-0.3, 0.3, response))
    return prompts, responses, logps


def main_job_model():
    """The main job's model shape: width 128, 2 layers, vocab 1024."""
    return preset_config(
        "tiny",
        num_layers=2,
        hidden_size=128,
        intermediate_size=512,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        vocab_size=1024,
        max_position_embeddings=2048,
    )


def micro(iters: int) -> None:
    from memagent_jax.rl.batch import build_conversation_batch

    config = main_job_model()
    params = init_params(config, 0)
    rng = np.random.default_rng(0)
    prompts, responses, logps = [], [], []
    for count, low, high in ((1024, 74, 100), (128, 42, 47)):
        for _ in range(count):
            r = int(rng.integers(2, 9))
            n = int(rng.integers(low, high + 1))
            prompts.append(rng.integers(3, config.vocab_size, n - r))
            responses.append(rng.integers(3, config.vocab_size, r))
            logps.append(-np.log(config.vocab_size) + rng.uniform(-0.3, 0.3, r))
    refs = [lp + rng.uniform(-0.05, 0.05, lp.size) for lp in logps]
    batch = build_conversation_batch(
        prompts, responses, logps, rng.normal(size=len(prompts)), ref_logprobs=refs, length_multiple=16
    )
    loss = LossConfig(clip_low=CLIP_LOW, clip_high=CLIP_HIGH, dual_clip=DUAL, kl_coef=0.001)
    variants = [(f"micro-batches of <= {t} tokens", dict(micro_batch_tokens=t)) for t in (1024, 2048, 4096, 8192)]
    variants += [
        ("whole mini-batch", dict(micro_batch_tokens=0)),
        ("whole mini-batch, LM head on every position", dict(micro_batch_tokens=0, response_window=0)),
    ]
    sides = {}
    for label, settings in variants:
        step, first, _ = make_ours(config, jax.tree.map(jnp.copy, params), batch, loss=loss, **settings)
        sides[label] = (step, first, [])
    for _ in range(iters):
        for step, _, times in sides.values():
            times.append(step())
    real = int(np.asarray(batch.token_mask).sum())
    print(
        f"one GRPO learner step (k3 KL 0.001, AdamW), width 128, 2 layers, vocab 1024; {batch.num_rows} x "
        f"{batch.length} tokens ({real} real); median of {iters} interleaved steps"
    )
    print("| layout | step ms | real tokens/s | against the whole mini-batch, head on every position | first loss |")
    print("|---|---:|---:|---:|---:|")
    base = float(np.median(sides[variants[-1][0]][2]))
    for label, (_, first, times) in sides.items():
        t = float(np.median(times))
        print(f"| {label} | {t * 1e3:.0f} | {real / t:.0f} | {base / t:.2f}x | {first:.6f} |")


def packing(iters: int) -> None:
    from memagent_jax.rl.batch import build_conversation_batch, pack_conversations

    config = main_job_model()
    params = init_params(config, 0)
    mixes = [
        ("main job: 256 x 74-78 + 128 x 42-47 tokens", [(256, 74, 78), (128, 42, 47)], 160),
        ("spread: 96 x 300-700 + 32 x 60-150 tokens", [(96, 300, 700), (32, 60, 150)], 1024),
    ]
    print(f"one learner step (GRPO, AdamW), width 128, 2 layers, vocab 1024; median of {iters} interleaved steps")
    print("| conversations | layout | rows x T | tokens incl. pads | real share | step ms | speed-up | first loss |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, groups, pack_length in mixes:
        rng = np.random.default_rng(0)
        prompts, responses, logps = [], [], []
        for count, low, high in groups:
            p, r, lp = _conversations(rng, count, low, high, config.vocab_size)
            prompts += p
            responses += r
            logps += lp
        adv = rng.normal(size=len(prompts))
        plain = build_conversation_batch(prompts, responses, logps, adv, length_multiple=16)
        packed = pack_conversations(plain, pack_length, rows_multiple=8)
        sides = {}
        for label, batch in (("one per row", plain), (f"packed ({pack_length})", packed)):
            step, loss, _ = make_ours(config, jax.tree.map(jnp.copy, params), batch)
            sides[label] = (step, loss, batch, [])
        for _ in range(iters):
            for step, _, _, times in sides.values():
                times.append(step())
        base = None
        for label, (_, loss, batch, times) in sides.items():
            ms = float(np.median(times)) * 1e3
            base = base or ms
            real = int(np.asarray(batch.token_mask).sum())
            print(
                f"| {name} | {label} | {batch.num_rows} x {batch.length} | {batch.tokens.size} | "
                f"{real / batch.tokens.size:.0%} | {ms:.0f} | {base / ms:.2f}x | {loss:.6f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shape only, fewer timed steps")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per side (default 5, quick 3)")
    parser.add_argument("--packing", action="store_true", help="our step on packed rows vs one conversation per row")
    parser.add_argument("--micro", action="store_true", help="our step: micro-batch sizes, the LM head's window")
    args = parser.parse_args()
    if args.packing:
        packing(args.iters or 5)
        return
    if args.micro:
        micro(args.iters or 5)
        return
    import torch

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    iters = args.iters or (3 if args.quick else 5)
    peak = matmul_peak_gflops()
    print(
        f"jax {jax.__version__}, torch {torch.__version__}, transformers on CPU; {threads} cores, "
        f"torch threads {threads}; f32 matmul peak (jitted 2048^3) {peak:.0f} GFLOP/s"
    )
    cases = [
        (
            "small (256w, 4L, V 4096)",
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
            8,
            256,
            64,
        )
    ]
    if not args.quick:
        cases.append(
            (
                "medium (512w, 8L, V 32000)",
                preset_config(
                    "tiny",
                    num_layers=8,
                    hidden_size=512,
                    intermediate_size=1536,
                    num_heads=8,
                    num_kv_heads=2,
                    head_dim=64,
                    vocab_size=32000,
                ),
                4,
                512,
                128,
            )
        )
    rows = []
    for name, config, n, t, r in cases:
        batch = make_batch(config, n, t, r)
        params = init_params(config, 0)
        with tempfile.TemporaryDirectory() as tmp:
            save_hf_checkpoint(params, config, tmp)
            torch_step, torch_loss = make_torch(tmp, batch)
        ours_step, ours_loss, compile_s = make_ours(config, params, batch)
        ours_t, torch_t = interleaved(ours_step, torch_step, iters)
        rows.append(
            (
                name,
                n,
                t,
                r,
                ours_t,
                torch_t,
                model_flops_per_step(config, n, t),
                ours_loss,
                torch_loss,
                compile_s,
                config.num_params(),
            )
        )
        del ours_step, torch_step, params
    peak_after = matmul_peak_gflops()
    print(f"f32 matmul peak re-measured after the runs: {peak_after:.0f} GFLOP/s; MFU uses the higher of the two")
    peak = max(peak, peak_after)
    print(
        f"\n== GRPO learner step (fwd + bwd + clipped loss + AdamW), f32, {iters} steps per side, interleaved; "
        f"tok/s from the best step (median in brackets) =="
    )
    print(
        f"{'shape':<28} {'params':>7} {'N x T (resp)':>14} {'ours tok/s':>16} {'torch tok/s':>16} "
        f"{'ours/torch':>10} {'ours MFU':>9} {'torch MFU':>10} {'first loss ours / torch':>24} {'compile':>8}"
    )
    for name, n, t, r, ours, ref, flops, lo, lt, cs, p in rows:
        tokens = n * t
        ob, om, tb, tm = ours.min(), np.median(ours), ref.min(), np.median(ref)
        print(
            f"{name:<28} {p / 1e6:>6.1f}M {f'{n} x {t} ({r})':>14} {f'{tokens / ob:.0f} ({tokens / om:.0f})':>16} "
            f"{f'{tokens / tb:.0f} ({tokens / tm:.0f})':>16} {tb / ob:>9.2f}x {flops / ob / 1e9 / peak:>8.1%} "
            f"{flops / tb / 1e9 / peak:>9.1%} {f'{lo:.6f} / {lt:.6f}':>24} {cs:>7.1f}s"
        )
    print("MFU = (6 * matmul params * tokens + 12 * L * H * Dh * T * tokens) / step time / matmul peak")


if __name__ == "__main__":
    main()
