"""The model and agent flags that answer, serve and generate share: their argparse definitions, their check (the
agent settings through the validation layer, the folders on disk), and the memory agent they build.

Flag names are the config names train and evaluate use (`--agent.chunk_tokens`); an agent flag left unset keeps
the model folder's memagent_agent.json value, else the documented default.
"""

from __future__ import annotations

import argparse
import os

from memagent_jax import settings as settings_lib


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """How the model is loaded and computed (shared with `serve` and `generate`): dtypes, attention kernel,
    non-finite weights."""
    p.add_argument("--dtype", default=None, help="param and compute dtype (float32, bfloat16; default: checkpoint)")
    p.add_argument(
        "--param-dtype",
        "--param_dtype",
        dest="param_dtype",
        default=None,
        help="dtype the weights are held in (overrides --dtype; default: --dtype, else the checkpoint's)",
    )
    p.add_argument(
        "--compute-dtype",
        "--compute_dtype",
        dest="compute_dtype",
        default=None,
        help="dtype of matmuls and the KV cache; norms, softmax, logits and sampling stay f32 (overrides "
        "--dtype; default: --dtype, else the param dtype)",
    )
    p.add_argument(
        "--attention-impl",
        dest="attention_impl",
        default="auto",
        choices=("auto", "materialized", "blockwise", "cudnn", "splash"),  # models.config.ATTENTION_IMPLS
        help="attention kernel (models/attention.py; default auto)",
    )
    p.add_argument(
        "--allow-nonfinite-weights",
        action="store_true",
        help="load a model whose weights hold NaN / inf (refused by default, naming the tensor)",
    )


def add_agent_arguments(p: argparse.ArgumentParser) -> None:
    """The agent-settings flags (`--agent.<config name>`, the names train and evaluate use) of `answer`, shared
    with `serve`. Unset = the model folder's memagent_agent.json (written by train's export), else the documented
    default shown."""
    from memagent_jax.evaluation import verifier  # pure Python: no JAX

    p.add_argument(
        "--agent.question_tokens",
        dest="question_tokens",
        type=int,
        default=None,
        metavar="Q",
        help="question slot in tokens (default: the model's settings file, else 1024)",
    )
    p.add_argument(
        "--agent.chunk_tokens",
        dest="chunk_tokens",
        type=int,
        default=None,
        metavar="C",
        help="document tokens read per step (default: settings file, else 5000)",
    )
    p.add_argument(
        "--agent.memory_tokens",
        dest="memory_tokens",
        type=int,
        default=None,
        metavar="M",
        help="most new tokens of a memory update (default: settings file, else 1024)",
    )
    p.add_argument(
        "--agent.answer_tokens",
        dest="answer_tokens",
        type=int,
        default=None,
        metavar="A",
        help="most new tokens of the final answer (default: settings file, else 1024)",
    )
    p.add_argument(
        "--agent.chunks_per_segment",
        dest="chunks_per_segment",
        type=int,
        default=None,
        metavar="S",
        help="chunks per compiled scan (default: settings file, else 4)",
    )
    p.add_argument(
        "--agent.max_document_tokens",
        dest="max_document_tokens",
        type=int,
        default=None,
        metavar="N",
        help="centre-truncate longer documents (0 = off; default: settings file, else 0)",
    )
    p.add_argument(
        "--agent.question_overflow",
        dest="question_overflow",
        choices=("error", "truncate"),
        default=None,
        help="an over-budget question: error, or truncate with a warning (default: settings file, else error)",
    )
    p.add_argument(
        "--agent.templates",
        dest="templates",
        default=None,
        metavar="FILE",
        help="JSON file with memory_update / final_answer / initial_memory / system / prompt_mode "
        "(default: the settings file's templates, else the default wording)",
    )
    p.add_argument(
        "--agent.prompt_mode",
        dest="prompt_mode",
        choices=("pieces", "text"),
        default=None,
        help="how prompts become tokens (default: settings file / templates, else pieces)",
    )
    p.add_argument(
        "--agent.temperature",
        dest="temperature",
        type=float,
        default=None,
        metavar="T",
        help="sampling temperature, 0 = greedy (default: settings file, else 0; the evaluation recipe: 0.7)",
    )
    p.add_argument(
        "--agent.top_p",
        dest="top_p",
        type=float,
        default=None,
        metavar="P",
        help="nucleus sampling (default: settings file, else 1.0; the evaluation recipe: 0.95)",
    )
    p.add_argument(
        "--agent.top_k",
        dest="top_k",
        type=int,
        default=None,
        metavar="K",
        help="keep the K most likely tokens, 0 = off (default: settings file, else 0)",
    )
    p.add_argument(
        "--agent.extract",
        dest="extract",
        choices=verifier.EXTRACTORS,
        default=None,
        help="how the answer is taken from the model's response: the last \\boxed{...}, the text after 'the answer "
        "is', either, the boxed answer else the whole response, or the whole response (default: settings file, "
        "else boxed)",
    )


AGENT_FLAGS = (
    "question_tokens",
    "chunk_tokens",
    "memory_tokens",
    "answer_tokens",
    "chunks_per_segment",
    "max_document_tokens",
    "question_overflow",
    "templates",
    "prompt_mode",
    "temperature",
    "top_p",
    "top_k",
    "extract",
)


def agent_flag_values(args) -> dict:
    """{config name: value} of the agent flags that were given (`add_agent_arguments`)."""
    return settings_lib.section_values(args, AGENT_FLAGS, skip_none=True)


class FlagError(settings_lib.ConfigError):
    """A command-line value is invalid; the message names the flag."""


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_and_agent_flags(args) -> None:
    """Checks the agent-settings flags and the model / tokenizer folders (`add_agent_arguments` + --model,
    --tokenizer); errors name the flag."""
    from memagent_jax.agent import AgentSettings

    given = {k: v for k, v in agent_flag_values(args).items() if k != "templates"}
    with settings_lib.named("--agent", error=FlagError):
        AgentSettings().override(**given)  # the settings dataclasses check each value
    if not os.path.isdir(args.model):
        raise FlagError(f"--model {args.model!r}: no such folder (expected a local Hugging Face model folder)")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise FlagError(f"--model {args.model!r}: no config.json in the folder (expected a Hugging Face model folder)")
    tok = args.tokenizer or args.model
    flag = "--tokenizer" if args.tokenizer else "--model"
    if not os.path.isdir(tok):
        raise FlagError(f"--tokenizer {tok!r}: no such folder")
    if not any(os.path.isfile(os.path.join(tok, name)) for name in _TOKENIZER_FILES):
        raise FlagError(
            f"{flag} {tok!r}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}) in the folder"
            + ("" if args.tokenizer else "; pass --tokenizer DIR")
        )
    if args.templates and not os.path.isfile(args.templates):
        raise FlagError(f"--agent.templates {args.templates!r}: no such file")


def build_agent(args):
    """The `MemoryAgent` the flags describe: the folder's settings with the given flags on top, the tokenizer, the
    weights in the asked dtypes and attention kernel."""
    from transformers import AutoTokenizer

    from memagent_jax.agent import MemoryAgent
    from memagent_jax.models import load_hf_params

    settings = resolve_settings(args)  # before anything heavy loads
    tok = args.tokenizer or args.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok, local_files_only=True)
    except Exception as e:  # transformers raises OSError / ValueError with long messages
        first = str(e).splitlines()[0] if str(e) else ""
        raise FlagError(
            f"{'--tokenizer' if args.tokenizer else '--model'} {tok!r}: cannot load a tokenizer: "
            f"{type(e).__name__}: {first}"
        ) from None
    param_dtype = args.param_dtype or args.dtype
    params, config = load_hf_params(args.model, param_dtype=param_dtype, allow_nonfinite=args.allow_nonfinite_weights)
    if args.compute_dtype or args.dtype or param_dtype:
        config = config.replace(compute_dtype=args.compute_dtype or args.dtype or param_dtype)
    config = config.replace(attention_impl=args.attention_impl)
    return MemoryAgent(
        params,
        config,
        tokenizer,
        budgets=settings.budgets,
        templates=settings.templates,
        memory_sampling=settings.sampling(),
        extract=settings.extract,
    )


def resolve_settings(args):
    """The agent settings of this run: the model folder's memagent_agent.json (or the documented defaults),
    with every flag that was given on top. Errors name the file or flag."""
    from memagent_jax.agent import AgentSettings

    loaded = AgentSettings.load(args.model)
    with settings_lib.named("--agent", error=FlagError):
        return loaded.override(**agent_flag_values(args))
