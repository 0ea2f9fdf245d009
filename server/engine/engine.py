"""The async facade over the model: one worker thread runs every JAX call.

Event loop side: `submit()` admits a request into the bounded scheduler (raising
QueueFullError at once when full) and returns a `RequestHandle`, whose `steps()`
async-iterates the request's StepOutputs. Worker side: one thread takes batches
from the scheduler and drives `Generator.stream`, handing each step to the
request's asyncio.Queue with `loop.call_soon_threadsafe` (JAX never runs on the
event loop). Between two steps the worker checks the request's abort flag;
closing `steps()` early (client disconnect, all choices stopped) sets it, and the
worker closes the generator, so generation stops at the next token.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import AsyncIterator

from lwm_serve.model.generation import Generator, StepOutput, seed_key
from lwm_serve.server.engine.request import AbortReason, GenerationRequest, RequestRecord, RequestStatus
from lwm_serve.server.engine.scheduler import Scheduler, SchedulerClosedError

logger = logging.getLogger(__name__)

_END = object()


@dataclass(frozen=True)
class _Failure:
    error: BaseException


@dataclass
class _Entry:
    request: GenerationRequest
    record: RequestRecord
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass
class EngineStats:
    waiting: int
    running: int
    admitted_total: int
    rejected_total: int
    finished_total: int
    aborted_total: int
    failed_total: int
    generated_tokens_total: int


class RequestHandle:
    """The consumer side of one request (lives on the event loop)."""

    def __init__(self, entry: _Entry) -> None:
        self._entry = entry
        self._ended = False
        # A handle dropped unconsumed (e.g. a stream whose client left before the
        # first byte) must not leave the worker generating for nobody.
        self._on_drop = weakref.finalize(self, entry.record.request_abort, "client")

    @property
    def request_id(self) -> str:
        return self._entry.request.request_id

    @property
    def record(self) -> RequestRecord:
        return self._entry.record

    def abort(self, reason: AbortReason = "client") -> None:
        """Asks the worker to stop this request at its next step (idempotent)."""
        if not self._ended:
            self._entry.record.request_abort(reason)

    def _set_ended(self) -> None:
        self._ended = True
        self._on_drop.detach()

    async def steps(self) -> AsyncIterator[StepOutput]:
        """The request's steps in order. Raises the worker's exception if it failed.
        Leaving the iteration early (break, cancel, aclose) aborts the request."""
        try:
            while True:
                item = await self._entry.queue.get()
                if item is _END:
                    self._set_ended()
                    return
                if isinstance(item, _Failure):
                    self._set_ended()
                    raise item.error
                yield item
        finally:
            if not self._ended:
                self.abort("client")


class Engine:
    """Runs generation requests on one worker thread.

    Args:
        generator: the model (weights + generation loop).
        max_queue: requests allowed to wait; more get QueueFullError (HTTP 503).
        retry_after_s: advice sent with QueueFullError.
        history: finished requests whose records are kept for introspection.
    """

    def __init__(self, generator: Generator, *, max_queue: int = 64, retry_after_s: int = 1,
                 history: int = 1024) -> None:
        self.generator = generator
        self._scheduler: Scheduler[_Entry] = Scheduler(max_queue, retry_after_s)
        self._records: collections.OrderedDict[str, RequestRecord] = collections.OrderedDict()
        self._history = history
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running: _Entry | None = None
        self._ids = itertools.count()
        self._finished = self._aborted = self._failed = self._tokens = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._work, name="lwm-engine", daemon=True)
        self._thread.start()
        logger.info("engine worker started (max_queue %d)", self._scheduler.max_queue)

    def stop(self, timeout: float = 30.0) -> None:
        """Stops admissions, fails waiting requests, aborts the running one, joins."""
        for entry in self._scheduler.close():
            entry.record.status = RequestStatus.FAILED
            self._deliver(entry, _Failure(SchedulerClosedError("the server is shutting down")))
            self._deliver(entry, _END)
        running = self._running
        if running is not None:
            running.record.request_abort("client")
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("engine worker did not stop within %.0f s", timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ requests

    @property
    def context_limit(self) -> int:
        return self.generator.context_limit

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raises ContextLengthError when the prompt + new tokens do not fit."""
        self.generator.check_length(prompt_tokens, max_new_tokens)

    def new_request_id(self, prefix: str = "") -> str:
        return f"{prefix}{time.time_ns():x}{next(self._ids):04x}"

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Admits a request (call on the event loop). Raises QueueFullError when full."""
        if not self.alive:
            raise SchedulerClosedError("the engine is not running")
        self.check_length(request.prompt_tokens, request.max_new_tokens)
        record = RequestRecord(request.request_id, len(request.rows), request.max_new_tokens)
        entry = _Entry(request, record, asyncio.get_running_loop(), asyncio.Queue())
        self._scheduler.add(entry)  # may raise QueueFullError
        with self._lock:
            self._records[request.request_id] = record
            while len(self._records) > self._history:
                self._records.popitem(last=False)
        logger.debug("[%s] queued: %d rows, prompt %d, max_new %d", request.request_id,
                     len(request.rows), request.prompt_tokens, request.max_new_tokens)
        return RequestHandle(entry)

    def record(self, request_id: str) -> RequestRecord | None:
        """The record of a recent request (None when unknown or forgotten)."""
        with self._lock:
            return self._records.get(request_id)

    def stats(self) -> EngineStats:
        s = self._scheduler.stats()
        return EngineStats(s.waiting, int(self._running is not None), s.admitted_total, s.rejected_total,
                           self._finished, self._aborted, self._failed, self._tokens)

    # ------------------------------------------------------------------ worker

    def _deliver(self, entry: _Entry, item: object) -> None:
        try:
            entry.loop.call_soon_threadsafe(entry.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening
            entry.record.request_abort("client")

    def _work(self) -> None:
        while True:
            batch = self._scheduler.next_batch()
            if batch is None:
                return
            for entry in batch:
                self._running = entry
                try:
                    self._run(entry)
                finally:
                    self._running = None

    def _run(self, entry: _Entry) -> None:
        req, rec = entry.request, entry.record
        rid = req.request_id
        if rec.abort_event.is_set():
            self._end(entry, None)
            return
        rec.status, rec.started = RequestStatus.RUNNING, time.monotonic()
        logger.debug("[%s] running (waited %.3f s)", rid, rec.started - rec.created)
        stream = None
        error: BaseException | None = None
        try:
            stream = self.generator.stream(
                req.rows, list(req.sampling), max_new_tokens=req.max_new_tokens, key=seed_key(req.seed),
                stop_token_ids=req.stop_token_ids, top_logprobs=req.top_logprobs)
            for step in stream:
                rec.steps += 1
                self._tokens += len(req.rows)
                if rec.first_token is None:
                    rec.first_token = time.monotonic()
                self._deliver(entry, step)
                if rec.abort_event.is_set():
                    break  # stop before computing the next token
        except Exception as exc:  # delivered to the consumer, which maps it to an API error
            error = exc
        finally:
            if stream is not None:
                stream.close()
        self._end(entry, error)

    def _end(self, entry: _Entry, error: BaseException | None) -> None:
        rec = entry.record
        rec.ended = time.monotonic()
        if error is not None:
            rec.status, rec.error = RequestStatus.FAILED, f"{type(error).__name__}: {error}"
            self._failed += 1
            logger.warning("[%s] failed after %d steps: %s", rec.request_id, rec.steps, rec.error)
            self._deliver(entry, _Failure(error))
        elif rec.abort_reason == "client":
            rec.status = RequestStatus.ABORTED
            self._aborted += 1
            logger.info("[%s] aborted by the client after %d steps", rec.request_id, rec.steps)
        else:
            rec.status = RequestStatus.FINISHED
            self._finished += 1
            logger.debug("[%s] finished: %d steps", rec.request_id, rec.steps)
        self._deliver(entry, _END)
