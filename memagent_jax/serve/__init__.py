"""Serve a memory agent over HTTP: an OpenAI-compatible server with continuous batching over chunk steps.

    memagent serve --model DIR [--host 127.0.0.1] [--port 8000] [--batch-size 8] [--max-queue 256] [--api-key KEY]
    python -m memagent_jax.serve --model DIR ...

One engine thread owns a `DocumentEngine` (agent.engine) of --batch-size row slots: a request joins the running
batch at the next segment boundary and leaves when its document ends; the compiled programs and the KV cache are
reused by every request (they compile once, at start-up, on a dummy request: /health answers 503 "warming_up"
until then). A row's output depends only on its question, document and seed, never on its batch mates or on the
load: a request with seed S samples with the keys of `python -m memagent_jax.answer --model DIR --question Q
--document F --seed S` (= `MemoryAgent.run([q], [doc], rng=S)`). Its answer is bit-identical to
`MemoryAgent.run([q], [doc], rng=S, batch_size=B)` and to row 0 of `answer --input ... --seed S --batch-size B` (B =
the server's --batch-size: the same compiled shapes); against the single-document CLI, which runs batch-1 programs,
float32 sums may associate differently in the two shapes, which now and then flips a sampled token (temperature > 0).

Sampling is per request: temperature (0 = greedy), top_p, top_k (extension field; -1 or 0 = off) and seed, each
defaulting to the model folder's memagent_agent.json settings (or the flags below), for the request's memory updates
and answer (per-row arrays of the compiled programs: any mix shares a batch, nothing compiles). frequency_penalty,
presence_penalty, repetition_penalty, min_p, typical_p, top_logprobs, best_of, min_tokens, length_penalty,
use_beam_search, ignore_eos and logit_bias get a 400 naming the field unless they hold their neutral value (0, 0, 1,
0, 1, 0, 1, 0, 1, false, false, {}).

API key: with --api-key KEY (or the environment variable MEMAGENT_API_KEY; the flag wins) every /v1 request must
send "Authorization: Bearer KEY", else 401 (code "invalid_api_key"); /health and /metrics stay open (load balancers
and scrapers; they show the model name and counters, never request text). Without a key on an address other than
loopback the server warns at start-up.

Endpoints
  POST /v1/chat/completions  OpenAI chat completions. The LAST user message holds the question and the document,
      split by a line holding only  <<<DOCUMENT>>>  (question above it, stripped of surrounding whitespace;
      document below it, verbatim). Or: the extension field "documents" (an array of strings, joined with a blank
      line "\\n\\n" between them) carries the document and the whole last user message is the question. Other
      messages (system, earlier turns) are ignored: the agent's own templates frame every prompt.
      Fields used: model (must be the served name, else 404), messages, seed (default 0), stream,
      stream_options.include_usage, max_tokens / max_completion_tokens (caps the answer: its first n tokens,
      finish_reason "length"), temperature / top_p / top_k (per request). n must be 1; tools, stop,
      response_format, logit_bias, logprobs and the sampling fields above are refused (400). Other unknown fields
      are ignored.
      Response: a chat.completion; message.content = the model's response (raw, e.g. "\\boxed{Ra}");
      usage.prompt_tokens = question + document tokens, usage.completion_tokens = answer tokens (the stop token
      included); extension "memagent": {answer, num_chunks, document_tokens, seed}, answer = what the extraction
      rule of the model's settings (memagent_agent.json "extract" / --agent.extract; default boxed) takes from the
      content (e.g. "Ra"; null when it finds none).
      stream=true: server-sent events "data: {chat.completion.chunk}" -- first the role, then one chunk per segment
      read with an empty delta and the extension field "memagent_progress": {"chunks_read", "num_chunks"} (the
      openai client keeps it in chunk.model_extra), then the answer as one content delta, then a chunk with
      finish_reason ("stop" or "length") and "memagent": {"answer"} (the extracted answer), a usage chunk when
      asked, and "data: [DONE]". An error after the stream has started comes as "data: {"error": {...}}" (the
      openai client raises it) before [DONE].
  POST /v1/memagent/answer  {"question": str, "document": str | "documents": [str], "trace": bool, "seed": int,
      "temperature", "top_p", "top_k" (as above)} -> {"answer" (the extracted answer, as above; null when none),
      "response" (the model's response, raw), "finished", "num_chunks", "question_tokens", "document_tokens",
      "answer_tokens", "seed", "trace": [memory text after each chunk] (when asked), "timings": {"queued_s",
      "reading_s", "total_s"}}
  GET /v1/models   the served model (--served-model-name, default: the model folder's name)
  GET /health      200 {"status": "ok", ...} once warm; 503 {"status": "warming_up"} before
  GET /metrics     Prometheus text: memagent_requests_total{endpoint,status}, memagent_queue_depth,
                   memagent_rows_reading, memagent_document_tokens_total, memagent_document_tokens_per_second (last
                   60 s), memagent_request_latency_seconds (summary), memagent_requests_cancelled_total{reason}, ...

Errors are OpenAI-style {"error": {"message", "type", "param", "code"}}; the message names the field at fault.
Every client error is a 4xx; a 500 is the server's own failure.
  400 malformed JSON (also: not UTF-8, nested over 64 levels, an integer literal over 4300 digits, a string with a
      lone UTF-16 surrogate such as "\\ud800"), a missing / ill-typed field, an empty question or document, a
      question over budgets.question_tokens (or over 16 bytes per token of it, refused before tokenizing), other
      sampling than the server's;  401 no or a wrong API key;  404 another model name;
  408 a request body not received within --body-timeout seconds (the connection is closed);
  413 a body over --max-body-bytes; a document over --max-document-bytes UTF-8 bytes (default: 16 per token of
      --max-document-tokens; checked before tokenizing), or over --max-document-tokens tokens;
  429 (with Retry-After) when --batch-size + --max-queue requests are already outstanding (requests being
      tokenized count);
  504 past --request-timeout seconds from arrival, tokenizing included (a row that was admitted is cancelled);
  500 an engine failure (the loop keeps serving).
Tokenizing runs in worker threads off the event loop, large texts (256 Ki characters and more) in a pool of their
own: a small request is never queued behind a large document.
A client that disconnects (streaming or not) has its row cancelled: the slot is free at the next step.
SIGINT / SIGTERM stop the server gracefully: no new connections, running requests get up to 10 s to finish, then
the engine loop stops (requests still outstanding get 503) and the process ends by that signal, as uvicorn does.
"""


def main(argv=None) -> int:
    """`memagent serve` / `python -m memagent_jax.serve` (see `memagent_jax.serve.server`)."""
    from memagent_jax.serve.server import main as _main

    return _main(argv)


__all__ = ["main"]
