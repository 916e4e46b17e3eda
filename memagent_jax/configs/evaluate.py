"""Evaluation of memory agents across document lengths.

    python -m memagent_jax.evaluate --config configs/evaluate.py --workdir runs/eval \\
        --config.models=warm=/ckpt/warm,rl=/ckpt/rl \\
        --config.eval_files='/data/eval_50docs.json,/data/eval_*docs.json'

`get_config()` gives the reference evaluation recipe: each model's own memagent_agent.json (budgets, templates,
sampling, as train exported it), else budgets 1024 / 5000 / 1024 / 1024 (question / chunk / memory / answer
tokens), temperature 0.7 and top-p 0.95; accuracy = sub-exact-match of the last \\boxed{...} answer.
`get_config("cpu")` applies the CPU block: the budgets of the main job and grpo:cpu (16 / 32 / 8 / 12,
`cpu_agent`) and float32 weights; the wording stays each model's own.
Every field is overridable with --config.a.b=value.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from memagent_jax import configs
from memagent_jax.configs import cpu_agent


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    return configs.variant(
        "evaluate", arg, reference_config, {"cpu": apply_cpu_overrides}, base_name="the reference recipe"
    )


def reference_config() -> ml_collections.ConfigDict:
    """The reference evaluation recipe, every field with its meaning."""
    c = ml_collections.ConfigDict()
    # Models: comma list of name=folder (a bare folder is named after its basename). Each folder is a local
    # Hugging Face checkpoint (config.json + safetensors); each is loaded once and run on every file.
    c.models = ""
    c.tokenizer = ""  # tokenizer folder for every model ('' = each model's own folder)
    # Evaluation files (reference evaluation format: context / input / answers [/ num_docs / index]), comma list;
    # glob patterns allowed. Each file is one point on the accuracy-vs-length curve.
    c.eval_files = ""
    # Document store for files whose rows give 'context' as a list of document indices (the reference's 12800+
    # document files): the raw HotpotQA / SQuAD JSON the files were built from, or a JSON array of documents.
    c.doc_store = ""
    # The agent's settings, named as in configs/grpo.py (`--config.agent.chunk_tokens=...` in train and here,
    # `--agent.chunk_tokens` in answer). None / '' = each model folder's memagent_agent.json (what train's export
    # writes), else the default after the '|'.
    c.agent = ml_collections.ConfigDict(
        dict(
            question_tokens=placeholder(int),  # question slot | 1024
            chunk_tokens=placeholder(int),  # document tokens read per step | 5000
            memory_tokens=placeholder(int),  # most new tokens of a memory update | 1024
            answer_tokens=placeholder(int),  # most new tokens of the answer | 1024
            chunks_per_segment=placeholder(int),  # chunks per scan | 4
            max_document_tokens=placeholder(int),  # centre-truncate longer documents, 0 = off | 0
            question_overflow=placeholder(str),  # an over-budget question: 'error' or 'truncate' | error
            temperature=placeholder(float),  # sampling temperature, 0 = greedy | 0.7 (the paper's evaluation)
            top_p=placeholder(float),  # nucleus sampling | 0.95
            top_k=placeholder(int),  # keep the k most likely tokens, 0 = off | 0
            templates="",  # JSON file of agent.AgentTemplates fields | the model's settings, else the default wording
            prompt_mode="",  # 'pieces' or 'text' (see agent/templates.py) | the templates' own (pieces)
            # Single template fields over the templates | the model's settings (an export of the main job or of
            # train carries its wording, e.g. the main job's compact one in configs/cpu_agent.py).
            memory_update="",
            final_answer="",
            initial_memory="",
        )
    )
    c.metric = "sub_em"  # em | f1 | sub_em | string_match_all | auto (each row's extra field 'metric', else sub_em)
    c.extract = "boxed"  # how the prediction is taken from the answer (verifier.EXTRACTORS)
    c.batch_size = 8  # rows the agent runs at once (row slots of continuous batching)
    # continuous: a row whose document ends takes the next document at the next segment boundary (no idle rows);
    # bucketed: rows sorted by length, run in lockstep batches. Same outputs (per-row keys).
    c.scheduling = "continuous"
    c.max_questions = 0  # per file; 0 = all rows
    c.seed = 0  # row r samples with fold_in(key(seed), index of r): the same keys for every model and rerun
    c.num_traces = 3  # rows per (model, file) whose memory after every chunk is written to predictions/
    c.row_errors = "skip"  # a row that cannot run (empty / over-budget question): skip | zero | raise
    # How per-row scores become a file's figures: 'ours' (every scored row, unrounded) or 'reference' (as the
    # reference's evaluation scripts: rows whose response is empty left out, each row's score rounded to 2 decimals).
    c.averaging = "ours"
    c.param_dtype = ""  # '' = the checkpoint's dtype
    c.compute_dtype = ""  # '' = param_dtype
    c.attention_impl = ""  # attention kernel: auto | materialized | blockwise | cudnn ('' = auto; models/attention.py)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    c.warmup = True  # compile on a dummy batch first, so wall times and tokens/s measure the evaluation itself
    c.progress = True
    c.plot = True  # write accuracy_vs_length.png
    c.allow_nonfinite_weights = False  # True: load weights holding NaN / inf (default: refused, naming the tensor)
    return c


def apply_cpu_overrides(c: ml_collections.ConfigDict) -> None:
    """The CPU block, in place: the main job's budgets and float32 weights (the wording stays each model's own)."""
    c.agent.update(
        {
            name: cpu_agent.BUDGETS[name]
            for name in ("question_tokens", "chunk_tokens", "memory_tokens", "answer_tokens", "chunks_per_segment")
        }
    )
    c.param_dtype = "float32"
