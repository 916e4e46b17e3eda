"""The `memagent serve` command: flags, agent loading, uvicorn (see `memagent_jax.serve` for the API)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from memagent_jax import errors

log = logging.getLogger("memagent_jax.serve")


def _parser() -> argparse.ArgumentParser:
    import memagent_jax.serve as package
    from memagent_jax.model_flags import add_agent_arguments, add_model_arguments

    p = argparse.ArgumentParser(
        prog="memagent serve", description=package.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model",
        required=True,
        help="local Hugging Face model folder (config.json + safetensors; "
        "its memagent_agent.json gives budgets, templates and sampling)",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    p.add_argument(
        "--served-model-name", default=None, help="the model name of the API (default: the model folder's name)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--batch-size", type=int, default=8, help="row slots read at once (default 8)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="requests that may wait for a slot; beyond "
        "--batch-size + --max-queue outstanding requests the server answers 429 (default 256)",
    )
    p.add_argument(
        "--max-document-tokens",
        type=int,
        default=1_048_576,
        help="longer documents are refused with "
        "413 (0 = no limit; default 1048576). Not --agent.max_document_tokens, which centre-truncates",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=32 * 2**20,
        help="larger request bodies are refused with 413 (default 32 MiB)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        help="seconds from arrival to answer; later: 504 and the row is cancelled (default 600)",
    )
    add_agent_arguments(p)
    add_model_arguments(p)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


class ServeArgsError(ValueError):
    """A command-line value is invalid; the message names the flag."""


def check_args(args) -> None:
    from memagent_jax.model_flags import check_model_and_agent_flags

    for flag, value, low in (
        ("--batch-size", args.batch_size, 1),
        ("--max-queue", args.max_queue, 0),
        ("--max-document-tokens", args.max_document_tokens, 0),
        ("--max-body-bytes", args.max_body_bytes, 1),
        ("--port", args.port, 0),
    ):
        if value < low:
            raise ServeArgsError(f"{flag} must be >= {low}, got {value}")
    if not args.request_timeout > 0:
        raise ServeArgsError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    if args.prompt_mode == "text":
        raise ServeArgsError(
            "--agent.prompt_mode=text: the server runs the piece prompt mode only (continuous "
            "batching steps the chunk scan on the device)"
        )
    check_model_and_agent_flags(args)


def build_state(args):
    """The `ServerState` of parsed flags (loads the model; does not start the engine)."""
    from memagent_jax.model_flags import build_agent
    from memagent_jax.serve.app import ServeLimits, ServerState

    agent = build_agent(args)
    if agent.spec.prompt_mode != "pieces":
        raise ServeArgsError(
            "the model's templates use the text prompt mode; the server runs the piece prompt mode "
            "only (pass --agent.prompt_mode=pieces)"
        )
    name = args.served_model_name or os.path.basename(os.path.normpath(os.path.abspath(args.model)))
    limits = ServeLimits(
        max_document_tokens=args.max_document_tokens,
        max_body_bytes=args.max_body_bytes,
        request_timeout=args.request_timeout,
    )
    return ServerState(
        agent,
        model_name=name,
        batch_size=args.batch_size,
        max_queue=args.max_queue,
        limits=limits,
        model_path=os.path.abspath(args.model),
    )


def describe(state, host: str, port: int) -> list[str]:
    """The start-up log lines."""
    b, s = state.agent.budgets, state.sampling
    return [
        f"model {state.model_name!r} from {state.model_path}",
        f"budgets: question {b.question_tokens}, chunk {b.chunk_tokens}, memory {b.memory_tokens}, answer "
        f"{b.answer_tokens}, {b.chunks_per_segment} chunks per segment; sampling temperature={s.temperature} "
        f"top_p={s.top_p}",
        f"{state.engine_loop.batch_size} row slots, queue {state.engine_loop.capacity - state.engine_loop.batch_size}, "
        f"max document {state.limits.max_document_tokens or 'unlimited'} tokens, timeout "
        f"{state.limits.request_timeout:g} s",
        f"listening on http://{host}:{port}/v1 (health: /health; warming up the engine first)",
    ]


@errors.user_errors  # --debug (or MEMAGENT_DEBUG=1): the traceback of a user error instead of its one line
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        check_args(args)
        state = build_state(args)
    except errors.user_error_types() as e:  # a bad flag, model or templates file: one line, exit status 2
        return errors.handle(e)
    import uvicorn

    from memagent_jax.serve.app import create_app

    for line in describe(state, args.host, args.port):
        log.info(line)
    config = uvicorn.Config(
        create_app(state), host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=10
    )
    server = uvicorn.Server(config)
    server.run()  # SIGINT / SIGTERM: stop accepting, finish the lifespan (the engine loop stops), return
    return 0 if server.started else 1


if __name__ == "__main__":
    raise SystemExit(main())
