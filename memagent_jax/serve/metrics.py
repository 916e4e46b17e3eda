"""Server metrics in the Prometheus text format (written by hand: no client library needed).

Counters and windows are updated from the HTTP handlers and the engine thread under one lock; `render` adds the
engine loop's live gauges (queue depth, rows reading) at scrape time.
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

LATENCY_WINDOW = 2048  # the latency summary covers the most recent requests
RATE_WINDOW_S = 60.0  # document tokens/s over the most recent minute
QUANTILES = (0.5, 0.9, 0.99)


class Metrics:
    """Thread-safe counters of one server."""

    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.time()
        self._started_mono = time.monotonic()
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status) -> n
        self.cancelled: collections.Counter = collections.Counter()  # reason -> n
        self.document_tokens_total = 0
        self.documents_total = 0
        self.engine_errors_total = 0
        self._latency: collections.deque = collections.deque(maxlen=LATENCY_WINDOW)  # (endpoint, seconds)
        self._latency_sum: collections.Counter = collections.Counter()
        self._latency_count: collections.Counter = collections.Counter()
        self._tokens: collections.deque = collections.deque()  # (time, tokens read)

    def request(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[(endpoint, int(status))] += 1
            if seconds is not None and status == 200:
                self._latency.append((endpoint, seconds))
                self._latency_sum[endpoint] += seconds
                self._latency_count[endpoint] += 1

    def cancel(self, reason: str) -> None:
        with self._lock:
            self.cancelled[reason] += 1

    def tokens_read(self, n: int) -> None:
        """Document tokens a row read (called by the engine thread after every segment)."""
        now = time.monotonic()
        with self._lock:
            self.document_tokens_total += n
            self._tokens.append((now, n))
            self._trim(now)

    def document_done(self) -> None:
        with self._lock:
            self.documents_total += 1

    def engine_error(self) -> None:
        with self._lock:
            self.engine_errors_total += 1

    def _trim(self, now: float) -> None:
        while self._tokens and self._tokens[0][0] < now - RATE_WINDOW_S:
            self._tokens.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            total = sum(n for _, n in self._tokens)
        span = min(RATE_WINDOW_S, max(now - self._started_mono, 1e-9))
        return total / span

    def render(self, *, queue_depth: int, reading: int, slots: int, ready: bool, model: str) -> str:
        """The Prometheus text exposition of everything."""
        rate = self.tokens_per_second()
        with self._lock:
            lines = [
                "# HELP memagent_up 1 once the engine is warm and serving.",
                "# TYPE memagent_up gauge",
                f'memagent_up{{model="{_label(model)}"}} {int(ready)}',
                "# HELP memagent_requests_total HTTP requests by endpoint and status.",
                "# TYPE memagent_requests_total counter",
            ]
            lines += [
                f'memagent_requests_total{{endpoint="{_label(e)}",status="{s}"}} {n}'
                for (e, s), n in sorted(self.requests.items())
            ]
            lines += [
                "# HELP memagent_queue_depth Admitted requests waiting for a row slot.",
                "# TYPE memagent_queue_depth gauge",
                f"memagent_queue_depth {queue_depth}",
                "# HELP memagent_rows_reading Row slots reading a document.",
                "# TYPE memagent_rows_reading gauge",
                f"memagent_rows_reading {reading}",
                "# HELP memagent_row_slots Row slots of the engine (--batch-size).",
                "# TYPE memagent_row_slots gauge",
                f"memagent_row_slots {slots}",
                "# HELP memagent_document_tokens_total Document tokens read by the engine.",
                "# TYPE memagent_document_tokens_total counter",
                f"memagent_document_tokens_total {self.document_tokens_total}",
                f"# HELP memagent_document_tokens_per_second Document tokens read per second over the last "
                f"{RATE_WINDOW_S:.0f} s.",
                "# TYPE memagent_document_tokens_per_second gauge",
                f"memagent_document_tokens_per_second {rate:.3f}",
                "# HELP memagent_documents_total Documents answered.",
                "# TYPE memagent_documents_total counter",
                f"memagent_documents_total {self.documents_total}",
                "# HELP memagent_requests_cancelled_total Rows cancelled, by reason.",
                "# TYPE memagent_requests_cancelled_total counter",
            ]
            lines += [
                f'memagent_requests_cancelled_total{{reason="{_label(r)}"}} {n}'
                for r, n in sorted(self.cancelled.items())
            ]
            lines += [
                "# HELP memagent_engine_errors_total Exceptions inside the engine loop (affected requests got 500).",
                "# TYPE memagent_engine_errors_total counter",
                f"memagent_engine_errors_total {self.engine_errors_total}",
                f"# HELP memagent_request_latency_seconds Latency of answered requests (quantiles over the last "
                f"{LATENCY_WINDOW}).",
                "# TYPE memagent_request_latency_seconds summary",
            ]
            by_endpoint = collections.defaultdict(list)
            for endpoint, seconds in self._latency:
                by_endpoint[endpoint].append(seconds)
            for endpoint in sorted(self._latency_count):
                values = by_endpoint.get(endpoint)
                for q in QUANTILES:
                    v = float(np.quantile(values, q)) if values else float("nan")
                    lines.append(
                        f'memagent_request_latency_seconds{{endpoint="{_label(endpoint)}",quantile="{q}"}} {v:.6f}'
                    )
                lines.append(
                    f'memagent_request_latency_seconds_sum{{endpoint="{_label(endpoint)}"}} '
                    f"{self._latency_sum[endpoint]:.6f}"
                )
                lines.append(
                    f'memagent_request_latency_seconds_count{{endpoint="{_label(endpoint)}"}} '
                    f"{self._latency_count[endpoint]}"
                )
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def parse(text: str) -> dict[str, float]:
    """{'name{labels}': value} of a Prometheus text page (tests, benchmarks)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out
