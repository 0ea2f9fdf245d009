"""SSE framing on the wire, the error event, and client disconnects stopping the worker."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from lwm_serve.server.engine.request import RequestStatus
from lwm_serve.server.errors import InvalidRequestError
from lwm_serve.server.streaming import DONE, sse_events


def _long_body(live, stream: bool) -> dict:
    # As long as the context allows, so the worker is certainly still busy when the client leaves.
    return {"model": live.model, "messages": [{"role": "user", "content": "Go on forever"}], "stream": stream,
            "max_tokens": live.engine.context_limit - 64, "temperature": 0, "ignore_eos": True}


def _wait_done(record, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not record.status.done and time.monotonic() < deadline:
        time.sleep(0.01)


def test_raw_sse_framing(live, auth_headers):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{live.base_url}/v1/chat/completions", json=body, headers=auth_headers,
                      timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        raw = r.read().decode()
    assert raw.endswith("\n\ndata: [DONE]\n\n")
    events = raw.split("\n\n")
    # progress comments (": ..."), which SSE clients skip, may precede the data events
    comments = [e for e in events[:-1] if e.startswith(": ")]
    assert all(c.startswith(": progress stage=prefill") for c in comments)
    events = [e for e in events if not e.startswith(": ")]
    assert events[-1] == "" and all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    chunks = [json.loads(e[6:]) for e in events[:-2]]
    roles = [c["choices"][0]["index"] for c in chunks[:2]]
    assert roles == [0, 1] and all(c["choices"][0]["delta"]["role"] == "assistant" for c in chunks[:2])
    finals = sorted(c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert finals == [0, 1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def test_a_failing_stream_sends_one_error_event_then_done(validate):
    async def chunks():
        yield {"ok": 1}
        raise InvalidRequestError("something went wrong", param="messages")

    async def collect():
        return [e async for e in sse_events(chunks())]

    events = asyncio.run(collect())
    assert events[0] == 'data: {"ok":1}\n\n' and events[-1] == DONE and len(events) == 3
    body = json.loads(events[1][len("data: "):])
    validate("ErrorResponse", body)
    assert body["error"]["message"] == "something went wrong" and body["error"]["param"] == "messages"


def _paced(hooked_runtime):
    """The fixture model at >= 20 ms per step: 960 tokens cannot be done before the client leaves."""
    return hooked_runtime(lambda: time.sleep(0.02))


def test_disconnected_stream_stops_the_worker(hooked_runtime, make_server, auth_headers):
    live = make_server(_paced(hooked_runtime))
    body = _long_body(live, stream=True)
    chunks = []
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", f"{live.base_url}/v1/chat/completions", json=body, headers=auth_headers) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(json.loads(line[6:]))
                if len(chunks) >= 4:
                    break  # leaving the block closes the connection mid-stream
    record = live.engine.record(chunks[0]["id"].removeprefix("chatcmpl-"))
    assert record is not None
    _wait_done(record)
    assert record.status is RequestStatus.ABORTED
    steps = record.steps
    assert 3 <= steps < body["max_tokens"]
    time.sleep(0.2)
    assert record.steps == steps  # nothing more was generated for it
    # The server goes on serving.
    r = httpx.post(f"{live.base_url}/v1/chat/completions", headers=auth_headers, timeout=120,
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert r.status_code == 200


def test_disconnected_non_stream_request_is_aborted(hooked_runtime, make_server, auth_headers):
    live = make_server(_paced(hooked_runtime))
    before = live.engine.stats().aborted_total
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.base_url}/v1/chat/completions", json=_long_body(live, stream=False),
                   headers=auth_headers, timeout=httpx.Timeout(120, read=0.5))
    deadline = time.monotonic() + 60
    while live.engine.stats().aborted_total == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert live.engine.stats().aborted_total == before + 1
    assert live.engine.stats().running == 0 or _settles(live)


def _settles(live) -> bool:
    deadline = time.monotonic() + 30
    while live.engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.01)
    return live.engine.stats().running == 0
