"""Train a memory agent with multi-conversation GRPO.

    python -m memagent_jax.train --config configs/grpo.py --workdir runs/x [--config.a.b=value ...]

Each step: Q questions from the data iterator -> G agent trajectories each (the chunk scan, sampling) ->
rewards from the verifier (thread pool) -> group-relative advantages -> every conversation of every
trajectory becomes a training row carrying its trajectory's advantage -> one jitted learner step (mini-batch
updates, gradient accumulation). The rollout runs on the learner's params in place (no host copy).

The workdir holds `checkpoints/` (Orbax: train state, data-iterator position, RNG; the last N kept),
`metrics.jsonl` and TensorBoard events, and `export/` (the final model as a Hugging Face folder). Restarting
with the same workdir resumes from the newest finished checkpoint and continues exactly where it stopped.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/grpo.py", "training config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and the exported model")


class TrainConfigError(ValueError):
    """A training config field is invalid; the message names the field."""


def validate_config(cfg, *, device_count: int, check_files: bool = True) -> None:
    """Checks a config before any expensive work; every error names the field at fault.

    check_files=False skips the checks that need the model folder and data files to exist (the planner sizes
    shipped configs whose checkpoints live elsewhere).
    """
    if check_files:
        if not cfg.model.path:
            raise TrainConfigError("config.model.path: required (a local Hugging Face model folder)")
        if not os.path.isdir(cfg.model.path):
            raise TrainConfigError(f"config.model.path: {cfg.model.path!r} is not a directory")
        if cfg.model.tokenizer and not os.path.isdir(cfg.model.tokenizer):
            raise TrainConfigError(f"config.model.tokenizer: {cfg.model.tokenizer!r} is not a directory")
        if cfg.data.train_file and not os.path.isfile(cfg.data.train_file):
            raise TrainConfigError(f"config.data.train_file: {cfg.data.train_file!r} does not exist")
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    known = [s for s in sizes if s != -1]
    if sizes.count(-1) > 1 or any(s <= 0 for s in known):
        raise TrainConfigError(f"config.mesh: sizes must be positive with at most one -1, got {sizes}")
    prod = 1
    for s in known:
        prod *= s
    if (-1 in sizes and device_count % prod) or (-1 not in sizes and prod != device_count):
        raise TrainConfigError(f"config.mesh: data x fsdp x tensor = {sizes} does not match {device_count} devices")
    for name in ("steps",):
        if cfg[name] <= 0:
            raise TrainConfigError(f"config.{name} must be positive, got {cfg[name]}")
    for name in ("questions_per_step", "group_size", "num_minibatches"):
        if cfg.rl[name] <= 0:
            raise TrainConfigError(f"config.rl.{name} must be positive, got {cfg.rl[name]}")
    if cfg.rl.micro_batch_size < 0:
        raise TrainConfigError(f"config.rl.micro_batch_size must be >= 0 (0 = whole mini-batch)")
    if cfg.checkpoint.every <= 0:
        raise TrainConfigError(f"config.checkpoint.every must be positive, got {cfg.checkpoint.every}")


def _learner_config(cfg):
    from memagent_jax.rl.learner import LearnerConfig, OptimizerConfig
    from memagent_jax.rl.losses import LossConfig

    rl = cfg.rl
    return LearnerConfig(
        loss=LossConfig(kind="grpo", clip_low=rl.clip_low, clip_high=rl.clip_high,
                        dual_clip=rl.dual_clip if rl.dual_clip else None, kl_coef=rl.kl_coef,
                        entropy_coef=rl.entropy_coef, aggregation=rl.aggregation),
        optimizer=OptimizerConfig(learning_rate=rl.learning_rate, weight_decay=rl.weight_decay,
                                  max_grad_norm=rl.max_grad_norm, warmup_steps=rl.warmup_steps, schedule=rl.schedule,
                                  total_steps=cfg.steps if rl.schedule == "cosine" else None),
        num_minibatches=rl.num_minibatches, micro_batch_size=rl.micro_batch_size or None,
        recompute_old_logprobs=rl.recompute_old_logprobs, on_nonfinite=rl.on_nonfinite,
        remat=cfg.model.remat)


def _records(cfg, tokenizer):
    """(random-access source, transform to QARecord): the training file, or the synthetic task."""
    if cfg.data.train_file:
        from memagent_jax.data.formats import open_file

        return open_file(cfg.data.train_file), None
    from memagent_jax.data.synthetic import SyntheticConfig, SyntheticDataset

    synthetic = SyntheticDataset(SyntheticConfig(task=cfg.data.synthetic_task, num_tokens=cfg.data.synthetic_tokens,
                                                 chunk_tokens=cfg.agent.chunk_tokens, seed=cfg.seed),
                                 tokenizer, cfg.data.synthetic_samples)
    return synthetic, lambda sample: sample.to_record()


def train(cfg, workdir: str) -> dict:
    """Runs (or resumes) training; returns the last step's metrics."""
    import jax
    import numpy as np
    from transformers import AutoTokenizer

    from memagent_jax.agent import AgentBudgets, MemoryAgent
    from memagent_jax.checkpoint import Checkpointer
    from memagent_jax.data.iterator import ShardedIterator
    from memagent_jax.models import load_hf_params, save_hf_checkpoint
    from memagent_jax.models import sharding as sharding_lib
    from memagent_jax.rl.advantages import dynamic_sampling_mask, group_advantages
    from memagent_jax.rl.batch import shuffle_rows
    from memagent_jax.rl.learner import Learner
    from memagent_jax.rl.metrics import MetricsWriter
    from memagent_jax.rl.rollout import RewardScorer, collect_rollouts, rollout_to_batch
    from memagent_jax.sampling import SamplingParams

    validate_config(cfg, device_count=jax.device_count())
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path, local_files_only=True)
    params, model_config = load_hf_params(cfg.model.path, mesh=mesh, param_dtype=cfg.model.param_dtype)
    model_config = model_config.replace(compute_dtype=cfg.model.compute_dtype)

    learner = Learner(model_config, _learner_config(cfg), mesh=mesh)
    reference = learner.copy_params(params) if learner.needs_reference else None
    state = learner.init_state(params)
    source, transform = _records(cfg, tokenizer)
    iterator = ShardedIterator(source, cfg.rl.questions_per_step, seed=cfg.seed, transform=transform,
                               process_index=jax.process_index(), process_count=jax.process_count())
    base_key = jax.random.key(cfg.seed)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=cfg.checkpoint.keep,
                                async_save=cfg.checkpoint.async_save)
    start = 0
    if checkpointer.latest_step() is not None:
        restored = checkpointer.restore(learner.abstract_state())
        state, start = restored.state, restored.step
        iterator.set_state(restored.data_state)
        print(f"resumed from {checkpointer.directory} at step {start}", flush=True)

    budgets = AgentBudgets(question_tokens=cfg.agent.question_tokens, chunk_tokens=cfg.agent.chunk_tokens,
                           memory_tokens=cfg.agent.memory_tokens, answer_tokens=cfg.agent.answer_tokens,
                           chunks_per_segment=cfg.agent.chunks_per_segment)
    agent = MemoryAgent(state.params, model_config, tokenizer, budgets=budgets, mesh=mesh,
                        memory_sampling=SamplingParams(temperature=cfg.agent.temperature, top_p=cfg.agent.top_p))
    scorer = RewardScorer(cfg.data.reward_style)
    writer = MetricsWriter(workdir, total_steps=cfg.steps, console_every=cfg.log_every)
    metrics: dict = {}
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            records = next(iterator)
            agent.params = state.params  # the learner's params, in place
            rollout = collect_rollouts(agent, records, cfg.rl.group_size, jax.random.fold_in(base_key, step),
                                       scorer=scorer).result()
            advantages = np.asarray(group_advantages(rollout.rewards, normalize_std=cfg.rl.normalize_std,
                                                     leave_one_out=cfg.rl.leave_one_out))
            keep = np.asarray(dynamic_sampling_mask(rollout.rewards)) if cfg.rl.dynamic_sampling else None
            batch, stats = rollout_to_batch(rollout, advantages, keep_groups=keep, pad_id=agent.spec.pad_id,
                                            vocab_size=model_config.vocab_size, rows_multiple=learner.rows_multiple)
            metrics = {"reward_mean": float(rollout.rewards.mean()), "reward_std": float(rollout.rewards.std()),
                       "accuracy": float(rollout.accuracy.mean()), "rollout_time_s": rollout.rollout_seconds,
                       "reward_time_s": rollout.reward_seconds, **rollout.length_stats(), **stats}
            if batch is not None:
                batch = shuffle_rows(batch, np.random.default_rng([cfg.seed, step]))
                state, learn = learner.train_step(state, batch, ref_params=reference)
                metrics.update({k: v for k, v in learn.items() if k != "step"})
            metrics["step_time_s"] = time.perf_counter() - t0
            writer.write(step + 1, metrics)
            if (step + 1) % cfg.checkpoint.every == 0 or step + 1 == cfg.steps:
                checkpointer.save(step + 1, state, data_state=iterator.get_state(), rng=base_key)
        checkpointer.wait_until_finished()
        if cfg.export:
            out = save_hf_checkpoint(state.params, model_config, os.path.join(workdir, "export"),
                                     base_folder=cfg.model.tokenizer or cfg.model.path)
            if jax.process_index() == 0:
                print(f"exported the trained model to {out}", flush=True)
    finally:
        scorer.close()
        writer.close()
        checkpointer.close()
    return metrics


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    if not flags.FLAGS["verbosity"].present:  # keep Orbax's per-save INFO lines off the progress output
        absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        train(_CONFIG.value, _WORKDIR.value)
    except TrainConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
