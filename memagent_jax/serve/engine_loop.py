"""The device side of the server: one thread owns the `DocumentEngine`.

HTTP handlers never touch the engine. They `admit` a `Job` (refused with `QueueFull` when `capacity` jobs are
already outstanding) and later maybe `cancel` it; both only put a command on a thread-safe queue. The engine thread:

    warm up (one dummy request: the refill / segment / final programs and the key derivation compile here);
    loop:
        take commands (block on the queue while the engine is idle, else take what is there without waiting);
        submit new jobs to the engine (a job the engine refuses gets a 400 at once); cancel rows of clients that
        left or timed out (their slots are free at the next step);
        engine.step(): every occupied slot reads one segment; free slots took queued documents first (so a new
        request joins the running batch at the next segment boundary), and finished rows are answered;
        deliver the events to their jobs (`Job.deliver`, which the handler made thread-safe with
        `loop.call_soon_threadsafe`).

An exception inside `step` fails the rows that were reading (500), builds a fresh engine (same shapes: the
compiled programs are reused), resubmits the rows that were still queued, and keeps serving.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

WARMUP_TAG = "__warmup__"


class QueueFull(Exception):
    """Too many outstanding requests (row slots + --max-queue)."""


@dataclasses.dataclass
class Event:
    """What a job hears from the engine thread. kind: 'progress' (chunks_read / num_chunks), 'result' (result:
    the engine's RowResult), or 'error' (status, message)."""

    kind: str
    chunks_read: int = 0
    num_chunks: int = 0
    result: Any = None
    status: int = 0
    message: str = ""


@dataclasses.dataclass
class Job:
    """One request's row. deliver(Event) is called from the engine thread and must be thread-safe."""

    id: str
    question_ids: np.ndarray
    document_ids: np.ndarray
    seed: int
    deliver: Callable[[Event], None]
    trace: bool = False
    sampling: Any = None  # the request's SamplingParams (temperature / top_k / top_p); None: the agent's
    tokens_read: int = 0


def request_key(seed: int) -> np.ndarray:
    """The raw uint32 [2] key of a request with `seed`: the key `python -m memagent_jax.answer --seed SEED` (and
    `MemoryAgent.run([q], [doc], rng=SEED)`) gives its single row."""
    import jax

    from memagent_jax.sampling.api import row_keys

    return np.asarray(jax.random.key_data(row_keys(int(seed), 1))[0], np.uint32)


class EngineLoop:
    """Owns a `DocumentEngine` in its own thread (see the module docstring).

    Args:
      agent: the `MemoryAgent` (piece prompt mode).
      batch_size: row slots.
      max_queue: admitted requests that may wait for a slot beyond the `batch_size` reading ones; `admit` raises
        QueueFull past batch_size + max_queue outstanding requests.
      metrics: a `serve.metrics.Metrics` (tokens read, documents answered, engine errors).
    """

    def __init__(self, agent, *, batch_size: int, max_queue: int, metrics=None):
        self.agent = agent
        self.metrics = metrics
        self.engine = agent.document_engine(batch_size, eager_answers=True)
        self.batch_size = self.engine.batch_size
        self.capacity = self.batch_size + max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._outstanding: set[str] = set()
        self._jobs: dict[str, Job] = {}  # jobs the engine holds (engine thread only)
        self.ready = threading.Event()
        self.startup_error: BaseException | None = None
        self.reading = 0  # gauges, written by the engine thread
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="memagent-engine", daemon=True)

    # ------------------------------------------------------------------------------------ any thread

    @property
    def outstanding(self) -> int:
        """Admitted requests not answered, failed or cancelled yet."""
        with self._lock:
            return len(self._outstanding)

    @property
    def queue_depth(self) -> int:
        """Admitted requests not reading yet (waiting for a slot)."""
        return max(0, self.outstanding - self.reading)

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def admit(self, job: Job) -> None:
        """Queues a job for the engine; QueueFull when `capacity` requests are outstanding."""
        with self._lock:
            if len(self._outstanding) >= self.capacity:
                raise QueueFull(
                    f"{len(self._outstanding)} requests outstanding ({self.batch_size} row slots + "
                    f"{self.capacity - self.batch_size} queued, --max-queue)"
                )
            self._outstanding.add(job.id)
        self._inbox.put(("submit", job))

    def cancel(self, job_id: str, reason: str) -> None:
        """Drops a job wherever it is (its slot is free at the next step); no event is delivered for it."""
        self._inbox.put(("cancel", job_id, reason))

    def stop(self, timeout: float = 30.0) -> None:
        """Fails what is outstanding (503) and ends the thread."""
        self._inbox.put(("stop",))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def call(self, fn: Callable[[Any], Any]) -> None:
        """Runs fn(engine_loop) on the engine thread between steps (tests: inject a failure)."""
        self._inbox.put(("call", fn))

    # ------------------------------------------------------------------------------------ engine thread

    def _release(self, job_id: str) -> None:
        with self._lock:
            self._outstanding.discard(job_id)

    def _send(self, job: Job, event: Event) -> None:
        try:
            job.deliver(event)
        except Exception:  # the client's event loop is gone (server shutting down): nothing to tell
            log.debug("could not deliver %s to %s", event.kind, job.id, exc_info=True)

    def _fail(self, job: Job, status: int, message: str) -> None:
        self._jobs.pop(job.id, None)
        self._release(job.id)
        self._send(job, Event("error", status=status, message=message))

    def _warm_up(self) -> None:
        from memagent_jax.agent.types import RowRequest

        t0 = time.perf_counter()
        q_ids, d_ids = self.agent.prepare("warm up", "warm up " * 4)
        self.engine.submit(
            RowRequest(tag=WARMUP_TAG, question_ids=q_ids, document_ids=d_ids, key=request_key(0), trace=True)
        )
        while self.engine.busy:
            self.engine.step()
        log.info("engine warm: refill / segment / final programs compiled in %.1fs", time.perf_counter() - t0)

    def _run(self) -> None:
        try:
            self._warm_up()
        except BaseException as e:  # noqa: BLE001 - reported by /health and every request
            log.exception("engine warm-up failed")
            self.startup_error = e
            self.ready.set()
            self._drain_after_failure()
            return
        self.ready.set()
        while True:
            commands = []
            if not self.engine.busy:
                commands.append(self._inbox.get())
            while True:
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            if any(command[0] == "stop" for command in commands):
                self._shutdown(commands)
                return
            try:
                for command in commands:
                    self._handle(command)
                if self.engine.busy:
                    self._step()
            except Exception as e:  # noqa: BLE001 - a bug outside `step`: same recovery, the loop goes on
                self._recover(e)
            self.reading = self.engine.reading

    def _handle(self, command) -> None:
        from memagent_jax.agent.chunking import AgentInputError
        from memagent_jax.agent.types import RowRequest

        kind = command[0]
        if kind == "submit":
            job = command[1]
            try:
                key = request_key(job.seed)
                self.engine.submit(
                    RowRequest(
                        tag=job.id,
                        question_ids=job.question_ids,
                        document_ids=job.document_ids,
                        key=key,
                        trace=job.trace,
                        sampling=job.sampling,
                    )
                )
            except AgentInputError as e:
                self._fail(job, 400, str(e))
                return
            except Exception as e:  # noqa: BLE001
                log.exception("submit failed")
                self._fail(job, 500, f"internal error while queueing the request: {type(e).__name__}: {e}")
                return
            self._jobs[job.id] = job
        elif kind == "cancel":
            _, job_id, reason = command
            job = self._jobs.pop(job_id, None)
            self._release(job_id)
            if job is not None:
                self.engine.cancel(job_id)
                if self.metrics is not None:
                    self.metrics.cancel(reason)
        elif kind == "call":
            try:
                command[1](self)
            except Exception:  # noqa: BLE001
                log.exception("engine call failed")

    def _step(self) -> None:
        from memagent_jax.agent.types import RowProgress, RowResult

        try:
            events = self.engine.step()
        except Exception as e:  # noqa: BLE001 - the loop must keep serving
            self._recover(e)
            return
        self.steps += 1
        chunk = self.agent.budgets.chunk_tokens
        for event in events:
            job = self._jobs.get(event.tag)
            if job is None:
                continue  # cancelled meanwhile
            if isinstance(event, RowProgress):
                read = min(event.chunks_read * chunk, int(job.document_ids.size))
                if self.metrics is not None and read > job.tokens_read:
                    self.metrics.tokens_read(read - job.tokens_read)
                job.tokens_read = read
                self._send(job, Event("progress", chunks_read=event.chunks_read, num_chunks=event.num_chunks))
            elif isinstance(event, RowResult):
                self._jobs.pop(job.id, None)
                self._release(job.id)
                if self.metrics is not None:
                    self.metrics.document_done()
                self._send(job, Event("result", result=event))

    def _recover(self, error: BaseException) -> None:
        """A step raised: fail the rows that were in slots, rebuild the engine, resubmit the queued rows."""
        log.exception("engine step failed; failing the rows in its slots and continuing")
        if self.metrics is not None:
            self.metrics.engine_error()
        old = self.engine
        waiting = old.waiting()
        waiting_tags = {r.tag for r in waiting}
        message = f"internal error in the engine: {type(error).__name__}: {error}"
        for job in [j for tag, j in self._jobs.items() if tag not in waiting_tags]:
            self._fail(job, 500, message)
        self.engine = self.agent.document_engine(self.batch_size, eager_answers=True)
        for request in waiting:
            if request.tag in self._jobs:
                self.engine.submit(request)

    def _shutdown(self, commands) -> None:
        for command in commands:
            if command[0] == "submit":
                self._jobs.setdefault(command[1].id, command[1])
            elif command[0] == "cancel":
                self._jobs.pop(command[1], None)
                self._release(command[1])
        for job in list(self._jobs.values()):
            self._fail(job, 503, "the server is shutting down; the request was not answered")
        self.reading = 0

    def _drain_after_failure(self) -> None:
        """Warm-up failed: answer every job 503 until stopped."""
        message = f"the engine failed to start: {type(self.startup_error).__name__}: {self.startup_error}"
        while True:
            command = self._inbox.get()
            if command[0] == "stop":
                return
            if command[0] == "submit":
                self._fail(command[1], 503, message)
