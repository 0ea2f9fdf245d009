"""Admission and scheduling: a bounded FIFO of requests waiting for the model.

Pure Python, no JAX: the worker thread calls `next_batch()`; the event loop
calls `add()`. Today a batch is one request (its n rows run together), so
concurrent requests run one after another; continuous batching (many requests
sharing decode steps, slots joining and leaving) will replace `next_batch`
here without touching the HTTP side.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class QueueFullError(RuntimeError):
    """The waiting queue is full; the client should retry later (HTTP 503)."""

    def __init__(self, max_queue: int, retry_after_s: int) -> None:
        self.max_queue, self.retry_after_s = max_queue, retry_after_s
        super().__init__(f"the server is busy: {max_queue} requests are already waiting; "
                         f"retry in {retry_after_s} s")


class SchedulerClosedError(RuntimeError):
    """The engine is shutting down and accepts no new requests."""


@dataclass
class SchedulerStats:
    waiting: int
    admitted_total: int
    rejected_total: int


class Scheduler(Generic[T]):
    """Bounded FIFO between the event loop (producers) and one worker (consumer).

    Args:
        max_queue: most entries waiting (the running one not counted).
        retry_after_s: advice sent with QueueFullError.
    """

    def __init__(self, max_queue: int, retry_after_s: int = 1) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.max_queue, self.retry_after_s = max_queue, retry_after_s
        self._queue: collections.deque[T] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._admitted = 0
        self._rejected = 0

    def add(self, entry: T) -> None:
        """Queues an entry. Raises QueueFullError (full) or SchedulerClosedError."""
        with self._cond:
            if self._closed:
                raise SchedulerClosedError("the engine is shutting down")
            if len(self._queue) >= self.max_queue:
                self._rejected += 1
                raise QueueFullError(self.max_queue, self.retry_after_s)
            self._queue.append(entry)
            self._admitted += 1
            self._cond.notify()

    def next_batch(self, timeout: float | None = None) -> list[T] | None:
        """Blocks until work is available; returns the next batch, [] on timeout,
        None once closed and drained."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._queue or self._closed, timeout):
                return []
            if not self._queue:
                return None
            # One request per batch for now (see module docstring).
            return [self._queue.popleft()]

    def close(self) -> list[T]:
        """Stops admissions; returns the entries that were still waiting."""
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
            return left

    def stats(self) -> SchedulerStats:
        with self._cond:
            return SchedulerStats(len(self._queue), self._admitted, self._rejected)
