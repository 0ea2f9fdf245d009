"""Admission and scheduling: a bounded FIFO of requests waiting for the model.

Pure Python, no JAX: the event loop calls `add()`; the engine's worker thread
`peek()`s at the oldest request and `pop()`s it once the slot pool has room for
it (FIFO admission: a large request is not overtaken by smaller ones forever).
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

    def peek(self, timeout: float | None = 0.0) -> T | None:
        """The oldest waiting entry, left in the queue; waits up to `timeout`
        (None: until one comes or the scheduler closes). None when there is none."""
        with self._cond:
            if timeout != 0.0:
                self._cond.wait_for(lambda: self._queue or self._closed, timeout)
            return self._queue[0] if self._queue else None

    def pop(self, entry: T) -> None:
        """Takes a peeked entry out of the queue (it starts running)."""
        with self._cond:
            self._queue.remove(entry)

    def remove_if(self, predicate) -> list[T]:
        """Takes every waiting entry matching `predicate` out (aborted while waiting)."""
        with self._cond:
            gone = [e for e in self._queue if predicate(e)]
            for e in gone:
                self._queue.remove(e)
            return gone

    @property
    def closed(self) -> bool:
        return self._closed

    def wake(self) -> None:
        """Wakes a worker blocked in `peek` (an abort or a stop happened)."""
        with self._cond:
            self._cond.notify_all()

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
