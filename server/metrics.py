"""Prometheus text metrics: HTTP responses by route and status, engine counters.

Kept dependency-free and cheap: a pure ASGI middleware counts responses (it
never wraps bodies, so streaming and disconnect detection are untouched) and
the engine's own counters are read at scrape time.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Awaitable, Callable

from lwm_serve.server.engine.engine import EngineStats

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


class HttpCounter:
    """Counts finished HTTP responses per (method, route, status)."""

    def __init__(self) -> None:
        self._counts: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self._lock = threading.Lock()

    def add(self, method: str, route: str, status: int) -> None:
        with self._lock:
            self._counts[(method, route, status)] += 1

    def snapshot(self) -> dict[tuple[str, str, int], int]:
        with self._lock:
            return dict(self._counts)


class MetricsMiddleware:
    """Pure ASGI middleware recording the status of every HTTP response."""

    def __init__(self, app: ASGIApp, counter: HttpCounter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 0}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.counter.add(scope.get("method", ""), path, status["code"])


def render(http: HttpCounter, engine: EngineStats | None, ready: bool) -> str:
    """The exposition text (Prometheus format 0.0.4)."""
    lines = ["# HELP lwm_http_responses_total HTTP responses by method, route and status.",
             "# TYPE lwm_http_responses_total counter"]
    for (method, route, status), n in sorted(http.snapshot().items()):
        lines.append(f'lwm_http_responses_total{{method="{method}",route="{route}",status="{status}"}} {n}')
    lines += ["# HELP lwm_ready Whether the model is loaded and warm.", "# TYPE lwm_ready gauge",
              f"lwm_ready {int(ready)}"]
    if engine is not None:
        gauges = {"lwm_requests_waiting": engine.waiting, "lwm_requests_running": engine.running}
        counters = {
            "lwm_requests_admitted_total": engine.admitted_total,
            "lwm_requests_rejected_total": engine.rejected_total,
            "lwm_requests_finished_total": engine.finished_total,
            "lwm_requests_aborted_total": engine.aborted_total,
            "lwm_requests_failed_total": engine.failed_total,
            "lwm_generated_tokens_total": engine.generated_tokens_total,
        }
        for name, value in gauges.items():
            lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        for name, value in counters.items():
            lines += [f"# TYPE {name} counter", f"{name} {value}"]
    return "\n".join(lines) + "\n"
