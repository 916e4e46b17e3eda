"""Multi-conversation GRPO training of a memory agent.

    python -m memagent_jax.train --config configs/grpo.py --workdir runs/x \\
        --config.model.path=/ckpt/Qwen2.5-7B-Instruct --config.data.train_file=hotpotqa_train.parquet

`get_config()` gives the reference recipe (budgets 1024/5000/1024/1024, group 16, AdamW 1e-6 with 20 warm-up
steps from lr 0, clip 0.2/0.2, dual clip 3, k3 KL 0.001 clamped per token to 10, old log-probs recomputed by the
learner, training documents centre-truncated to 40000 tokens, token-mean); `get_config("cpu")` applies the CPU
block (`cpu_overrides`) for tiny models and tests: the main job's budgets (16 / 32 / 8 / 12) and compact wording
(`cpu_agent`), its keyed_recall task when no data file is given, no recompute, no KL clamp, no truncation. Every
field is overridable with --config.a.b=value.
"""

import ml_collections

from memagent_jax import configs
from memagent_jax.configs import cpu_agent


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return configs.variant(
        "grpo", arg, reference_config, {"cpu": apply_cpu_overrides}, base_name="the reference recipe"
    )


def reference_config() -> ml_collections.ConfigDict:
    """The reference recipe (MemAgent's GRPO settings), every field with its meaning."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 200

    c.model = ml_collections.ConfigDict(
        dict(
            path="",  # local Hugging Face folder (config.json + safetensors); required
            preset="",  # models.presets name giving the shape when the folder is not at hand (the planner)
            tokenizer="",  # tokenizer folder ('' = the model folder)
            param_dtype="bfloat16",
            compute_dtype="bfloat16",
            remat="full",
            # attention kernel (models/attention.py): 'auto' (cuDNN on CUDA GPUs where it applies, else blockwise;
            # on CPU materialised for one-block calls), 'materialized' ([T, S] scores in memory), 'blockwise' or
            # 'cudnn'
            attention_impl="auto",
            attention_block_size=512,  # key slots per block of the blockwise path
            # Decode loop layout: 'auto' (unstacked on CPU and GPU, scan on TPU) | 'scan' | 'unstacked' (per-layer
            # weight arrays made once per weights, so decode matmuls read weights in place; one extra copy of the
            # layers, held during the rollout).
            decode_layout="auto",
            allow_nonfinite_weights=False,  # True: load weights holding NaN / inf (default: refused, naming the tensor)
        )
    )
    c.data = ml_collections.ConfigDict(
        dict(
            train_file="",  # reference-format training (or evaluation) file; '' = the synthetic task below
            synthetic_task="multihop_qa",
            synthetic_tokens=28000,
            synthetic_samples=20000,
            # verifier.REWARD_STYLES name: 'reference_boxed' = MemAgent's training reward exactly (last \boxed{} in the
            # last 300 characters, lower-case + space removal only); 'boxed_em' = our SQuAD-normalised exact match.
            reward_style="reference_boxed",
            reward_drop_think=False,  # score only the text after the last </think> (the reference scores it all)
        )
    )
    c.agent = ml_collections.ConfigDict(
        dict(
            question_tokens=1024,  # question slot in tokens (longer: an error)
            chunk_tokens=5000,  # document tokens read per step
            memory_tokens=1024,  # most new tokens of a memory update (the memory's size)
            answer_tokens=1024,  # most new tokens of the final answer
            chunks_per_segment=4,  # chunks per compiled scan
            temperature=1.0,  # rollout sampling temperature (> 0: GRPO compares sampled trajectories)
            top_p=1.0,  # rollout nucleus sampling
            templates="",  # JSON file of agent.AgentTemplates fields ('' = the default wording)
            # Single template fields over the templates file ('' = the file's / the default).
            memory_update="",
            final_answer="",
            initial_memory="",
            # 'pieces' (template pieces tokenized apart, memory carried as exact ids inside the chunk scan) or 'text'
            # (each prompt formatted as one string and tokenized whole, as the reference does); '' = the templates
            # file's prompt_mode (default 'pieces'). See agent/templates.py.
            prompt_mode="",
            # Training documents longer than this are centre-truncated (first and last halves kept); 0 = off. The
            # reference cuts training contexts to max_chunks x chunk_size = 8 x 5000 tokens.
            max_document_tokens=40000,
        )
    )
    c.rl = ml_collections.ConfigDict(
        dict(
            questions_per_step=128,
            group_size=16,
            num_minibatches=16,
            micro_batch_size=0,  # 0 = whole mini-batch at once
            rollout_batch_size=0,  # trajectories per agent call (bounds rollout memory); 0 = the whole step at once
            learning_rate=1e-6,
            weight_decay=0.01,
            max_grad_norm=1.0,
            warmup_steps=20,
            warmup_from_zero=True,  # True: lr * s / warmup_steps (step 0 at lr 0, the reference); else (s + 1)
            schedule="constant",
            clip_low=0.2,
            clip_high=0.2,
            dual_clip=3.0,
            kl_coef=0.001,
            kl_clamp=10.0,  # per-token k3 clamped to [-x, x] (the reference: 10); 0 = off
            entropy_coef=0.0,
            aggregation="token-mean",
            normalize_std=False,
            leave_one_out=False,
            # "shared": every conversation carries its trajectory's advantage (the reference). "positive": the final
            # answer's conversation gets 0 instead of a negative one. Given wrong notes, any answer scores 0, so its
            # negative term says nothing about the answer step and only adds noise (on a copying answer step it can
            # drift one word's closing brace into the stop token).
            answer_advantage="shared",
            dynamic_sampling=False,  # DAPO: drop groups whose rewards are all equal (no signal) ...
            max_sampling_batches=1,  # ... and draw up to this many batches of questions to fill the step with signal
            # Conversations are padded to a multiple of this many tokens: fewer compiled shapes against less padding.
            length_multiple=64,
            # > 0: pack several conversations into learner rows of this many tokens (first-fit decreasing; each one
            # attends only to itself), so the short final-answer conversations stop padding to the memory updates'
            # length. Needs aggregation 'token-mean'. 0: one conversation per row.
            pack_length=0,
            recompute_old_logprobs=True,  # the learner recomputes old log-probs before the update (the reference)
            on_nonfinite="skip",
        )
    )
    # Learner mesh data x fsdp x tensor (one axis may be -1: the rest of the devices). rollout_devices > 0 runs the
    # rollout on its own mesh of that many devices (data = the rest x rollout_fsdp x rollout_tensor), taken from
    # the end of each process's devices, the learner gets the others, and the learner's params are copied there
    # every step. 0 = rollout on the learner's mesh with its params in place.
    c.mesh = ml_collections.ConfigDict(
        dict(data=1, fsdp=-1, tensor=1, rollout_devices=0, rollout_fsdp=1, rollout_tensor=1)
    )
    c.checkpoint = ml_collections.ConfigDict(dict(every=10, keep=3, async_save=True))
    # LoRA (pip install -e ".[lora]"): rank > 0 trains adapters on the targeted projections only (base frozen, and
    # the KL reference); the export merges them into the HF folder, save_adapters also writes <workdir>/adapters.
    c.lora = ml_collections.ConfigDict(
        dict(
            rank=0,
            alpha=16.0,
            targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            dropout=0.0,
            save_adapters=False,
            seed=0,
        )
    )
    c.export = True  # write an HF folder of the final params to <workdir>/export
    # The default sampling written into the export's memagent_agent.json (what answer / evaluate /
    # MemoryAgent.from_pretrained use unless told otherwise): the paper's evaluation sampling.
    c.export_sampling = ml_collections.ConfigDict(dict(temperature=0.7, top_p=0.95))
    c.log_every = 1
    # Evaluation of the policy during training (rl/validation.py), as `memagent evaluate` runs it, on the rollout's
    # params and mesh: accuracy per file to the metrics, <workdir>/eval_history.jsonl, the best step exported to
    # <workdir>/best/. every_steps = 0: off.
    c.eval = ml_collections.ConfigDict(
        dict(
            files="",  # comma-separated evaluation files / glob patterns (memagent evaluate's format)
            every_steps=0,  # evaluate after every N-th step; 0 = no evaluation
            max_questions=0,  # the first N rows of each file (0 = all)
            temperature=0.0,  # memory and answer sampling (0 = greedy)
            top_p=1.0,
            at_start=False,  # also evaluate the initial params (step 0)
            at_end=True,  # also evaluate after the last step when every_steps does not divide steps
            metric="sub_em",  # em | f1 | sub_em | string_match_all | auto (as memagent evaluate)
            extract="boxed",  # how the prediction is taken from the answer (verifier.EXTRACTORS)
            batch_size=8,  # rows the agent runs at once
            seed=0,  # row r samples with fold_in(key(seed), r.index)
        )
    )
    # Weights & Biases (pip install -e ".[wandb]"): the same per-step metrics as TensorBoard, and this config, go to
    # a W&B run; a resumed run continues it (its id is kept in <workdir>/wandb_run_id).
    c.wandb = ml_collections.ConfigDict(
        dict(
            enabled=False,
            project="memagent-jax",
            entity="",  # W&B team or user ('' = the logged-in user's default)
            name="",  # the run's display name ('' = the workdir's folder name)
            mode="online",  # 'online' | 'offline' (files only; `wandb sync` uploads them) | 'disabled'
            tags="",  # comma-separated
            dir="",  # W&B writes its files in <dir>/wandb ('' = the workdir)
        )
    )
    # Device kind for the planner (memagent_jax.plan) and train's memory check ('' = the devices JAX sees).
    c.hardware = ""
    # Refuse, before any model loads, a run whose planned peak memory per device exceeds the device's memory (on
    # CPU: the RAM share of each CPU device); False = run anyway (an estimate that is wrong for this run).
    c.memory_check = True
    return c


def apply_cpu_overrides(c: ml_collections.ConfigDict) -> None:
    """The CPU block, in place: tiny models in float32, the main job's budgets, wording and task, a few steps.

    No recompute of old log-probs (one epoch over the rollouts: they equal the rollout's), no KL clamp, no
    training-document truncation; rows padded to multiples of 16 tokens, since every padded token costs its full
    share of a CPU step.
    """
    b = cpu_agent.BUDGETS
    c.steps = 4
    c.model.update(dict(param_dtype="float32", compute_dtype="float32", remat="none"))
    c.data.update(
        dict(
            synthetic_task=cpu_agent.SYNTHETIC_TASK,
            synthetic_tokens=cpu_agent.SYNTHETIC_TOKENS,
            synthetic_samples=64,
            reward_style="boxed_em",
        )
    )
    c.agent.update(
        dict(
            max_document_tokens=0,
            **{
                name: b[name]
                for name in ("question_tokens", "chunk_tokens", "memory_tokens", "answer_tokens", "chunks_per_segment")
            },
            **cpu_agent.TEMPLATES,
        )
    )
    c.rl.update(
        dict(
            questions_per_step=2,
            group_size=4,
            num_minibatches=1,
            warmup_steps=0,
            warmup_from_zero=False,
            kl_clamp=0.0,
            length_multiple=16,
            recompute_old_logprobs=False,
        )
    )
    c.checkpoint.every = 2


def scale_config(preset: str, arg: str, hardware_table: dict, questions_per_step: int) -> ml_collections.ConfigDict:
    """The reference recipe at scale for one model, on the hardware that `arg` names.

    hardware_table: arg -> (config.hardware, mesh (data, fsdp, tensor), rl.rollout_batch_size,
    rl.micro_batch_size), each entry checked to fit by `memagent_jax.plan`. Used by configs/*_hotpotqa.py.

    Recipe: GRPO, group 16, `questions_per_step` questions, 16 mini-batches, AdamW lr 1e-6 (wd 0.01, grad clip
    1.0, 20 warm-up steps starting from lr 0 at step 0), clip 0.2 / 0.2, dual clip 3, k3 KL 0.001 clamped per
    token to [-10, 10], old log-probs recomputed by the learner before the update, training documents
    centre-truncated to 40000 tokens (8 chunks of 5000), budgets question 1024 / chunk 5000 / memory 1024 /
    answer 1024, rollout temperature 1 / top-p 1, remat full.

    Numerics: params (and so the AdamW moments and the KL reference) in float32, matmuls and KV caches in
    bfloat16: with bfloat16 params an lr-1e-6 update is below half an ulp of almost every weight and rounds away.

    Batches: the learner takes one conversation row per device per micro-batch (rl.micro_batch_size = data x
    fsdp); the rollout runs rl.rollout_batch_size trajectories per agent call, the largest power of two that
    keeps the planner's peak under 80% of the usable HBM.

    `config.model.path` (the checkpoint folder) and `config.data.train_file` are the user's to give;
    `config.model.preset` only gives the planner the shapes, `config.hardware` the device kind.
    """
    default = "v5p-128" if "v5p-128" in hardware_table else next(iter(hardware_table))
    key = (arg or default).strip().lower()
    if key not in hardware_table:
        raise ValueError(f"unknown hardware {arg!r} for {preset}; known: {', '.join(hardware_table)}")
    hardware, (data, fsdp, tensor), rollout_batch, micro_batch = hardware_table[key]
    c = get_config()
    c.model.preset = preset
    c.model.path = ""  # yours: --config.model.path=/ckpt/<the checkpoint>
    c.model.param_dtype = "float32"
    c.model.compute_dtype = "bfloat16"
    c.model.remat = "full"
    c.agent.question_tokens, c.agent.chunk_tokens = 1024, 5000
    c.agent.memory_tokens, c.agent.answer_tokens = 1024, 1024
    c.agent.temperature, c.agent.top_p = 1.0, 1.0
    c.data.reward_style = "reference_boxed"  # the reference's training reward, rule for rule (evaluation/verifier.py)
    c.rl.questions_per_step = questions_per_step
    c.rl.group_size = 16
    c.rl.num_minibatches = 16
    c.rl.learning_rate = 1e-6
    c.rl.weight_decay, c.rl.max_grad_norm, c.rl.warmup_steps = 0.01, 1.0, 20
    c.rl.warmup_from_zero = True
    c.rl.clip_low, c.rl.clip_high, c.rl.dual_clip = 0.2, 0.2, 3.0
    c.rl.kl_coef, c.rl.kl_clamp = 0.001, 10.0
    c.rl.recompute_old_logprobs = True
    c.agent.max_document_tokens = 40000
    c.rl.micro_batch_size = micro_batch
    c.rl.rollout_batch_size = rollout_batch  # trajectories per agent call
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = data, fsdp, tensor
    c.hardware = hardware
    return c
