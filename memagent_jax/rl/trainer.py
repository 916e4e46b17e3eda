"""The GRPO training loop: rollouts of the memory agent, rewards, advantages, learner steps, checkpoints, export.

Each step: Q questions from the data iterator -> G agent trajectories each (the chunk scan, sampling) ->
rewards from the verifier (thread pool) -> group-relative advantages -> every conversation of every
trajectory becomes a training row carrying its trajectory's advantage -> one jitted learner step (mini-batch
updates, gradient accumulation). `train(cfg, workdir)` runs or resumes a run; `memagent_jax.train` is its command.

A caller may steer which questions a step trains on with `train(..., question_mix=)`, an object with
`restore(metadata)` (called once with the resumed checkpoint's metadata, {} on a fresh run), `before_step(step,
params)` (called before each step's rollouts with the policy's params), `mix(step, draw, records) -> records` (the
questions of each sampling draw, same count; a pure function of its arguments and of what `before_step` saw) and
`metadata() -> dict` (saved in every checkpoint, so a resumed run mixes as the uninterrupted one). The main job's
hard-pair replay (memagent_jax.pipeline) is one.
"""

from __future__ import annotations

import os
import sys
import time

from memagent_jax.rl.recipe import (
    TrainConfigError,
    agent_settings,
    eval_settings,
    export_settings,
    learner_config,
    mesh_field,
    model_options,
    split_devices,
    validate_config,
    wandb_settings,
)


def _records(cfg, tokenizer):
    """(random-access source, transform to QARecord): the training file, or the synthetic task."""
    if cfg.data.train_file:
        from memagent_jax.data.formats import open_file

        return open_file(cfg.data.train_file), None
    from memagent_jax.data.synthetic import SyntheticConfig, SyntheticDataset

    synthetic = SyntheticDataset(
        SyntheticConfig(
            task=cfg.data.synthetic_task,
            num_tokens=cfg.data.synthetic_tokens,
            chunk_tokens=cfg.agent.chunk_tokens,
            seed=cfg.seed,
        ),
        tokenizer,
        cfg.data.synthetic_samples,
    )
    return synthetic, lambda sample: sample.to_record()


def _common_batch(batch, stats: dict, *, pad_id: int, packed: bool = False):
    """Multi-process: this process's conversation batch padded to the row count and length of the largest one of
    any process (every process must feed the learner the same shapes; padding rows train on nothing), and the
    stats summed over processes. Returns (batch or None when no process has a conversation, stats)."""
    import numpy as np

    from memagent_jax.distributed import arrays as multiprocess
    from memagent_jax.rl.batch import ConversationBatch, pad_rows

    rows, length = (batch.num_rows, batch.length) if batch is not None else (0, 0)
    local = np.array([rows, length, stats["kept_groups"], stats["groups"], stats["conversations"]], np.int64)
    every = multiprocess.process_allgather(local)
    rows, length = int(every[:, 0].max()), int(every[:, 1].max())
    stats = {
        "kept_groups": int(every[:, 2].sum()),
        "groups": int(every[:, 3].sum()),
        "conversations": int(every[:, 4].sum()),
    }
    if rows == 0:
        return None, stats
    if batch is None:  # packed: per-token advantages and segment ids, all zero
        return ConversationBatch(
            tokens=np.full((rows, length), pad_id, np.int32),
            token_mask=np.zeros((rows, length), bool),
            loss_mask=np.zeros((rows, length), bool),
            old_logprobs=np.zeros((rows, length), np.float32),
            advantages=np.zeros((rows, length) if packed else (rows,), np.float32),
            segment_ids=np.zeros((rows, length), np.int32) if packed else None,
        ), stats
    batch = pad_rows(batch, rows)
    extra = length - batch.length
    if extra:

        def widen(x, value):
            return None if x is None else np.pad(np.asarray(x), ((0, 0), (0, extra)), constant_values=value)

        batch = batch.replace(
            tokens=widen(batch.tokens, pad_id),
            token_mask=widen(batch.token_mask, False),
            loss_mask=widen(batch.loss_mask, False),
            old_logprobs=widen(batch.old_logprobs, 0.0),
            ref_logprobs=widen(batch.ref_logprobs, 0.0),
            segment_ids=widen(batch.segment_ids, 0),
            advantages=widen(batch.advantages, 0.0) if batch.packed else batch.advantages,
        )
    return batch, stats


def _global_rollout_stats(rollout):
    """Multi-process: (rewards [Q, G], accuracy [Q, G], length stats) over every process's trajectories, questions
    in the step's global order (question j of process p is question j * processes + p)."""
    import numpy as np

    from memagent_jax.distributed import arrays as multiprocess

    def gather(x):  # [P, Qp, G] -> [Qp, P, G] -> [Q, G]
        every = multiprocess.process_allgather(x)
        return every.transpose(1, 0, 2).reshape(-1, x.shape[-1])

    convs = rollout.agent_result.conversations
    memory = [len(c.response_ids) for conv in convs for c in conv if c.kind == "memory"]
    final = [len(c.response_ids) for conv in convs for c in conv if c.kind == "final"]
    chunks = rollout.agent_result.num_chunks
    sums = multiprocess.process_allgather(
        np.array([sum(memory), len(memory), sum(final), len(final), sum(chunks), len(chunks)], np.int64)
    ).sum(axis=0)
    lengths = {
        "memory_response_len": float(sums[0] / sums[1]) if sums[1] else 0.0,
        "final_response_len": float(sums[2] / sums[3]) if sums[3] else 0.0,
        "chunks_per_trajectory": float(sums[4] / sums[5]) if sums[5] else 0.0,
    }
    return gather(rollout.rewards), gather(rollout.accuracy), lengths


def _config_items(cfg) -> dict:
    """The config as {dotted key: JSON value} (kept in every checkpoint's metadata)."""
    import json

    out: dict = {}

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(json.loads(cfg.to_json_best_effort(sort_keys=True)), "")
    return out


def _config_changes(saved, current: dict, limit: int = 8) -> str:
    """'key (old -> new), ...' for the config entries that differ from a checkpoint's ('' if none or unknown)."""
    if not isinstance(saved, dict):
        return ""
    keys = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    text = ", ".join(f"{k} ({saved.get(k)!r} -> {current.get(k)!r})" for k in keys[:limit])
    return text + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _export_adapters(learner, state, model_config, workdir: str) -> None:
    """LoRA with lora.save_adapters: the adapters alone, PEFT's layout, in <workdir>/adapters (process 0)."""
    import jax

    if not (learner.lora.enabled and learner.lora.save_adapters) or jax.process_index() != 0:
        return
    from memagent_jax.models.lora import save_adapters

    out = save_adapters(state.params, model_config, learner.lora, os.path.join(workdir, "adapters"))
    print(f"saved the LoRA adapters to {out}", flush=True)


def _lora_layout(param_shapes: dict[str, tuple[int, ...]]) -> str:
    """What a train state's params are, from {leaf path: shape}: 'LoRA adapters of rank r' or 'full model params'."""
    ranks = {shape[-1] for path, shape in param_shapes.items() if path.endswith("['a']")}
    if ranks and all(path.endswith(("['a']", "['b']")) for path in param_shapes):
        return f"LoRA adapters of rank {min(ranks)}"
    return "full model params"


def check_lora_layout(checkpointer, step: int, learner, workdir: str) -> None:
    """Refuses to resume a checkpoint whose train state is of the other kind (full fine-tune vs LoRA adapters, or
    adapters of another rank or targets) than config.lora asks for: one line naming config.lora.rank and the
    workdir, instead of a shape error from the restore (which would also set the checkpoints aside as damaged)."""
    import jax

    saved = checkpointer.state_shapes(step)
    if saved is None:
        return  # unreadable metadata: the verified restore reports it
    prefix = "['params']"
    saved_params = {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}
    if not saved_params:
        return
    want = {
        jax.tree_util.keystr(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(learner.abstract_state().params)[0]
    }
    have_kind, want_kind = _lora_layout(saved_params), _lora_layout(want)
    if saved_params == want or (have_kind == want_kind == "full model params"):
        return
    if have_kind == want_kind:
        wanted = f"config.lora.rank={learner.lora.rank} with other config.lora.targets"
    else:
        wanted = f"config.lora.rank={learner.lora.rank}, which trains {want_kind}"
    raise TrainConfigError(
        f"config.lora.rank: checkpoint {checkpointer.directory}/{step} of --workdir {workdir} holds {have_kind}, "
        f"not what this run trains ({wanted}); resume it with the config it was written with, or start in a new "
        f"--workdir"
    )


def sample_step(roll_out, *, dynamic_sampling: bool, max_batches: int, groups_wanted: int, process_count: int = 1):
    """One step's rollout, with DAPO's dynamic sampling when asked.

    roll_out(draw) -> Rollout of the next batch of questions (draw 0, 1, ...). Without dynamic sampling: draw 0,
    every group kept. With it, groups whose rewards are all equal (no gradient signal) are dropped and further
    batches are drawn, up to `max_batches` in all, until `groups_wanted` groups with signal are at hand (on every
    process); the first `groups_wanted` of them are kept (fewer when the draws ran out).
    Returns (rollout of all draws, keep [Q] bool or None, number of draws).
    """
    import numpy as np

    from memagent_jax.rl.advantages import dynamic_sampling_mask
    from memagent_jax.rl.rollout import merge_rollouts

    first = roll_out(0)
    if not dynamic_sampling:
        return first, None, 1
    rollouts = [first]
    masks = [np.asarray(dynamic_sampling_mask(first.rewards))]
    while len(rollouts) < max_batches:
        have = int(sum(m.sum() for m in masks))
        if process_count > 1:  # every process draws the same number of batches (the rollouts are collective)
            from memagent_jax.distributed import arrays as multiprocess

            have = int(multiprocess.process_allgather(np.asarray(have, np.int64)).min())
        if have >= groups_wanted:
            break
        rollouts.append(roll_out(len(rollouts)))
        masks.append(np.asarray(dynamic_sampling_mask(rollouts[-1].rewards)))
    mask = np.concatenate(masks)
    keep = mask & (np.cumsum(mask) <= groups_wanted)
    return merge_rollouts(rollouts), keep, len(rollouts)


def _training_evaluation(cfg, workdir: str, agent, *, state_params, start: int, restored: dict):
    """The `validation.TrainingEvaluation` of `config.eval` (None when off): a MemoryAgent over the rollout agent's
    params, tokenizer and mesh with the export's budgets and templates and the evaluation's sampling (greedy by
    default); its best step exported as the regular export (state_params() gives the learner's current params)."""
    ev = eval_settings(cfg)
    if not ev.enabled:
        return None
    from memagent_jax.agent import SETTINGS_FILE, MemoryAgent
    from memagent_jax.models import save_hf_checkpoint
    from memagent_jax.rl.validation import TrainingEvaluation
    from memagent_jax.sampling import SamplingParams

    exported = export_settings(cfg)
    evaluator = MemoryAgent(
        agent.params,
        agent.config,
        agent.tokenizer,
        budgets=exported.budgets,
        templates=exported.templates,
        memory_sampling=SamplingParams(temperature=ev.temperature, top_p=ev.top_p),
        mesh=agent.mesh,
    )

    def export(folder: str, extra_files: dict):
        return save_hf_checkpoint(
            state_params(),
            agent.config,
            folder,
            base_folder=cfg.model.tokenizer or cfg.model.path,
            extra_files={SETTINGS_FILE: exported.to_json(), **extra_files},
        )

    return TrainingEvaluation(
        ev, evaluator, workdir, export=export, resume_step=start, restored=restored, total_steps=cfg.steps
    )


def train(cfg, workdir: str, *, question_mix=None) -> dict:
    """Runs (or resumes) training; returns the last step's metrics. question_mix: see the module docstring."""
    import jax
    import numpy as np
    from transformers import AutoTokenizer

    from memagent_jax.agent import SETTINGS_FILE, MemoryAgent
    from memagent_jax.data.iterator import ShardedIterator
    from memagent_jax.distributed import arrays as multiprocess
    from memagent_jax.models import load_hf_params, save_hf_checkpoint
    from memagent_jax.models import sharding as sharding_lib
    from memagent_jax.rl.advantages import group_advantages
    from memagent_jax.rl.batch import pack_conversations, pad_rows, shuffle_rows
    from memagent_jax.rl.learner import Learner
    from memagent_jax.rl.metrics import MetricsWriter
    from memagent_jax.rl.rollout import RewardScorer, collect_rollouts_in_slices, rollout_to_batch
    from memagent_jax.sampling import SamplingParams
    from memagent_jax.storage.checkpoint import Checkpointer, CheckpointError
    from memagent_jax.storage.paths import RemotePathError, check_local_path

    try:
        check_local_path(workdir, "--workdir")
    except RemotePathError as e:
        raise TrainConfigError(str(e)) from None
    process_count, process_index = jax.process_count(), jax.process_index()
    validate_config(cfg, device_count=jax.device_count(), process_count=process_count)
    os.makedirs(workdir, exist_ok=True)
    learner_devices, rollout_devices = split_devices(cfg)
    mesh = sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=learner_devices)
    rollout_mesh = (
        mesh
        if rollout_devices is None
        else sharding_lib.make_mesh(
            -1, mesh_field(cfg, "rollout_fsdp", 1), mesh_field(cfg, "rollout_tensor", 1), devices=rollout_devices
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path, local_files_only=True)
    params, model_config = load_hf_params(
        cfg.model.path,
        mesh=mesh,
        param_dtype=cfg.model.param_dtype,
        allow_nonfinite=bool(cfg.model.get("allow_nonfinite_weights", False)),
    )
    model_config = model_config.replace(compute_dtype=cfg.model.compute_dtype, **model_options(cfg.model))

    learner = Learner(model_config, learner_config(cfg), mesh=mesh)
    reference = learner.copy_params(params) if learner.needs_reference else None
    state = learner.init_state(params)
    source, transform = _records(cfg, tokenizer)
    # Each process reads its own shard: questions_per_step / processes questions per step.
    iterator = ShardedIterator(
        source,
        cfg.rl.questions_per_step // process_count,
        seed=cfg.seed,
        transform=transform,
        process_index=process_index,
        process_count=process_count,
    )
    # The rollout runs in agent calls of rl.rollout_batch_size trajectories (0: the whole step at once), which
    # bounds the KV caches and prefill activations; keys follow the global question ids, so slicing changes nothing.
    questions_per_call = (
        int(cfg.rl.get("rollout_batch_size", 0) or 0) // cfg.rl.group_size // process_count
        or cfg.rl.questions_per_step // process_count
    )
    base_key = jax.random.key(cfg.seed)
    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save
    )
    start = 0
    run_metadata = {"config": _config_items(cfg)}
    restored_metadata: dict = {}
    if checkpointer.latest_step() is not None:
        check_lora_layout(checkpointer, checkpointer.latest_step(), learner, workdir)
        # Verified (weights, optimiser state, data position, RNG, metadata); falls back past damaged checkpoints.
        restored = checkpointer.restore(learner.abstract_state())
        state, start = restored.state, restored.step
        restored_metadata = restored.metadata
        try:
            iterator.set_state(restored.data_state)
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{checkpointer.directory}/{start}: its data position does not fit this run's data: {e}"
            ) from None
        if restored.rng is not None:
            base_key = restored.rng  # the run's key, as saved (the one cfg.seed gives: the iterator checks the seed)
        if process_index == 0:
            for bad_step, why in restored.skipped:
                print(
                    f"warning: checkpoint step {bad_step} is unusable and was moved to "
                    f"{checkpointer.directory}/quarantine/: {why}",
                    file=sys.stderr,
                    flush=True,
                )
            if restored.unverified:
                print(
                    f"warning: checkpoint step {start} was written without a manifest: its "
                    f"{', '.join(restored.unverified)} are not verified",
                    file=sys.stderr,
                    flush=True,
                )
            changed = _config_changes(restored.metadata.get("config"), run_metadata["config"])
            if changed:
                print(
                    f"note: the config differs from checkpoint step {start}'s: {changed}", file=sys.stderr, flush=True
                )
            print(f"resumed from {checkpointer.directory} at step {start}", flush=True)
    if rollout_devices is None:

        def rollout_params(params):
            return params  # the learner's params, in place
    else:
        # Separate meshes: the learner's params are copied onto the rollout mesh's shardings every step.
        rollout_shardings = sharding_lib.param_shardings(learner.abstract_policy_params(), rollout_mesh)

        def rollout_params(params):
            return multiprocess.copy_to(params, rollout_shardings)  # jax.device_put, also across processes

    budgets, templates = agent_settings(cfg)
    agent = MemoryAgent(
        rollout_params(learner.policy_params(state)),
        model_config,
        tokenizer,
        budgets=budgets,
        mesh=rollout_mesh,
        templates=templates,
        # The recorded (old) log-probs are at the rollout temperature, as the learner's (`logprob_temperature`).
        # At temperature 1 they are the model's own either way: the flag stays off and the program is unchanged.
        memory_sampling=SamplingParams(
            temperature=cfg.agent.temperature,
            top_p=cfg.agent.top_p,
            tempered_logprobs=float(cfg.agent.temperature) != 1.0,
        ),
    )
    evaluation = _training_evaluation(
        cfg, workdir, agent, state_params=lambda: learner.policy_params(state), start=start, restored=restored_metadata
    )
    scorer = RewardScorer(cfg.data.reward_style, drop_think=bool(cfg.data.get("reward_drop_think", False)))
    # Rows of steps after `start` (written before an interruption) are dropped: the resumed run writes them again.
    writer = MetricsWriter(
        workdir,
        total_steps=cfg.steps,
        console_every=cfg.log_every,
        resume_step=start if start or evaluation is None else -1,  # a fresh run evaluates step 0 again
        wandb=wandb_settings(cfg),
        run_config=run_metadata["config"],
    )
    if cfg.export and process_index == 0:
        from memagent_jax.models.hf_io import clean_stale_exports

        clean_stale_exports(os.path.join(workdir, "export"))  # left by a kill during an earlier export
    if question_mix is not None:
        question_mix.restore(restored_metadata)
    metrics: dict = {}
    most_rows = 0  # dynamic sampling / packing: the largest learner batch so far (smaller ones are padded to it)
    pack_length = int(cfg.rl.get("pack_length", 0))
    try:
        if evaluation is not None and start == 0 and evaluation.due(0):
            writer.write(0, evaluation.run(0, rollout_params(learner.policy_params(state))))
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            # LoRA: the adapters are merged into a copy of the base once per step (the sampler runs a plain model).
            agent.params = rollout_params(learner.policy_params(state))
            if question_mix is not None:
                question_mix.before_step(step, agent.params)

            def roll_out(draw):
                # Question j of process p is question j * processes + p of the step (the iterator's global order):
                # trajectory keys depend on that, not on the process layout. Draw 0 samples with the step's key.
                records = next(iterator)
                if question_mix is not None:
                    records = question_mix.mix(step, draw, records)
                question_ids = [j * process_count + process_index for j in range(len(records))]
                key = jax.random.fold_in(base_key, step)
                return collect_rollouts_in_slices(
                    agent,
                    records,
                    cfg.rl.group_size,
                    key if draw == 0 else jax.random.fold_in(key, draw),
                    scorer=scorer,
                    questions_per_call=questions_per_call,
                    question_ids=question_ids,
                )

            rollout, keep, draws = sample_step(
                roll_out,
                dynamic_sampling=bool(cfg.rl.dynamic_sampling),
                max_batches=int(cfg.rl.get("max_sampling_batches", 1)),
                groups_wanted=cfg.rl.questions_per_step // process_count,
                process_count=process_count,
            )
            agent.release_layout()  # the rollout's copy of the weights: the learner step needs the memory
            advantages = np.asarray(
                group_advantages(
                    rollout.rewards, normalize_std=cfg.rl.normalize_std, leave_one_out=cfg.rl.leave_one_out
                )
            )
            batch, stats = rollout_to_batch(
                rollout,
                advantages,
                keep_groups=keep,
                pad_id=agent.spec.pad_id,
                vocab_size=model_config.vocab_size,
                rows_multiple=learner.process_rows_multiple,
                length_multiple=int(cfg.rl.get("length_multiple", 64)),
                answer_advantage=str(cfg.rl.get("answer_advantage", "shared")),
            )
            if batch is not None and pack_length:
                # Packed rows vary in number from step to step: pad to the most so far (one learner shape).
                batch = pack_conversations(
                    batch, pack_length, rows_multiple=learner.process_rows_multiple, min_rows=most_rows
                )
                most_rows = batch.num_rows
            elif keep is not None and batch is not None:
                # A step that kept fewer groups trains on empty padding rows instead of compiling a new shape.
                most_rows = max(most_rows, batch.num_rows)
                batch = pad_rows(batch, most_rows)
            if process_count == 1:
                rewards, accuracy, lengths = rollout.rewards, rollout.accuracy, rollout.length_stats()
            else:  # every process learns from its own rows; the metrics cover all of them
                batch, stats = _common_batch(batch, stats, pad_id=agent.spec.pad_id, packed=bool(pack_length))
                rewards, accuracy, lengths = _global_rollout_stats(rollout)
            metrics = {
                "reward_mean": float(rewards.mean()),
                "reward_std": float(rewards.std()),
                "accuracy": float(accuracy.mean()),
                "rollout_time_s": rollout.rollout_seconds,
                "reward_time_s": rollout.reward_seconds,
                **lengths,
                **stats,
                "sampling_batches": draws,
            }
            if batch is not None:
                batch = shuffle_rows(batch, np.random.default_rng([cfg.seed, step]))
                state, learn = learner.train_step(state, batch, ref_params=reference)
                metrics.update({k: v for k, v in learn.items() if k != "step"})
            metrics["step_time_s"] = time.perf_counter() - t0
            if evaluation is not None and evaluation.due(step + 1):
                metrics.update(evaluation.run(step + 1, rollout_params(learner.policy_params(state))))
                run_metadata.update(evaluation.metadata())  # the best so far, kept by the next checkpoint
            if question_mix is not None:
                run_metadata.update(question_mix.metadata())
            writer.write(step + 1, metrics)
            if (step + 1) % cfg.checkpoint.every == 0 or step + 1 == cfg.steps:
                checkpointer.save(step + 1, state, data_state=iterator.get_state(), rng=base_key, metadata=run_metadata)
        checkpointer.wait_until_finished()
        if cfg.export:
            out = save_hf_checkpoint(
                learner.policy_params(state),
                model_config,
                os.path.join(workdir, "export"),
                base_folder=cfg.model.tokenizer or cfg.model.path,
                extra_files={SETTINGS_FILE: export_settings(cfg).to_json()},
            )
            if jax.process_index() == 0:
                print(f"exported the trained model to {out}", flush=True)
            _export_adapters(learner, state, model_config, workdir)
    finally:
        scorer.close()
        writer.close()
        checkpointer.close()
    return metrics
