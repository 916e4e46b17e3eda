"""Train a memory agent with multi-conversation GRPO.

    python -m memagent_jax.train --config configs/grpo.py --workdir runs/x [--config.a.b=value ...]

Each step: Q questions from the data iterator -> G agent trajectories each (the chunk scan, sampling) ->
rewards from the verifier (thread pool) -> group-relative advantages -> every conversation of every
trajectory becomes a training row carrying its trajectory's advantage -> one jitted learner step (mini-batch
updates, gradient accumulation). The rollout runs on the learner's params in place (no host copy).

The workdir holds `checkpoints/` (Orbax: train state, data-iterator position, RNG; the last N kept),
`metrics.jsonl` and TensorBoard events, and `export/` (the final model as a Hugging Face folder). Restarting
with the same workdir resumes from the newest finished checkpoint and continues exactly where it stopped.

Multi-host: run the same command on every host (one process per host, or `launch/local.py` for several
processes on one machine) with --coordinator_address/--num_processes/--process_id or the MEMAGENT_* variables
(see `memagent_jax.distributed`). Each process reads its own share of the questions (questions_per_step /
processes), rolls them out on the shared mesh, and feeds its own conversations to the learner; process 0 writes
the metrics and the export, every process takes part in checkpointing. `config.mesh.rollout_devices` > 0 puts
the rollout on its own devices (its own mesh) and copies the learner's params there every step.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from memagent_jax import distributed, settings

_CONFIG = _WORKDIR = None


def define_flags() -> None:
    """Registers the command-line flags (only when run as a program, so other entry points can import `train`)."""
    global _CONFIG, _WORKDIR
    from memagent_jax import configs

    sys.argv = configs.resolve_argv(sys.argv)
    _CONFIG = config_flags.DEFINE_config_file(
        "config", configs.path_of("grpo"), "training config file", lock_config=True
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and the exported model")
    distributed.define_flags()  # --coordinator_address / --num_processes / --process_id (multi-host runs)


class TrainConfigError(settings.ConfigError):
    """A training config field is invalid; the message names the field."""


def _number(
    cfg, field: str, *, low=None, high=None, low_open=False, high_open=False, integer=False, allowed: str = ""
) -> float:
    """The value of `config.<field>` (a dotted path), checked by the shared rules (`memagent_jax.settings`);
    TrainConfigError naming the field and the allowed range otherwise."""
    value = cfg
    for part in field.split("."):
        value = value[part]
    try:
        if integer:
            return settings.integer(
                field, value, minimum=low if low is None or not low_open else low + 1, maximum=high, allowed=allowed
            )
        return settings.real(field, value, low=low, high=high, low_open=low_open, high_open=high_open, allowed=allowed)
    except settings.SettingError as e:
        raise TrainConfigError(f"config.{e}") from None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _model_context(folder: str) -> int:
    """max_position_embeddings from `folder`/config.json alone (no model, no tokenizer loaded)."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise TrainConfigError(
            f"config.model.path: {folder!r} has no config.json (expected a Hugging Face model folder)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrainConfigError(f"config.model.path: {path} does not parse as JSON: {e}") from None
    if not isinstance(hf, dict):
        raise TrainConfigError(f"config.model.path: {path} must hold a JSON object")
    context = hf.get("max_position_embeddings", 32768)  # the loader's default (models.config)
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise TrainConfigError(
            f"config.model.path: {path}: max_position_embeddings must be a positive integer, got {context!r}"
        )
    return context


def _check_ranges(cfg) -> None:
    """Every numeric / choice field with a range, named with its allowed range (no file is opened)."""
    from memagent_jax.evaluation import verifier

    _number(cfg, "seed", low=0, integer=True)
    _number(cfg, "log_every", low=1, integer=True)
    _number(cfg, "checkpoint.keep", low=1, integer=True)
    from memagent_jax.agent import AgentBudgets
    from memagent_jax.sampling import SamplingParams

    settings.build(
        AgentBudgets,
        cfg.agent,
        "config.agent",
        error=TrainConfigError,
        fields=(
            "question_tokens",
            "chunk_tokens",
            "memory_tokens",
            "answer_tokens",
            "chunks_per_segment",
            "max_document_tokens",
        ),
    )
    settings.build(SamplingParams, cfg.agent, "config.agent", fields=("temperature", "top_p"), error=TrainConfigError)
    if cfg.agent.temperature == 0:
        raise TrainConfigError(
            "config.agent.temperature must be > 0 (GRPO compares the sampled trajectories of a "
            "group: at temperature 0 they are all the same and every advantage is 0)"
        )
    if "export_sampling" in cfg:
        settings.build(
            SamplingParams,
            cfg.export_sampling,
            "config.export_sampling",
            fields=("temperature", "top_p"),
            error=TrainConfigError,
        )
    rl = cfg.rl
    _number(cfg, "rl.learning_rate", low=0, low_open=True, allowed="> 0 (at 0 nothing is learned)")
    _number(
        cfg,
        "rl.group_size",
        low=2,
        integer=True,
        allowed=">= 2 (advantages compare the trajectories of one question: a group of 1 always has 0)",
    )
    _number(cfg, "rl.micro_batch_size", low=0, integer=True, allowed=">= 0 (0 = whole mini-batch)")
    if "length_multiple" in rl:
        _number(
            cfg,
            "rl.length_multiple",
            low=1,
            integer=True,
            allowed=">= 1 (training rows are padded to a multiple of this many tokens)",
        )
    if "pack_length" in rl:
        _number(
            cfg,
            "rl.pack_length",
            low=0,
            integer=True,
            allowed=">= 0 (tokens per packed learner row; 0 = one conversation per row)",
        )
        if rl.pack_length and rl.aggregation != "token-mean":
            raise TrainConfigError(
                f"config.rl.pack_length > 0 needs config.rl.aggregation 'token-mean' (a packed "
                f"row holds several conversations), got {rl.aggregation!r}"
            )
    if "max_sampling_batches" in rl:
        _number(
            cfg,
            "rl.max_sampling_batches",
            low=1,
            integer=True,
            allowed=">= 1 (batches of questions a step may draw under rl.dynamic_sampling)",
        )
    fewest = 2 * rl.questions_per_step * rl.group_size
    _number(
        cfg,
        "rl.num_minibatches",
        low=1,
        high=fewest,
        integer=True,
        allowed=f"in [1, {fewest}]: a step has at least {fewest} conversations (questions_per_step "
        f"{rl.questions_per_step} x group_size {rl.group_size} trajectories x (one chunk + the final "
        f"answer)); more mini-batches than conversations leaves some with padding only",
    )
    if cfg.data.reward_style not in verifier.REWARD_STYLES:
        raise TrainConfigError(
            f"config.data.reward_style must be one of {sorted(verifier.REWARD_STYLES)}, got {cfg.data.reward_style!r}"
        )
    dtypes = ("float32", "bfloat16", "float16")
    for name in ("param_dtype", "compute_dtype"):
        if cfg.model[name] not in dtypes:
            raise TrainConfigError(f"config.model.{name} must be one of {dtypes}, got {cfg.model[name]!r}")
    if cfg.model.remat not in ("none", "full", "dots"):
        raise TrainConfigError(f"config.model.remat must be 'none', 'full' or 'dots', got {cfg.model.remat!r}")
    from memagent_jax.models.config import ATTENTION_IMPLS

    if cfg.model.get("attention_impl", "auto") not in ATTENTION_IMPLS:
        raise TrainConfigError(
            f"config.model.attention_impl must be one of {ATTENTION_IMPLS}, got {cfg.model.attention_impl!r}"
        )
    if "attention_block_size" in cfg.model:
        _number(cfg, "model.attention_block_size", low=1, integer=True)
    from memagent_jax.models.config import DECODE_LAYOUTS

    if cfg.model.get("decode_layout", "auto") not in DECODE_LAYOUTS:
        raise TrainConfigError(
            f"config.model.decode_layout must be one of {DECODE_LAYOUTS}, got {cfg.model.decode_layout!r}"
        )
    # The learner's settings check themselves (loss, optimiser, mini-batches); their fields are named as in config.rl.
    with settings.named("config.rl", error=TrainConfigError, rename={"total_steps": "steps"}):
        _learner_config(cfg)


def _check_files(cfg) -> None:
    """The model folder (config.json, tokenizer files), budgets vs its context, the data file's first rows and the
    templates file, before any model, tokenizer or learner is built."""
    from memagent_jax.agent import AgentInputError, TemplateError

    if not cfg.model.path:
        raise TrainConfigError("config.model.path: required (a local Hugging Face model folder)")
    if not os.path.isdir(cfg.model.path):
        raise TrainConfigError(f"config.model.path: {cfg.model.path!r} is not a directory")
    if cfg.model.tokenizer and not os.path.isdir(cfg.model.tokenizer):
        raise TrainConfigError(f"config.model.tokenizer: {cfg.model.tokenizer!r} is not a directory")
    tok = cfg.model.tokenizer or cfg.model.path
    if not any(os.path.isfile(os.path.join(tok, name)) for name in _TOKENIZER_FILES):
        field = "config.model.tokenizer" if cfg.model.tokenizer else "config.model.path"
        raise TrainConfigError(
            f"{field}: {tok!r} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)})"
            + ("" if cfg.model.tokenizer else "; set config.model.tokenizer")
        )
    context = _model_context(cfg.model.path)
    a = cfg.agent
    update = a.question_tokens + 2 * a.memory_tokens + a.chunk_tokens
    final = a.question_tokens + a.memory_tokens + a.answer_tokens
    if max(update, final) > context:
        raise TrainConfigError(
            f"config.agent budgets need a context of more than {max(update, final)} tokens (memory update: "
            f"question_tokens {a.question_tokens} + memory_tokens {a.memory_tokens} + chunk_tokens {a.chunk_tokens} "
            f"+ {a.memory_tokens} new; final: question + memory + answer_tokens {a.answer_tokens}; plus the "
            f"templates), but the model's max_position_embeddings is {context} ({cfg.model.path}/config.json)"
        )
    if cfg.data.train_file:
        from memagent_jax.data.formats import open_file
        from memagent_jax.data.records import DataFormatError

        path = cfg.data.train_file
        if not os.path.isfile(path):
            raise TrainConfigError(f"config.data.train_file: {path!r} does not exist")
        try:
            rows = open_file(path)
            if len(rows) == 0:
                raise TrainConfigError(f"config.data.train_file: {path!r} has no rows")
            for i in range(min(len(rows), 8)):
                rows[i]
        except DataFormatError as e:
            raise TrainConfigError(f"config.data.train_file: {e}") from None
    else:
        from memagent_jax.data.synthetic import SyntheticConfig

        try:
            SyntheticConfig(
                task=cfg.data.synthetic_task,
                num_tokens=cfg.data.synthetic_tokens,
                chunk_tokens=cfg.agent.chunk_tokens,
                seed=cfg.seed,
            )
        except ValueError as e:
            raise TrainConfigError(f"config.data (synthetic task): {e}") from None
        _number(cfg, "data.synthetic_samples", low=1, integer=True)
    if a.get("templates") and not os.path.isfile(a.templates):
        raise TrainConfigError(f"config.agent.templates: {a.templates!r} does not exist")
    try:
        agent_settings(cfg)  # the budgets, the templates file (parsed, placeholders checked) and prompt_mode
    except (TemplateError, AgentInputError, ValueError, TypeError) as e:
        field = "config.agent.templates" if a.get("templates") else "config.agent"
        raise TrainConfigError(f"{field}: {e}") from None


def validate_config(cfg, *, device_count: int, check_files: bool = True, process_count: int = 1) -> None:
    """Checks a config before any expensive work; every error names the field at fault and its allowed range.

    Runs first in `train`, before any tokenizer, model or learner is built: every numeric field with a range
    (learning rate, clip values, sampling, budgets, group size, mini-batches vs the fewest conversations of a
    step, ...), and with check_files the model folder (config.json, tokenizer files), the budgets against the
    model's max_position_embeddings (read from config.json alone), the data file's first rows and the templates
    file. check_files=False skips the checks that need the model folder and data files to exist (the planner
    sizes shipped configs whose checkpoints live elsewhere). device_count / process_count: of the whole run (all
    hosts); the learner mesh gets device_count - config.mesh.rollout_devices devices.
    """
    for name in ("steps",):
        if cfg[name] <= 0:
            raise TrainConfigError(f"config.{name} must be positive, got {cfg[name]}")
    for name in ("questions_per_step", "group_size", "num_minibatches"):
        if cfg.rl[name] <= 0:
            raise TrainConfigError(f"config.rl.{name} must be positive, got {cfg.rl[name]}")
    _check_ranges(cfg)
    rollout = _mesh_field(cfg, "rollout_devices", 0)
    rollout_fsdp = _mesh_field(cfg, "rollout_fsdp", 1)
    rollout_tensor = _mesh_field(cfg, "rollout_tensor", 1)
    for name, value in (
        ("rollout_devices", rollout),
        ("rollout_fsdp", rollout_fsdp),
        ("rollout_tensor", rollout_tensor),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TrainConfigError(f"config.mesh.{name} must be an integer, got {value!r}")
    if rollout < 0 or rollout >= device_count:
        raise TrainConfigError(
            f"config.mesh.rollout_devices must be 0 (rollout on the learner's devices) or in "
            f"[1, {device_count - 1}] ({device_count} devices, at least one for the learner), "
            f"got {rollout}"
        )
    if rollout:
        if rollout % process_count:
            raise TrainConfigError(
                f"config.mesh.rollout_devices={rollout} must be a multiple of the "
                f"{process_count} processes (each process gives the same number of its devices)"
            )
        if rollout_fsdp < 1 or rollout_tensor < 1 or rollout % (rollout_fsdp * rollout_tensor):
            raise TrainConfigError(
                f"config.mesh.rollout_fsdp x config.mesh.rollout_tensor = {rollout_fsdp} x "
                f"{rollout_tensor} must be positive and divide config.mesh.rollout_devices="
                f"{rollout}"
            )
        if (rollout // rollout_tensor) % process_count:
            raise TrainConfigError(
                f"config.mesh.rollout_devices / config.mesh.rollout_tensor = "
                f"{rollout // rollout_tensor} batch shards must be a multiple of the "
                f"{process_count} processes (every process holds whole rows)"
            )
    learner_count = device_count - rollout
    where = (
        f"{device_count} devices"
        if not rollout
        else f"the {learner_count} learner devices ({device_count} devices - config.mesh.rollout_devices={rollout})"
    )
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    known = [s for s in sizes if s != -1]
    if sizes.count(-1) > 1 or any(s <= 0 for s in known):
        raise TrainConfigError(f"config.mesh: sizes must be positive with at most one -1, got {sizes}")
    prod = 1
    for s in known:
        prod *= s
    if (-1 in sizes and learner_count % prod) or (-1 not in sizes and prod != learner_count):
        raise TrainConfigError(f"config.mesh: data x fsdp x tensor = {sizes} does not match {where}")
    if process_count > 1:
        resolved = [learner_count // prod if s == -1 else s for s in sizes]
        if (resolved[0] * resolved[1]) % process_count:
            raise TrainConfigError(
                f"config.mesh: data x fsdp = {resolved[0] * resolved[1]} must be a multiple of the "
                f"{process_count} processes, so that every process holds whole batch rows"
            )
        if cfg.rl.questions_per_step % process_count:
            raise TrainConfigError(
                f"config.rl.questions_per_step={cfg.rl.questions_per_step} must be a multiple of "
                f"the {process_count} processes (each process rolls out "
                f"questions_per_step / processes questions per step)"
            )
    if cfg.rl.micro_batch_size < 0:
        raise TrainConfigError("config.rl.micro_batch_size must be >= 0 (0 = whole mini-batch)")
    rollout_batch = int(cfg.rl.get("rollout_batch_size", 0) or 0)
    if (
        rollout_batch < 0
        or rollout_batch % cfg.rl.group_size
        or (rollout_batch and (rollout_batch // cfg.rl.group_size) % process_count)
    ):
        raise TrainConfigError(
            f"config.rl.rollout_batch_size={rollout_batch} must be 0 (the whole step in one agent "
            f"call) or a multiple of group_size ({cfg.rl.group_size}) x processes ({process_count})"
        )
    if cfg.checkpoint.every <= 0:
        raise TrainConfigError(f"config.checkpoint.every must be positive, got {cfg.checkpoint.every}")
    if check_files:  # last: the only checks that open files
        _check_files(cfg)


def _mesh_field(cfg, name: str, default):
    return cfg.mesh[name] if name in cfg.mesh else default


def split_devices(cfg, devices=None):
    """(learner devices, rollout devices or None when colocated) for `config.mesh.rollout_devices`.

    Each process gives its last rollout_devices / processes local devices to the rollout mesh and the rest to
    the learner mesh (with one process: the last rollout_devices devices).
    """
    import jax

    devices = list(devices if devices is not None else jax.devices())
    k = _mesh_field(cfg, "rollout_devices", 0)
    if not k:
        return devices, None
    procs = sorted({d.process_index for d in devices})
    per = k // len(procs)
    learner, rollout = [], []
    for p in procs:
        local = [d for d in devices if d.process_index == p]
        learner += local[: len(local) - per]
        rollout += local[len(local) - per :]
    return learner, rollout


def model_options(model_cfg) -> dict:
    """The `ModelConfig` run options a config's `model` section sets besides the dtypes (attention kernel and block
    size, decode layout; absent fields keep the ModelConfig defaults)."""
    out = {}
    if "decode_layout" in model_cfg:
        out["decode_layout"] = model_cfg.decode_layout
    if "attention_impl" in model_cfg:
        out["attention_impl"] = model_cfg.attention_impl
    if "attention_block_size" in model_cfg:
        out["attention_block_size"] = int(model_cfg.attention_block_size)
    return out


def _learner_config(cfg):
    from memagent_jax.rl.learner import LearnerConfig, OptimizerConfig
    from memagent_jax.rl.losses import LossConfig

    rl = cfg.rl
    return LearnerConfig(
        loss=LossConfig(
            kind="grpo",
            clip_low=rl.clip_low,
            clip_high=rl.clip_high,
            dual_clip=rl.dual_clip if rl.dual_clip else None,
            kl_coef=rl.kl_coef,
            kl_clamp=float(rl.get("kl_clamp", 0.0)) or None,  # 0 = off
            entropy_coef=rl.entropy_coef,
            aggregation=rl.aggregation,
        ),
        optimizer=OptimizerConfig(
            learning_rate=rl.learning_rate,
            weight_decay=rl.weight_decay,
            max_grad_norm=rl.max_grad_norm,
            warmup_steps=rl.warmup_steps,
            warmup_from_zero=bool(rl.get("warmup_from_zero", False)),
            schedule=rl.schedule,
            total_steps=cfg.steps if rl.schedule == "cosine" else None,
        ),
        num_minibatches=rl.num_minibatches,
        micro_batch_size=rl.micro_batch_size or None,
        recompute_old_logprobs=rl.recompute_old_logprobs,
        on_nonfinite=rl.on_nonfinite,
        remat=cfg.model.remat,
    )


def agent_settings(cfg):
    """(AgentBudgets, AgentTemplates) of the training agent from `config.agent`: the budgets, centre truncation of
    training documents (`agent.max_document_tokens`), the templates file, and single template fields over it
    (`agent.memory_update` / `final_answer` / `initial_memory` / `prompt_mode`, '' = the file's)."""
    from memagent_jax.agent import AgentBudgets, AgentTemplates

    a = cfg.agent
    budgets = AgentBudgets(
        question_tokens=a.question_tokens,
        chunk_tokens=a.chunk_tokens,
        memory_tokens=a.memory_tokens,
        answer_tokens=a.answer_tokens,
        chunks_per_segment=a.chunks_per_segment,
        max_document_tokens=int(a.get("max_document_tokens", 0) or 0),
    )
    templates = AgentTemplates.from_file(a.templates) if a.get("templates") else AgentTemplates()
    fields = {name: a.get(name) for name in ("memory_update", "final_answer", "initial_memory", "prompt_mode")}
    fields = {name: value for name, value in fields.items() if value}
    if fields:
        templates = templates.replace(**fields)
    return budgets, templates


def export_settings(cfg):
    """The `AgentSettings` that train's export carries (memagent_agent.json): the training budgets and templates,
    `config.export_sampling` as the default inference sampling (the paper's evaluation 0.7 / 0.95 unless changed),
    the reward style, and a record of the rollout's sampling."""
    from memagent_jax.agent import AgentSettings

    budgets, templates = agent_settings(cfg)
    sampling = cfg.get("export_sampling") or {"temperature": 0.7, "top_p": 0.95}
    return AgentSettings(
        budgets=budgets,
        templates=templates,
        temperature=float(sampling["temperature"]),
        top_p=float(sampling["top_p"]),
        reward_style=cfg.data.reward_style,
        extract="boxed",
        training={
            "source": "memagent_jax.train",
            "steps": int(cfg.steps),
            "temperature": float(cfg.agent.temperature),
            "top_p": float(cfg.agent.top_p),
            "model": str(cfg.model.path),
        },
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


def train(cfg, workdir: str) -> dict:
    """Runs (or resumes) training; returns the last step's metrics."""
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
    from memagent_jax.storage.checkpoint import Checkpointer
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
            -1, _mesh_field(cfg, "rollout_fsdp", 1), _mesh_field(cfg, "rollout_tensor", 1), devices=rollout_devices
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

    learner = Learner(model_config, _learner_config(cfg), mesh=mesh)
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
    if checkpointer.latest_step() is not None:
        restored = checkpointer.restore(learner.abstract_state())  # verified; falls back past bad checkpoints
        state, start = restored.state, restored.step
        iterator.set_state(restored.data_state)
        if process_index == 0:
            for bad_step, why in restored.skipped:
                print(
                    f"warning: checkpoint step {bad_step} is unusable and was moved to "
                    f"{checkpointer.directory}/quarantine/: {why}",
                    file=sys.stderr,
                    flush=True,
                )
            print(f"resumed from {checkpointer.directory} at step {start}", flush=True)
    if rollout_devices is None:

        def rollout_params(params):
            return params  # the learner's params, in place
    else:
        # Separate meshes: the learner's params are copied onto the rollout mesh's shardings every step.
        rollout_shardings = sharding_lib.param_shardings(state.params, rollout_mesh)

        def rollout_params(params):
            return multiprocess.copy_to(params, rollout_shardings)  # jax.device_put, also across processes

    budgets, templates = agent_settings(cfg)
    agent = MemoryAgent(
        rollout_params(state.params),
        model_config,
        tokenizer,
        budgets=budgets,
        mesh=rollout_mesh,
        templates=templates,
        memory_sampling=SamplingParams(temperature=cfg.agent.temperature, top_p=cfg.agent.top_p),
    )
    scorer = RewardScorer(cfg.data.reward_style, drop_think=bool(cfg.data.get("reward_drop_think", False)))
    # Rows of steps after `start` (written before an interruption) are dropped: the resumed run writes them again.
    writer = MetricsWriter(workdir, total_steps=cfg.steps, console_every=cfg.log_every, resume_step=start)
    if cfg.export and process_index == 0:
        from memagent_jax.models.hf_io import clean_stale_exports

        clean_stale_exports(os.path.join(workdir, "export"))  # left by a kill during an earlier export
    metrics: dict = {}
    most_rows = 0  # dynamic sampling / packing: the largest learner batch so far (smaller ones are padded to it)
    pack_length = int(cfg.rl.get("pack_length", 0))
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            agent.params = rollout_params(state.params)

            def roll_out(draw):
                # Question j of process p is question j * processes + p of the step (the iterator's global order):
                # trajectory keys depend on that, not on the process layout. Draw 0 samples with the step's key.
                records = next(iterator)
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
            writer.write(step + 1, metrics)
            if (step + 1) % cfg.checkpoint.every == 0 or step + 1 == cfg.steps:
                checkpointer.save(step + 1, state, data_state=iterator.get_state(), rng=base_key)
        checkpointer.wait_until_finished()
        if cfg.export:
            out = save_hf_checkpoint(
                state.params,
                model_config,
                os.path.join(workdir, "export"),
                base_folder=cfg.model.tokenizer or cfg.model.path,
                extra_files={SETTINGS_FILE: export_settings(cfg).to_json()},
            )
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
        distributed.initialize_from_flags()  # multi-host runs: join the other processes (no-op for one process)
        train(_CONFIG.value, _WORKDIR.value)
    except (TrainConfigError, distributed.DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # bad weights, a checkpoint folder with no usable checkpoint: no traceback needed
        from memagent_jax.models import CheckpointError, ConfigError
        from memagent_jax.storage.checkpoint import CheckpointError as StateCheckpointError

        if not isinstance(e, (CheckpointError, StateCheckpointError, ConfigError)):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    define_flags()
    app.run(main)
