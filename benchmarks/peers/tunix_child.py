"""tunix side of benchmarks/bench_peers.py, run with the tunix virtualenv's python.

Reads one JSON job per line on stdin and answers each with one line `@@ {json}` on stdout. Jobs:
    {"op": "load", "model": folder, "dtype": "float32"}: tunix's own Qwen2 model from the folder's safetensors
    {"op": "learner", "batch": npz path, "settings": {...}}: one GRPO learner step: tunix's registered 'grpo'
        policy loss (`algo_core.grpo_loss_fn`) under `nnx.value_and_grad`, then the optax update through
        `nnx.Optimizer` (the body of tunix's `PeftTrainer._train_step`), jitted with the optimizer donated;
        answers {"seconds", "loss", "traces" (times the step was traced so far)}
    {"op": "rss"}: peak RSS of this process
    {"op": "quit"}
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from types import SimpleNamespace


def _reply(obj) -> None:
    sys.stdout.write("@@ " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def tunix_config(folder: str, dtype: str):
    import jax.numpy as jnp
    from tunix.models.qwen2 import model as qwen2

    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    return qwen2.ModelConfig(
        num_layers=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        rope_theta=int(hf.get("rope_theta") or hf.get("rope_parameters", {}).get("rope_theta", 1_000_000)),
        norm_eps=hf["rms_norm_eps"],
        use_tied_embedding=hf.get("tie_word_embeddings", False),
        dtype=jnp.dtype(dtype),
        param_dtype=jnp.dtype(dtype),
    )


class Learner:
    def __init__(self, job: dict):
        from tunix.models.qwen2 import params as qwen2_params

        self.folder = job["model"]
        self.dtype = job["dtype"]
        self.model = qwen2_params.create_model_from_safe_tensors(self.folder, tunix_config(self.folder, self.dtype))
        self.step = None
        self.traces = 0

    def _build(self, s: dict):
        import optax
        from flax import nnx
        from tunix.rl import function_registry

        loss_fn = function_registry.get_policy_loss_fn("grpo")
        algo = SimpleNamespace(
            beta=s["kl_coef"],
            epsilon=s["clip_low"],
            epsilon_high=s["clip_high"],
            epsilon_c=s["dual_clip"],
            loss_algo="grpo",
            loss_agg_mode=s["aggregation"],
            kl_loss_mode="low_var_kl",  # k3: exp(ref - logp) - (ref - logp) - 1, our KL estimate
            kl_clamp_value=None,
            temperature=1.0,
        )
        tx = optax.chain(
            optax.clip_by_global_norm(s["max_grad_norm"]),
            optax.adamw(s["learning_rate"], b1=0.9, b2=0.999, eps=1e-8, weight_decay=s["weight_decay"]),
        )
        self.optimizer = nnx.Optimizer(self.model, tx, wrt=nnx.Param)

        def train_step(model, optimizer, example):
            self.traces += 1  # runs only when jax traces (compiles) the step
            grad_fn = nnx.value_and_grad(
                lambda m, ex: loss_fn(m, ex, algo_config=algo, pad_id=0, eos_id=-1), has_aux=True
            )
            (loss, _aux), grads = grad_fn(model, example)
            optimizer.update(model, grads)
            return loss

        self.step = nnx.jit(train_step, donate_argnames=("optimizer",))

    def learner(self, job: dict) -> dict:
        import jax
        import jax.numpy as jnp
        import numpy as np
        from tunix.rl import common

        if self.step is None:
            self._build(job["settings"])
        b = np.load(job["batch"])
        example = common.TrainExample(
            prompt_ids=jnp.asarray(b["prompt_ids"]),
            prompt_mask=jnp.ones(b["prompt_ids"].shape, jnp.int32),
            completion_ids=jnp.asarray(b["completion_ids"]),
            completion_mask=jnp.ones(b["completion_ids"].shape, jnp.int32),
            advantages=jnp.asarray(b["advantages"]),
            ref_per_token_logps=jnp.asarray(b["ref_logprobs"]),
            old_per_token_logps=jnp.asarray(b["old_logprobs"]),
        )
        t0 = time.perf_counter()
        loss = jax.block_until_ready(self.step(self.model, self.optimizer, example))
        return {"seconds": time.perf_counter() - t0, "loss": float(loss), "traces": self.traces}


def main() -> None:
    real_stdout = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(real_stdout, "w")
    learner = None
    for line in sys.stdin:
        job = json.loads(line)
        try:
            if job["op"] == "load":
                from importlib.metadata import version

                t0 = time.perf_counter()
                learner = Learner(job)
                _reply({"seconds": time.perf_counter() - t0, "version": version("google-tunix")})
            elif job["op"] == "learner":
                _reply(learner.learner(job))
            elif job["op"] == "rss":
                _reply({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})  # whole life
            elif job["op"] == "quit":
                _reply({})
                break
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which prints it
            import traceback

            traceback.print_exc()
            _reply({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()
