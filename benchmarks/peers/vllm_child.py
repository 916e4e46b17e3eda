"""vLLM side of benchmarks/bench_peers.py, run with the vLLM virtualenv's python.

Reads one JSON job per line on stdin and answers each with one line `@@ {json}` on stdout (vLLM's own logging
goes to stderr). Jobs:
    {"op": "load", "model": folder, "dtype": "float32", "max_model_len": n, "max_num_seqs": b,
     "memory_fraction": f (the share of RAM vLLM's CPU backend reserves for weights and KV cache)}
    {"op": "agent", "questions": [[ids]], "documents": [[ids]], "update": {"pieces", "slots"},
     "final": {"pieces", "slots"}, "initial_memory": [ids], "chunk": C, "memory": M, "answer": A}
        the memory-agent loop: one `generate` per chunk step holding every unfinished document's prompt
        (prefix caching on, emptied before the job; fixed-length memory and answer, greedy); answers
        {"seconds", "answers", "memories"}
    {"op": "generate", "prompts": [[ids]], "max_tokens": n}: one `generate`; answers {"seconds", "tokens"}
    {"op": "quit"}
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import sys
import time


def _reply(obj) -> None:
    sys.stdout.write("@@ " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _assemble(template: dict, values: dict) -> list[int]:
    out = list(template["pieces"][0])
    for slot, piece in zip(template["slots"], template["pieces"][1:]):
        out.extend(values[slot])
        out.extend(piece)
    return out


class Engine:
    def __init__(self, job: dict):
        from vllm import LLM

        self.llm = LLM(
            model=job["model"],
            skip_tokenizer_init=True,
            enable_prefix_caching=True,
            dtype=job["dtype"],
            max_model_len=job["max_model_len"],
            max_num_seqs=job["max_num_seqs"],
            max_num_batched_tokens=max(job["max_model_len"], 2048),
            seed=0,
            gpu_memory_utilization=job["memory_fraction"],  # on the CPU backend: the share of RAM it reserves
            enforce_eager=job.get("enforce_eager", False),
        )

    def close(self) -> None:
        """Stop the engine's processes (its core and workers) before this process exits."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm
        gc.collect()

    def _sampling(self, n: int):
        from vllm import SamplingParams

        return SamplingParams(
            temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True, detokenize=False, stop_token_ids=[]
        )

    def _generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], self._sampling(n), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def _forget(self) -> None:
        """Empties the prefix cache before a timed job. Repeats of a job send the same prompts (greedy: the same
        memories), so a cache kept from the previous repeat would serve whole prompts without computing them
        (tiny shape, batch 4: about 130K document tokens/s on a repeat against 55K on the first run). Within a
        job the cache still shares every document's question prefix across its chunk steps."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache")

    def agent(self, job: dict) -> dict:
        c, m, a = job["chunk"], job["memory"], job["answer"]
        docs, questions = job["documents"], job["questions"]
        memories = [list(job["initial_memory"]) for _ in docs]
        steps = max((len(d) + c - 1) // c for d in docs)
        self._forget()
        t0 = time.perf_counter()
        for k in range(steps):
            rows = [i for i, d in enumerate(docs) if k * c < len(d)]
            prompts = [
                _assemble(
                    job["update"],
                    {"question": questions[i], "memory": memories[i], "chunk": docs[i][k * c : (k + 1) * c]},
                )
                for i in rows
            ]
            for i, out in zip(rows, self._generate(prompts, m)):
                memories[i] = out
        finals = [_assemble(job["final"], {"question": q, "memory": mem}) for q, mem in zip(questions, memories)]
        answers = self._generate(finals, a)
        return {"seconds": time.perf_counter() - t0, "answers": answers, "memories": memories}

    def generate(self, job: dict) -> dict:
        self._forget()
        t0 = time.perf_counter()
        tokens = self._generate(job["prompts"], job["max_tokens"])
        return {"seconds": time.perf_counter() - t0, "tokens": tokens}


def main() -> None:
    # vLLM and its libraries log to stdout: keep stdout for the answers only.
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(real_stdout, "w")
    engine = None
    for line in sys.stdin:
        job = json.loads(line)
        try:
            if job["op"] == "load":
                import vllm

                t0 = time.perf_counter()
                engine = Engine(job)
                _reply({"seconds": time.perf_counter() - t0, "version": vllm.__version__})
            elif job["op"] == "agent":
                _reply(engine.agent(job))
            elif job["op"] == "generate":
                _reply(engine.generate(job))
            elif job["op"] == "rss":
                _reply({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
            elif job["op"] == "quit":
                break
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which prints it
            import traceback

            traceback.print_exc()
            _reply({"error": f"{type(exc).__name__}: {exc}"})
    # 'quit', or stdin closed (the parent is gone): stop the engine's processes before exiting.
    if engine is not None:
        engine.close()
    with contextlib.suppress(OSError):  # the answer to 'quit'; nobody reads it when the parent is gone
        _reply({})


if __name__ == "__main__":
    main()
