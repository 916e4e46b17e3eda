"""The HTTP side: a FastAPI app over one `EngineLoop` (see `memagent_jax.serve` for the API).

Every `/v1` route first checks the API key (`--api-key`; `_ApiKeyMiddleware`). Handlers read the body under a time
limit (408), parse and check the request (`serve.protocol`), refuse texts over the byte bounds derived from the
token limits before any tokenizing (413 / 400), tokenize in a worker pool off the event loop, admit a `Job` to the
engine loop and wait for its events on an asyncio queue that the engine thread fills with
`loop.call_soon_threadsafe`. While waiting they watch the client (a disconnect cancels the row) and the request
timeout (504, and the row is cancelled); the timeout also covers the time spent tokenizing.

Tokenizing: requests whose question + document are under `large_text_chars` characters go to one pool, larger ones
to another, so however many large documents are being tokenized, a small request never waits behind them. The
tokenizer is shared by the pool threads: the server always calls it with the same settings (no special tokens, no
truncation or padding), so the Rust backend is never mutated, and its encode releases the GIL.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import hmac
import logging
import time
import uuid

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from memagent_jax.serve import protocol
from memagent_jax.serve.engine_loop import EngineLoop, Event, Job, QueueFull
from memagent_jax.serve.metrics import Metrics
from memagent_jax.serve.protocol import RequestError

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a waiting handler checks its client and its deadline
# A safe ceiling on UTF-8 bytes per token: natural text in any language averages 1-6 bytes per token with BPE
# vocabularies, so a text over (token limit) x 16 bytes is refused before it is tokenized (only texts of long runs
# of one repeated character average more: raise --max-document-bytes for those).
BYTES_PER_TOKEN_CEILING = 16
LARGE_TEXT_CHARS = 256 * 1024  # question + document characters from which a request is tokenized in the large pool
SMALL_POOL_THREADS = 2  # small requests and decoding
LARGE_POOL_THREADS = 2  # large documents
ENDPOINTS = ("/v1/chat/completions", "/v1/memagent/answer", "/v1/models", "/health", "/metrics")


@dataclasses.dataclass
class ServeLimits:
    """Request limits (CLI flags of `memagent serve`)."""

    max_document_tokens: int = 1_048_576  # longer documents: 413
    max_body_bytes: int = 32 * 2**20  # larger request bodies: 413
    request_timeout: float = 600.0  # seconds from arrival to answer: 504 (the row is cancelled)
    retry_after: int = 1  # Retry-After seconds of a 429
    # Larger documents (UTF-8 bytes): 413 before tokenizing. None: max_document_tokens x BYTES_PER_TOKEN_CEILING;
    # 0: no byte bound.
    max_document_bytes: int | None = None
    body_timeout: float = 30.0  # seconds to receive the whole request body: 408

    def document_bytes(self) -> int:
        """The byte bound on a document (0 = none)."""
        if self.max_document_bytes is not None:
            return self.max_document_bytes
        return self.max_document_tokens * BYTES_PER_TOKEN_CEILING


def utf8_length_over(text: str, limit: int) -> int | None:
    """The UTF-8 length of `text` when it is over `limit` bytes, else None; O(1) when the character count decides
    (a character is 1 to 4 bytes)."""
    n = len(text)
    if n > limit:
        return n if text.isascii() else len(text.encode("utf-8"))
    if 4 * n <= limit or text.isascii():
        return None
    size = len(text.encode("utf-8"))
    return size if size > limit else None


class ServerState:
    """Everything a running server holds: the agent, its engine loop, limits, metrics."""

    def __init__(
        self,
        agent,
        *,
        model_name: str,
        batch_size: int = 8,
        max_queue: int = 256,
        limits: ServeLimits | None = None,
        model_path: str = "",
        api_key: str | None = None,
        large_text_chars: int = LARGE_TEXT_CHARS,
    ):
        self.agent = agent
        self.model_name = model_name
        self.model_path = model_path
        self.limits = limits or ServeLimits()
        self.api_key = api_key  # None: /v1 is open (read at every request)
        self.large_text_chars = large_text_chars
        self.tokenizing = 0  # requests being tokenized or waiting for a tokenizer thread (event-loop thread only)
        self.metrics = Metrics()
        self.engine_loop = EngineLoop(agent, batch_size=batch_size, max_queue=max_queue, metrics=self.metrics)
        s = agent.spec.answer_sampling
        self.sampling = protocol.Sampling(temperature=float(s.temperature), top_p=float(s.top_p), top_k=int(s.top_k))
        self.stop_ids = set(int(t) for t in s.stop_token_ids)
        self.extract = agent.extract  # how the answer is taken from a response (a `verifier.EXTRACTORS` rule)
        self._small_pool = concurrent.futures.ThreadPoolExecutor(SMALL_POOL_THREADS, thread_name_prefix="memagent-tok")
        self._large_pool = concurrent.futures.ThreadPoolExecutor(
            LARGE_POOL_THREADS, thread_name_prefix="memagent-tok-large"
        )
        self.created = int(time.time())

    def start(self) -> ServerState:
        self.engine_loop.start()
        return self

    def close(self) -> None:
        self.engine_loop.stop()
        self._small_pool.shutdown(wait=False, cancel_futures=True)
        self._large_pool.shutdown(wait=False, cancel_futures=True)
        log.info("engine loop stopped after %d documents", self.metrics.documents_total)

    @property
    def ready(self) -> bool:
        return self.engine_loop.ready.is_set() and self.engine_loop.startup_error is None

    # ------------------------------------------------------------------------------ host work

    def _tokenize(self, parsed: protocol.ParsedRequest):
        from memagent_jax.agent.chunking import AgentInputError, centre_truncate, prepare_question, tokenize_document

        agent = self.agent
        try:
            q_ids = prepare_question(agent.tokenizer, parsed.question, agent.budgets, source=parsed.question_field)
        except AgentInputError as e:
            raise RequestError(400, str(e), param=parsed.question_field.split(" ")[0]) from None
        try:
            d_ids = tokenize_document(agent.tokenizer, parsed.document, source=parsed.document_field)
        except AgentInputError as e:
            raise RequestError(400, str(e), param=parsed.document_field.split(" ")[0]) from None
        limit = self.limits.max_document_tokens
        if limit and d_ids.size > limit:
            raise RequestError(
                413,
                f"{parsed.document_field}: the document has {d_ids.size} tokens, over this "
                f"server's limit of {limit} (memagent serve --max-document-tokens)",
                param=parsed.document_field.split(" ")[0],
                code="document_too_long",
            )
        return q_ids, centre_truncate(d_ids, agent.budgets.max_document_tokens)

    def request_sampling(self, parsed: protocol.ParsedRequest):
        """The request's `SamplingParams` for its memory updates and its answer: the agent's answer sampling with
        the fields the request sent replaced; None when it sent none (the agent's memory / answer sampling)."""
        if not parsed.sampling:
            return None
        return self.agent.spec.answer_sampling.replace(**parsed.sampling)

    def check_sizes(self, parsed: protocol.ParsedRequest) -> None:
        """Refuses a document or question over its byte bound, before any tokenizing (see BYTES_PER_TOKEN_CEILING)."""
        limit = self.limits.document_bytes()
        size = utf8_length_over(parsed.document, limit) if limit else None
        if size is not None:
            raise RequestError(
                413,
                f"{parsed.document_field}: the document has {size} bytes, over this server's limit of {limit} "
                f"(memagent serve --max-document-bytes; by default --max-document-tokens x "
                f"{BYTES_PER_TOKEN_CEILING})",
                param=parsed.document_field.split(" ")[0],
                code="document_too_long",
            )
        budget = self.agent.budgets.question_tokens
        size = utf8_length_over(parsed.question, budget * BYTES_PER_TOKEN_CEILING)
        if size is not None:
            raise RequestError(
                400,
                f"{parsed.question_field}: the question has {size} bytes, more than {BYTES_PER_TOKEN_CEILING} per "
                f"token of its budget of {budget} tokens (budgets.question_tokens)",
                param=parsed.question_field.split(" ")[0],
            )

    async def tokenize(self, parsed, deadline: float):
        """(question ids, document ids) from a pool thread; 504 past `deadline` (time.monotonic)."""
        large = len(parsed.question) + len(parsed.document) >= self.large_text_chars
        pool = self._large_pool if large else self._small_pool
        future = asyncio.get_running_loop().run_in_executor(pool, self._tokenize, parsed)
        self.tokenizing += 1
        try:
            return await asyncio.wait_for(future, timeout=max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            raise _timeout_error(self, "while its text was being tokenized") from None
        finally:
            self.tokenizing -= 1

    def answer_text(self, ids) -> str:
        return self.agent.tokenizer.decode([t for t in ids if t not in self.stop_ids], skip_special_tokens=True)

    def response_and_answer(self, ids) -> tuple[str, str | None]:
        """(the response text of answer ids, the answer the agent's extraction rule takes from it, None if none):
        what `MemoryAgent.run` gives as `answers` / `predictions`."""
        from memagent_jax.evaluation.verifier import readable_answer

        text = self.answer_text(ids)
        return text, readable_answer(text, self.extract)

    def trace_texts(self, memories) -> list[str]:
        return [self.agent.tokenizer.decode(np.asarray(m).tolist(), skip_special_tokens=True) for m in memories or []]

    async def decode(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._small_pool, fn, *args)


def _timeout_error(state: ServerState, when: str) -> RequestError:
    return RequestError(
        504,
        f"the request took longer than this server's timeout of {state.limits.request_timeout:g} s "
        f"(memagent serve --request-timeout); {when}",
        type="timeout",
        code="request_timeout",
    )


class _Waiter:
    """One admitted job's side of the handler: its event queue, deadline and cancellation."""

    def __init__(self, state: ServerState, job_id: str, deadline: float):
        self.state = state
        self.job_id = job_id
        self.deadline = deadline
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.deliver = lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, event)
        self.done = False
        self._checked = time.monotonic()

    def cancel(self, reason: str) -> None:
        if not self.done:
            self.done = True
            self.state.engine_loop.cancel(self.job_id, reason)

    async def next_event(self, request) -> Event:
        """The next event; RequestError 504 past the deadline; `ClientGone` when the client left (the row is
        cancelled in both cases)."""
        while True:
            left = self.deadline - time.monotonic()
            if left <= 0:
                self.cancel("timeout")
                raise _timeout_error(self.state, "its row was cancelled")
            now = time.monotonic()
            if request is not None and now - self._checked >= POLL_S:  # also while events keep coming
                self._checked = now
                if await request.is_disconnected():
                    self.cancel("disconnect")
                    raise ClientGone()
            try:
                event = await asyncio.wait_for(self.queue.get(), timeout=min(POLL_S, left))
            except TimeoutError:
                continue
            if event.kind in ("result", "error"):
                self.done = True
            return event


class ClientGone(Exception):
    """The client disconnected while its request was running."""


def _error_response(error: RequestError):
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _read_json(request, state: ServerState) -> dict:
    limit = state.limits.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise RequestError(
            413,
            f"the request body has {int(length)} bytes, over this server's limit of {limit} "
            "(memagent serve --max-body-bytes)",
            code="body_too_large",
        )
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    seconds = state.limits.body_timeout
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(
                        413,
                        f"the request body is over this server's limit of {limit} bytes "
                        "(memagent serve --max-body-bytes)",
                        code="body_too_large",
                    )
                chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone() from None
    except TimeoutError:
        raise RequestError(
            408,
            f"the request body did not arrive within {seconds:g} s ({size} bytes received; "
            "memagent serve --body-timeout)",
            code="body_timeout",
            headers={"Connection": "close"},
        ) from None
    return protocol.parse_json(b"".join(chunks))


async def _admit(state: ServerState, parsed: protocol.ParsedRequest, t0: float):
    """Tokenizes and admits a request; returns (waiter, question ids, document ids)."""
    state.check_sizes(parsed)
    if state.engine_loop.startup_error is not None:
        raise RequestError(503, f"the engine failed to start: {state.engine_loop.startup_error}", type="server_error")
    loop = state.engine_loop
    # Early: a flood is refused before its documents are tokenized (requests being tokenized count as outstanding).
    if loop.outstanding + state.tokenizing >= loop.capacity:
        raise _queue_full(
            state,
            f"{loop.outstanding + state.tokenizing} requests outstanding ({loop.batch_size} row slots + "
            f"{loop.capacity - loop.batch_size} queued, --max-queue)",
        )
    q_ids, d_ids = await state.tokenize(parsed, t0 + state.limits.request_timeout)
    job_id = uuid.uuid4().hex
    waiter = _Waiter(state, job_id, t0 + state.limits.request_timeout)
    job = Job(
        id=job_id,
        question_ids=q_ids,
        document_ids=d_ids,
        seed=parsed.seed,
        deliver=waiter.deliver,
        trace=parsed.trace,
        sampling=state.request_sampling(parsed),
    )
    try:
        state.engine_loop.admit(job)
    except QueueFull as e:
        raise _queue_full(state, str(e)) from None
    return waiter, q_ids, d_ids


def _queue_full(state: ServerState, why: str) -> RequestError:
    return RequestError(
        429,
        f"the server is full: {why}; retry later",
        type="rate_limit_error",
        code="queue_full",
        headers={"Retry-After": str(state.limits.retry_after)},
    )


async def _wait_result(waiter: _Waiter, request):
    while True:
        event = await waiter.next_event(request)
        if event.kind == "result":
            return event.result
        if event.kind == "error":
            raise RequestError(
                event.status, event.message, type="invalid_request_error" if event.status < 500 else "server_error"
            )


def _check_finite(result) -> None:
    if result.nonfinite:
        from memagent_jax.evaluation.answering import NONFINITE_MESSAGE

        raise RequestError(500, NONFINITE_MESSAGE, type="server_error", code="nonfinite_logits")


def _answer_of(state: ServerState, result, max_tokens: int | None):
    """(answer ids, finish_reason) with an optional cap on the answer's tokens (sampling is autoregressive: the
    first n tokens are what a budget of n would have sampled)."""
    ids = list(result.answer_ids)
    if max_tokens is not None and len(ids) > max_tokens:
        return ids[:max_tokens], "length"
    return ids, "stop" if result.finished else "length"


def endpoint_label(path: str) -> str:
    """The metrics label of a request path: a route of this server, else "other" (labels stay few)."""
    return path if path in ENDPOINTS else "other"


def _bearer_token(headers) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header (ASGI raw headers), else None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


class _ApiKeyMiddleware:
    """401 for a `/v1` request without `Authorization: Bearer <the server's key>` (when the server has a key).
    Plain ASGI (the body and disconnects of authorized requests pass untouched); the tokens are compared as SHA-256
    digests with `hmac.compare_digest` (constant time, whatever their lengths)."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        key = self.state.api_key
        if key and scope["type"] == "http" and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            token = _bearer_token(scope.get("headers", ()))
            given = hashlib.sha256(token or b"").digest()
            if token is None or not hmac.compare_digest(given, hashlib.sha256(key.encode()).digest()):
                why = (
                    "no API key: send the header 'Authorization: Bearer <key>'"
                    if token is None
                    else "incorrect API key"
                )
                error = RequestError(
                    401,
                    f"{why} (this server's key: memagent serve --api-key or MEMAGENT_API_KEY)",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                self.state.metrics.request(endpoint_label(scope["path"]), 401)
                await _error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(state: ServerState, *, manage_state: bool = True):
    """The FastAPI app. manage_state: start the engine loop on startup and stop it on shutdown."""
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if manage_state:
            state.start()
        try:
            yield
        finally:
            if manage_state:
                state.close()

    app = FastAPI(title="memagent-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.memagent = state
    app.add_middleware(_ApiKeyMiddleware, state=state)
    metrics = state.metrics

    def record(endpoint: str, status: int, t0: float):
        metrics.request(endpoint, status, time.monotonic() - t0)

    def failed(endpoint: str, t0: float, error: Exception):
        """The response to a request that ended in `RequestError` (its 4xx/5xx) or `ClientGone` (499), recorded."""
        if isinstance(error, ClientGone):
            record(endpoint, 499, t0)
            return JSONResponse({}, status_code=499)
        record(endpoint, error.status, t0)
        return _error_response(error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # the server never crashes on a request
        log.exception("unexpected error in %s", request.url.path)
        metrics.request(endpoint_label(request.url.path), 500)
        return JSONResponse(
            {
                "error": {
                    "message": f"internal error: {type(exc).__name__}: {exc}",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            },
            status_code=500,
        )

    @app.get("/health")
    async def health():
        loop = state.engine_loop
        if loop.startup_error is not None:
            return JSONResponse({"status": "error", "error": str(loop.startup_error)}, status_code=503)
        if not loop.ready.is_set():
            return JSONResponse({"status": "warming_up"}, status_code=503)
        return {
            "status": "ok",
            "model": state.model_name,
            "row_slots": loop.batch_size,
            "reading": loop.reading,
            "queued": loop.queue_depth,
        }

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": state.model_name, "object": "model", "created": state.created, "owned_by": "memagent-jax"}],
        }

    @app.get("/metrics")
    async def metrics_page():
        loop = state.engine_loop
        return PlainTextResponse(
            metrics.render(
                queue_depth=loop.queue_depth,
                reading=loop.reading,
                slots=loop.batch_size,
                ready=state.ready,
                model=state.model_name,
            ),
            media_type="text/plain; version=0.0.4",
        )

    @app.post("/v1/memagent/answer")
    async def answer(request: Request):
        endpoint, t0 = "/v1/memagent/answer", time.monotonic()
        waiter = None
        try:
            parsed = protocol.parse_answer(await _read_json(request, state), sampling=state.sampling)
            waiter, q_ids, d_ids = await _admit(state, parsed, t0)
            result = await _wait_result(waiter, request)
            _check_finite(result)
            text, prediction = await state.decode(state.response_and_answer, result.answer_ids)
            body = {
                "id": waiter.job_id,
                "model": state.model_name,
                "answer": prediction,
                "response": text,
                "finished": result.finished,
                "num_chunks": result.num_chunks,
                "question_tokens": int(q_ids.size),
                "document_tokens": int(d_ids.size),
                "answer_tokens": len(result.answer_ids),
                "seed": parsed.seed,
            }
            if parsed.trace:
                body["trace"] = await state.decode(state.trace_texts, result.memories)
            body["timings"] = {
                "queued_s": round(result.started_at - result.submitted_at, 6),
                "reading_s": round(result.finished_at - result.started_at, 6),
                "total_s": round(time.monotonic() - t0, 6),
            }
            record(endpoint, 200, t0)
            return body
        except (RequestError, ClientGone) as e:
            return failed(endpoint, t0, e)
        finally:
            if waiter is not None and not waiter.done:
                waiter.cancel("aborted")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        endpoint, t0 = "/v1/chat/completions", time.monotonic()
        waiter = None
        try:
            parsed = protocol.parse_chat(
                await _read_json(request, state), model_name=state.model_name, sampling=state.sampling
            )
            waiter, q_ids, d_ids = await _admit(state, parsed, t0)
        except (RequestError, ClientGone) as e:
            return failed(endpoint, t0, e)
        prompt_tokens = int(q_ids.size + d_ids.size)
        if parsed.stream:
            return StreamingResponse(
                _stream(state, waiter, parsed, prompt_tokens, request, t0),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            result = await _wait_result(waiter, request)
            _check_finite(result)
            ids, finish = _answer_of(state, result, parsed.max_tokens)
            text, prediction = await state.decode(state.response_and_answer, ids)
            record(endpoint, 200, t0)
            return protocol.chat_completion(
                request_id=f"chatcmpl-{waiter.job_id[:24]}",
                model=state.model_name,
                content=text,
                finish_reason=finish,
                prompt_tokens=prompt_tokens,
                completion_tokens=len(ids),
                extra={
                    "memagent": {
                        "answer": prediction,
                        "num_chunks": result.num_chunks,
                        "document_tokens": int(d_ids.size),
                        "seed": parsed.seed,
                    }
                },
            )
        except (RequestError, ClientGone) as e:
            return failed(endpoint, t0, e)
        finally:
            if not waiter.done:
                waiter.cancel("aborted")

    return app


async def _stream(state: ServerState, waiter: _Waiter, parsed, prompt_tokens: int, request, t0: float):
    """The server-sent events of a streamed chat completion (see the package docstring)."""
    endpoint = "/v1/chat/completions"
    rid, created, model = f"chatcmpl-{waiter.job_id[:24]}", int(time.time()), state.model_name

    def chunk(**kw) -> bytes:
        return protocol.sse(protocol.chat_chunk(request_id=rid, model=model, created=created, **kw))

    status = 200
    try:
        yield chunk(delta={"role": "assistant", "content": ""})
        while True:
            # No disconnect polling here: Starlette cancels this generator when the client leaves.
            event = await waiter.next_event(None)
            if event.kind == "progress":
                yield chunk(
                    extra={"memagent_progress": {"chunks_read": event.chunks_read, "num_chunks": event.num_chunks}}
                )
            elif event.kind == "error":
                raise RequestError(
                    event.status, event.message, type="invalid_request_error" if event.status < 500 else "server_error"
                )
            else:
                result = event.result
                _check_finite(result)
                ids, finish = _answer_of(state, result, parsed.max_tokens)
                text, prediction = await state.decode(state.response_and_answer, ids)
                if text:
                    yield chunk(delta={"content": text})
                yield chunk(
                    finish_reason=finish,
                    extra={
                        "memagent_progress": {"chunks_read": result.num_chunks, "num_chunks": result.num_chunks},
                        "memagent": {"answer": prediction},
                    },
                )
                if parsed.include_usage:
                    yield chunk(
                        choices=False,
                        usage={
                            "prompt_tokens": prompt_tokens,
                            "completion_tokens": len(ids),
                            "total_tokens": prompt_tokens + len(ids),
                        },
                    )
                yield protocol.sse("[DONE]")
                return
    except RequestError as e:
        status = e.status
        body = e.body()
        body["error"]["status"] = e.status
        yield protocol.sse(body)
        yield protocol.sse("[DONE]")
    except (asyncio.CancelledError, GeneratorExit):
        status = 499
        raise
    finally:
        if not waiter.done:
            waiter.cancel("disconnect")
        state.metrics.request(endpoint, status, time.monotonic() - t0)
