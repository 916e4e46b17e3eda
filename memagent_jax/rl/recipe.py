"""The GRPO recipe's config (configs/grpo.py) checked and turned into settings objects, before any heavy work.

`validate_config` runs first in `train` (and in the planner, without the file checks): every field with a range is
checked by the settings dataclasses themselves (`memagent_jax.settings`), the mesh against the devices, and with
`check_files` the model folder, the data file's first rows and the templates file. `agent_settings`,
`learner_config`, `export_settings`, `model_options` and `split_devices` turn the config into what the trainer
builds. Nothing here imports JAX at module level.
"""

from __future__ import annotations

import json
import os

from memagent_jax import settings

# What the final answer's conversation carries in the GRPO batch (config.rl.answer_advantage; `rollout_to_batch`).
ANSWER_ADVANTAGES = ("shared", "positive")


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
    if rl.get("answer_advantage", "shared") not in ANSWER_ADVANTAGES:
        raise TrainConfigError(
            f"config.rl.answer_advantage must be one of {ANSWER_ADVANTAGES}, got {rl.answer_advantage!r}"
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
        learner_config(cfg)
    eval_settings(cfg)


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
        from memagent_jax.storage.paths import input_file_problem

        path = cfg.data.train_file
        problem = input_file_problem(path, pipes=False)
        if problem is not None:
            raise TrainConfigError(f"config.data.train_file: {path!r} {problem}")
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
    _check_eval_files(cfg)
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
    step, ...), the W&B section, and with check_files the model folder (config.json, tokenizer files), the budgets
    against the model's max_position_embeddings (read from config.json alone), the data file's first rows, the
    templates file and, with W&B on, that wandb is installed. check_files=False skips the checks that need the model
    folder, data files and packages to exist (the planner sizes shipped configs whose checkpoints live elsewhere).
    device_count / process_count: of the whole run (all hosts); the learner mesh gets device_count -
    config.mesh.rollout_devices devices.
    """
    for name in ("steps",):
        if cfg[name] <= 0:
            raise TrainConfigError(f"config.{name} must be positive, got {cfg[name]}")
    for name in ("questions_per_step", "group_size", "num_minibatches"):
        if cfg.rl[name] <= 0:
            raise TrainConfigError(f"config.rl.{name} must be positive, got {cfg.rl[name]}")
    _check_ranges(cfg)
    rollout = mesh_field(cfg, "rollout_devices", 0)
    rollout_fsdp = mesh_field(cfg, "rollout_fsdp", 1)
    rollout_tensor = mesh_field(cfg, "rollout_tensor", 1)
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
    wandb_settings(cfg, check_installed=check_files)
    if check_files:  # last: the only checks that open files
        _check_files(cfg)
        if cfg.get("memory_check", True):
            check_memory(cfg, device_count=device_count)


# ----------------------------------------------------------------------------------------- memory check


def host_memory_bytes() -> int | None:
    """The machine's physical memory (None where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def memory_budget(cfg, devices=None, *, host_bytes: int | None = None):
    """(Hardware whose hbm_bytes is one device's memory, where that figure comes from) for the devices the run
    uses, or None when it is not known. The rule, first that applies:

      CPU devices            the machine's RAM shared equally by the local CPU devices (JAX's host platform);
      GPU / TPU              the bytes the device's allocator may use (`memory_stats()['bytes_limit']`);
      config.hardware named  its HBM in the planner's table (an accelerator that reports no memory).

    The peak FLOP/s and bandwidth (not used by the check) and the platform the estimate assumes are config.hardware's
    when named, else the accelerator kind's."""
    import dataclasses

    import jax

    from memagent_jax.planning import GiB, Hardware, PlanError, get_hardware

    devices = list(jax.local_devices() if devices is None else devices)
    named = cfg.get("hardware", "") or ""
    try:
        table = get_hardware(named) if named else None
    except PlanError as e:
        raise TrainConfigError(f"config.hardware: {e}") from None
    platform = devices[0].platform if devices else "cpu"
    if platform == "cpu":
        total = host_memory_bytes() if host_bytes is None else host_bytes
        if not total:
            return None
        share = total // len(devices)
        hw = Hardware("cpu", share, 1e12, 1e11, "host CPU")
        return hw, f"host RAM ({total / GiB:.1f} GiB shared by {len(devices)} CPU devices)"
    base = table or Hardware(
        "tpu" if platform == "tpu" else platform, 0, 1e15, 1e12, getattr(devices[0], "device_kind", platform)
    )
    try:
        limit = int((devices[0].memory_stats() or {}).get("bytes_limit", 0))
    except Exception:  # a backend without memory statistics
        limit = 0
    if limit > 0:
        kind = getattr(devices[0], "device_kind", platform)
        return dataclasses.replace(base, hbm_bytes=limit), f"{kind} (its allocator's limit)"
    if table is not None:
        return table, f"{table.name} (config.hardware)"
    return None


def planned_doc_tokens(cfg, rows: int = 8) -> int | None:
    """Tokens of a training document for the estimate: the synthetic task's length, else the longest of the data
    file's first `rows` documents in the model's tokenizer (None when that cannot be read: no check), each capped at
    config.agent.max_document_tokens (centre truncation) when set."""
    cap = int(cfg.agent.get("max_document_tokens", 0) or 0)
    if not cfg.data.get("train_file"):
        tokens = int(cfg.data.synthetic_tokens)
    else:
        from transformers import AutoTokenizer

        from memagent_jax.data.formats import open_file

        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path, local_files_only=True)
            records = open_file(cfg.data.train_file)
            tokens = max(
                len(tokenizer(records[i].document, add_special_tokens=False)["input_ids"])
                for i in range(min(rows, len(records)))
            )
        except Exception:  # an unreadable tokenizer or file fails with its own error when training starts
            return None
    return min(tokens, cap) if cap else tokens


def check_memory(cfg, *, device_count: int, devices=None, host_bytes: int | None = None) -> None:
    """TrainConfigError, before any model loads, when the planner's memory estimate of one training step
    (`memagent_jax.plan`: params, optimiser state, KV caches, rollout and learner activations, per device) exceeds
    one device's whole memory as `memory_budget` finds it. The planner's own verdict keeps 10% of the memory as a
    margin; this check refuses only runs whose estimate does not fit at all. `--config.memory_check=False` skips it
    (an estimate that is wrong for this run)."""
    from memagent_jax.planning import PlanError, make_plan

    budget = memory_budget(cfg, devices, host_bytes=host_bytes)
    if budget is None:
        return
    hw, source = budget
    doc_tokens = planned_doc_tokens(cfg)
    if doc_tokens is None:
        return
    try:
        plan = make_plan(cfg, hardware=hw, devices=device_count, usable_fraction=1.0, doc_tokens=doc_tokens)
    except PlanError as e:
        raise TrainConfigError(
            f"config.memory_check: the planner cannot size this run ({e}); --config.memory_check=False skips the check"
        ) from None
    if not plan.fits:
        raise TrainConfigError(
            f"config.memory_check: this run does not fit in memory: {plan.verdict.removeprefix('DOES NOT FIT: ')} "
            f"(memory: {source}); `python -m memagent_jax.plan` shows the breakdown; --config.memory_check=False "
            f"runs anyway"
        )


def wandb_settings(cfg, *, check_installed: bool = True):
    """`config.wandb` as a checked `metrics.WandbSettings` (None when the config has no such section); with W&B on
    and `check_installed`, a TrainConfigError when the wandb package is not installed (nothing is imported)."""
    from memagent_jax.rl.metrics import WandbSettings, wandb_installed

    if cfg.get("wandb") is None:
        return None
    wandb = settings.build(WandbSettings, cfg.wandb, "config.wandb", error=TrainConfigError)
    if check_installed and wandb.active and not wandb_installed():
        raise TrainConfigError(
            'config.wandb.enabled=True needs the wandb package, which is not installed: pip install -e ".[wandb]"'
        )
    return wandb


def mesh_field(cfg, name: str, default):
    """`config.mesh.<name>`, or `default` for a config written before the field existed."""
    return cfg.mesh[name] if name in cfg.mesh else default


def split_devices(cfg, devices=None):
    """(learner devices, rollout devices or None when colocated) for `config.mesh.rollout_devices`.

    Each process gives its last rollout_devices / processes local devices to the rollout mesh and the rest to
    the learner mesh (with one process: the last rollout_devices devices).
    """
    import jax

    devices = list(devices if devices is not None else jax.devices())
    k = mesh_field(cfg, "rollout_devices", 0)
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


def learner_config(cfg):
    """The `LearnerConfig` of `config.rl` (loss, optimiser, mini-batches), as the learner checks it; its log-probs
    and entropy are at the rollout temperature `config.agent.temperature`, as verl's."""
    from memagent_jax.models.lora import lora_config
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
        lora=lora_config(cfg.get("lora"), "config.lora", error=TrainConfigError),
        logprob_temperature=float(cfg.agent.temperature),
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


# ----------------------------------------------------------------------------------- evaluation during training


def eval_settings(cfg):
    """`config.eval` as a checked `validation.EvalSettings` (evaluation off when the config has no such section)."""
    from memagent_jax.rl.validation import EvalSettings

    if cfg.get("eval") is None:
        return EvalSettings()
    return settings.build(EvalSettings, cfg.eval, "config.eval", error=TrainConfigError)


def _check_eval_files(cfg) -> None:
    """With evaluation on: every `config.eval.files` entry exists and opens as an evaluation file."""
    from memagent_jax.rl.validation import open_files

    ev = eval_settings(cfg)
    if ev.enabled:
        try:
            open_files(ev)
        except settings.ConfigError as e:
            raise TrainConfigError(str(e)) from None
