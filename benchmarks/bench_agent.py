"""Memory-agent benchmarks: chunk scan vs the same agent loop in transformers PyTorch; linear cost; compile.

    python benchmarks/bench_agent.py                 # all parts (about 10 minutes on 2 CPU cores)
    python benchmarks/bench_agent.py --part speed --quick
    python benchmarks/bench_agent.py --part decode   # the decode loop alone, both decode layouts
    python benchmarks/bench_agent.py --part linear
    python benchmarks/bench_agent.py --part compile

speed:   document tokens/s of our jitted chunk scan and of the same agent loop written with transformers
         (`model.generate` per chunk, greedy; batch 4: one batched, left-padded generate per step), same random
         weights, same budgets, fixed-length memory and answer generation (no stop tokens) so both sides do
         the same work; tiny shape and Qwen2.5-0.5B's shapes, f32, batch 1 and 4, ours with both decode
         layouts ('scan' and 'unstacked', see ModelConfig.decode_layout).
linear:  per-document-token time and peak RSS from 4K to 1M document tokens (tiny shape, one process per
         length), against the 4K figure.
compile: compile time of the segment program, and the number of compiled programs after documents of
         2, 8 and 64 chunks; compile time of the segment program at 2, 8 and 24 layers with both decode
         layouts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

TINY = dict(num_layers=2, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, head_dim=32)


def _tokenizer(folder: str):
    from memagent_jax.agent import AgentTemplates
    from memagent_jax.data.synthetic import tokenizer_corpus
    from memagent_jax.data.tokenizer import load_tokenizer, train_tokenizer

    t = AgentTemplates()
    texts = itertools.chain(tokenizer_corpus(num_samples=8, num_tokens=200), [t.memory_update, t.final_answer])
    train_tokenizer(texts, folder, vocab_size=512)
    return load_tokenizer(folder)


def _agent(config, tokenizer, budgets, seed=0):
    from memagent_jax.agent import MemoryAgent
    from memagent_jax.models import init_params

    params = init_params(config, seed)
    return MemoryAgent(params, config, tokenizer, budgets=budgets, stop_token_ids=())


def _tiny_agent(budgets):
    """A random tiny-shape agent with a freshly trained tokenizer."""
    from memagent_jax.models.presets import preset_config

    tokenizer = _tokenizer(os.path.join(tempfile.mkdtemp(), "tok"))
    return _agent(preset_config("tiny", vocab_size=len(tokenizer), **TINY), tokenizer, budgets), tokenizer


def _torch_loop(model, agent, question: str, doc: np.ndarray) -> None:
    import torch

    from memagent_jax.agent.chunking import split_chunks

    spec = agent.spec
    q_ids = agent.prepare(question, doc)[0]
    memory = list(spec.prompts.initial_memory)
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        for chunk in split_chunks(doc, agent.budgets.chunk_tokens):
            prompt = spec.prompts.update.assemble({"question": q_ids, "memory": memory, "chunk": chunk})
            m = agent.budgets.memory_tokens
            out = model.generate(
                torch.tensor([prompt], device=model.device), max_new_tokens=m, min_new_tokens=m, **kwargs
            )
            memory = out[0, len(prompt) :].tolist()
        final = spec.prompts.final.assemble({"question": q_ids, "memory": memory})
        a = agent.budgets.answer_tokens
        model.generate(torch.tensor([final], device=model.device), max_new_tokens=a, min_new_tokens=a, **kwargs)


def _torch_loop_batch(model, agent, questions, docs) -> None:
    """The agent loop for a batch of documents with one batched `model.generate` per step (left padding and
    an attention mask; fixed-length memory and answer, as in `_torch_loop`). Documents of equal chunk count."""
    import torch

    from memagent_jax.agent.chunking import split_chunks

    spec = agent.spec
    q_ids = [agent.prepare(q, d)[0] for q, d in zip(questions, docs)]
    chunks = [split_chunks(d, agent.budgets.chunk_tokens) for d in docs]
    memories = [list(spec.prompts.initial_memory) for _ in docs]
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def generate(prompts, n):
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kwargs)
        return [row[width:].tolist() for row in out]

    with torch.inference_mode():
        for k in range(len(chunks[0])):
            prompts = [
                spec.prompts.update.assemble({"question": q, "memory": m, "chunk": c[k]})
                for q, m, c in zip(q_ids, memories, chunks)
            ]
            memories = generate(prompts, agent.budgets.memory_tokens)
        finals = [spec.prompts.final.assemble({"question": q, "memory": m}) for q, m in zip(q_ids, memories)]
        generate(finals, agent.budgets.answer_tokens)


def _timed(fn, repeats: int = 1) -> float:
    """Best wall time of `repeats` calls (seconds)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def ours_tokens_per_s(agent, questions, docs, repeats: int) -> tuple[float, float]:
    """(document tokens/s of `agent.run` on these documents, best of `repeats` after a first call; seconds of that
    first call, compile included)."""
    t0 = time.perf_counter()
    agent.run(questions, docs)
    first = time.perf_counter() - t0
    return sum(len(d) for d in docs) / _timed(lambda: agent.run(questions, docs), repeats), first


def torch_tokens_per_s(model, agent, questions, docs, repeats: int) -> dict[int, float]:
    """Document tokens/s of the transformers loop at batch 1 (`_torch_loop` on the first document) and batch 4
    (`_torch_loop_batch` on four), each after a one-chunk warm-up."""
    chunk = agent.budgets.chunk_tokens
    _torch_loop(model, agent, questions[0], docs[0][:chunk])
    one = len(docs[0]) / _timed(lambda: _torch_loop(model, agent, questions[0], docs[0]), repeats)
    _torch_loop_batch(model, agent, questions[:4], [d[:chunk] for d in docs[:4]])
    four = sum(len(d) for d in docs[:4]) / _timed(
        lambda: _torch_loop_batch(model, agent, questions[:4], docs[:4]), repeats
    )
    return {1: one, 4: four}


def decode_seconds_per_token(params, config, batch: int, prompt: int, new_tokens: int, repeats: int = 3) -> float:
    """Seconds per token of the jitted decode loop alone (greedy, `new_tokens` after a `prompt`-token prefill,
    best of `repeats` after a warm-up)."""
    import jax
    import jax.numpy as jnp

    from memagent_jax.models import init_cache
    from memagent_jax.sampling import SamplingParams
    from memagent_jax.sampling.sampler import decode, prefill

    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    tokens = jnp.full((batch, prompt), 5, jnp.int32)
    pre = jax.jit(prefill, static_argnames="config")(
        params, config, tokens, jnp.ones_like(tokens, bool), init_cache(config, batch, prompt + new_tokens)
    )
    keys = jax.random.split(jax.random.key(0), batch)
    run = jax.jit(decode, static_argnames=("config", "sampling"))
    args = (params, config, pre.cache, pre.last_logits, pre.next_positions, keys, sampling)
    jax.block_until_ready(run(*args).tokens)
    return _timed(lambda: jax.block_until_ready(run(*args).tokens), repeats) / new_tokens


def bench_speed(quick: bool) -> None:
    import torch
    import transformers

    from memagent_jax.agent import AgentBudgets
    from memagent_jax.models import save_hf_checkpoint
    from memagent_jax.models.presets import preset_config

    torch.set_num_threads(os.cpu_count() or 1)
    tmp = tempfile.mkdtemp()
    tokenizer = _tokenizer(os.path.join(tmp, "tok"))
    cases = [
        (
            "tiny",
            preset_config("tiny", vocab_size=len(tokenizer), **TINY),
            AgentBudgets(
                question_tokens=32, chunk_tokens=512, memory_tokens=64, answer_tokens=16, chunks_per_segment=4
            ),
            4096,
        )
    ]
    if not quick:
        cases.append(
            (
                "qwen2.5-0.5b shapes",
                preset_config("qwen2.5-0.5b-instruct", param_dtype="float32", compute_dtype="float32"),
                AgentBudgets(
                    question_tokens=32, chunk_tokens=256, memory_tokens=16, answer_tokens=8, chunks_per_segment=4
                ),
                1024,
            )
        )
    print("\n== document tokens/s: chunk scan vs transformers agent loop (greedy, fixed-length memory, f32) ==")
    print(
        "   ours with decode_layout 'scan' and 'unstacked'; torch: one (batched, left-padded) generate per step, "
        "best of 1 thread and all cores"
    )
    header = (
        f"{'shape':<21} {'C/M/A':>10} {'batch':>5} {'scan':>8} {'unstacked':>9} {'torch':>8} "
        f"{'scan/torch':>10} {'unstacked/torch':>15}"
    )
    print(header)
    repeats = 1 if quick else 2
    for name, config, budgets, doc_tokens in cases:
        rng = np.random.default_rng(0)
        docs = [rng.integers(3, len(tokenizer), doc_tokens).astype(np.int32) for _ in range(4)]
        questions = ["Where is the red key?"] * 4
        ours = {}
        for layout in ("scan", "unstacked"):
            agent = _agent(config.replace(decode_layout=layout), tokenizer, budgets)
            for batch in (1, 4):
                ours[layout, batch] = ours_tokens_per_s(agent, questions[:batch], docs[:batch], repeats)[0]
            params = agent.params
            del agent
        folder = os.path.join(tmp, name.replace(" ", "_"))
        save_hf_checkpoint(params, config, folder)
        del params
        agent = _agent(config, tokenizer, budgets)  # for its prompts (the weights are not used)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None
        # torch: the better of 1 thread and all cores (with all cores, OpenMP's spinning barriers collapse when
        # another process shares the cores, up to 100x slower per token on a loaded 2-core machine).
        ref = {1: 0.0, 4: 0.0}
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            for batch, speed in torch_tokens_per_s(model, agent, questions, docs, repeats).items():
                ref[batch] = max(ref[batch], speed)
        b = budgets
        for batch in (1, 4):
            s_, u_, t_ = ours["scan", batch], ours["unstacked", batch], ref[batch]
            print(
                f"{name:<21} {f'{b.chunk_tokens}/{b.memory_tokens}/{b.answer_tokens}':>10} {batch:>5} {s_:>8.0f} "
                f"{u_:>9.0f} {t_:>8.0f} {s_ / t_:>9.2f}x {u_ / t_:>14.2f}x",
                flush=True,
            )
        del agent, model


def _linear_child(length: int) -> dict:
    from memagent_jax.agent import AgentBudgets

    agent, tokenizer = _tiny_agent(
        AgentBudgets(question_tokens=32, chunk_tokens=512, memory_tokens=32, answer_tokens=8, chunks_per_segment=8)
    )
    rng = np.random.default_rng(0)
    agent.run(["Where?"], [rng.integers(3, len(tokenizer), 4096).astype(np.int32)])  # compile
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    doc = rng.integers(3, len(tokenizer), length).astype(np.int32)
    t0 = time.perf_counter()
    agent.run(["Where?"], [doc])
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(
        length=length,
        seconds=elapsed,
        us_per_token=elapsed / length * 1e6,
        rss_growth_mb=(peak - base_rss) / 1024,
        doc_array_mb=doc.nbytes / 2**20,
    )


def bench_linear(lengths) -> None:
    print("\n== linear cost: tiny shape, chunk 512, memory 32 (one process per length) ==")
    print(
        f"{'doc tokens':>10} {'seconds':>8} {'us/token':>9} {'vs 4K':>7} {'vs 64K':>7} "
        f"{'peak RSS growth (MB)':>21} {'doc array (MB)':>15}"
    )
    first = ref64 = None
    for length in lengths:
        out = subprocess.run(
            [sys.executable, __file__, "--linear-child", str(length)], capture_output=True, text=True, check=True
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        first = first or r["us_per_token"]
        if length == 65536:
            ref64 = r["us_per_token"]
        vs64 = f"{r['us_per_token'] / ref64:>6.2f}x" if ref64 else f"{'-':>7}"
        print(
            f"{length:>10} {r['seconds']:>8.2f} {r['us_per_token']:>9.1f} {r['us_per_token'] / first:>6.2f}x "
            f"{vs64} {r['rss_growth_mb']:>21.1f} {r['doc_array_mb']:>15.2f}"
        )


def bench_compile() -> None:
    from memagent_jax.agent import AgentBudgets, program

    agent, tokenizer = _tiny_agent(
        AgentBudgets(question_tokens=32, chunk_tokens=512, memory_tokens=32, answer_tokens=8, chunks_per_segment=4)
    )
    rng = np.random.default_rng(0)
    print("\n== compile: tiny shape, chunk 512, 4 chunks per segment ==")
    for n_chunks in (2, 8, 64):
        doc = rng.integers(3, len(tokenizer), 512 * n_chunks).astype(np.int32)
        t0 = time.perf_counter()
        agent.run(["Where?"], [doc])
        print(
            f"{n_chunks:>3} chunks: first call {time.perf_counter() - t0:6.2f}s, compiled segment programs = "
            f"{program.segment_program._cache_size()}, final programs = {program.final_program._cache_size()}"
        )


def bench_compile_depth(depths=(2, 8, 24)) -> None:
    """Compile time of the segment program (prefill scanned; decode 'scan' vs 'unstacked') against depth."""
    import jax
    import jax.numpy as jnp

    from memagent_jax.agent import AgentBudgets, program
    from memagent_jax.models import init_cache
    from memagent_jax.models.presets import preset_config

    tokenizer = _tokenizer(os.path.join(tempfile.mkdtemp(), "tok"))
    budgets = AgentBudgets(
        question_tokens=32, chunk_tokens=512, memory_tokens=32, answer_tokens=8, chunks_per_segment=4
    )
    print("\n== compile: segment program (tiny shape, chunk 512, 4 chunks per segment, batch 1), seconds ==")
    print(f"{'layers':>6} {'scan':>8} {'unstacked':>10} {'ratio':>6}")
    for depth in depths:
        times = {}
        for layout in ("scan", "unstacked"):
            config = preset_config(
                "tiny", vocab_size=len(tokenizer), **dict(TINY, num_layers=depth), decode_layout=layout
            )
            agent = _agent(config, tokenizer, budgets)
            spec, b, s = agent.spec, 1, budgets.chunks_per_segment
            args = (
                agent.params,
                spec,
                init_cache(config, b, spec.update_cache_slots),
                jnp.zeros((b,), jnp.int32),
                jnp.zeros((b, budgets.memory_tokens), jnp.int32),
                jnp.zeros((b,), jnp.int32),
                jnp.zeros((b, s, budgets.chunk_tokens), jnp.int32),
                jnp.zeros((b, s), jnp.int32),
                jax.random.split(jax.random.key(0), b),
                jnp.int32(0),
            )
            lowered = program.segment_program.lower(*args)
            t0 = time.perf_counter()
            lowered.compile()
            times[layout] = time.perf_counter() - t0
        print(
            f"{depth:>6} {times['scan']:>8.2f} {times['unstacked']:>10.2f} {times['unstacked'] / times['scan']:>5.2f}x",
            flush=True,
        )


def bench_decode_step(quick: bool) -> None:
    """Per-token time of the jitted decode loop alone (no prefill, no host), 'scan' vs 'unstacked'."""
    from memagent_jax.models import init_params
    from memagent_jax.models.presets import preset_config

    cases = [("tiny", preset_config("tiny", vocab_size=512, **TINY))]
    if not quick:
        cases.append(
            (
                "qwen2.5-0.5b shapes",
                preset_config("qwen2.5-0.5b-instruct", param_dtype="float32", compute_dtype="float32"),
            )
        )
    n, prompt = 32, 256
    print(f"\n== decode loop alone: ms per token ({n} tokens after a {prompt}-token prompt, greedy, f32) ==")
    print(f"{'shape':<21} {'batch':>5} {'scan':>8} {'unstacked':>10} {'speed-up':>9}")
    for name, config in cases:
        params = init_params(config, 0)
        for batch in (1, 4):
            ms = {
                layout: 1e3 * decode_seconds_per_token(params, config.replace(decode_layout=layout), batch, prompt, n)
                for layout in ("scan", "unstacked")
            }
            print(
                f"{name:<21} {batch:>5} {ms['scan']:>8.2f} {ms['unstacked']:>10.2f} "
                f"{ms['scan'] / ms['unstacked']:>8.2f}x",
                flush=True,
            )
        del params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "speed", "decode", "linear", "compile"], default="all")
    parser.add_argument("--quick", action="store_true", help="tiny shape only; linear up to 64K")
    parser.add_argument("--linear-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.linear_child:
        print(json.dumps(_linear_child(args.linear_child)))
        return
    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores")
    if args.part in ("all", "compile"):
        bench_compile()
        bench_compile_depth()
    if args.part in ("all", "decode"):
        bench_decode_step(args.quick)
    if args.part in ("all", "speed"):
        bench_speed(args.quick)
    if args.part in ("all", "linear"):
        bench_linear([4096, 16384, 65536] + ([] if args.quick else [262144, 1048576]))


if __name__ == "__main__":
    main()
