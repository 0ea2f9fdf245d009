"""Prometheus metrics (prometheus-client), named after vLLM's under an `lwm:` prefix.

One `ServerMetrics` per app (its own registry: tests run several apps in one
process). Latencies are histograms observed as the engine works (it calls the
`EngineObserver` methods from its worker thread); levels and totals the engine
already counts (queue, slots, KV use, prefix cache) are read at scrape time.
A pure ASGI middleware counts HTTP responses (it never wraps bodies, so
streaming and disconnect detection are untouched).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]
CONTENT_TYPE = CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 20.0)


class _EngineCollector:
    """Scrape-time view of the engine's own counters."""

    def __init__(self, state: Any) -> None:
        self._state = state  # app.state: services and readiness change over the app's life

    def collect(self) -> Iterator[Any]:
        ready = GaugeMetricFamily("lwm:ready", "Whether the model is loaded, warm and not draining.")
        ready.add_metric([], float(bool(getattr(self._state, "ready", False))))
        yield ready
        services = getattr(self._state, "services", None)
        if services is None:
            return
        s = services.engine.stats()
        gauges = {
            "lwm:num_requests_running": ("Requests prefilling or decoding.", s.running),
            "lwm:num_requests_waiting": ("Requests waiting for a decode slot.", s.waiting),
            "lwm:kv_cache_usage_perc": ("Share of the KV pool's slots holding tokens (1 = full).", s.kv_usage),
            "lwm:kv_slots_total": ("Decode slots (rows of the KV pool).", s.slots_total),
            "lwm:kv_slots_used": ("Decode slots held by requests.", s.slots_used),
            "lwm:prefix_cache_entries": ("Prompt prefills kept for reuse.", s.prefix_entries),
            "lwm:prefix_cache_bytes": ("Bytes of kept prompt prefills.", s.prefix_bytes),
            "lwm:prefix_cache_in_use": ("Kept prefills being copied right now.", s.prefix_in_use),
        }
        for name, (doc, value) in gauges.items():
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value))
            yield g
        counters = {
            "lwm:prompt_tokens": ("Prompt tokens of admitted requests.", s.prompt_tokens_total),
            "lwm:generation_tokens": ("Tokens generated.", s.generated_tokens_total),
            "lwm:prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.", s.prefix_query_tokens),
            "lwm:prefix_cache_hits": ("Prompt tokens served from the prefix cache.", s.prefix_hit_tokens),
            "lwm:requests_rejected": ("Requests refused because the queue was full.", s.rejected_total),
        }
        for name, (doc, value) in counters.items():
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(value))
            yield c
        done = CounterMetricFamily("lwm:requests", "Requests that ended, by how.", labels=["status"])
        done.add_metric(["finished"], float(s.finished_total))
        done.add_metric(["aborted"], float(s.aborted_total))
        done.add_metric(["failed"], float(s.failed_total))
        yield done


class ServerMetrics:
    """The app's registry; also the engine's observer (`server.engine.engine.EngineObserver`)."""

    def __init__(self, app_state: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http = Counter("lwm:http_responses", "HTTP responses by method, route and status.",
                            ["method", "route", "status"], registry=r)
        self.ttft = Histogram("lwm:time_to_first_token_seconds", "From arrival to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lwm:inter_token_latency_seconds", "Between two tokens of one request.",
                             buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("lwm:e2e_request_latency_seconds", "From arrival to the end.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("lwm:request_queue_time_seconds", "From arrival to admission.",
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.frames = Counter("lwm:video_frames_ingested", "Video/image frames decoded and VQGAN-encoded.",
                              registry=r)
        self.ingest = Histogram("lwm:video_ingest_seconds", "Time to ingest one media part (decode + VQGAN).",
                                buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(app_state))

    # EngineObserver
    def request_started(self, queue_s: float, prompt_tokens: int, cached_tokens: int) -> None:
        self.queue.observe(queue_s)

    def first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def tokens(self, count: int, gap_s: float | None) -> None:
        if gap_s is not None:
            self.itl.observe(gap_s)

    def request_ended(self, status: str, e2e_s: float) -> None:
        self.e2e.observe(e2e_s)

    def media_ingested(self, frames: int, seconds: float) -> None:
        self.frames.inc(frames)
        self.ingest.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI middleware recording the status of every HTTP response."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

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
            # 499 (nginx's "client closed request"): the client left before any response.
            code = status["code"] or 499
            self.metrics.http.labels(scope.get("method", ""), path, str(code)).inc()
