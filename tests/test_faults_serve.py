"""The HTTP server under hostile or broken clients, live on 127.0.0.1: the API key, byte bounds checked before any
tokenizing, a body that never finishes, large documents tokenized off the serving path (an injected slow
tokenizer, no wall-clock assumptions), client errors that must be 4xx, and sampling fields the server does not
implement."""

import concurrent.futures
import contextlib
import socket
import threading

import httpx
import openai
import pytest
from test_serve import BUDGETS, QUESTIONS, SEP, LiveServer, _error, _wait_for, expected, words

from hf_tiny import make_agent_model_dir
from memagent_jax.agent import AgentTemplates, MemoryAgent, write_agent_settings
from memagent_jax.serve import protocol, server
from memagent_jax.serve.app import BYTES_PER_TOKEN_CEILING, ServeLimits, ServerState, utf8_length_over

pytestmark = pytest.mark.faults

MARKER = "zqxmarker"  # documents holding it are held by the injected slow tokenizer


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    folder = make_agent_model_dir(tmp_path_factory.mktemp("faults-serve") / "tiny-agent", seed=5, vocab_size=400)
    write_agent_settings(folder, budgets=BUDGETS, templates=AgentTemplates(), temperature=0.9, top_p=0.95)
    return MemoryAgent.from_pretrained(folder)


@pytest.fixture(scope="module")
def live(agent):
    state = ServerState(
        agent,
        model_name="tiny-agent",
        batch_size=8,
        max_queue=0,  # capacity: 8 outstanding requests
        limits=ServeLimits(max_document_tokens=4000, max_body_bytes=400_000, request_timeout=120),
        large_text_chars=1000,
    )
    live = LiveServer(state)
    yield live
    live.close()


class SlowTokenizer:
    """The agent's tokenizer, except that a text holding MARKER waits for `release` (counted in `entered`).

    It hides the fast backend (`backend_tokenizer`), so the agent's plain-text encoder calls the tokenizer itself
    (`tokenizer(texts, split_special_tokens=True)`, the same ids for ordinary text) and meets the wait."""

    backend_tokenizer = None

    def __init__(self, inner):
        self.inner = inner
        self.release = threading.Event()
        self.entered = 0
        self.lock = threading.Lock()

    def __call__(self, text, **kw):
        if MARKER in (text if isinstance(text, str) else "".join(text)):
            with self.lock:
                self.entered += 1
            assert self.release.wait(120), "the test never released the slow tokenizer"
        return self.inner(text, **kw)

    def __len__(self):
        return len(self.inner)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@contextlib.contextmanager
def slow_tokenizer(state):
    slow = SlowTokenizer(state.agent.tokenizer)
    state.agent.tokenizer = slow
    try:
        yield slow
    finally:
        slow.release.set()
        state.agent.tokenizer = slow.inner


def one(agent, question, document, seed):
    """The answer `MemoryAgent.run` gives with the server's shapes (batch 8) and the keys of `seed`."""
    return expected(agent, [question], [document], [seed]).answers[0]


def answer(url, question, document, timeout=60, **kw):
    return httpx.post(
        url + "/v1/memagent/answer", json=dict({"question": question, "document": document}, **kw), timeout=timeout
    )


# ------------------------------------------------------------------------------------------- API key


def test_api_key_guards_every_v1_route_and_leaves_health_open(live, agent):
    url = live.url
    live.state.api_key = "s3cret-key"
    try:
        r = httpx.get(url + "/v1/models")
        e = _error(r, 401, "no API key", "Authorization: Bearer", "--api-key")
        assert e["code"] == "invalid_api_key" and e["type"] == "invalid_request_error"
        assert r.headers["www-authenticate"] == "Bearer"
        _error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401, "incorrect API key")
        _error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cret-ke"}), 401, "incorrect")
        _error(httpx.get(url + "/v1/models", headers={"Authorization": "Basic s3cret-key"}), 401, "no API key")
        _error(httpx.get(url + "/v1/no-such-route"), 401, "no API key")  # nothing learnt without the key
        _error(answer(url, QUESTIONS[0], "abc"), 401, "no API key")
        _error(
            httpx.post(url + "/v1/chat/completions", json={"model": "tiny-agent", "messages": []}, timeout=60),
            401,
            "no API key",
        )
        with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/metrics").status_code == 200
        # The right key, as the openai client sends it (and the scheme in any case).
        api = openai.OpenAI(base_url=url + "/v1", api_key="s3cret-key", max_retries=0, timeout=120)
        assert [m.id for m in api.models.list().data] == ["tiny-agent"]
        doc = words(40, 1)
        out = api.chat.completions.create(
            model="tiny-agent", seed=3, messages=[{"role": "user", "content": f"{QUESTIONS[0]}\n{SEP}\n{doc}"}]
        )
        assert out.choices[0].message.content == one(agent, QUESTIONS[0], doc, 3)
        r = httpx.get(url + "/v1/models", headers={"Authorization": "bearer s3cret-key"})
        assert r.status_code == 200
        m = live.metrics()
        assert m['memagent_requests_total{endpoint="/v1/models",status="401"}'] >= 4
        assert m['memagent_requests_total{endpoint="other",status="401"}'] >= 1
    finally:
        live.state.api_key = None
    assert httpx.get(url + "/v1/models").status_code == 200  # no key: open


def test_api_key_from_flag_or_environment_and_the_exposure_warning():
    parse = server._parser().parse_args
    args = parse(["--model", "m"])
    assert server.api_key(args, {}) is None
    assert server.api_key(args, {"MEMAGENT_API_KEY": "from-env"}) == "from-env"
    assert server.api_key(args, {"MEMAGENT_API_KEY": ""}) is None  # empty: unset
    args = parse(["--model", "m", "--api-key", "from-flag"])
    assert server.api_key(args, {"MEMAGENT_API_KEY": "from-env"}) == "from-flag"  # the flag wins
    for bad in ("", "two words", "ключ"):
        with pytest.raises(server.ServeArgsError, match="--api-key must be printable ASCII"):
            server.api_key(parse(["--model", "m", "--api-key", bad]), {})
    with pytest.raises(server.ServeArgsError, match="MEMAGENT_API_KEY must be printable ASCII"):
        server.api_key(parse(["--model", "m"]), {"MEMAGENT_API_KEY": "a\tb"})
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org", ""):
        (line,) = server.startup_warnings(host, None)
        assert "without an API key" in line and "MEMAGENT_API_KEY" in line
        assert server.startup_warnings(host, "k") == []
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert server.startup_warnings(host, None) == []
    for flag in ("--body-timeout=0", "--body-timeout=nan", "--max-document-bytes=-1"):
        with pytest.raises(server.ServeArgsError, match=flag.split("=")[0]):
            server.check_args(parse(["--model", "m", flag]))


# ------------------------------------------------------------------------------------------- resources


def test_utf8_length_over():
    assert utf8_length_over("abc", 3) is None and utf8_length_over("abcd", 3) == 4
    assert utf8_length_over("é" * 2, 4) is None and utf8_length_over("é" * 3, 5) == 6
    assert utf8_length_over("€" * 3, 100) is None and utf8_length_over("€" * 3, 8) == 9


def test_texts_over_their_byte_bound_are_refused_before_tokenizing(live):
    """A document over max_document_tokens x 16 bytes gets its 413 without being tokenized (the injected tokenizer
    would hold it); a question over question_tokens x 16 bytes its 400."""
    limit = 4000 * BYTES_PER_TOKEN_CEILING
    with slow_tokenizer(live.state) as slow:
        big = MARKER + " " + "x" * limit
        e = _error(answer(live.url, "q?", big), 413, f"{limit + 1 + len(MARKER)} bytes", "--max-document-bytes")
        assert e["param"] == "document" and e["code"] == "document_too_long"
        e = _error(
            answer(live.url, MARKER + "?" * (BUDGETS.question_tokens * 16), "abc"), 400, "budgets.question_tokens"
        )
        assert e["param"] == "question"
        assert slow.entered == 0
        # Multi-byte text counts in UTF-8 bytes; an explicit --max-document-bytes replaces the derived bound.
        live.state.limits.max_document_bytes = 30
        try:
            _error(answer(live.url, "q?", "é" * 16), 413, "has 32 bytes", "limit of 30")
            assert answer(live.url, "q?", "é" * 15).status_code == 200
        finally:
            live.state.limits.max_document_bytes = None
    assert slow.entered == 0


def test_a_body_that_never_finishes_gets_408(live):
    live.state.limits.body_timeout = 0.5
    try:
        with socket.create_connection(("127.0.0.1", live.port), timeout=30) as s:
            s.sendall(
                b"POST /v1/memagent/answer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"question": "q?", "document": "'
            )
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                part = s.recv(65536)
                if not part:
                    break
                reply += part
    finally:
        live.state.limits.body_timeout = 30.0
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    assert b"--body-timeout" in body and b"32 bytes received" in body
    assert b"connection: close" in head.lower()
    assert answer(live.url, "q?", "the key").status_code == 200  # still serving


def test_small_request_is_answered_while_large_documents_tokenize(live, agent):
    """Three large documents (over large_text_chars) held inside the tokenizer: two fill the large pool, one waits
    for it; a small request is tokenized in the other pool and answered meanwhile. Released, the large ones are
    answered too."""
    large = [MARKER + " " + words(400, 20 + i) for i in range(3)]
    assert all(len(d) >= live.state.large_text_chars for d in large)
    small = words(30, 30)
    with slow_tokenizer(live.state) as slow, concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(answer, live.url, QUESTIONS[1], d, 120, seed=i) for i, d in enumerate(large)]
        _wait_for(lambda: slow.entered == 2 and live.state.tokenizing == 3)
        r = answer(live.url, QUESTIONS[0], small, timeout=30, seed=7)
        assert r.status_code == 200, r.text
        assert r.json()["response"] == one(agent, QUESTIONS[0], small, 7)
        assert not any(f.done() for f in futures) and slow.entered == 2
        slow.release.set()
        replies = [f.result() for f in futures]
    for i, r in enumerate(replies):
        assert r.status_code == 200, r.text
        assert r.json()["response"] == one(agent, QUESTIONS[1], large[i], i)
    assert live.state.tokenizing == 0


def test_tokenizing_counts_toward_the_timeout_and_the_queue(live):
    """A request held in the tokenizer gets its 504 at --request-timeout; requests being tokenized count as
    outstanding, so past capacity (8 here) the next one gets a 429 at once."""
    doc = MARKER + " " + words(400, 40)
    with slow_tokenizer(live.state) as slow:
        live.state.limits.request_timeout = 1.0
        try:
            _error(answer(live.url, "q?", doc, timeout=30), 504, "--request-timeout", "being tokenized")
        finally:
            live.state.limits.request_timeout = 120
        assert slow.entered == 1
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(answer, live.url, "q?", doc, 120) for _ in range(8)]
            _wait_for(lambda: live.state.tokenizing == 8)
            r = answer(live.url, "q?", "the key", timeout=30)
            _error(r, 429, "the server is full", "--max-queue")
            assert r.headers["retry-after"] == "1"
            slow.release.set()
            assert [f.result().status_code for f in futures] == [200] * 8
    assert live.state.tokenizing == 0 and live.state.engine_loop.outstanding == 0


# ------------------------------------------------------------------------------------------- client errors


@pytest.mark.parametrize(
    "body, needle, param",
    [
        (
            b'{"question": "q\\ud800?", "document": "abc"}',
            "'question' holds a lone UTF-16 surrogate \\ud800",
            "question",
        ),
        (b'{"question": "q?", "document": "a\\udfffb"}', "'document' holds a lone", "document"),
        (b'{"question": "q?", "documents": ["ok", "\\ud83d"]}', "'documents[1]' holds a lone", "documents"),
        (b'{"question": "q?", "document": "abc", "x": {"\\ud800": 1}}', "'x.<key>' holds a lone", "x"),
        (b'{"question": "q?", "document": "abc", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested", None),
        (b'{"question": "q?", "document": "abc", "x": ' + b"[" * 80 + b"]" * 80 + b"}", "at most 64 levels", "x"),
        (b'{"question": "q?", "document": "abc", "seed": ' + b"1" * 5000 + b"}", "not valid JSON", None),
    ],
    ids=["question", "document", "documents", "key", "deep", "over-64", "long-int"],
)
def test_malformed_bodies_are_400_never_500(live, body, needle, param):
    e = _error(httpx.post(live.url + "/v1/memagent/answer", content=body, timeout=60), 400, needle)
    assert e["param"] == param


def test_surrogate_pairs_and_chat_messages(live, agent):
    """A valid escaped pair is text like any other; a lone one in a chat message is a 400 naming the message."""
    e = _error(
        httpx.post(
            live.url + "/v1/chat/completions",
            content=b'{"model": "tiny-agent", "messages": [{"role": "user", "content": "q?\\n'
            + SEP.encode()
            + b'\\nx\\ud800"}]}',
            timeout=60,
        ),
        400,
        "'messages[0].content' holds a lone",
    )
    assert e["param"] == "messages"
    r = httpx.post(
        live.url + "/v1/memagent/answer", content=b'{"question": "q?", "document": "key \\ud83d\\ude00"}', timeout=60
    )
    assert r.status_code == 200 and r.json()["response"] == one(agent, "q?", "key \U0001f600", 0)
    assert not any(k.endswith('status="500"}') for k in live.metrics())


# ------------------------------------------------------------------------------------------- sampling fields


@pytest.mark.parametrize(
    "field, value",
    [
        ("frequency_penalty", 0.5),
        ("presence_penalty", -1),
        ("repetition_penalty", 1.1),
        ("min_p", 0.05),
        ("typical_p", 0.9),
        ("best_of", 2),
        ("use_beam_search", True),
        ("logit_bias", {"5": 3}),
    ],
)
def test_unimplemented_sampling_fields_are_400_naming_the_field(live, field, value):
    chat = {"model": "tiny-agent", "messages": [{"role": "user", "content": f"q?\n{SEP}\ndoc"}], field: value}
    for path, body in (("/v1/chat/completions", chat), ("/v1/memagent/answer", {"question": "q", "document": "d"})):
        body = dict(body, **{field: value})
        e = _error(httpx.post(live.url + path, json=body, timeout=60), 400, f"'{field}'", "does not implement")
        assert e["param"] == field and e["code"] == "unsupported_sampling"


def test_neutral_sampling_values_are_accepted(live, agent):
    doc = words(50, 50)
    api = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError, match="'frequency_penalty'"):
        api.chat.completions.create(
            model="tiny-agent", frequency_penalty=0.5, messages=[{"role": "user", "content": f"q?\n{SEP}\n{doc}"}]
        )
    out = api.chat.completions.create(
        model="tiny-agent",
        seed=2,
        frequency_penalty=0,
        presence_penalty=0.0,
        temperature=0.9,
        top_p=0.95,
        messages=[{"role": "user", "content": f"{QUESTIONS[2]}\n{SEP}\n{doc}"}],
        extra_body={"top_k": -1, "repetition_penalty": 1.0, "min_p": 0},
    )
    assert out.choices[0].message.content == one(agent, QUESTIONS[2], doc, 2)


def test_protocol_sampling_check_unit():
    assert protocol.parse_sampling({"top_k": 0, "ignore_eos": False, "top_logprobs": None}) == {"top_k": 0}
    assert protocol.parse_sampling({"top_k": -1, "temperature": 0, "top_p": 0.5}) == {
        "top_k": 0,
        "temperature": 0.0,
        "top_p": 0.5,
    }
    for body in ({"ignore_eos": 0}, {"min_tokens": [1]}, {"presence_penalty": 0.1}):
        with pytest.raises(protocol.RequestError, match="does not implement"):
            protocol.parse_sampling(body)
    for body, field in (
        ({"top_k": True}, "top_k"),
        ({"top_k": "40"}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ):
        with pytest.raises(protocol.RequestError, match=f"'{field}'") as e:
            protocol.parse_sampling(body)
        assert e.value.param == field
