"""Models, health, docs and metrics endpoints."""

from __future__ import annotations

import httpx


def test_models_list_and_retrieve(live, auth_headers, validate):
    r = httpx.get(f"{live.base_url}/v1/models", headers=auth_headers)
    assert r.status_code == 200
    validate("ListModelsResponse", r.json())
    assert [m["id"] for m in r.json()["data"]] == [live.model]
    one = httpx.get(f"{live.base_url}/v1/models/{live.model}", headers=auth_headers)
    validate("Model", one.json())
    assert one.json() == r.json()["data"][0]


def test_health_ready_docs(live):
    assert httpx.get(f"{live.base_url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{live.base_url}/ready")
    assert ready.status_code == 200 and ready.json()["model"] == live.model
    docs = httpx.get(f"{live.base_url}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = httpx.get(f"{live.base_url}/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/ready"):
        assert path in spec["paths"]
    assert "400" in spec["paths"]["/v1/chat/completions"]["post"]["responses"]


def test_metrics_count_requests_and_tokens(live, auth_headers, read_metrics):
    before = read_metrics(live.base_url)
    r = httpx.post(f"{live.base_url}/v1/chat/completions", headers=auth_headers, timeout=120,
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200
    assert httpx.get(f"{live.base_url}/metrics").headers["content-type"].startswith("text/plain")
    after = read_metrics(live.base_url)

    def grew(name: str, labels: tuple = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert grew("lwm:generation_tokens_total") == 3
    assert grew("lwm:prompt_tokens_total") == r.json()["usage"]["prompt_tokens"]
    assert grew("lwm:http_responses_total",
                (("method", "POST"), ("route", "/v1/chat/completions"), ("status", "200"))) == 1
    assert grew("lwm:time_to_first_token_seconds_count") == 1
    assert grew("lwm:inter_token_latency_seconds_count") == 2
    assert grew("lwm:e2e_request_latency_seconds_count") == 1
    assert grew("lwm:requests_total", (("status", "finished"),)) == 1
    assert after[("lwm:ready", ())] == 1
    assert after[("lwm:kv_slots_used", ())] == 0  # the finished request gave its slot back


def test_cors_preflight(live):
    r = httpx.options(f"{live.base_url}/v1/chat/completions", headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] in ("*", "http://example.com")


def test_a_bug_is_a_logged_500_without_internals(caplog, validate):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lwm_serve.server.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/boom")
    assert r.status_code == 500
    validate("ErrorResponse", r.json())
    assert "secret" not in r.text and r.json()["error"]["code"] == "internal_error"
    assert any(rec.exc_info and "secret internal detail" in str(rec.exc_info[1]) for rec in caplog.records)
