"""The HTTP server (memagent_jax.serve) live on 127.0.0.1: the official openai client and plain HTTP against a tiny
random model; answers equal `MemoryAgent.run` with the same seeds; a 64-request load test; limits and bad input."""

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import uvicorn

from hf_tiny import make_agent_model_dir
from memagent_jax.agent import AgentBudgets, AgentTemplates, MemoryAgent, write_agent_settings
from memagent_jax.sampling.api import row_keys
from memagent_jax.serve import protocol
from memagent_jax.serve.app import ServeLimits, ServerState, create_app
from memagent_jax.serve.metrics import parse as parse_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGETS = AgentBudgets(question_tokens=24, chunk_tokens=16, memory_tokens=12, answer_tokens=6, chunks_per_segment=2)
WORDS = (
    "the key is under red stone river mill old letter ferry left north city code number seven blue garden "
    "wrote house bridge morning night door table window green"
).split()
QUESTIONS = ["Where is the key?", "Which river flows past the old mill?", "What is the code?", "Who wrote it?"]
SEP = protocol.DOCUMENT_SEPARATOR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def words(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n))


class LiveServer:
    """uvicorn serving `state` in a background thread; ready when /health says ok."""

    def __init__(self, state: ServerState, timeout: float = 600.0):
        self.state = state
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(state), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + timeout
        while True:
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                if r.status_code == 200:
                    break
                assert r.json()["status"] == "warming_up"
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not become healthy"
            time.sleep(0.2)

    def metrics(self) -> dict:
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text)

    def close(self):
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = make_agent_model_dir(tmp_path_factory.mktemp("serve") / "tiny-agent", seed=5, vocab_size=400)
    write_agent_settings(folder, budgets=BUDGETS, templates=AgentTemplates(), temperature=0.9, top_p=0.95)
    return folder


@pytest.fixture(scope="module")
def agent(model_dir):
    return MemoryAgent.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def live(agent):
    state = ServerState(
        agent,
        model_name="tiny-agent",
        batch_size=8,
        max_queue=200,
        limits=ServeLimits(max_document_tokens=4000, max_body_bytes=400_000, request_timeout=120),
    )
    server = LiveServer(state)
    yield server
    server.close()


@pytest.fixture(scope="module")
def small(agent, live):
    """A second server over the same agent (same shapes: nothing compiles again) with small limits."""
    state = ServerState(
        agent,
        model_name="tiny-agent",
        batch_size=8,
        max_queue=2,
        limits=ServeLimits(max_document_tokens=10_000, max_body_bytes=20_000, request_timeout=120),
    )
    server = LiveServer(state)
    yield server
    server.close()


def expected(agent, questions, docs, seeds, trace=False):
    keys = jnp.stack([row_keys(int(s), 1)[0] for s in seeds])
    return agent.run(questions, docs, rng=keys, trace=trace, batch_size=8)


def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=120)


# ------------------------------------------------------------------------------------------- basics


def test_separator_and_documents_rules():
    """The documented split: question above the first <<<DOCUMENT>>> line (stripped), document below (verbatim)."""
    split = protocol.split_question_document
    assert split(f"  Who?  \n{SEP}\n  body\n{SEP}\nmore\n") == ("Who?", f"  body\n{SEP}\nmore\n")
    assert split(f"Q\n  {SEP}  \nD") == ("Q", "D")
    assert split(f"Q {SEP} D") is None  # the marker must be a line of its own
    sampling = protocol.Sampling(temperature=0.9, top_p=0.95)
    parsed = protocol.parse_chat(
        {
            "model": "m",
            "seed": 3,
            "documents": ["a", "b"],
            "messages": [
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "x"},
                {"role": "user", "content": " Q? "},
            ],
        },
        model_name="m",
        sampling=sampling,
    )
    assert (parsed.question, parsed.document, parsed.seed) == ("Q?", "a\n\nb", 3)
    with pytest.raises(protocol.RequestError, match="'seed' must be an integer"):
        protocol.parse_answer({"question": "q", "document": "d", "seed": 1.5}, sampling=sampling)
    with pytest.raises(protocol.RequestError, match="exactly one of 'document'"):
        protocol.parse_answer({"question": "q", "document": "d", "documents": ["e"]}, sampling=sampling)


def test_health_says_warming_up_until_the_engine_is_warm(agent):
    state = ServerState(agent, model_name="tiny-agent", batch_size=8)  # engine loop not started

    async def get(path):
        transport = httpx.ASGITransport(app=create_app(state, manage_state=False))
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            return await http.get(path)

    r = asyncio.run(get("/health"))
    assert r.status_code == 503 and r.json() == {"status": "warming_up"}
    assert 'memagent_up{model="tiny-agent"} 0' in asyncio.run(get("/metrics")).text


def test_health_models_and_metrics(live):
    r = httpx.get(live.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["row_slots"] == 8
    models = client(live).models.list()
    assert [m.id for m in models.data] == ["tiny-agent"]
    page = httpx.get(live.url + "/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    m = parse_metrics(page.text)
    assert m['memagent_up{model="tiny-agent"}'] == 1
    for name in (
        "memagent_queue_depth",
        "memagent_rows_reading",
        "memagent_document_tokens_total",
        "memagent_document_tokens_per_second",
        "memagent_row_slots",
    ):
        assert name in m


def test_chat_completions_equal_memory_agent_run(live, agent):
    """Separator and `documents` forms, several seeds: the same answers as MemoryAgent.run([q], [doc], rng=seed),
    the single-document CLI path (batch-1 programs; on this tiny model its float32 sums agree with the server's
    batch-8 programs; the other tests compare with the same shapes, which is exact by construction)."""
    doc_a, doc_b = words(60, 1), words(130, 2)
    api = client(live)
    for seed, question, doc in ((0, QUESTIONS[0], doc_a), (7, QUESTIONS[1], doc_b), (123, QUESTIONS[1], doc_b)):
        want = agent.run([question], [doc], rng=seed)
        out = api.chat.completions.create(
            model="tiny-agent",
            seed=seed,
            messages=[
                {"role": "system", "content": "ignored"},
                {"role": "user", "content": f"{question}\n{SEP}\n{doc}"},
            ],
        )
        assert out.object == "chat.completion"
        assert out.choices[0].message.content == want.answers[0]
        assert out.choices[0].finish_reason == ("stop" if want.finished[0] else "length")
        q_ids, d_ids = agent.prepare(question, doc)
        assert out.usage.prompt_tokens == q_ids.size + d_ids.size
        assert out.usage.completion_tokens == len(want.answer_ids[0])
        assert out.model_extra["memagent"]["num_chunks"] == want.num_chunks[0]
    # `documents`: joined with a blank line; the whole message is the question.
    parts = [words(20, 3), words(35, 4)]
    want = agent.run([QUESTIONS[2]], [protocol.DOCUMENTS_JOINER.join(parts)], rng=5)
    out = api.chat.completions.create(
        model="tiny-agent",
        seed=5,
        temperature=0.9,
        top_p=0.95,
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTIONS[2]}]}],
        extra_body={"documents": parts},
    )
    assert out.choices[0].message.content == want.answers[0]
    # max_tokens caps the answer: its first tokens, finish_reason "length".
    full = agent.run([QUESTIONS[0]], [doc_a], rng=0)
    capped = api.chat.completions.create(
        model="tiny-agent",
        seed=0,
        max_tokens=2,
        messages=[{"role": "user", "content": f"{QUESTIONS[0]}\n{SEP}\n{doc_a}"}],
    )
    stops = set(agent.spec.answer_sampling.stop_token_ids)
    assert capped.usage.completion_tokens == min(2, len(full.answer_ids[0]))
    assert capped.choices[0].message.content == agent.tokenizer.decode(
        [t for t in full.answer_ids[0][:2] if t not in stops], skip_special_tokens=True
    )


def test_streaming_progress_then_answer(live, agent):
    doc = words(150, 6)
    want = agent.run([QUESTIONS[3]], [doc], rng=11)
    stream = client(live).chat.completions.create(
        model="tiny-agent",
        seed=11,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": f"{QUESTIONS[3]}\n{SEP}\n{doc}"}],
    )
    progress, content, finish, usage = [], "", None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        extra = chunk.model_extra.get("memagent_progress")
        if extra and not (chunk.choices and chunk.choices[0].finish_reason):
            progress.append((extra["chunks_read"], extra["num_chunks"]))
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    n = want.num_chunks[0]
    assert n >= 6 and progress == [(min(k, n), n) for k in range(2, n + 2, 2)]  # one event per segment of 2
    assert content == want.answers[0]
    assert finish == ("stop" if want.finished[0] else "length")
    assert usage.completion_tokens == len(want.answer_ids[0])
    # The raw wire format: data: lines, [DONE] last.
    with httpx.stream(
        "POST",
        live.url + "/v1/chat/completions",
        json={
            "model": "tiny-agent",
            "stream": True,
            "seed": 11,
            "messages": [{"role": "user", "content": f"{QUESTIONS[3]}\n{SEP}\n{doc}"}],
        },
        timeout=120,
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_answer_endpoint_with_trace(live, agent):
    parts = [words(40, 7), words(50, 8)]
    want = agent.run([QUESTIONS[0]], [protocol.DOCUMENTS_JOINER.join(parts)], rng=3, trace=True)
    r = httpx.post(
        live.url + "/v1/memagent/answer",
        json={"question": QUESTIONS[0], "documents": parts, "seed": 3, "trace": True, "temperature": 0.9},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["response"] == want.answers[0] and body["finished"] == want.finished[0]
    assert body["num_chunks"] == want.num_chunks[0] and body["trace"] == want.traces[0]
    assert body["document_tokens"] == agent.prepare(QUESTIONS[0], protocol.DOCUMENTS_JOINER.join(parts))[1].size
    t = body["timings"]
    assert 0 <= t["queued_s"] and 0 < t["reading_s"] <= t["total_s"]
    r = httpx.post(live.url + "/v1/memagent/answer", json={"question": QUESTIONS[0], "document": parts[0]}, timeout=120)
    assert r.status_code == 200 and "trace" not in r.json()
    assert r.json()["response"] == agent.run([QUESTIONS[0]], [parts[0]], rng=0).answers[0]  # seed defaults to 0


# ------------------------------------------------------------------------------------------- load


def test_load_64_concurrent_mixed_lengths_no_compile(live, agent):
    """64 concurrent requests of 1..16 chunks: none lost, none twice, each equal to its single-request answer; no
    program compiles while serving them."""
    n = 64
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 160, n)  # ~1..16 chunks of 16 tokens
    docs = [words(int(k), 100 + i) for i, k in enumerate(lengths)]
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    seeds = [1000 + 7 * i for i in range(n)]
    want = expected(agent, questions, docs, seeds)
    assert min(want.num_chunks) <= 2 and max(want.num_chunks) >= 12
    before = live.metrics()
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None  # noqa
    jax.monitoring.register_event_duration_secs_listener(listener)

    async def one(http, i):
        if i % 2:
            r = await http.post(
                "/v1/memagent/answer", json={"question": questions[i], "document": docs[i], "seed": seeds[i]}
            )
            return i, r.status_code, r.json()["response"]
        r = await http.post(
            "/v1/chat/completions",
            json={
                "model": "tiny-agent",
                "seed": seeds[i],
                "messages": [{"role": "user", "content": f"{questions[i]}\n{SEP}\n{docs[i]}"}],
            },
        )
        return i, r.status_code, r.json()["choices"][0]["message"]["content"]

    async def all_of_them():
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=live.url, timeout=300, limits=limits) as http:
            return await asyncio.gather(*(one(http, i) for i in range(n)))

    try:
        results = asyncio.run(all_of_them())
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert sorted(i for i, _, _ in results) == list(range(n))
    assert all(status == 200 for _, status, _ in results)
    assert [text for _, _, text in sorted(results)] == want.answers
    assert compiles == []
    after = live.metrics()
    assert after["memagent_documents_total"] - before["memagent_documents_total"] == n  # none answered twice
    tokens = sum(agent.prepare(q, d)[1].size for q, d in zip(questions, docs))
    assert after["memagent_document_tokens_total"] - before["memagent_document_tokens_total"] == tokens
    assert after["memagent_rows_reading"] == 0 and after["memagent_queue_depth"] == 0
    done = 'memagent_requests_total{endpoint="/v1/memagent/answer",status="200"}'
    assert after[done] - before.get(done, 0) == n // 2


def test_queue_full_answers_429_with_retry_after(small, agent):
    n = 24
    docs = [words(300, 200 + i) for i in range(n)]  # long: the first 10 (8 slots + queue 2) are still running

    async def flood():
        async with httpx.AsyncClient(base_url=small.url, timeout=300, limits=httpx.Limits(max_connections=n)) as http:
            return await asyncio.gather(
                *(
                    http.post("/v1/memagent/answer", json={"question": QUESTIONS[0], "document": docs[i], "seed": i})
                    for i in range(n)
                )
            )

    responses = asyncio.run(flood())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 10, codes
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"].isdigit() and "--max-queue" in r.json()["error"]["message"]
    ok = [i for i, r in enumerate(responses) if r.status_code == 200]
    want = expected(agent, [QUESTIONS[0]] * len(ok), [docs[i] for i in ok], ok)
    assert [responses[i].json()["response"] for i in ok] == want.answers
    assert small.metrics()["memagent_queue_depth"] == 0


# ------------------------------------------------------------------------------------------- bad input


def _error(r, status, *needles):
    assert r.status_code == status, (r.status_code, r.text)
    message = r.json()["error"]["message"]
    for needle in needles:
        assert needle in message, message
    return r.json()["error"]


def test_bad_requests_get_clear_4xx_and_the_server_goes_on(live, small, agent):
    url = live.url
    post = lambda path, **kw: httpx.post(url + path, timeout=60, **kw)  # noqa: E731
    _error(post("/v1/memagent/answer", content=b"{not json"), 400, "not valid JSON")
    _error(post("/v1/memagent/answer", content=b"[1, 2]"), 400, "JSON object")
    assert (
        _error(post("/v1/memagent/answer", json={"document": "x"}), 400, "'question' is missing")["param"] == "question"
    )
    _error(post("/v1/memagent/answer", json={"question": 3, "document": "x"}), 400, "'question' must be a string")
    _error(post("/v1/memagent/answer", json={"question": "q?"}), 400, "'document'")
    _error(post("/v1/memagent/answer", json={"question": "q?", "document": ""}), 400, "document is empty")
    _error(post("/v1/memagent/answer", json={"question": "  ", "document": "abc"}), 400, "question is empty")
    _error(post("/v1/memagent/answer", json={"question": "q?", "documents": "abc"}), 400, "array of strings")
    _error(post("/v1/memagent/answer", json={"question": "q?", "document": "a", "seed": "x"}), 400, "'seed'")
    _error(post("/v1/memagent/answer", json={"question": "q?", "document": "a", "trace": 1}), 400, "'trace'")
    _error(
        post("/v1/memagent/answer", json={"question": "why " * 40, "document": "abc"}),
        400,
        "budgets.question_tokens",
        "over the budget of 24",
    )
    e = _error(post("/v1/memagent/answer", json={"question": "q?", "document": "a", "temperature": -0.2}), 400, ">= 0")
    assert e["param"] == "temperature"
    chat = lambda **body: post("/v1/chat/completions", json=dict({"model": "tiny-agent"}, **body))  # noqa: E731
    _error(chat(messages=[{"role": "user", "content": "no separator here"}]), 400, SEP, "documents")
    _error(chat(messages=[{"role": "system", "content": "x"}]), 400, "no user message")
    _error(chat(messages="hi"), 400, "'messages'")
    _error(chat(messages=[{"role": "user", "content": f"q?\n{SEP}\ndoc"}], top_p=1.5), 400, "'top_p'")
    _error(chat(messages=[{"role": "user", "content": f"q?\n{SEP}\ndoc"}], n=2), 400, "'n'")
    _error(chat(model="gpt-9", messages=[{"role": "user", "content": f"q?\n{SEP}\ndoc"}]), 404, "tiny-agent")
    _error(chat(messages=[{"role": "user", "content": f"q?\n{SEP}\ndoc"}], documents=["x"]), 400, "twice")
    # The openai client sees the same as an exception with the message.
    with pytest.raises(openai.BadRequestError, match="'temperature'"):
        client(live).chat.completions.create(
            model="tiny-agent", temperature=-1.0, messages=[{"role": "user", "content": f"q?\n{SEP}\ndoc"}]
        )
    # Limits of the small server: document tokens and body bytes -> 413.
    _error(
        httpx.post(small.url + "/v1/memagent/answer", json={"question": "q?", "document": words(8000, 1)}, timeout=60),
        413,
        "--max-body-bytes",
    )
    small.state.limits.max_document_tokens = 100
    small.state.limits.max_document_bytes = 0  # no byte bound: the token count decides
    try:
        _error(
            httpx.post(
                small.url + "/v1/memagent/answer", json={"question": "q?", "document": words(300, 1)}, timeout=60
            ),
            413,
            "--max-document-tokens",
            "limit of 100",
        )
    finally:
        small.state.limits.max_document_tokens = 10_000
        small.state.limits.max_document_bytes = None
    # Still serving, with the right answer.
    r = post("/v1/memagent/answer", json={"question": QUESTIONS[0], "document": "the key is here", "seed": 2})
    want = agent.run([QUESTIONS[0]], ["the key is here"], rng=2).answers[0]
    assert r.status_code == 200 and r.json()["response"] == want
    assert httpx.get(url + "/health").json()["status"] == "ok"
    m = live.metrics()
    assert m['memagent_requests_total{endpoint="/v1/memagent/answer",status="400"}'] >= 10


def _wait_for(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "condition not reached"
        time.sleep(0.1)


@contextlib.contextmanager
def engine_held(server):
    """Holds the server's engine through the loop's injection hook (`EngineLoop.call`): inside the block, once a row
    is reading, the engine thread waits before its next step, so the row stays in its slot however fast the machine
    reads. Leaving the block lets the engine go on; the hold is removed at the loop's next command."""
    gate, installed = threading.Event(), threading.Event()

    def install(loop):
        engine = loop.engine
        step = engine.step

        def held_step():
            if engine.reading:
                gate.wait(120)
            return step()

        engine.step = held_step
        installed.set()

    loop = server.state.engine_loop
    loop.call(install)
    assert installed.wait(60), "the engine thread did not take the hold"
    try:
        yield
    finally:
        gate.set()
        loop.call(lambda loop: vars(loop.engine).pop("step", None))


def _count(server, name: str) -> float:
    return server.metrics().get(name, 0)


def test_timeout_gives_504_and_frees_the_slot(small):
    cancelled = 'memagent_requests_cancelled_total{reason="timeout"}'
    before = _count(small, cancelled)
    small.state.limits.request_timeout = 1.0
    try:
        with engine_held(small):  # the row cannot be answered before its deadline
            t0 = time.time()
            r = httpx.post(
                small.url + "/v1/memagent/answer", json={"question": "q?", "document": words(2500, 9)}, timeout=60
            )
            _error(r, 504, "--request-timeout")
            assert time.time() - t0 < 10
            _wait_for(lambda: small.metrics()["memagent_rows_reading"] == 1)  # its slot stays taken while held
    finally:
        small.state.limits.request_timeout = 120
    _wait_for(lambda: small.metrics()["memagent_rows_reading"] == 0)
    assert _count(small, cancelled) == before + 1


def test_client_disconnect_frees_the_row(small):
    long_doc = words(2500, 10)
    cancelled = 'memagent_requests_cancelled_total{reason="disconnect"}'
    gone = 'memagent_requests_total{{endpoint="{}",status="499"}}'
    before = _count(small, cancelled)
    # Streaming: read until the first progress event, then hang up while the row is held in its slot.
    chat_gone = _count(small, gone.format("/v1/chat/completions"))
    with engine_held(small):
        with httpx.stream(
            "POST",
            small.url + "/v1/chat/completions",
            timeout=60,
            json={
                "model": "tiny-agent",
                "stream": True,
                "messages": [{"role": "user", "content": f"q?\n{SEP}\n{long_doc}"}],
            },
        ) as r:
            for line in r.iter_lines():
                if "memagent_progress" in line:
                    break
        _wait_for(lambda: small.metrics()["memagent_rows_reading"] == 1)
        _wait_for(lambda: _count(small, gone.format("/v1/chat/completions")) == chat_gone + 1)  # seen, cancelled
    _wait_for(lambda: small.metrics()["memagent_rows_reading"] == 0)
    assert _count(small, cancelled) == before + 1
    # Not streaming: the client gives up after a second and a half, while the row is held in its slot.
    answer_gone = _count(small, gone.format("/v1/memagent/answer"))
    with engine_held(small):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(small.url + "/v1/memagent/answer", json={"question": "q?", "document": long_doc}, timeout=1.5)
        _wait_for(lambda: _count(small, gone.format("/v1/memagent/answer")) == answer_gone + 1)
    _wait_for(lambda: small.metrics()["memagent_rows_reading"] == 0 and _count(small, cancelled) == before + 2)
    assert small.state.engine_loop.outstanding == 0


def test_engine_failure_fails_its_rows_with_500_and_the_loop_goes_on(live, agent):
    def inject(loop):
        engine = loop.engine
        step = engine.step

        def failing():
            events = step()
            if engine.reading:  # after the refill: the row is in a slot
                raise RuntimeError("injected device failure")
            return events

        engine.step = failing  # this engine only: the loop builds a fresh one after the failure

    live.state.engine_loop.call(inject)
    r = httpx.post(live.url + "/v1/memagent/answer", json={"question": "q?", "document": words(50, 11)}, timeout=60)
    _error(r, 500, "injected device failure")
    assert live.metrics()["memagent_engine_errors_total"] == 1
    doc = words(70, 12)
    r = httpx.post(
        live.url + "/v1/memagent/answer", json={"question": QUESTIONS[1], "document": doc, "seed": 4}, timeout=60
    )
    assert r.status_code == 200 and r.json()["response"] == agent.run([QUESTIONS[1]], [doc], rng=4).answers[0]


# ------------------------------------------------------------------------------------------- entry point


@pytest.mark.slow
def test_python_m_serve_entry_point_and_sigterm(model_dir, agent, tmp_path):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "memagent_jax.serve", "--model", model_dir, "--port", str(port), "--batch-size", "2"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def healthy():
            assert proc.poll() is None, open(tmp_path / "serve.log").read()
            try:
                return httpx.get(url + "/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        _wait_for(healthy, timeout=300)
        doc = words(40, 13)
        out = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            model=os.path.basename(model_dir),
            seed=9,
            messages=[{"role": "user", "content": f"{QUESTIONS[0]}\n{SEP}\n{doc}"}],
        )
        assert out.choices[0].message.content == agent.run([QUESTIONS[0]], [doc], rng=9).answers[0]
    finally:
        proc.terminate()
        code = proc.wait(60)
    text = open(tmp_path / "serve.log").read()
    # Graceful: the lifespan ran to its end, then the process ends by SIGTERM (uvicorn re-raises the signal).
    assert code == -signal.SIGTERM, text
    assert "engine loop stopped after 1 documents" in text and "Traceback" not in text, text
    assert "row slots" in text and "listening on http://127.0.0.1" in text and "temperature=0.9" in text


# ------------------------------------------------------------------------------------------- answer and response


def test_both_endpoints_carry_the_answer_and_the_response(live, agent, monkeypatch):
    """`/v1/memagent/answer` returns `answer` (the agent's extraction rule on the response) and `response` (raw); a
    chat completion keeps the response as content and adds the answer as `memagent.answer`, streamed or not."""
    from memagent_jax.evaluation.verifier import readable_answer

    doc, seed = words(40, 21), 5
    want = expected(agent, [QUESTIONS[0]], [doc], [seed])
    chat = {
        "model": "tiny-agent",
        "seed": seed,
        "messages": [{"role": "user", "content": f"{QUESTIONS[0]}\n{SEP}\n{doc}"}],
    }

    def ask():
        """(answer endpoint body, chat completion, (streamed content, the finish chunk's memagent object))."""
        body = httpx.post(
            live.url + "/v1/memagent/answer",
            json={"question": QUESTIONS[0], "document": doc, "seed": seed},
            timeout=120,
        ).json()
        api = client(live)
        out = api.chat.completions.create(**chat)
        content, extension = "", None
        for chunk in api.chat.completions.create(**chat, stream=True):
            if chunk.choices:
                content += chunk.choices[0].delta.content or ""
                if chunk.choices[0].finish_reason:
                    extension = chunk.model_extra["memagent"]
        return body, out, (content, extension)

    # The model's own text, and the default rule ('boxed') on it: what MemoryAgent.run gives.
    assert live.state.extract == agent.extract == "boxed"
    body, out, (content, extension) = ask()
    assert body["response"] == out.choices[0].message.content == content == want.answers[0]
    assert want.predictions[0] == readable_answer(want.answers[0])
    assert body["answer"] == out.model_extra["memagent"]["answer"] == extension["answer"] == want.predictions[0]
    # A response holding boxed answers (the decoded text replaced): the last box is the answer, the response verbatim.
    n = len(want.answer_ids[0])
    response = f"First \\boxed{{wrong}}, then \\boxed{{Ra {n}}}."
    monkeypatch.setattr(
        live.state, "answer_text", lambda ids: f"First \\boxed{{wrong}}, then \\boxed{{Ra {len(ids)}}}."
    )
    body, out, (content, extension) = ask()
    assert body["response"] == out.choices[0].message.content == content == response
    assert body["answer"] == out.model_extra["memagent"]["answer"] == extension["answer"] == f"Ra {n}"
    assert out.model_extra["memagent"]["num_chunks"] == want.num_chunks[0]
    # The server's rule decides: 'raw' answers with the whole response.
    monkeypatch.setattr(live.state, "extract", "raw")
    body, out, (content, extension) = ask()
    assert body["answer"] == out.model_extra["memagent"]["answer"] == extension["answer"] == response


def test_per_request_sampling_concurrent_requests_honoured(live, agent):
    """Concurrent requests with different temperature / top_p / top_k / seed (temperature 0 among them): each gets
    what MemoryAgent.run gives its row with the same settings and seed; no program compiles for them."""
    doc = words(60, 7)
    base = agent.spec.answer_sampling
    asks = [
        ({"temperature": 0}, 1),
        ({"temperature": 1.3, "top_k": 5}, 2),
        ({"temperature": 0.7, "top_p": 0.5, "top_k": -1}, 2),
        ({}, 3),
    ]
    settings = [base.replace(**{k: 0 if k == "top_k" and v == -1 else v for k, v in f.items()}) for f, _ in asks]
    keys = jnp.stack([row_keys(s, 1)[0] for _, s in asks])
    want = agent.run([QUESTIONS[1]] * len(asks), [doc] * len(asks), rng=keys, sampling=settings, batch_size=8)
    greedy_alone = agent.run([QUESTIONS[1]], [doc], rng=5, sampling=base.replace(temperature=0.0))
    assert want.answer_ids[0] == greedy_alone.answer_ids[0]  # greedy: the seed does not matter
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None  # noqa

    async def one(http, i):
        fields, seed = asks[i]
        if i % 2:
            body = dict({"question": QUESTIONS[1], "document": doc, "seed": seed}, **fields)
            r = await http.post("/v1/memagent/answer", json=body)
            return r.status_code, r.json()["response"]
        body = dict(
            {
                "model": "tiny-agent",
                "seed": seed,
                "messages": [{"role": "user", "content": f"{QUESTIONS[1]}\n{SEP}\n{doc}"}],
            },
            **fields,
        )
        r = await http.post("/v1/chat/completions", json=body)
        return r.status_code, r.json()["choices"][0]["message"]["content"]

    async def all_of_them():
        async with httpx.AsyncClient(base_url=live.url, timeout=300) as http:
            return await asyncio.gather(*(one(http, i) for i in range(len(asks))))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        results = asyncio.run(all_of_them())
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert [status for status, _ in results] == [200] * len(asks)
    assert [text for _, text in results] == want.answers
    assert compiles == []
    assert len(set(map(tuple, want.answer_ids))) > 1  # the settings made a difference
