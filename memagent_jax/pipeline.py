"""The main job: build a task, warm-start a tiny model, train it with GRPO, evaluate across lengths, report.

    python -m memagent_jax.pipeline --config configs/tiny_synthetic.py --workdir runs/tiny_synthetic
    python -m memagent_jax.pipeline --config configs/tiny_synthetic.py:quick --workdir /tmp/q

Stages, each in its own folder of the workdir and skipped when re-run after it finished (a killed job
resumes at the stage it was in; the GRPO stage resumes from its last checkpoint):

    assets/      task data (reference formats: train.jsonl, eval_<m>x.jsonl), tokenizer, templates.json,
                 the initial model (a Hugging Face folder, random weights)
    warm_start/  SFT on scripted memory traces -> warm_start/export (HF folder)
    rl/          multi-conversation GRPO (memagent_jax.train) -> rl/export (HF folder)
    eval/        both models at every length: results.json / .csv, accuracy_vs_length.png, predictions/
    report.md / report.html   memory traces of a few held-out questions, warm start vs RL
    summary.json              figures and stage timings

Nothing is downloaded: the tokenizer is trained on the task's own text and the model is created here.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import random
import re
import sys
import time

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from memagent_jax import errors, settings

_CONFIG = _WORKDIR = _SEEDS = None


def define_flags() -> None:
    """Registers the command-line flags (only when run as a program)."""
    global _CONFIG, _WORKDIR, _SEEDS
    from memagent_jax import configs

    sys.argv = configs.resolve_argv(sys.argv)
    _CONFIG = config_flags.DEFINE_config_file(
        "config", configs.path_of("tiny_synthetic"), "main job config", lock_config=True
    )
    _WORKDIR = flags.DEFINE_string("workdir", None, "directory for every artefact of the job")
    _SEEDS = flags.DEFINE_string(
        "seeds",
        "",
        "comma-separated seeds: run the whole job once per seed (config.seed) under <workdir>/seed_<s>, then write "
        "<workdir>/seeds.md and seeds.json: mean, min and max of every cell over the seeds",
    )


class PipelineConfigError(settings.ConfigError):
    """A main-job config field is invalid; the message names the field."""


# ------------------------------------------------------------------------------------------- config


def resolve_config(cfg):
    """A resolved, unlocked copy of `cfg`, validated."""
    cfg = cfg.copy_and_resolve_references()
    cfg.unlock()
    validate_config(cfg)
    return cfg


def _multipliers(cfg, field: str, *, allow_empty: bool) -> list[int]:
    """`config.task.<field>`: positive integers separated by ';' (lengths in multiples of the training length)."""
    text = str(cfg.task.get(field, ""))
    try:
        values = [int(v) for v in text.replace(",", ";").split(";") if v.strip()]
    except ValueError:
        raise PipelineConfigError(f"config.task.{field}: expected integers separated by ';', got {text!r}") from None
    if (not values and not allow_empty) or any(v <= 0 for v in values):
        raise PipelineConfigError(f"config.task.{field}: need positive integers, got {values}")
    return values


def eval_multipliers(cfg) -> list[int]:
    return _multipliers(cfg, "eval_multipliers", allow_empty=False)


def two_hop_multipliers(cfg) -> list[int]:
    """Lengths of the two-hop evaluation files ('' = none)."""
    return _multipliers(cfg, "two_hop_multipliers", allow_empty=True)


def eval_labels(cfg) -> list[str]:
    """Labels of the evaluation files: '<m>x' per length, then 'two_hop_<m>x', 'other_fact_<m>x' and
    'concat_<m>x' when enabled."""
    labels = [f"{m}x" for m in eval_multipliers(cfg)]
    labels += [f"two_hop_{m}x" for m in two_hop_multipliers(cfg)]
    if cfg.task.get("other_fact_multiplier", 0):
        labels.append(f"other_fact_{cfg.task.other_fact_multiplier}x")
    if cfg.task.concat_multiplier:
        labels.append(f"concat_{cfg.task.concat_multiplier}x")
    return labels


def rl_chunks(cfg) -> int:
    """Chunks per GRPO training row: `task.rl_chunks`, or (0 / absent) `task.train_chunks`, the warm start's rows'
    length and the unit of the evaluation lengths."""
    value = int(cfg.task.get("rl_chunks", 0))
    if value < 0:
        raise PipelineConfigError(f"config.task.rl_chunks must be >= 0 (0 = task.train_chunks), got {value}")
    return value or int(cfg.task.train_chunks)


def is_two_hop_row(cfg, index: int) -> bool:
    """Whether training row (or scripted warm-start trajectory) `index` is a two-hop chain: a fraction
    `task.train_two_hop_fraction` of the rows, spread evenly (row i is one when floor((i+1)f) > floor(i f))."""
    return _spread_evenly(index, float(cfg.task.get("train_two_hop_fraction", 0.0)))


def _spread_evenly(index: int, fraction: float) -> bool:
    """Whether item `index` is one of a `fraction` of items spread evenly: floor((i+1)f) > floor(i f)."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


def rl_absent_fraction(cfg) -> float:
    """The fraction of GRPO training rows whose asked creature has no fact in the document (`task.rl_absent_fraction`,
    0 when absent): the right answer is then the script's 'unknown' (`warm_start.ScriptedPolicy.unknown_answer`), so
    a look-alike's word noted while the notes hold "?" costs reward there. Taken from the single-hop rows."""
    value = float(cfg.task.get("rl_absent_fraction", FIELDS_ADDED_LATER["task.rl_absent_fraction"]))
    single = 1.0 - float(cfg.task.get("train_two_hop_fraction", 0.0))
    if not 0.0 <= value <= single:
        raise PipelineConfigError(
            f"config.task.rl_absent_fraction must be in [0, 1 - task.train_two_hop_fraction] = [0, {single:g}] "
            f"(absent rows are single-hop ones), got {value!r}"
        )
    return value


def is_absent_row(cfg, index: int) -> bool:
    """Whether GRPO training row `index` asks about a creature with no fact in its document: single-hop rows, a
    fraction `rl_absent_fraction(cfg) / (1 - train_two_hop_fraction)` of them, spread evenly over their order."""
    fraction = rl_absent_fraction(cfg)
    if not fraction or is_two_hop_row(cfg, index):
        return False
    two_hop = float(cfg.task.get("train_two_hop_fraction", 0.0))
    single = index - math.floor(index * two_hop)  # this row's place among the single-hop rows (`is_two_hop_row`)
    return _spread_evenly(single, fraction / (1.0 - two_hop))


def without_asked_fact(record, rng):
    """A single-hop keyed_recall training record (`QARecord`) with its asked fact replaced by a look-alike's (another
    creature, another word: the same number of tokens), and 'unknown' as the answer: the asked creature appears
    nowhere in the document."""
    from memagent_jax.data.synthetic.keyed_recall import KEYED_FACTS, RECALL_WORDS
    from memagent_jax.data.synthetic.vocabulary import KEY_CREATURES
    from memagent_jax.rl.warm_start import ScriptedPolicy

    stating = KEYED_FACTS["pair"][0]
    asked = record.question.rstrip("?").split()[-1]
    (word,) = record.answers
    fact = stating.format(key=asked, word=word)
    if record.document.count(fact) != 1 or f" {asked} " in record.document.replace(fact, ""):
        raise ValueError(f"training row {record.index}: expected the asked fact {fact!r} once, and no other fact of it")
    creature = rng.choice([k for k in KEY_CREATURES if k != asked])
    lookalike = stating.format(key=creature, word=rng.choice([w for w in RECALL_WORDS if w != word]))
    return dataclasses.replace(
        record,
        document=record.document.replace(fact, lookalike),
        answers=(ScriptedPolicy.unknown_answer,),
        extra={**record.extra, "asked_fact_absent": True},
    )


def validate_config(cfg) -> None:
    from memagent_jax.data.synthetic import TASKS

    if cfg.task.name not in TASKS:
        raise PipelineConfigError(f"config.task.name: {cfg.task.name!r} is not one of {TASKS}")
    for path in (
        "task.train_chunks",
        "task.train_samples",
        "task.eval_questions",
        "tokenizer.vocab_size",
        "warm_start.updates",
        "warm_start.trajectories_per_update",
        "warm_start.updates_per_call",
        "rl.steps",
        "rl.questions_per_step",
        "rl.group_size",
        "eval.batch_size",
        "agent.chunk_tokens",
        "agent.memory_tokens",
        "agent.answer_tokens",
        "agent.question_tokens",
    ):
        section, field = path.split(".")
        if int(cfg[section][field]) <= 0:
            raise PipelineConfigError(f"config.{path} must be positive, got {cfg[section][field]}")
    if cfg.task.distractors_per_chunk < 0:
        raise PipelineConfigError("config.task.distractors_per_chunk must be >= 0")
    fraction = cfg.task.get("train_two_hop_fraction", 0.0)
    if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise PipelineConfigError(f"config.task.train_two_hop_fraction must be in [0, 1], got {fraction!r}")
    rl_distractors_per_chunk(cfg)
    warm_distractors_per_chunk(cfg)
    rl_chunks(cfg)
    if rl_absent_fraction(cfg) and (cfg.task.name != "keyed_recall" or cfg.task.fact_style != "pair"):
        raise PipelineConfigError(
            f"config.task.rl_absent_fraction needs task.name 'keyed_recall' with fact_style 'pair', got "
            f"{cfg.task.name!r} and {cfg.task.fact_style!r}"
        )
    from memagent_jax.data.synthetic import FACT_STYLES
    from memagent_jax.rl.warm_start import ANSWER_FORMS, NOTE_STYLES

    for path, allowed in (
        ("task.fact_style", FACT_STYLES),
        ("model.init", ("random", "induction")),
        ("warm_start.note_style", NOTE_STYLES),
        ("warm_start.answer_form", ANSWER_FORMS),
    ):
        section, field = path.split(".")
        if field in cfg[section] and cfg[section][field] not in allowed:
            raise PipelineConfigError(f"config.{path} must be one of {allowed}, got {cfg[section][field]!r}")
    for path, low in (
        ("task.same_chunk_distractors", 0),
        ("task.other_fact_multiplier", 0),
        ("warm_start.focus_repeats", 1),
        ("long_eval.chunks", 1),
        ("long_eval.questions", 1),
        ("long_eval.batch_size", 1),
        ("rl.max_sampling_batches", 1),
        ("rl.pack_length", 0),
        ("rl.eval_every", 0),
        ("rl.eval_questions", 1),
        ("rl.lora_rank", 0),
        ("rl.warmup_steps", 0),
        ("warm_start.pack_length", 0),
        ("warm_start.replay_rounds", 0),
        ("warm_start.replay_updates", 1),
        ("rl.replay_every", 0),
        ("rl.replay_lookalikes", 1),
    ):
        section, field = path.split(".")
        if field in cfg[section] and int(cfg[section][field]) < low:
            raise PipelineConfigError(f"config.{path} must be >= {low}, got {cfg[section][field]}")
    if cfg.task.concat_multiplier == 1 or cfg.task.concat_multiplier < 0:
        raise PipelineConfigError(
            f"config.task.concat_multiplier must be 0 (no file) or >= 2 (documents joined), "
            f"got {cfg.task.concat_multiplier}"
        )
    eval_labels(cfg)
    for switch, section in (("warm_start.replay_rounds", cfg.warm_start), ("rl.replay_every", cfg.rl)):
        if not section.get(switch.split(".")[1], 0):
            continue
        if not probes_key_confusion(cfg):
            raise PipelineConfigError(
                f"config.{switch} needs task.name 'keyed_recall' and warm_start.note_style 'keyed' (the pairs come "
                f"from the key-confusion probe), got {cfg.task.name!r} and {cfg.warm_start.note_style!r}"
            )
        threshold = section.get("replay_threshold", 0.3)
        if not 0.0 < threshold < 1.0:
            prefix = switch.split(".")[0]
            raise PipelineConfigError(f"config.{prefix}.replay_threshold must be in (0, 1), got {threshold}")
    fraction = cfg.rl.get("replay_fraction", 0.5)
    if cfg.rl.get("replay_every", 0) and not 0.0 < fraction <= 1.0:
        raise PipelineConfigError(f"config.rl.replay_fraction must be in (0, 1], got {fraction}")
    if two_hop_multipliers(cfg) or cfg.task.get("train_two_hop_fraction", 0.0):
        if not probes_key_confusion(cfg):
            raise PipelineConfigError(
                "config.task.two_hop_multipliers / train_two_hop_fraction need task.name 'keyed_recall' and "
                f"warm_start.note_style 'keyed' (the notes that follow a chain), got {cfg.task.name!r} and "
                f"{cfg.warm_start.note_style!r}"
            )
    with settings.named("config.agent", error=PipelineConfigError):  # the wording and budgets, before any stage runs
        agent_templates(cfg)
        agent_budgets(cfg)


# ------------------------------------------------------------------------------------------- stages


def _stage_done(folder: str) -> dict | None:
    path = os.path.join(folder, "DONE.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def _mark_done(folder: str, info: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, "DONE.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, os.path.join(folder, "DONE.json"))


def _say(message: str) -> None:
    print(message, flush=True)


def rl_distractors_per_chunk(cfg) -> float:
    """Look-alikes per chunk in the GRPO training rows: `task.rl_distractors_per_chunk`, or with -1 (or the field
    absent) `task.distractors_per_chunk`, the density of every evaluation file."""
    return _distractor_density(cfg, "rl_distractors_per_chunk")


def warm_distractors_per_chunk(cfg) -> float:
    """Look-alikes per chunk in the warm start's scripted documents: `task.warm_distractors_per_chunk`, or with -1
    (or the field absent) `task.distractors_per_chunk`."""
    return _distractor_density(cfg, "warm_distractors_per_chunk")


def _distractor_density(cfg, field: str) -> float:
    value = float(cfg.task.get(field, -1.0))
    if value == -1.0:
        return float(cfg.task.distractors_per_chunk)
    if value < 0:
        raise PipelineConfigError(
            f"config.task.{field} must be >= 0, or -1 (= task.distractors_per_chunk), got {value:g}"
        )
    return value


def task_config(
    cfg, chunks: int, seed: int, hops: int | None = None, exact_length: bool = False, per_chunk: float | None = None
):
    """The synthetic task at a length of `chunks` chunks (look-alikes scale with the length: `per_chunk` per
    chunk, by default `task.distractors_per_chunk`)."""
    from memagent_jax.data.synthetic import SyntheticConfig

    per_chunk = cfg.task.distractors_per_chunk if per_chunk is None else per_chunk
    return SyntheticConfig(
        task=cfg.task.name,
        num_tokens=chunks * cfg.agent.chunk_tokens,
        num_distractors=int(round(per_chunk * chunks)),
        same_chunk_distractors=cfg.task.same_chunk_distractors,
        isolate_answer=cfg.task.isolate_answer,
        exact_length=exact_length,
        hops=hops,
        chunk_tokens=cfg.agent.chunk_tokens,
        chunk_aligned=True,
        fact_style=cfg.task.get("fact_style", "sentence"),
        seed=seed,
    )


def agent_templates(cfg):
    from memagent_jax.agent import AgentTemplates

    return AgentTemplates(
        memory_update=cfg.agent.memory_update,
        final_answer=cfg.agent.final_answer,
        initial_memory=cfg.agent.initial_memory,
    )


def agent_budgets(cfg, chunks_per_segment: int | None = None):
    from memagent_jax.agent import AgentBudgets

    return AgentBudgets(
        question_tokens=cfg.agent.question_tokens,
        chunk_tokens=cfg.agent.chunk_tokens,
        memory_tokens=cfg.agent.memory_tokens,
        answer_tokens=cfg.agent.answer_tokens,
        chunks_per_segment=chunks_per_segment or cfg.task.train_chunks,
    )


# Seeds: training rows, warm-start traces and held-out evaluation rows never share a sample.
def _seeds(cfg) -> dict[str, int]:
    return {
        "train": cfg.seed * 1000 + 1,
        "warm_start": cfg.seed * 1000 + 2,
        "eval": cfg.seed * 1000 + 3,
        "rl_replay": cfg.seed * 1000 + 4,
    }


def make_assets(cfg, folder: str) -> dict:
    """Tokenizer, templates, task files and the initial random model, all under `folder`."""
    import jax

    from memagent_jax.data.formats import write_eval_file, write_train_file
    from memagent_jax.data.synthetic import (
        SyntheticDataset,
        concatenated_records,
        other_fact_records,
        tokenizer_corpus,
    )
    from memagent_jax.data.tokenizer import load_tokenizer, train_tokenizer
    from memagent_jax.models import save_hf_checkpoint
    from memagent_jax.models.config import ModelConfig, RopeConfig
    from memagent_jax.models.induction import wire_induction_heads
    from memagent_jax.models.transformer import init_params

    paths = {
        "tokenizer": os.path.join(folder, "tokenizer"),
        "model": os.path.join(folder, "initial_model"),
        "templates": os.path.join(folder, "templates.json"),
        "train_file": os.path.join(folder, "train.jsonl"),
        "eval_files": {label: os.path.join(folder, f"eval_{label}.jsonl") for label in eval_labels(cfg)},
    }
    done = _stage_done(folder)
    if done is not None:
        return done["paths"]
    t0 = time.perf_counter()
    os.makedirs(folder, exist_ok=True)
    templates = agent_templates(cfg)
    with open(paths["templates"], "w") as f:
        json.dump(templates.to_dict(), f, indent=1)
    texts = itertools.chain(
        tokenizer_corpus(num_samples=16, num_tokens=300, seed=cfg.seed),
        [templates.memory_update, templates.final_answer, templates.initial_memory] * 50,
    )
    train_tokenizer(texts, paths["tokenizer"], vocab_size=cfg.tokenizer.vocab_size)
    tokenizer = load_tokenizer(paths["tokenizer"])
    _say(f"[assets] tokenizer: {len(tokenizer)} tokens -> {paths['tokenizer']}")

    seeds = _seeds(cfg)
    k = cfg.task.train_chunks
    rl_per_chunk = rl_distractors_per_chunk(cfg)
    n = cfg.task.train_samples
    rl_k = rl_chunks(cfg)
    single = SyntheticDataset(task_config(cfg, rl_k, seeds["train"], per_chunk=rl_per_chunk), tokenizer, n)
    chains = SyntheticDataset(task_config(cfg, rl_k, seeds["train"], hops=2, per_chunk=rl_per_chunk), tokenizer, n)
    rows = [chains[i].to_record() if is_two_hop_row(cfg, i) else single[i].to_record() for i in range(n)]
    absent_rng = random.Random(seeds["train"] + 1)
    rows = [without_asked_fact(row, absent_rng) if is_absent_row(cfg, i) else row for i, row in enumerate(rows)]
    write_train_file(rows, paths["train_file"])
    two_hop = sum(is_two_hop_row(cfg, i) for i in range(n))
    absent = sum(is_absent_row(cfg, i) for i in range(n))
    _say(
        f"[assets] {n} GRPO training rows of {rl_k} chunks ({two_hop} of them two-hop chains"
        + (f", {absent} whose asked creature has no fact" if absent else "")
        + f"), {rl_per_chunk:g} look-alikes per chunk -> {paths['train_file']}"
    )
    for m in eval_multipliers(cfg):
        path = paths["eval_files"][f"{m}x"]
        data = SyntheticDataset(task_config(cfg, m * k, seeds["eval"]), tokenizer, cfg.task.eval_questions)
        write_eval_file(data.records(), path)
        _say(f"[assets] {len(data)} held-out rows of {m * k} chunks ({m}x) -> {path}")
    for m in two_hop_multipliers(cfg):
        path = paths["eval_files"][f"two_hop_{m}x"]
        data = SyntheticDataset(task_config(cfg, m * k, seeds["eval"], hops=2), tokenizer, cfg.task.eval_questions)
        write_eval_file(data.records(), path)
        _say(f"[assets] {len(data)} held-out two-hop rows of {m * k} chunks -> {path}")
    if cfg.task.get("other_fact_multiplier", 0):
        m = cfg.task.other_fact_multiplier
        path = paths["eval_files"][f"other_fact_{m}x"]
        write_eval_file(
            other_fact_records(task_config(cfg, m * k, seeds["eval"]), cfg.task.eval_questions, tokenizer), path
        )
        _say(
            f"[assets] {cfg.task.eval_questions} held-out rows of {m * k} chunks asked about a look-alike's fact "
            f"instead of the generator's pick -> {path}"
        )
    if cfg.task.concat_multiplier:
        m = cfg.task.concat_multiplier
        path = paths["eval_files"][f"concat_{m}x"]
        write_eval_file(
            concatenated_records(
                task_config(cfg, k, seeds["eval"], exact_length=True), cfg.task.eval_questions, m, tokenizer
            ),
            path,
        )
        _say(
            f"[assets] {cfg.task.eval_questions} rows of {m} held-out {k}-chunk documents joined, asked about "
            f"one that is not the last -> {path}"
        )

    m = cfg.model
    model_config = ModelConfig(
        model_type="qwen2",
        vocab_size=len(tokenizer),
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=True,
        attention_bias=True,
        eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        rope=RopeConfig(theta=float(m.get("rope_theta", RopeConfig.theta))),
    )
    params = init_params(model_config, jax.random.key(cfg.seed))
    init = m.get("init", "random")
    if init == "induction":
        params = wire_induction_heads(params, model_config, seed=cfg.seed)
    save_hf_checkpoint(params, model_config, paths["model"], base_folder=paths["tokenizer"])
    n_params = sum(x.size for x in jax.tree.leaves(params))
    _say(
        f"[assets] tiny Qwen2 model, {n_params / 1e6:.2f}M parameters, "
        f"{'random weights plus a hand-wired induction circuit' if init == 'induction' else 'random weights'} "
        f"-> {paths['model']}"
    )
    _mark_done(folder, {"paths": paths, "seconds": time.perf_counter() - t0, "num_params": int(n_params)})
    return paths


def scripted_batches(
    cfg,
    tokenizer,
    prompts,
    budgets,
    stop_id: int,
    count: int,
    rows_multiple: int,
    *,
    key_pairs: tuple[tuple[str, str], ...] = (),
    first_index: int = 0,
):
    """Yields `count` SFT batches, each holding `updates_per_call` mini-batches of scripted trajectories.

    key_pairs: (asked, look-alike) creature pairs; every other trajectory is then a single-hop document drilling
    one of them (its question about the first, every look-alike for the second). first_index: the first row index
    drawn (rows are a pure function of the index; a later call starts past the earlier ones' rows)."""
    import numpy as np

    from memagent_jax.agent.chunking import tokenize_document
    from memagent_jax.data.synthetic import generate_sample
    from memagent_jax.rl.batch import pack_conversations
    from memagent_jax.rl.warm_start import (
        ScriptedPolicy,
        StraddlingFactError,
        conversations_to_sft_batch,
        scripted_conversations,
    )

    ws = cfg.warm_start
    policy = ScriptedPolicy(
        forget_prob=ws.forget_prob,
        overwrite_prob=ws.overwrite_prob,
        note_style=ws.note_style,
        answer_form=ws.get("answer_form", "noted"),
    )
    rng = np.random.default_rng((_seeds(cfg)["warm_start"], first_index) if first_index else _seeds(cfg)["warm_start"])
    density = warm_distractors_per_chunk(cfg)
    task = task_config(cfg, cfg.task.train_chunks, _seeds(cfg)["warm_start"], per_chunk=density)
    chain_task = task_config(cfg, cfg.task.train_chunks, _seeds(cfg)["warm_start"], hops=2, per_chunk=density)
    pair_task = task.replace(key_pairs=tuple(key_pairs)) if key_pairs else None
    index = first_index
    most_rows = 0  # packed batches are padded to the largest so far (one learner shape)
    for _ in range(count):
        conversations = []
        made = 0
        while made < ws.updates_per_call * ws.trajectories_per_update:
            if pair_task is not None and made % 2 == 0:
                row_task = pair_task
            else:
                row_task = chain_task if is_two_hop_row(cfg, index) else task
            sample = generate_sample(row_task, index, tokenizer)
            index += 1
            try:
                trajectory = scripted_conversations(
                    sample,
                    tokenize_document(tokenizer, sample.text()),
                    tokenizer,
                    prompts,
                    budgets,
                    policy,
                    rng,
                    stop_id,
                )
            except StraddlingFactError:  # a crowded document whose facts could not all be chunk-aligned
                continue
            made += 1
            # The steps that read the asked fact (and a chain's later facts) among their look-alikes are the ones
            # that teach which fact the question wants: each is repeated `focus_repeats` times (the other steps are
            # learned long before).
            asked = {f.token_offset // budgets.chunk_tokens for f in sample.facts if f.role != "distractor"}
            for conv in trajectory:
                conversations += [conv] * (ws.focus_repeats if conv.kind == "memory" and conv.step in asked else 1)
        batch = conversations_to_sft_batch(
            conversations, pad_id=tokenizer.pad_token_id, rows_multiple=rows_multiple * ws.updates_per_call
        )
        if ws.get("pack_length", 0):
            batch = pack_conversations(
                batch, ws.pack_length, rows_multiple=rows_multiple * ws.updates_per_call, min_rows=most_rows
            )
            most_rows = batch.num_rows
        yield batch


def warm_start(cfg, assets: dict, folder: str) -> str:
    """SFT of the initial model on scripted traces; returns the exported HF folder."""
    export = os.path.join(folder, "export")
    if _stage_done(folder) is not None:
        return export

    import jax

    from memagent_jax.agent import write_agent_settings
    from memagent_jax.agent.templates import AgentPrompts
    from memagent_jax.data.tokenizer import load_tokenizer
    from memagent_jax.models import load_hf_params, save_hf_checkpoint
    from memagent_jax.rl.learner import Learner
    from memagent_jax.rl.metrics import MetricsWriter
    from memagent_jax.rl.warm_start import sft_learner_config

    t0 = time.perf_counter()
    ws = cfg.warm_start
    tokenizer = load_tokenizer(assets["tokenizer"])
    params, model_config = load_hf_params(assets["model"])
    calls = -(-ws.updates // ws.updates_per_call)
    updates = calls * ws.updates_per_call
    replay_rounds = int(ws.get("replay_rounds", 0))
    replay_calls = -(-int(ws.get("replay_updates", 1)) // ws.updates_per_call) if replay_rounds else 0
    learner = Learner(
        model_config,
        sft_learner_config(
            learning_rate=ws.learning_rate,
            updates=(calls + replay_rounds * replay_calls) * ws.updates_per_call,  # one schedule over both phases
            warmup=ws.warmup,
            updates_per_call=ws.updates_per_call,
        ),
    )
    state = learner.init_state(params)
    prompts = AgentPrompts.build(tokenizer, agent_templates(cfg))
    budgets = agent_budgets(cfg)
    writer = MetricsWriter(folder, total_steps=calls + replay_rounds * replay_calls, console_every=max(1, calls // 8))
    _say(
        f"[warm start] SFT on scripted traces: {updates} updates x {ws.trajectories_per_update} trajectories "
        f"(the script drops its notes at a section without the answer with p={ws.forget_prob})"
    )
    done_calls = 0

    def train(batches):
        nonlocal state, metrics, done_calls
        for batch in batches:
            state, metrics = learner.train_step(state, batch)
            done_calls += 1
            writer.write(
                done_calls,
                {
                    "loss": float(metrics["loss"]),
                    "updates": done_calls * ws.updates_per_call,
                    "seconds": time.perf_counter() - t0,
                },
            )

    metrics = {}
    threshold = ws.get("replay_threshold", 0.3)
    checks = []  # the probe after the SFT and after each replay round
    try:
        train(scripted_batches(cfg, tokenizer, prompts, budgets, tokenizer.eos_token_id, calls, learner.rows_multiple))
        # Hard-pair replay: a pair of creatures the model confuses almost surely gives GRPO groups of equal rewards
        # (no signal), so the pairs are found with the key-confusion probe and drilled here, before GRPO starts.
        # Drilling moves confusions as well as removing them (the pairs found change from round to round), so the
        # model exported is the checked one with the fewest pairs over 0.5 (then the least excess over the
        # threshold): the SFT's own if no round improves on it.
        kept = best_params = None
        for round_index in range(replay_rounds + 1 if replay_rounds else 0):
            if round_index:
                train(
                    scripted_batches(
                        cfg,
                        tokenizer,
                        prompts,
                        budgets,
                        tokenizer.eos_token_id,
                        replay_calls,
                        learner.rows_multiple,
                        key_pairs=pair_tuples(checks[-1]["pairs"]),
                        first_index=round_index * 10_000_000,  # past every earlier row
                    )
                )
            probe = probe_key_confusion(cfg, tokenizer, prompts, state.params, model_config, ("unknown", "held"))
            pairs = confused_pairs(probe, threshold)
            score = [sum(p > 0.5 for p in pairs.values()), round(sum(p - threshold for p in pairs.values()), 4)]
            checks.append(
                {"after": f"replay round {round_index}" if round_index else "SFT", "pairs": pairs, "score": score}
            )
            listed = ", ".join(f"{pair} {p:.2f}" for pair, p in pairs.items()) or "none"
            _say(f"[warm start] after {checks[-1]['after']}: pairs confused with p > {threshold}: {listed}")
            if kept is None or score < checks[kept]["score"]:
                kept, best_params = round_index, jax.device_get(state.params)  # a host copy (the step donates)
            if not pairs:
                break
    finally:
        writer.close()
    if kept is not None:
        _say(f"[warm start] kept the model after {checks[kept]['after']}")
    save_hf_checkpoint(
        state.params if best_params is None else best_params, model_config, export, base_folder=assets["tokenizer"]
    )
    write_agent_settings(
        export,
        budgets=agent_budgets(cfg, cfg.eval.chunks_per_segment),
        templates=agent_templates(cfg),
        temperature=cfg.eval.temperature,
        top_p=cfg.eval.top_p,
        reward_style="boxed_em",
        training={"source": "memagent_jax.pipeline warm_start"},
    )
    seconds = time.perf_counter() - t0
    _say(f"[warm start] done in {seconds:.0f} s -> {export}")
    _mark_done(
        folder,
        {
            "seconds": seconds,
            "updates": done_calls * ws.updates_per_call,
            "final_loss": float(metrics["loss"]),
            "replay": {"checks": checks, "kept": None if kept is None else checks[kept]["after"]},
        },
    )
    return export


def grpo_config(cfg, assets: dict, model_path: str):
    """The memagent_jax.train config of the GRPO stage (configs/grpo.py:cpu with the job's settings)."""
    from memagent_jax.configs import grpo

    g = grpo.get_config("cpu")
    g.seed = cfg.seed
    g.steps = cfg.rl.steps
    g.model.path = model_path
    g.data.train_file = assets["train_file"]
    g.data.reward_style = "boxed_em"
    g.agent.update(
        dict(
            question_tokens=cfg.agent.question_tokens,
            chunk_tokens=cfg.agent.chunk_tokens,
            memory_tokens=cfg.agent.memory_tokens,
            answer_tokens=cfg.agent.answer_tokens,
            chunks_per_segment=cfg.task.train_chunks,
            temperature=cfg.rl.temperature,
            top_p=cfg.rl.top_p,
            templates=assets["templates"],
            memory_update="",
            final_answer="",
            initial_memory="",
        )
    )  # the job's wording is the templates file (written from config.agent)
    g.rl.update(
        dict(
            questions_per_step=cfg.rl.questions_per_step,
            group_size=cfg.rl.group_size,
            num_minibatches=cfg.rl.num_minibatches,
            learning_rate=cfg.rl.learning_rate,
            schedule=str(cfg.rl.get("schedule", "constant")),
            kl_coef=cfg.rl.kl_coef,
            warmup_steps=int(cfg.rl.get("warmup_steps", FIELDS_ADDED_LATER["rl.warmup_steps"])),
            warmup_from_zero=True,
            max_grad_norm=1.0,
            weight_decay=0.0,
            dynamic_sampling=bool(cfg.rl.get("dynamic_sampling", False)),
            max_sampling_batches=int(cfg.rl.get("max_sampling_batches", 1)),
            pack_length=int(cfg.rl.get("pack_length", 0)),
            answer_advantage=str(cfg.rl.get("answer_advantage", "shared")),
        )
    )
    g.export_sampling.update(dict(temperature=cfg.eval.temperature, top_p=cfg.eval.top_p))
    every = int(cfg.rl.get("eval_every", 0))
    if every:  # held-out accuracy against the training step (greedy), drawn by `plot_training_curve`
        files = [assets["eval_files"][label] for label in training_eval_labels(cfg)]
        g.eval.update(
            dict(
                files=",".join(files),
                every_steps=every,
                max_questions=int(cfg.rl.eval_questions),
                at_start=True,
                metric="string_match_all",
                batch_size=int(cfg.rl.eval_questions),
                seed=cfg.seed,
            )
        )
    if int(cfg.rl.get("lora_rank", 0)):  # GRPO trains LoRA adapters only; the KL reference is the warm start itself
        g.lora.update(dict(rank=int(cfg.rl.lora_rank), alpha=float(cfg.rl.get("lora_alpha", 2 * cfg.rl.lora_rank))))
    g.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    g.checkpoint.every = max(1, cfg.rl.steps // 4)
    g.log_every = max(1, cfg.rl.steps // 10)
    return g


def training_eval_labels(cfg) -> list[str]:
    """The evaluation files the GRPO stage scores while it trains: the second length and the first two-hop one."""
    lengths = [f"{m}x" for m in eval_multipliers(cfg)]
    return [lengths[min(1, len(lengths) - 1)]] + [f"two_hop_{m}x" for m in two_hop_multipliers(cfg)[:1]]


def plot_training_curve(cfg, history_path: str, path: str) -> str | None:
    """Held-out accuracy (greedy) against the GRPO step, one line per file, from the trainer's eval_history.jsonl."""
    if not os.path.exists(history_path):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list] = {}
    with open(history_path) as f:
        for line in f:
            row = json.loads(line)
            curves.setdefault(row["file_key"], []).append((row["step"], row["accuracy"], row["low"], row["high"]))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, points in curves.items():
        points.sort()
        steps, acc, low, high = (list(v) for v in zip(*points))
        ax.plot(steps, [100 * a for a in acc], marker="o", label=key.removeprefix("eval_"))
        ax.fill_between(steps, [100 * v for v in low], [100 * v for v in high], alpha=0.15)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("held-out accuracy % (greedy)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Accuracy while training (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class PairReplay:
    """Hard-pair replay inside GRPO (`rl.replay_every`), a `question_mix` of memagent_jax.rl.trainer.train.

    Every `rl.replay_every` steps (and at the first) the key-confusion probe runs on the policy ('unknown' and
    'held' states). While it finds (asked, look-alike) pairs noted wrongly with p > `rl.replay_threshold`, a
    fraction `rl.replay_fraction` of each sampling draw's questions (spread evenly) are replaced by drill rows: a
    GRPO-length single-hop document asking about a found pair's first creature, whose look-alikes, only
    `rl.replay_lookalikes` of them, are all for its second. GRPO itself can make such pairs (the warm start's
    replay cannot see them), and a pair confused with p near 1 on a crowded row gives a group of equal rewards:
    no signal. Few look-alikes leave a confused policy some correct rollouts, so the group's rewards differ.
    Drill rows are a pure function of the seed, the step, the draw and the position; the checks are kept in the
    checkpoints' metadata (a resumed run drills what the uninterrupted one did)."""

    METADATA_KEY = "pair_replay"

    def __init__(self, cfg, assets: dict, warm_model: str):
        from memagent_jax.agent.templates import AgentPrompts
        from memagent_jax.data.tokenizer import load_tokenizer
        from memagent_jax.models.config import ModelConfig

        self.cfg = cfg
        self.tokenizer = load_tokenizer(assets["tokenizer"])
        self.prompts = AgentPrompts.build(self.tokenizer, agent_templates(cfg))
        self.model_config = ModelConfig.from_hf_folder(warm_model)
        self.every = int(cfg.rl.replay_every)
        self.threshold = float(cfg.rl.get("replay_threshold", 0.3))
        self.fraction = float(cfg.rl.get("replay_fraction", 0.5))
        chunks = rl_chunks(cfg)
        lookalikes = int(cfg.rl.get("replay_lookalikes", 2))
        self.task = task_config(cfg, chunks, _seeds(cfg)["rl_replay"], per_chunk=lookalikes / chunks)
        self.checks: list[dict] = []  # {"step", "pairs": {'asked<look-alike': p}} per probe

    @property
    def pairs(self) -> dict[str, float]:
        return self.checks[-1]["pairs"] if self.checks else {}

    def restore(self, metadata: dict) -> None:
        self.checks = list((metadata or {}).get(self.METADATA_KEY, []))

    def metadata(self) -> dict:
        return {self.METADATA_KEY: list(self.checks)}

    def before_step(self, step: int, params) -> None:
        if step % self.every or (self.checks and self.checks[-1]["step"] >= step):
            return
        probe = probe_key_confusion(
            self.cfg, self.tokenizer, self.prompts, params, self.model_config, ("unknown", "held")
        )
        self.checks.append({"step": step, "pairs": confused_pairs(probe, self.threshold)})
        listed = ", ".join(f"{pair} {p:.2f}" for pair, p in self.pairs.items()) or "none (no drill rows)"
        _say(f"[rl] step {step}: pairs confused with p > {self.threshold}: {listed}")

    def mix(self, step: int, draw: int, records: list) -> list:
        from memagent_jax.data.synthetic import generate_sample

        if not self.pairs:
            return records
        task = self.task.replace(key_pairs=pair_tuples(self.pairs))
        out = list(records)
        for j in range(len(out)):
            if math.floor((j + 1) * self.fraction) > math.floor(j * self.fraction):
                index = (step * 1000 + draw) * len(out) + j
                out[j] = generate_sample(task, index, self.tokenizer).to_record()
        return out


def reinforce(cfg, assets: dict, warm_model: str, folder: str) -> str:
    """Multi-conversation GRPO from the warm start; returns the exported HF folder."""
    export = os.path.join(folder, "export")
    if _stage_done(folder) is not None:
        return export
    from memagent_jax.rl.trainer import train

    t0 = time.perf_counter()
    g = grpo_config(cfg, assets, warm_model)
    _say(
        f"[rl] GRPO: {g.steps} steps x {g.rl.questions_per_step} questions x {g.rl.group_size} trajectories, "
        f"lr {g.rl.learning_rate}, rollout temperature {g.agent.temperature}"
    )
    replay = PairReplay(cfg, assets, warm_model) if cfg.rl.get("replay_every", 0) else None
    metrics = train(g, folder, question_mix=replay)
    seconds = time.perf_counter() - t0
    _say(f"[rl] done in {seconds:.0f} s -> {export}")
    info = {"seconds": seconds, "last_metrics": {k: float(v) for k, v in metrics.items()}}
    if replay is not None:
        info["replay"] = replay.checks
    _mark_done(folder, info)
    return export


def _eval_sampling(cfg):
    from memagent_jax.sampling import SamplingParams

    return SamplingParams(temperature=cfg.eval.temperature, top_p=cfg.eval.top_p if cfg.eval.temperature else 1.0)


def evaluate_both(cfg, assets: dict, models: dict[str, str], folder: str) -> dict:
    """Every model on every evaluation file (memagent_jax.evaluation); returns {model: {file label: figures}}."""
    done = _stage_done(folder)
    if done is not None:
        return done["figures"]
    from memagent_jax import evaluation as evaluate_lib

    t0 = time.perf_counter()
    labels = eval_labels(cfg)
    files = [assets["eval_files"][label] for label in labels]
    _say(
        f"[eval] {len(models)} models x {len(files)} files ({', '.join(labels)}; <m>x = m times the training "
        f"length), {cfg.task.eval_questions} held-out questions each, temperature {cfg.eval.temperature}"
        f", top-p {cfg.eval.top_p}"
    )
    results = evaluate_lib.evaluate_models(
        models,
        files,
        folder,
        budgets=agent_budgets(cfg, cfg.eval.chunks_per_segment),
        templates=agent_templates(cfg),
        temperature=cfg.eval.temperature,
        top_p=cfg.eval.top_p,
        metric="auto",
        batch_size=cfg.eval.batch_size,
        seed=cfg.seed,
        num_traces=cfg.eval.report_questions,
        progress=False,
        plot=False,
    )
    figures: dict = {}
    for name in models:
        figures[name] = {}
        for label, path in zip(labels, files):
            r = results.get(name, path)
            figures[name][label] = {
                "chunks": r.mean_chunks,
                "tokens": r.mean_doc_tokens,
                "n": r.n,
                "accuracy": r.accuracy.mean,
                "accuracy_low": r.accuracy.low,
                "accuracy_high": r.accuracy.high,
                "em": r.em.mean,
                "f1": r.f1.mean,
                "sub_em": r.sub_em.mean,
                "seconds": r.wall_s,
                "per_word": answer_word_accuracy(r.rows),
                "per_key": asked_key_accuracy(r.rows),
            }
    _say(results.table())
    _say(summary_table(figures))
    with open(os.path.join(folder, "per_word.txt"), "w") as f:
        f.write(per_word_table(figures) + "\n")
    with open(os.path.join(folder, "per_key.txt"), "w") as f:
        f.write(per_word_table(figures, field="per_key", name="creature") + "\n")
    _say(
        f"[eval] accuracy per answer word -> {os.path.join(folder, 'per_word.txt')}, per asked creature -> per_key.txt"
    )
    confusion = key_confusion_stage(cfg, assets, models, folder)
    seconds = time.perf_counter() - t0
    _mark_done(folder, {"seconds": seconds, "figures": figures, "key_confusion": confusion})
    return figures


def probes_key_confusion(cfg) -> bool:
    """Whether the job's notes name the asked creature on the keyed_recall task: what the key-confusion probe
    (and hard-pair replay) reads, and what lets the notes follow a two-hop chain."""
    return cfg.task.name == "keyed_recall" and cfg.warm_start.note_style == "keyed"


def probe_key_confusion(cfg, tokenizer, prompts, params, model_config, states=None):
    """`evaluation.key_confusion` of one model (params pytree) with the job's chunk size, fact wording and seed."""
    from memagent_jax.data.synthetic.keyed_recall import KEYED_FACTS, RECALL_WORDS
    from memagent_jax.data.synthetic.vocabulary import KEY_CREATURES
    from memagent_jax.evaluation.key_confusion import STATES, key_confusion

    return key_confusion(
        params,
        model_config,
        tokenizer,
        prompts,
        KEY_CREATURES,
        RECALL_WORDS,
        chunk_tokens=cfg.agent.chunk_tokens,
        fact_template=KEYED_FACTS[cfg.task.get("fact_style", "sentence")][0],
        seed=cfg.seed,
        states=STATES if states is None else tuple(states),
    )


def confused_pairs(probe, threshold: float) -> dict[str, float]:
    """{'asked<look-alike': p} for every pair whose 'unknown' or 'held' failure probability exceeds `threshold`:
    the pairs a memory notes wrongly before or after reading the asked fact, worst first."""
    import numpy as np

    worst = np.fmax(probe.probability["unknown"], probe.probability["held"])
    found = {
        f"{probe.keys[i]}<{probe.keys[j]}": round(float(worst[i, j]), 4)
        for i, j in zip(*np.nonzero(np.nan_to_num(worst, nan=0.0) > threshold))
    }
    return dict(sorted(found.items(), key=lambda item: -item[1]))


def pair_tuples(pairs: dict[str, float]) -> tuple[tuple[str, str], ...]:
    """`confused_pairs`' {'asked<look-alike': p} as the (asked, look-alike) tuples that `SyntheticConfig.key_pairs`
    drills."""
    return tuple(tuple(pair.split("<")) for pair in pairs)


def key_confusion_stage(cfg, assets: dict, models: dict[str, str], folder: str) -> dict | None:
    """Every model's pairwise key confusion (`evaluation.key_confusion`, one teacher-forced memory step per pair
    of creatures and state) -> <folder>/key_confusion.txt and .json; None for a task or note style it does not
    probe."""
    if not probes_key_confusion(cfg):
        return None
    from memagent_jax.agent.templates import AgentPrompts
    from memagent_jax.data.tokenizer import load_tokenizer
    from memagent_jax.models import load_hf_params

    tokenizer = load_tokenizer(assets["tokenizer"])
    prompts = AgentPrompts.build(tokenizer, agent_templates(cfg))
    out = {}
    for name, path in models.items():
        params, model_config = load_hf_params(path)
        out[name] = probe_key_confusion(cfg, tokenizer, prompts, params, model_config).summary()
    lines = [["model", "state", "mean p", "pairs > 0.5", "pairs > 0.1", "worst pairs (asked<look-alike: p)"]]
    for name, by_state in out.items():
        for state, c in by_state.items():
            worst = ", ".join(f"{pair} {p:.2f}" for pair, p in c["worst"].items())
            lines.append([name, state, f"{c['mean']:.4f}", str(c["pairs_over_0.5"]), str(c["pairs_over_0.1"]), worst])
    text = (
        "Key confusion: one memory step per (asked, look-alike) pair of creatures, probability of a failure. "
        "unknown: notes '?' and a look-alike's fact noted; held: a noted word replaced by a look-alike's; wrong: "
        "notes holding a wrong word that the asked creature's own fact does not replace; answer: the answer step not "
        "copying the word of two-hop notes.\n\n" + _aligned(lines)
    )
    with open(os.path.join(folder, "key_confusion.txt"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(folder, "key_confusion.json"), "w") as f:
        json.dump(out, f, indent=1)
    _say(text)
    return out


def answer_word_accuracy(rows) -> dict[str, list]:
    """{gold answer word: [rows scored correct, rows]} over an evaluation file's per-row predictions."""
    return _accuracy_by(rows, lambda row: row["answers"][0] if row.get("answers") else "")


def asked_key_accuracy(rows) -> dict[str, list]:
    """{asked creature: [rows scored correct, rows]}: the creature the question names (a look-alike confused with
    one creature, or a creature's notes malformed, shows as one low row while every answer word looks fine)."""
    from memagent_jax.data.synthetic.vocabulary import KEY_CREATURES

    keys = set(KEY_CREATURES)

    def asked(row) -> str:
        named = [w for w in re.findall(r"[a-z]+", str(row.get("question", ""))) if w in keys]
        return named[-1] if named else ""

    return _accuracy_by(rows, asked)


def _accuracy_by(rows, label_of) -> dict[str, list]:
    """{label_of(row): [rows scored correct, rows]}, sorted by label."""
    counts: dict[str, list] = {}
    for row in rows:
        hit = counts.setdefault(label_of(row), [0.0, 0])
        hit[0] += float(row.get("scores", {}).get("accuracy", 0.0))
        hit[1] += 1
    return dict(sorted(counts.items()))


def worst_word(per_word: dict[str, list]) -> tuple[str, float, int] | None:
    """The entry (answer word, or asked creature) with the lowest accuracy (ties: fewest rows, then alphabetical),
    or None."""
    if not per_word:
        return None
    word, (hits, n) = min(per_word.items(), key=lambda kv: (kv[1][0] / kv[1][1], -kv[1][1], kv[0]))
    return word, hits / n, n


def _aligned(lines: list[list[str]]) -> str:
    """Rows of cells as text, each column padded to its widest cell."""
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)


def summary_table(figures: dict) -> str:
    """Accuracy (%) per evaluation file (rows) and model (columns), with each model's weakest answer word and
    weakest asked creature."""
    models = list(figures)
    labels = list(next(iter(figures.values()))) if figures else []
    head = ["file", *models, *(f"{m}: weakest word" for m in models), *(f"{m}: weakest creature" for m in models)]
    lines = [head]
    for label in labels:
        cells = [label] + [f"{100 * figures[m][label]['accuracy']:.1f}" for m in models]
        for field in ("per_word", "per_key"):
            for m in models:
                worst = worst_word(figures[m][label].get(field, {}))
                cells.append("-" if worst is None else f"{worst[0]} {100 * worst[1]:.0f}% of {worst[2]}")
        lines.append(cells)
    return _aligned(lines)


def per_word_table(figures: dict, field: str = "per_word", name: str = "word") -> str:
    """Accuracy (%) of every answer word (or, field 'per_key', asked creature) (rows) in every model and file
    (columns)."""
    columns = [(m, label) for m in figures for label in figures[m]]
    words = sorted({w for m, label in columns for w in figures[m][label].get(field, {})})
    head = [name, *(f"{m} {label}" for m, label in columns)]
    lines = [head]
    for w in words:
        cells = [w]
        for m, label in columns:
            hits, n = figures[m][label].get(field, {}).get(w, (0, 0))
            cells.append(f"{100 * hits / n:.0f} ({n})" if n else "-")
        lines.append(cells)
    return _aligned(lines)


def write_report(cfg, assets: dict, models: dict[str, str], workdir: str) -> list[str]:
    """Markdown + HTML memory traces of a few held-out questions at 4x the training length, every model."""
    from memagent_jax.agent import MemoryAgent
    from memagent_jax.data.formats import read_records
    from memagent_jax.evaluation import load_model, row_keys
    from memagent_jax.evaluation.traces import entries_from_agent, write_trace_report

    multipliers = eval_multipliers(cfg)
    m = 4 if 4 in multipliers else multipliers[0]
    records = read_records(assets["eval_files"][f"{m}x"])[: cfg.eval.report_questions]
    entries = []
    for name, folder in models.items():
        loaded = load_model(folder)
        agent = MemoryAgent(
            loaded.params,
            loaded.config,
            loaded.tokenizer,
            budgets=agent_budgets(cfg),
            templates=agent_templates(cfg),
            memory_sampling=_eval_sampling(cfg),
        )
        result = agent.run(
            [r.question for r in records],
            [r.document for r in records],
            rng=row_keys(cfg.seed, [r.index for r in records]),
            trace=True,
        )
        doc_ids = [agent.prepare(r.question, r.document)[1] for r in records]
        entries += entries_from_agent(
            loaded.tokenizer,
            result,
            records,
            doc_ids,
            cfg.agent.chunk_tokens,
            model=name,
            metric="string_match_all",
            initial_memory=cfg.agent.initial_memory,
        )
    entries.sort(key=lambda e: (e.question, e.model != "warm_start"))
    paths = write_trace_report(
        os.path.join(workdir, "report"),
        entries,
        title=f"Memory traces: {len(records)} held-out questions at {m}x the training length",
    )
    _say(f"[report] memory traces -> {', '.join(paths)}")
    return paths


def plot_results(cfg, figures: dict, long: dict | None, path: str) -> str:
    """Accuracy against document length for both models at every `<m>x` length (not the multi-hop and
    concatenated files), the long point of the RL model when it was run, the training length marked."""
    from types import SimpleNamespace

    from memagent_jax.evaluation import plot_accuracy_vs_length

    def point(model, n, tokens, mean, low, high):
        return SimpleNamespace(
            model=model,
            n=n,
            mean_doc_tokens=tokens,
            metrics_used=("string_match_all",),
            metric="string_match_all",
            accuracy=SimpleNamespace(mean=mean, low=low, high=high),
        )

    points = [
        point(model, f["n"], f["tokens"], f["accuracy"], f["accuracy_low"], f["accuracy_high"])
        for model, by_label in figures.items()
        for m in eval_multipliers(cfg)
        for f in [by_label[f"{m}x"]]
    ]
    if long:
        points.append(
            point(
                "RL",
                long["questions"],
                long["tokens_per_document"],
                long["accuracy"],
                long["accuracy_low"],
                long["accuracy_high"],
            )
        )
    train_tokens = cfg.task.train_chunks * cfg.agent.chunk_tokens
    return plot_accuracy_vs_length(
        points,
        path,
        train_tokens=train_tokens,
        title="Memory agent accuracy vs document length (95% CI; dashed: training length)",
    )


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def long_eval(cfg, assets: dict, model: str, folder: str) -> dict:
    """The trained model on `long_eval.questions` held-out documents of `long_eval.chunks` chunks each (the
    paper's headline point in miniature: >= 1M tokens), in batches of `long_eval.batch_size` rows streamed
    segment by segment; reports accuracy with its 95% interval, document tokens/s and the process's peak RSS."""
    done = _stage_done(folder)
    if done is not None:
        return done
    import numpy as np

    from memagent_jax import evaluation as evaluate_lib
    from memagent_jax.agent import MemoryAgent
    from memagent_jax.data.synthetic import generate_sample
    from memagent_jax.evaluation.verifier import score

    t0 = time.perf_counter()
    le = cfg.long_eval
    chunks = le.chunks
    loaded = evaluate_lib.load_model(model)
    agent = MemoryAgent(
        loaded.params,
        loaded.config,
        loaded.tokenizer,
        budgets=agent_budgets(cfg, cfg.eval.chunks_per_segment),
        templates=agent_templates(cfg),
        memory_sampling=_eval_sampling(cfg),
        answer_sampling=_eval_sampling(cfg),
    )
    task = task_config(cfg, chunks, _seeds(cfg)["eval"])
    _say(
        f"[long eval] {le.questions} held-out questions on documents of {chunks} chunks "
        f"({chunks * cfg.agent.chunk_tokens / 1e6:.2f}M tokens, {chunks // cfg.task.train_chunks}x the training "
        f"length), batches of {le.batch_size}"
    )
    hits, tokens, agent_seconds, rss = [], 0, 0.0, []
    for start in range(0, le.questions, le.batch_size):
        indices = list(range(start, min(start + le.batch_size, le.questions)))
        samples = [generate_sample(task, i, loaded.tokenizer) for i in indices]
        docs = [np.concatenate([np.asarray(ids, np.int32) for ids in s.token_ids(loaded.tokenizer)]) for s in samples]
        t1 = time.perf_counter()
        result = agent.run([s.question for s in samples], docs, rng=evaluate_lib.row_keys(cfg.seed, indices))
        agent_seconds += time.perf_counter() - t1
        tokens += sum(d.size for d in docs)
        for s, answer in zip(samples, result.answers):
            hits.append(float(score(answer, s.answers, "string_match_all")))
        rss.append(_peak_rss_bytes())
        _say(
            f"[long eval] {len(hits)}/{le.questions} rows: accuracy so far {100 * np.mean(hits):.1f}%, "
            f"{tokens / agent_seconds:,.0f} document tokens/s, peak RSS {rss[-1] / 2**30:.2f} GiB"
        )
    acc = evaluate_lib.estimate(hits)
    info = {
        "questions": len(hits),
        "chunks": chunks,
        "tokens_per_document": tokens / len(hits),
        "multiplier": chunks // cfg.task.train_chunks,
        "accuracy": acc.mean,
        "accuracy_low": acc.low,
        "accuracy_high": acc.high,
        "document_tokens_per_s": tokens / agent_seconds,
        "agent_seconds": agent_seconds,
        "peak_rss_bytes_after_each_batch": rss,
        "seconds": time.perf_counter() - t0,
    }
    _say(
        f"[long eval] accuracy {100 * acc.mean:.1f}% [{100 * acc.low:.1f}, {100 * acc.high:.1f}] on "
        f"{len(hits)} documents of {tokens / len(hits) / 1e6:.2f}M tokens; {info['document_tokens_per_s']:,.0f} "
        f"document tokens/s; peak RSS {rss[-1] / 2**30:.2f} GiB"
    )
    _mark_done(folder, info)
    return info


# Sections whose fields do not change what the stages compute (a finished workdir may be rerun with other values).
RERUNNABLE_SECTIONS = ("long_eval",)
# Fields added after workdirs were first written, with the value the job read when they were absent: a saved config
# without one matches a config holding that value (an older workdir resumes; any other value is a change).
FIELDS_ADDED_LATER = {"rl.warmup_steps": 0, "task.rl_absent_fraction": 0.0}


def check_workdir_config(cfg, workdir: str) -> None:
    """Records the job's config in <workdir>/job_config.json on the first run; a later run (a resume) with other
    values would mix stages of two configs, so it is refused, naming the fields that differ."""
    path = os.path.join(workdir, "job_config.json")
    current = {k: v for k, v in json.loads(cfg.to_json()).items() if k not in RERUNNABLE_SECTIONS}
    if not os.path.exists(path):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(current, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        return
    with open(path) as f:
        saved = json.load(f)

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    was, now = FIELDS_ADDED_LATER | flat(saved), flat(current)
    changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
    if changed:
        shown = ", ".join(f"{k}: {was.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
        more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
        raise PipelineConfigError(
            f"{workdir} holds a run of another config ({shown}{more}); its finished stages would be reused. "
            "Use a new --workdir, or delete this one"
        )


def run(cfg, workdir: str) -> dict:
    """Runs (or resumes) every stage; returns the summary."""
    cfg = resolve_config(cfg)
    os.makedirs(workdir, exist_ok=True)
    check_workdir_config(cfg, workdir)
    t_start = time.perf_counter()
    timings = {}

    def timed(name, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        timings[name] = time.perf_counter() - t0
        return out

    assets = timed("assets", make_assets, cfg, os.path.join(workdir, "assets"))
    warm = timed("warm_start", warm_start, cfg, assets, os.path.join(workdir, "warm_start"))
    rl = timed("rl", reinforce, cfg, assets, warm, os.path.join(workdir, "rl"))
    results = timed("eval", evaluate_both, cfg, assets, {"warm_start": warm, "RL": rl}, os.path.join(workdir, "eval"))
    long = None
    if cfg.long_eval.enabled:
        long = timed("long_eval", long_eval, cfg, assets, rl, os.path.join(workdir, "long_eval"))
    elif _stage_done(os.path.join(workdir, "long_eval")) is not None:  # from an earlier `make long-eval`
        long = _stage_done(os.path.join(workdir, "long_eval"))
    plot_path = plot_results(cfg, results, long, os.path.join(workdir, "eval", "accuracy_vs_length.png"))
    _say(f"[eval] accuracy against length -> {plot_path}")
    curve = plot_training_curve(
        cfg, os.path.join(workdir, "rl", "eval_history.jsonl"), os.path.join(workdir, "eval", "accuracy_vs_step.png")
    )
    if curve:
        _say(f"[eval] held-out accuracy against GRPO step -> {curve}")
    timed("report", write_report, cfg, assets, {"warm_start": warm, "RL": rl}, workdir)
    # Each stage's own time when it ran (a resumed stage takes no time in `stage_seconds`).
    computed = {
        name: (_stage_done(os.path.join(workdir, name)) or {}).get("seconds")
        for name in ("assets", "warm_start", "rl", "eval", "long_eval")
    }
    summary = {
        "workdir": workdir,
        "seconds_total": time.perf_counter() - t_start,
        "stage_seconds": timings,
        "stage_seconds_when_computed": {k: v for k, v in computed.items() if v is not None},
        "results": results,
        "key_confusion": (_stage_done(os.path.join(workdir, "eval")) or {}).get("key_confusion"),
        "long_eval": long,
        "models": {"warm_start": warm, "RL": rl},
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    _say(f"[done] {summary['seconds_total']:.0f} s in all; artefacts under {workdir}")
    return summary


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.replace(";", ",").split(",") if v.strip()]
    except ValueError:
        raise PipelineConfigError(f"--seeds: expected integers separated by ',', got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise PipelineConfigError(f"--seeds: need distinct integers >= 0, got {text!r}")
    return seeds


def seeds_table(summaries: dict[int, dict]) -> dict:
    """{model: {file label: {mean, min, max, weakest_word, weakest_key}}} of accuracy over the seeds' summaries (%),
    where weakest_word is the lowest per-answer-word accuracy in any seed (word, %, seed, rows of that word) and
    weakest_key the same over the asked creatures."""
    seeds = sorted(summaries)
    first = summaries[seeds[0]]["results"]
    table: dict = {}
    for model, by_label in first.items():
        table[model] = {}
        for label in by_label:
            values = [100 * summaries[s]["results"][model][label]["accuracy"] for s in seeds]
            weakest = {}
            for field in ("per_word", "per_key"):
                weakest[field] = None
                for s in seeds:
                    worst = worst_word(summaries[s]["results"][model][label].get(field, {}))
                    if worst and (weakest[field] is None or 100 * worst[1] < weakest[field][1]):
                        weakest[field] = (worst[0], 100 * worst[1], s, worst[2])
            table[model][label] = {
                "mean": sum(values) / len(values),
                "min": min(values),
                "max": max(values),
                "per_seed": dict(zip(seeds, values)),
                "weakest_word": weakest["per_word"],
                "weakest_key": weakest["per_key"],
            }
    return table


def seeds_markdown(table: dict, seeds: list[int], seconds: dict[int, float]) -> str:
    """The seeds table as markdown: one row per file, per model 'mean (min-max)', the weakest answer word and the
    weakest asked creature."""
    models = list(table)
    labels = list(next(iter(table.values())))
    head = [
        "file",
        *(f"{m} mean (min-max)" for m in models),
        *(f"{m} weakest word: right/rows" for m in models),
        *(f"{m} weakest creature" for m in models),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        cells = [label]
        for m in models:
            c = table[m][label]
            cells.append(f"{c['mean']:.1f} ({c['min']:.1f}-{c['max']:.1f})")
        for field in ("weakest_word", "weakest_key"):
            for m in models:
                w = table[m][label].get(field)
                cells.append("-" if w is None else f"{w[0]} {round(w[1] * w[3] / 100)}/{w[3]} (seed {w[2]})")
        lines.append("| " + " | ".join(cells) + " |")
    timing = ", ".join(f"seed {s}: {seconds[s]:.0f} s" for s in seeds)
    return "\n".join(
        [f"Accuracy % over seeds {', '.join(map(str, seeds))} (each seed: data, model, warm start, GRPO)", "", *lines]
        + ["", f"Job time per seed: {timing}."]
    )


def run_seeds(cfg, workdir: str, seeds: list[int]) -> dict:
    """The whole job once per seed under <workdir>/seed_<s> (each resumes), then <workdir>/seeds.md and
    seeds.json with mean, min and max of every cell."""
    os.makedirs(workdir, exist_ok=True)
    summaries, seconds = {}, {}
    for s in seeds:
        seed_cfg = cfg.copy_and_resolve_references()
        seed_cfg.unlock()
        seed_cfg.seed = s
        _say(f"[seeds] seed {s} ({seeds.index(s) + 1}/{len(seeds)}) -> {os.path.join(workdir, f'seed_{s}')}")
        summaries[s] = run(seed_cfg, os.path.join(workdir, f"seed_{s}"))
        seconds[s] = sum(summaries[s]["stage_seconds_when_computed"].values())
    table = seeds_table(summaries)
    text = seeds_markdown(table, seeds, seconds)
    with open(os.path.join(workdir, "seeds.json"), "w") as f:
        json.dump({"seeds": seeds, "table": table, "seconds": seconds}, f, indent=1)
    with open(os.path.join(workdir, "seeds.md"), "w") as f:
        f.write(text + "\n")
    _say(text)
    _say(f"[seeds] table -> {os.path.join(workdir, 'seeds.md')}")
    return table


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
    with errors.report_user_errors():  # a bad config field, model or file: one line, exit status 2
        if _SEEDS.value:
            run_seeds(_CONFIG.value, _WORKDIR.value, parse_seeds(_SEEDS.value))
        else:
            run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    errors.run_absl(main, define_flags, default_config="tiny_synthetic")
