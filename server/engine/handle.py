"""The consumer side of an engine request: its handle and what the worker hands it.

The worker thread puts StepOutput / PrefillProgress items, a `Failure` or `END`
on the request's asyncio.Queue (`Entry`); `RequestHandle` (on the event loop)
iterates them. Dropping or leaving a handle early aborts the request.
"""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from lwm_serve.model.generation import StepOutput
from lwm_serve.server.engine.request import AbortReason, GenerationRequest, PrefillProgress, RequestRecord

END = object()  # the request is over: nothing more comes


@dataclass(frozen=True)
class Failure:
    error: BaseException


@dataclass
class Entry:
    request: GenerationRequest
    record: RequestRecord
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class RequestHandle:
    """The consumer side of one request (lives on the event loop)."""

    def __init__(self, entry: Entry, wake: Callable[[], None]) -> None:
        self._entry = entry
        self._wake = wake
        self._ended = False
        # A handle dropped unconsumed (e.g. a stream whose client left before the
        # first byte) must not leave the worker generating for nobody.
        self._on_drop = weakref.finalize(self, abort_record, entry.record, wake)

    @property
    def request_id(self) -> str:
        return self._entry.request.request_id

    @property
    def record(self) -> RequestRecord:
        return self._entry.record

    def abort(self, reason: AbortReason = "client") -> None:
        """Asks the worker to stop this request at its next step (idempotent)."""
        if not self._ended:
            abort_record(self._entry.record, self._wake, reason)

    def _set_ended(self) -> None:
        self._ended = True
        self._on_drop.detach()

    async def events(self) -> AsyncIterator[StepOutput | PrefillProgress]:
        """Prefill progress, then the request's steps in order. Raises the worker's
        exception if it failed. Leaving early (break, cancel, aclose) aborts the request."""
        try:
            while True:
                item = await self._entry.queue.get()
                if item is END:
                    self._set_ended()
                    return
                if isinstance(item, Failure):
                    self._set_ended()
                    raise item.error
                yield item
        finally:
            if not self._ended:
                self.abort("client")

    async def steps(self) -> AsyncIterator[StepOutput]:
        """The request's steps only (see `events`)."""
        events = self.events()
        try:
            async for item in events:
                if isinstance(item, StepOutput):
                    yield item
        finally:
            await events.aclose()


def abort_record(record: RequestRecord, wake: Callable[[], None], reason: AbortReason = "client") -> None:
    record.request_abort(reason)
    wake()
