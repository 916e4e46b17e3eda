"""Request parsing and response shapes of the HTTP API (plain Python: no JAX, no web framework).

Every check raises `RequestError(status, message, param=...)`; the message names the field at fault, so a client
sees what to fix. The HTTP layer (`serve.app`) turns it into an OpenAI-style error body:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages", "code": null}}
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import uuid
from typing import Any

# A line holding only this marker splits the last user message into the question (above) and the document (below).
DOCUMENT_SEPARATOR = "<<<DOCUMENT>>>"
# `documents` (a list of strings) are joined into one document with this text between them.
DOCUMENTS_JOINER = "\n\n"
# OpenAI request fields this server cannot honour (they would change the output in ways it does not implement).
_UNSUPPORTED_CHAT_FIELDS = ("tools", "functions", "tool_choice", "response_format", "stop")
SEED_RANGE = (-(2**63), 2**63 - 1)
# Sampling fields honoured per request (`parse_sampling`): temperature (0 = greedy), top_p, and the extension field
# top_k (-1 or 0 = off); with seed, they decide the request's sample whatever requests share its batch.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k")
# Sampling fields of OpenAI-style servers that this server does not implement, with the values that leave sampling
# unchanged (sent with another value: 400 naming the field).
UNSUPPORTED_SAMPLING = {
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "repetition_penalty": (1,),
    "min_p": (0,),
    "typical_p": (1,),
    "top_logprobs": (0,),
    "best_of": (1,),
    "min_tokens": (0,),
    "length_penalty": (1,),
    "use_beam_search": (False,),
    "ignore_eos": (False,),
}
MAX_JSON_DEPTH = 64  # arrays / objects nested deeper in a request body: 400
_SURROGATE = re.compile("[\ud800-\udfff]")


class RequestError(Exception):
    """A request the server refuses. status: the HTTP status; param: the field at fault (or None); headers:
    extra response headers (e.g. Retry-After)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The server's default sampling: what a request that sends none of `SAMPLING_FIELDS` samples with."""

    temperature: float
    top_p: float
    top_k: int = 0


@dataclasses.dataclass
class ParsedRequest:
    """What a request asks for, checked. `document` is one text (documents already joined)."""

    question: str
    document: str
    seed: int = 0
    trace: bool = False
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    question_field: str = "question"
    document_field: str = "document"
    sampling: dict = dataclasses.field(default_factory=dict)  # the `SAMPLING_FIELDS` sent (checked); others default


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object (400 otherwise: not UTF-8, not JSON, nested deeper than `MAX_JSON_DEPTH`, an
    integer literal too long to convert, or a string holding a lone UTF-16 surrogate such as "\\ud800", which no
    text encoding can carry)."""
    if not raw:
        raise RequestError(400, "the request body is empty; expected a JSON object")
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise RequestError(400, "the request body is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise RequestError(
            400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except RecursionError:
        raise RequestError(
            400, f"the request body is nested too deeply (at most {MAX_JSON_DEPTH} levels of arrays and objects)"
        ) from None
    except ValueError as e:  # an integer literal over Python's digit limit
        raise RequestError(
            400, f"the request body is not valid JSON: an integer literal is too long ({str(e).split(':')[0]})"
        ) from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    _check_values(data)
    return data


def _check_values(data: dict) -> None:
    """400 for nesting deeper than MAX_JSON_DEPTH or a lone surrogate in any key or string (iterative: any depth)."""
    stack = [(data, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError(
                400,
                f"field '{path}' is nested too deeply: at most {MAX_JSON_DEPTH} levels of arrays and objects",
                param=_top(path),
            )
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else key
                if _SURROGATE.search(key):
                    raise _surrogate_error(f"{path}.<key>" if path else "<key>", key)
                if isinstance(item, str):
                    if not item.isascii() and _SURROGATE.search(item):
                        raise _surrogate_error(where, item)
                elif isinstance(item, (dict, list)):
                    stack.append((item, where, depth + 1))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                where = f"{path}[{i}]"
                if isinstance(item, str):
                    if not item.isascii() and _SURROGATE.search(item):
                        raise _surrogate_error(where, item)
                elif isinstance(item, (dict, list)):
                    stack.append((item, where, depth + 1))


def _top(path: str) -> str:
    return re.split(r"[.\[]", path, maxsplit=1)[0] or None


def _surrogate_error(path: str, text: str) -> RequestError:
    at = _SURROGATE.search(text)
    return RequestError(
        400,
        f"field '{path}' holds a lone UTF-16 surrogate \\u{ord(at.group()):04x} at character {at.start()}; "
        "strings must be valid Unicode (a surrogate only as half of an escaped pair)",
        param=_top(path),
    )


def _type_name(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _bool(data: dict, name: str, default: bool = False) -> bool:
    value = data.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(400, f"field '{name}' must be a boolean, got {_type_name(value)}", param=name)
    return value


def _int(data: dict, name: str, default: int | None, *, low: int | None = None, high: int | None = None):
    value = data.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise RequestError(400, f"field '{name}' must be an integer, got {_type_name(value)}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RequestError(400, f"field '{name}' must be {bounds}, got {value}", param=name)
    return value


def parse_sampling(data: dict) -> dict:
    """The request's `SAMPLING_FIELDS` that were sent, checked with the settings rules (`memagent_jax.settings`):
    temperature >= 0 (0 = greedy), top_p in (0, 1], top_k an integer >= 0 or -1 (-1 and 0 = off: 0). Fields not sent
    are absent (the server's defaults apply). The fields of `UNSUPPORTED_SAMPLING`, and logit_bias, when sent, must
    hold their neutral values: this server does not implement them (400 naming the field)."""
    from memagent_jax import settings

    out = {}
    for name in SAMPLING_FIELDS:
        value = data.get(name)
        if value is None:
            continue
        try:
            if name == "top_k":
                value = 0 if settings.is_integer(value) and value == -1 else value
                out[name] = settings.integer(name, value, minimum=0, allowed=">= 0, or -1 (-1 and 0 = off)")
            else:
                out[name] = getattr(settings, name)(value)
        except settings.SettingError as e:
            raise RequestError(400, f"field '{name}' {e.reason}", param=name) from None
    check_unsupported(data)
    return out


def check_unsupported(data: dict) -> None:
    """400 naming the first field of `UNSUPPORTED_SAMPLING` (or logit_bias) sent with a non-neutral value."""
    if data.get("logit_bias") not in (None, {}):
        raise RequestError(
            400,
            "field 'logit_bias' is set, but this server does not implement logit_bias (it honours temperature, top_p, "
            "top_k and seed); omit the field or send {}",
            param="logit_bias",
            code="unsupported_sampling",
        )
    for name, neutral in UNSUPPORTED_SAMPLING.items():
        value = data.get(name)
        if value is None:
            continue
        if isinstance(neutral[0], bool):
            ok = value in neutral and isinstance(value, bool)
        else:
            ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value in neutral
        if not ok:
            shown = json.dumps(value) if isinstance(value, (bool, int, float, str)) else _type_name(value)
            allowed = " or ".join(json.dumps(v) for v in neutral)
            raise RequestError(
                400,
                f"field '{name}' is {shown[:40]}, but this server does not implement {name} (it honours "
                f"temperature, top_p, top_k and seed); omit the field or send {allowed}",
                param=name,
                code="unsupported_sampling",
            )


def _documents(data: dict, name: str = "documents") -> str:
    docs = data[name]
    if not isinstance(docs, list) or not all(isinstance(d, str) for d in docs):
        raise RequestError(400, f"field '{name}' must be an array of strings", param=name)
    if not docs:
        raise RequestError(400, f"field '{name}' is an empty array; give at least one document", param=name)
    return DOCUMENTS_JOINER.join(docs)


def _message_text(message: dict, index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: [{"type": "text", "text": "..."}]
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(
                    400,
                    f'messages[{index}].content[{j}] must be a text part {{"type": "text", "text": "..."}}',
                    param="messages",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(
        400,
        f"messages[{index}].content must be a string or an array of text parts, got {_type_name(content)}",
        param="messages",
    )


def split_question_document(text: str) -> tuple[str, str] | None:
    """(question, document) of a message with a separator line, else None. The question is the text above the
    first line that holds only `DOCUMENT_SEPARATOR` (surrounding whitespace stripped); the document is everything
    after that line, verbatim."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.strip() == DOCUMENT_SEPARATOR:
            return "\n".join(lines[:i]).strip(), "\n".join(lines[i + 1 :])
    return None


def parse_chat(data: dict, *, model_name: str, sampling: Sampling) -> ParsedRequest:
    """A `POST /v1/chat/completions` body -> ParsedRequest (see the package docstring for the rules)."""
    model = data.get("model")
    if model is None:
        raise RequestError(400, "field 'model' is missing", param="model")
    if not isinstance(model, str):
        raise RequestError(400, f"field 'model' must be a string, got {_type_name(model)}", param="model")
    if model != model_name:
        raise RequestError(
            404,
            f"model '{model}' is not served here; this server serves '{model_name}' (GET /v1/models)",
            param="model",
            code="model_not_found",
        )
    messages = data.get("messages")
    if messages is None:
        raise RequestError(400, "field 'messages' is missing", param="messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "field 'messages' must be a non-empty array of messages", param="messages")
    last = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(400, f"messages[{i}] must be an object with a string 'role'", param="messages")
        if message["role"] == "user":
            last = i
    if last is None:
        raise RequestError(
            400,
            "field 'messages' has no user message; the last user message holds the question "
            f"(and the document after a line {DOCUMENT_SEPARATOR})",
            param="messages",
        )
    text = _message_text(messages[last], last)
    for name in _UNSUPPORTED_CHAT_FIELDS:
        if data.get(name) not in (None, [], {}):
            raise RequestError(400, f"field '{name}' is not supported by this server", param=name)
    if _int(data, "n", 1) != 1:
        raise RequestError(400, "field 'n' must be 1 (one answer per request)", param="n")
    if _bool(data, "logprobs"):
        raise RequestError(400, "field 'logprobs' is not supported by this server", param="logprobs")
    sampling_fields = parse_sampling(data)
    max_tokens = _int(data, "max_completion_tokens", None, low=1)
    if max_tokens is None:
        max_tokens = _int(data, "max_tokens", None, low=1)
    stream = _bool(data, "stream")
    options = data.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise RequestError(400, "field 'stream_options' must be an object", param="stream_options")
        include_usage = _bool(options, "include_usage")
    seed = _int(data, "seed", 0, low=SEED_RANGE[0], high=SEED_RANGE[1])
    split = split_question_document(text)
    if data.get("documents") is not None:
        if split is not None:
            raise RequestError(
                400,
                f"the document is given twice: after a {DOCUMENT_SEPARATOR} line of the last "
                "user message and in field 'documents'; give one",
                param="documents",
            )
        question, document, doc_field = text.strip(), _documents(data), "documents"
    elif split is not None:
        (question, document), doc_field = split, f"messages[{last}] (after {DOCUMENT_SEPARATOR})"
    else:
        raise RequestError(
            400,
            f"no document: put it in the last user message after a line {DOCUMENT_SEPARATOR} "
            "(the question above it), or in the extension field 'documents' (an array of strings)",
            param="messages",
        )
    return ParsedRequest(
        question=question,
        document=document,
        seed=seed,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        question_field=f"messages[{last}] (question)",
        document_field=doc_field,
        sampling=sampling_fields,
    )


def parse_answer(data: dict, *, sampling: Sampling) -> ParsedRequest:
    """A `POST /v1/memagent/answer` body -> ParsedRequest."""
    question = data.get("question")
    if question is None:
        raise RequestError(400, "field 'question' is missing", param="question")
    if not isinstance(question, str):
        raise RequestError(400, f"field 'question' must be a string, got {_type_name(question)}", param="question")
    has_doc, has_docs = data.get("document") is not None, data.get("documents") is not None
    if has_doc == has_docs:
        raise RequestError(
            400, "give exactly one of 'document' (a string) and 'documents' (an array of strings)", param="document"
        )
    if has_doc:
        document = data["document"]
        if not isinstance(document, str):
            raise RequestError(400, f"field 'document' must be a string, got {_type_name(document)}", param="document")
        field = "document"
    else:
        document, field = _documents(data), "documents"
    sampling_fields = parse_sampling(data)
    return ParsedRequest(
        question=question,
        document=document,
        seed=_int(data, "seed", 0, low=SEED_RANGE[0], high=SEED_RANGE[1]),
        trace=_bool(data, "trace"),
        question_field="question",
        document_field=field,
        sampling=sampling_fields,
    )


# ------------------------------------------------------------------------------------------- responses


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def chat_completion(
    *,
    request_id: str,
    model: str,
    content: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    extra: dict[str, Any] | None = None,
) -> dict:
    """A `chat.completion` object."""
    body = {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    if extra:
        body.update(extra)
    return body


def chat_chunk(
    *,
    request_id: str,
    model: str,
    created: int,
    delta: dict | None = None,
    finish_reason: str | None = None,
    extra: dict[str, Any] | None = None,
    usage: dict | None = None,
    choices: bool = True,
) -> dict:
    """A `chat.completion.chunk` object (`choices=False`: the usage-only chunk of stream_options.include_usage)."""
    body = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}]
        if choices
        else [],
    }
    if usage is not None:
        body["usage"] = usage
    if extra:
        body.update(extra)
    return body


def sse(data: dict | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()
