"""Serving benchmark: documents/s and document tokens/s of `memagent serve` under 1, 8 and 64 concurrent clients,
against the same documents answered one at a time through the CLI path (`MemoryAgent.run([q], [doc], rng=seed)` per
document, as `python -m memagent_jax.answer` does, compiled once and timed without the compile), and all at once
in-process with `MemoryAgent.run(..., batch_size=B)` (continuous batching without HTTP: the server's device work);
p50 / p99 request latency per document length.

    python benchmarks/bench_serve.py            # 128 documents of 1..16 chunks (a few minutes on 2 CPU cores)
    python benchmarks/bench_serve.py --quick    # 64 documents, clients 1 / 8 / 64
    python benchmarks/bench_serve.py --quick --batch-size 1 --clients 1,8   # one row slot (CPU latency)

The model: a random "tiny"-preset transformer a bit larger than the tests' (2 layers, hidden 128, f32) with a small
trained tokenizer, exported to a folder with memagent_agent.json (budgets: question 32, chunk 128, memory 32,
answer 16 tokens, 2 chunks per segment; sampling temperature 0.7 / top-p 0.95) so the device work dominates the
HTTP overhead. The server runs as its own process (`python -m memagent_jax.serve --batch-size 8`); each client
sends its next request when the previous one is answered (closed loop), all clients drawing from one list of
documents. Every server answer is checked against the CLI-path answer with the same seed.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(num_layers=2, hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, head_dim=32)
BUCKETS = ((1, 2), (3, 5), (6, 10), (11, 16))
QUESTION = "Where is the red key?"


def build_model(folder: str) -> str:
    """A random tiny-preset model + tokenizer + agent settings in one folder."""
    from memagent_jax.agent import AgentBudgets, AgentTemplates, write_agent_settings
    from memagent_jax.data.synthetic import tokenizer_corpus
    from memagent_jax.data.tokenizer import load_tokenizer, train_tokenizer
    from memagent_jax.models import init_params, save_hf_checkpoint
    from memagent_jax.models.presets import preset_config

    t = AgentTemplates()
    tok_dir = os.path.join(folder + "-tok")
    train_tokenizer(
        itertools.chain(
            tokenizer_corpus(num_samples=8, num_tokens=200), [t.memory_update, t.final_answer, t.initial_memory]
        ),
        tok_dir,
        vocab_size=512,
    )
    tokenizer = load_tokenizer(tok_dir)
    config = preset_config("tiny", vocab_size=len(tokenizer), **TINY)
    save_hf_checkpoint(init_params(config, 0), config, folder)
    tokenizer.save_pretrained(folder)
    write_agent_settings(
        folder,
        budgets=AgentBudgets(
            question_tokens=32, chunk_tokens=128, memory_tokens=32, answer_tokens=16, chunks_per_segment=2
        ),
        templates=t,
        temperature=0.7,
        top_p=0.95,
    )
    return folder


def make_documents(agent, n: int, max_chunks: int, seed: int = 0) -> list[str]:
    """n texts of 1..max_chunks chunks (uniform in chunks), from the tokenizer's own vocabulary."""
    rng = np.random.default_rng(seed)
    vocab = [w for w in agent.tokenizer.get_vocab() if w.isalpha() and len(w) > 2] or ["word"]
    c = agent.budgets.chunk_tokens
    docs = []
    for _ in range(n):
        target = int(rng.integers(1, max_chunks + 1)) * c - int(rng.integers(0, c // 2))
        text = " ".join(rng.choice(vocab, target))
        ids = agent.tokenizer(text, add_special_tokens=False)["input_ids"][:target]
        docs.append(agent.tokenizer.decode(ids))
    return docs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_path(agent, docs: list[str]) -> tuple[float, list[str]]:
    """Seconds to answer every document one at a time with `MemoryAgent.run` (after a compile run)."""
    agent.run([QUESTION], [docs[0]], rng=0)  # compile (not timed)
    answers = []
    t0 = time.perf_counter()
    for i, doc in enumerate(docs):
        answers.append(agent.run([QUESTION], [doc], rng=i).answers[0])
    return time.perf_counter() - t0, answers


def in_process(agent, docs: list[str], batch_size: int) -> tuple[float, list[str]]:
    """Seconds to answer every document with one `MemoryAgent.run(batch_size=...)` call (continuous batching, no
    HTTP; the same per-request keys as the server), after a compile run."""
    import jax.numpy as jnp

    from memagent_jax.sampling.api import row_keys

    keys = jnp.stack([row_keys(i, 1)[0] for i in range(len(docs))])
    agent.run([QUESTION], [docs[0]], rng=keys[:1], batch_size=batch_size)  # compile (not timed)
    t0 = time.perf_counter()
    answers = agent.run([QUESTION] * len(docs), docs, rng=keys, batch_size=batch_size).answers
    return time.perf_counter() - t0, answers


async def drive(url: str, docs: list[str], clients: int):
    """Closed-loop clients over one shared list; returns (seconds, [(i, latency, num_chunks, answer)])."""
    import httpx

    todo = list(range(len(docs)))
    out = []

    async def client(http):
        while todo:
            i = todo.pop(0)
            t0 = time.perf_counter()
            r = await http.post("/v1/memagent/answer", json={"question": QUESTION, "document": docs[i], "seed": i})
            r.raise_for_status()
            body = r.json()
            out.append((i, time.perf_counter() - t0, body["num_chunks"], body["answer"], body["document_tokens"]))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - t0, sorted(out)


def start_server(folder: str, port: int, batch_size: int):
    import httpx

    env = dict(os.environ, PYTHONPATH=REPO)
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memagent_jax.serve",
            "--model",
            folder,
            "--port",
            str(port),
            "--batch-size",
            str(batch_size),
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the server exited:\n{log.read()}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url, time.time() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="64 documents instead of 128")
    p.add_argument("--batch-size", type=int, default=8, help="the server's row slots (default 8)")
    p.add_argument("--clients", default="1,8,64", help="concurrency levels (default 1,8,64)")
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from memagent_jax.agent import MemoryAgent

    n = 64 if args.quick else 128
    folder = build_model(os.path.join(tempfile.mkdtemp(), "bench-agent"))
    agent = MemoryAgent.from_pretrained(folder)
    docs = make_documents(agent, n, 16)
    doc_tokens = [agent.prepare(QUESTION, d)[1].size for d in docs]
    total_tokens = sum(doc_tokens)
    print(
        f"{n} documents, {total_tokens} document tokens ({min(doc_tokens)}..{max(doc_tokens)} per document, chunk "
        f"{agent.budgets.chunk_tokens}); {os.cpu_count()} CPU cores"
    )
    base_s, base_answers = cli_path(agent, docs)
    rows = [("CLI path, one at a time", base_s, None)]
    print(f"CLI path: {base_s:.1f}s")
    same_shape_s, same_shape = in_process(agent, docs, args.batch_size)
    rows.append((f"run(batch_size={args.batch_size}), no HTTP", same_shape_s, None))
    print(f"in-process continuous batching: {same_shape_s:.1f}s")
    proc, url, warm = start_server(folder, free_port(), args.batch_size)
    print(f"server healthy after {warm:.1f}s (start + warm-up compile), {args.batch_size} row slots")
    mismatches = cli_equal = 0
    try:
        for clients in [int(c) for c in args.clients.split(",")]:
            asyncio.run(drive(url, docs[: min(clients, 4)], min(clients, 4)))  # connections up, nothing compiles
            seconds, out = asyncio.run(drive(url, docs, clients))
            mismatches += sum(answer != same_shape[i] for i, _, _, answer, _ in out)
            cli_equal = sum(answer == base_answers[i] for i, _, _, answer, _ in out)
            assert len(out) == n and [o[0] for o in out] == list(range(n)), "lost or duplicated requests"
            rows.append((f"server, {clients} client{'s' if clients > 1 else ''}", seconds, out))
            print(f"{clients} clients: {seconds:.1f}s")
    finally:
        proc.terminate()
        proc.wait(60)

    print(f"\n== memagent serve vs the CLI path: {n} documents of 1..16 chunks, {total_tokens} document tokens ==")
    print(
        f"server answers equal to MemoryAgent.run(batch_size={args.batch_size}) (the same compiled shapes), every "
        f"concurrency: {'yes' if mismatches == 0 else f'NO ({mismatches} differ)'}; equal to the batch-1 CLI path: "
        f"{cli_equal}/{n}"
        + (
            ""
            if cli_equal == n
            else f" (the others differ by float32 reassociation between "
            f"batch-1 and batch-{args.batch_size} programs, which flips a sampled token now and then)"
        )
    )
    head = " | ".join(f"{lo}-{hi} chunks" for lo, hi in BUCKETS)
    print(f"{'':<26} {'docs/s':>7} {'doc tok/s':>10} {'vs CLI':>7}   p50 / p99 latency (s) by length: {head}")
    for name, seconds, out in rows:
        cells = []
        if out is not None:
            for lo, hi in BUCKETS:
                lat = [latency for _, latency, k, _, _ in out if lo <= k <= hi]
                cells.append(f"{pct(lat, 50):.2f} / {pct(lat, 99):.2f} (n={len(lat)})")
        print(
            f"{name:<26} {n / seconds:>7.2f} {total_tokens / seconds:>10.0f} {base_s / seconds:>6.2f}x   "
            + " | ".join(cells)
        )
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
