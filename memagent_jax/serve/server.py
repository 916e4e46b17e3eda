"""The `memagent serve` command: flags, agent loading, uvicorn (see `memagent_jax.serve` for the API)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import sys

from memagent_jax import errors
from memagent_jax.errors import UserError

log = logging.getLogger("memagent_jax.serve")

API_KEY_ENV = "MEMAGENT_API_KEY"


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
    p.add_argument(
        "--api-key",
        default=None,
        help=f"every /v1 request must send 'Authorization: Bearer KEY' (else 401); default: the environment "
        f"variable {API_KEY_ENV} (prefer it: a flag shows in the process list); unset: /v1 is open. /health and "
        "/metrics stay open",
    )
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
        "--max-document-bytes",
        type=int,
        default=None,
        help="documents of more UTF-8 bytes are refused with 413 before they are tokenized (0 = no byte bound; "
        "default: --max-document-tokens x 16)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="seconds to receive a request's whole body; slower: 408 (default 30)",
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


class ServeArgsError(UserError):
    """A command-line value is invalid; the message names the flag."""


def check_args(args) -> None:
    from memagent_jax.model_flags import check_model_and_agent_flags

    for flag, value, low in (
        ("--batch-size", args.batch_size, 1),
        ("--max-queue", args.max_queue, 0),
        ("--max-document-tokens", args.max_document_tokens, 0),
        ("--max-body-bytes", args.max_body_bytes, 1),
        ("--max-document-bytes", 0 if args.max_document_bytes is None else args.max_document_bytes, 0),
        ("--port", args.port, 0),
    ):
        if value < low:
            raise ServeArgsError(f"{flag} must be >= {low}, got {value}")
    for flag, value in (("--request-timeout", args.request_timeout), ("--body-timeout", args.body_timeout)):
        if not value > 0:  # also NaN
            raise ServeArgsError(f"{flag} must be > 0 seconds, got {value}")
    api_key(args)
    if args.prompt_mode == "text":
        raise ServeArgsError(
            "--agent.prompt_mode=text: the server runs the piece prompt mode only (continuous "
            "batching steps the chunk scan on the device)"
        )
    check_model_and_agent_flags(args)


def api_key(args, environ=None) -> str | None:
    """The server's API key: --api-key, else $MEMAGENT_API_KEY (empty: unset), else None. ServeArgsError for a key
    that cannot travel in an HTTP header (empty, whitespace, non-ASCII)."""
    environ = os.environ if environ is None else environ
    if args.api_key is not None:
        key, source = args.api_key, "--api-key"
    else:
        key, source = environ.get(API_KEY_ENV) or None, API_KEY_ENV
    if key is not None and not re.fullmatch(r"[\x21-\x7e]+", key):
        raise ServeArgsError(
            f"{source} must be printable ASCII without spaces (it travels in the header 'Authorization: Bearer "
            f"KEY'), got {len(key)} characters" + (" (empty)" if not key else "")
        )
    return key


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine (an IP literal or localhost; other names count as exposed)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def startup_warnings(host: str, key: str | None) -> list[str]:
    """Warnings for the start-up log: listening beyond loopback with no API key."""
    if key is None and not is_loopback(host):
        return [
            f"listening on {host!r}, beyond this machine, without an API key: anyone who reaches the port can use "
            f"the model (set {API_KEY_ENV} or --api-key, or bind 127.0.0.1 behind an authenticating proxy)"
        ]
    return []


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
        max_document_bytes=args.max_document_bytes,
        body_timeout=args.body_timeout,
    )
    return ServerState(
        agent,
        model_name=name,
        batch_size=args.batch_size,
        max_queue=args.max_queue,
        limits=limits,
        model_path=os.path.abspath(args.model),
        api_key=api_key(args),
    )


def describe(state, host: str, port: int) -> list[str]:
    """The start-up log lines."""
    b, s = state.agent.budgets, state.sampling
    return [
        f"model {state.model_name!r} from {state.model_path}",
        f"budgets: question {b.question_tokens}, chunk {b.chunk_tokens}, memory {b.memory_tokens}, answer "
        f"{b.answer_tokens}, {b.chunks_per_segment} chunks per segment; sampling temperature={s.temperature} "
        f"top_p={s.top_p} top_k={s.top_k}",
        f"{state.engine_loop.batch_size} row slots, queue {state.engine_loop.capacity - state.engine_loop.batch_size}, "
        f"max document {state.limits.max_document_tokens or 'unlimited'} tokens / "
        f"{state.limits.document_bytes() or 'unlimited'} bytes, timeout {state.limits.request_timeout:g} s "
        f"(request body {state.limits.body_timeout:g} s); API key {'required' if state.api_key else 'none'}",
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
    for line in startup_warnings(args.host, state.api_key):
        log.warning(line)
    config = uvicorn.Config(
        create_app(state), host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=10
    )
    server = uvicorn.Server(config)
    server.run()  # SIGINT / SIGTERM: stop accepting, finish the lifespan (the engine loop stops), return
    return 0 if server.started else 1


if __name__ == "__main__":
    raise SystemExit(main())
