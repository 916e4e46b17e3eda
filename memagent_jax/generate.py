"""Generate a completion from a local Hugging Face model folder (safetensors + tokenizer), on CPU or accelerator.

    python -m memagent_jax.generate --model DIR --prompt "Once upon a time"
    python -m memagent_jax.generate --model DIR --chat --prompt "What is 2 + 2?" --temperature 0.7 --top-p 0.95
    python -m memagent_jax.generate --model DIR --prompt "a" --prompt "b c" --json      # a batch, JSON out

Prints the completion of each prompt (greedy by default; a folder exported by `train` carries its sampling in
memagent_agent.json, used unless --temperature / --top-p are given). With several prompts each completion is preceded by
a `--- completion i ---` line; `--json` prints one JSON object per prompt with the new token ids, their
log-probs and whether a stop token was reached. Generation stops at the model's EOS ids (config.json), the
tokenizer's EOS token and any `--stop-id`.

Exit status: 0 done; 2 a bad flag, model folder or tokenizer (one line naming it; --debug: the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from memagent_jax import errors


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m memagent_jax.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="local Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    p.add_argument(
        "--prompt", action="append", required=True, help="prompt text; repeat the flag to generate for a batch"
    )
    p.add_argument("--chat", action="store_true", help="wrap each prompt as one user message with the chat template")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--temperature",
        "--agent.temperature",
        dest="temperature",
        type=float,
        default=None,
        help="0 = greedy (default: the model folder's memagent_agent.json, else 0)",
    )
    p.add_argument(
        "--top-p",
        "--agent.top_p",
        dest="top_p",
        type=float,
        default=None,
        help="nucleus sampling (default: the model folder's memagent_agent.json, else 1.0)",
    )
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop-id", type=int, action="append", default=[], help="extra stop token id (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS (only at --stop-id)")
    from memagent_jax.model_flags import add_model_arguments

    add_model_arguments(p)  # --dtype, --param-dtype, --compute-dtype, --attention-impl, --allow-nonfinite-weights
    p.add_argument("--json", action="store_true", help="print JSON lines with ids and log-probs")
    p.add_argument("--quiet", action="store_true", help="no timing line on stderr")
    from memagent_jax import distributed

    distributed.add_arguments(p)
    return p


def _encode(tokenizer, text: str, chat: bool, system: str | None) -> list[int]:
    if not chat:
        return list(tokenizer.encode(text, add_special_tokens=True))
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: the tokenizer has no chat template (chat_template in tokenizer_config.json)")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(rendered, add_special_tokens=False))


@errors.user_errors  # --debug (or MEMAGENT_DEBUG=1): the traceback of a user error instead of its one line
def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)

    # Argument checks that need no JAX, so mistakes are reported at once.
    from memagent_jax.sampling.params import SamplingError, SamplingParams

    if not os.path.isdir(args.model):
        parser.error(f"--model {args.model!r}: no such folder")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        parser.error(f"--model {args.model!r}: config.json is missing (expected a Hugging Face model folder)")
    tok_dir = args.tokenizer or args.model
    if not os.path.isdir(tok_dir):
        parser.error(f"--tokenizer {tok_dir!r}: no such folder")
    if args.system is not None and not args.chat:
        parser.error("--system needs --chat")
    from memagent_jax.agent.settings import AgentSettings, AgentSettingsError

    try:  # sampling left unset: what the exported model's memagent_agent.json says (else greedy)
        settings = AgentSettings.load(args.model)
    except AgentSettingsError as e:
        parser.error(str(e))
    if args.temperature is None:
        args.temperature = settings.temperature if settings.temperature is not None else 0.0
    if args.top_p is None:
        args.top_p = settings.top_p if settings.top_p is not None else 1.0
    try:
        SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            stop_token_ids=tuple(args.stop_id),
        )
    except SamplingError as e:
        parser.error(
            str(e)
            .replace("max_new_tokens", "--max-new-tokens")
            .replace("top_p", "--top-p")
            .replace("top_k", "--top-k")
            .replace("temperature", "--temperature")
            .replace("stop_token_ids", "--stop-id")
        )

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except Exception as e:  # transformers raises several types for a folder without tokenizer files
        parser.error(f"--tokenizer {tok_dir!r}: cannot load a tokenizer ({type(e).__name__}: {e})")
    try:
        prompts = [_encode(tokenizer, text, args.chat, args.system) for text in args.prompt]
    except ValueError as e:
        parser.error(str(e))
    for i, ids in enumerate(prompts):
        if not ids:
            parser.error(f"--prompt #{i + 1} is empty after tokenization")

    from memagent_jax import distributed
    from memagent_jax.models import load_hf_params
    from memagent_jax.sampling.api import Sampler

    try:
        # Multi-process runs: every process generates on its own devices; only process 0 prints.
        if distributed.initialize_from_args(args):
            import jax

            if jax.process_index() != 0:
                sys.stdout = open(os.devnull, "w")
                args.quiet = True
    except distributed.DistributedError as e:
        parser.error(str(e))
    try:
        param_dtype = args.param_dtype or args.dtype
        params, config = load_hf_params(
            args.model, param_dtype=param_dtype, allow_nonfinite=args.allow_nonfinite_weights
        )
        if args.compute_dtype or param_dtype:  # compute in the requested dtype too
            config = config.replace(compute_dtype=args.compute_dtype or args.dtype or config.param_dtype)
        config = config.replace(attention_impl=args.attention_impl)
    except errors.user_error_types() as e:  # bad weights, config.json or dtype: one line naming the folder, status 2
        return errors.handle(errors.UserError(f"--model {args.model!r}: {errors.one_line(e)}"))

    stops = set(args.stop_id)
    if not args.ignore_eos:
        stops.update(config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            stops.add(int(tokenizer.eos_token_id))
    pad_id = next((x for x in (tokenizer.pad_token_id, config.pad_token_id) if x is not None), 0)
    try:
        sampling = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            stop_token_ids=tuple(stops),
            pad_id=int(pad_id),
        )
        sampler = Sampler(params, config)
        t0 = time.perf_counter()
        result = sampler.generate(prompts, sampling, rng=args.seed)
        elapsed = time.perf_counter() - t0
    except errors.user_error_types() as e:
        return errors.handle(e)

    stop_set = set(sampling.stop_token_ids)
    for i, ids in enumerate(result.tokens):
        text_ids = ids[:-1] if result.finished[i] and ids and ids[-1] in stop_set else ids
        text = tokenizer.decode(text_ids, skip_special_tokens=False)
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": args.prompt[i],
                        "completion": text,
                        "token_ids": ids,
                        "logprobs": [float(x) for x in result.row_logprobs(i)],
                        "finished": bool(result.finished[i]),
                    },
                    ensure_ascii=False,
                )
            )
        else:
            if len(result.tokens) > 1:
                print(f"--- completion {i + 1} ---")
            print(text)
    if not args.quiet:
        total = int(result.num_tokens.sum())
        print(
            f"[{total} new tokens for {len(prompts)} prompt(s) in {elapsed:.2f}s incl. compile; "
            f"prompt bucket {result.bucket}]",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
