"""Server-Sent Events framing and client-disconnect handling.

A stream is `data: {json}\n\n` per chunk and `data: [DONE]\n\n` at the end. If
the handler's iterator fails mid-stream the client gets ONE OpenAI error object
as a data event, then `[DONE]` (the status line has already gone out). A client
that disconnects cancels the iteration; the handler's iterator then aborts its
engine request (see `RequestHandle.steps`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from lwm_serve.server.errors import to_api_error

logger = logging.getLogger(__name__)

T = TypeVar("T")
DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_CLOSED = 499  # nginx's code: the client closed the request
KEEPALIVE_S = 10.0


class SSEComment(str):
    """A comment line (`: text`): progress that OpenAI clients skip."""


@dataclass(frozen=True)
class SSEEvent:
    """A named event (`event: name` + `data: json`), e.g. progress on /v1/video/questions."""

    event: str
    data: dict[str, Any]


def sse_data(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_frame(chunk: dict | SSEComment | SSEEvent) -> str:
    if isinstance(chunk, SSEComment):
        return "".join(f": {line}\n" for line in chunk.splitlines() or [""]) + "\n"
    if isinstance(chunk, SSEEvent):
        return f"event: {chunk.event}\n" + sse_data(chunk.data)
    return sse_data(chunk)


async def sse_events(chunks: AsyncIterator[dict | SSEComment | SSEEvent],
                     keepalive_s: float | None = None) -> AsyncIterator[str]:
    """Frames chunk dicts (and comments / named events) as SSE; an error becomes one
    error event; always ends with [DONE] (unless the client is gone, in which case
    nothing more is sent). While the next chunk is slow to come (a long prefill or
    ingest), a `: keep-alive` comment goes out every `keepalive_s` so proxies with
    idle timeouts do not cut the stream."""
    keepalive_s = keepalive_s or KEEPALIVE_S
    pending: asyncio.Future | None = None
    try:
        while True:
            pending = asyncio.ensure_future(chunks.__anext__())
            while not (await asyncio.wait({pending}, timeout=keepalive_s))[0]:
                yield ": keep-alive\n\n"
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                pending = None
                break
            pending = None
            yield sse_frame(chunk)
    except Exception as exc:
        err = to_api_error(exc)
        if err.status >= 500:
            logger.exception("stream failed", exc_info=exc)
        else:
            logger.info("stream failed: %s", err.message)
        yield sse_data(err.body())
    finally:
        if pending is not None and not pending.done():
            pending.cancel()  # the client left while a chunk was being made
            await asyncio.gather(pending, return_exceptions=True)
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()  # runs the handler's cleanup (engine abort) at once
    yield DONE


def sse_response(chunks: AsyncIterator[Any]) -> StreamingResponse:
    return StreamingResponse(sse_events(chunks), media_type="text/event-stream", headers=SSE_HEADERS)


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | Response:
    """Runs a non-streaming handler, cancelling it if the client disconnects first
    (so its engine request is aborted instead of generating for nobody)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    logger.info("client disconnected before the response was ready")
    return Response(status_code=CLIENT_CLOSED)
