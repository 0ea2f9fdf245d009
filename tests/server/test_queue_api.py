"""Admission over HTTP: /ready before warm-up, 503 + Retry-After when the queue is full.

The real fixture model runs behind a gate (a thin wrapper that waits before each
step) so that "the worker is busy" is a fact of the test, not a race.
"""

from __future__ import annotations

import json
import threading
import time

import httpx


def _wait(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_ready_waits_for_warmup_and_full_queue_is_503(hooked_runtime, make_server, auth_headers, validate):
    gate = threading.Event()

    def wait_for_gate() -> None:
        assert gate.wait(60)

    runtime = hooked_runtime(wait_for_gate)
    live = make_server(runtime, wait_for="/health", max_queue=1, warmup=True, retry_after_s=4)

    # The warm-up request is stuck behind the gate: up, but not ready.
    r = httpx.get(f"{live.base_url}/ready")
    assert r.status_code == 503 and r.headers["retry-after"]
    validate("ErrorResponse", r.json())
    gate.set()
    assert _wait(lambda: httpx.get(f"{live.base_url}/ready").status_code == 200)
    gate.clear()

    url = f"{live.base_url}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.Client(timeout=120) as c1, httpx.Client(timeout=120) as c2:
        with c1.stream("POST", url, json=body, headers=auth_headers) as running:
            assert running.status_code == 200
            assert _wait(lambda: live.engine.stats().running == 1)
            with c2.stream("POST", url, json=body, headers=auth_headers) as waiting:
                assert waiting.status_code == 200
                assert live.engine.stats().waiting == 1
                full = httpx.post(url, json={**body, "stream": False}, headers=auth_headers, timeout=120)
                assert full.status_code == 503
                assert full.headers["retry-after"] == "4"
                validate("ErrorResponse", full.json())
                assert full.json()["error"]["code"] == "queue_full"
                gate.set()  # both admitted requests now complete normally
                texts = []
                for resp in (running, waiting):
                    events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
                    assert events[-1] == "[DONE]"
                    texts.append("".join(json.loads(e)["choices"][0]["delta"].get("content", "")
                                         for e in events[:-1]))
    assert texts[0] == texts[1]  # same greedy request, same answer
    stats = live.engine.stats()
    assert stats.rejected_total == 1 and stats.waiting == 0
