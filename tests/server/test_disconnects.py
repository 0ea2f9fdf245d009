"""Clients that leave are not bugs: a cut upload is logged at info and counted as 499
(not "unhandled error" with tracebacks, not status 0), leaves no file, and a `store=true`
upload whose client left before receiving its id is removed. Log lines escape the
control bytes of request paths."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
import uuid
from urllib.parse import urlsplit

import httpx
import pytest

from lwm_serve.server.errors import loggable

BOUNDARY = "lwmtestboundary"


def _multipart_head(fields: dict[str, str], filename: str) -> bytes:
    out = b""
    for name, value in fields.items():
        out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").encode()
    out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return out


def _tail() -> bytes:
    return f"\r\n--{BOUNDARY}--\r\n".encode()


def _open(base_url: str, path: str, length: int, auth: str) -> socket.socket:
    url = urlsplit(base_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: {auth}\r\n"
                  f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {length}\r\n\r\n"
                  ).encode())
    return sock


def _wait(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _count(server, route: str, status: int) -> int:
    """Responses counted by the app's metrics (`lwm:http_responses_total`) for a route and status."""
    return int(sum(sample.value for family in server.app.state.metrics.registry.collect()
                   for sample in family.samples
                   if sample.name == "lwm:http_responses_total" and sample.labels.get("route") == route
                   and sample.labels.get("status") == str(status)))


@pytest.fixture(scope="module")
def server(launch, vision_runtime):
    srv = launch(vision_runtime)
    yield srv
    srv.stop()


@pytest.mark.parametrize("route, fields", [("/v1/files", {"purpose": "user_data"}),
                                           ("/v1/video/questions", {"question": "q"})])
def test_a_client_leaving_mid_upload_is_a_499_logged_at_info(server, auth_headers, caplog, find_leftovers,
                                                            route, fields):
    caplog.set_level(logging.INFO)
    before = _count(server, route, 499)
    head = _multipart_head(fields, "clip.mp4")
    sock = _open(server.base_url, route, len(head) + (8 << 20) + len(_tail()), auth_headers["Authorization"])
    sock.sendall(head + b"\0" * (256 << 10))  # a quarter of a MiB of 8, then gone
    time.sleep(0.2)
    sock.close()
    _wait(lambda: _count(server, route, 499) > before, "the 499 to be counted")
    assert _count(server, route, 0) == 0 and _count(server, route, 500) == 0
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == [], [r.getMessage() for r in problems]
    assert any("closed the request" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert find_leftovers(server.data_dir) == []
    assert httpx.get(f"{server.base_url}/ready").status_code == 200


@pytest.fixture
def gated(hooked_runtime, vision_runtime, make_server):
    """A vision server whose generation waits at each step until `gate` is set."""
    gate = threading.Event()
    entered = threading.Event()

    def before_step() -> None:
        entered.set()
        gate.wait(60)

    runtime = dataclasses.replace(hooked_runtime(before_step), vqgan=vision_runtime.vqgan)
    server = make_server(runtime, warmup=False, wait_for="/health")
    yield server, gate, entered
    gate.set()


@pytest.mark.parametrize("stream", ["false", "true"])
def test_a_kept_upload_whose_client_left_before_the_id_is_removed(gated, auth_headers, server_media, find_leftovers,
                                                                  stream):
    server, gate, entered = gated
    data = (server_media / "image.png").read_bytes()
    head = _multipart_head({"question": "q", "store": "true", "stream": stream, "max_tokens": "4",
                            "temperature": "0"}, "image.png")
    body = head + data + _tail()
    sock = _open(server.base_url, "/v1/video/questions", len(body), auth_headers["Authorization"])
    sock.sendall(body)
    assert entered.wait(120), "generation never started"
    listed = httpx.get(f"{server.base_url}/v1/files", headers=auth_headers).json()["data"]
    assert len(listed) == 1  # kept while the question is being answered
    sock.close()  # gone before the answer (and so the file id) reached it
    gate.set()
    _wait(lambda: httpx.get(f"{server.base_url}/v1/files", headers=auth_headers).json()["data"] == [],
          "the kept upload to be removed")
    assert find_leftovers(server.data_dir) == []


def test_control_bytes_in_paths_are_escaped_in_logs(live, auth_headers, caplog):
    caplog.set_level(logging.INFO)
    marker = uuid.uuid4().hex[:8]
    raw = f"/v1/files/{marker}%0d%0aFORGED%1b[31m"
    r = httpx.get(f"{live.base_url}{raw}", headers=auth_headers)
    assert r.status_code == 404
    lines = [rec.getMessage() for rec in caplog.records if marker in rec.getMessage()]
    assert lines, "the 404 was logged"
    assert all("\r" not in line and "\n" not in line and "\x1b" not in line for line in lines), lines
    assert loggable("a\r\nb\x1b") == "a\\r\\nb\\x1b"


def test_a_remaining_500_closes_the_connection(make_server, fixture_runtime, auth_headers, caplog):
    """A bug's 500 keeps the error shape, is logged with its traceback, and says
    `Connection: close` (the connection's state after a bug is unknown)."""

    server = make_server(fixture_runtime, warmup=False, wait_for="/health")

    async def boom() -> None:
        raise RuntimeError("a bug")

    server.app.add_api_route("/test-only/boom", boom)
    with httpx.Client() as client:
        r = client.get(f"{server.base_url}/test-only/boom")
    assert r.status_code == 500 and r.headers.get("connection") == "close"
    assert r.json()["error"]["code"] == "internal_error"
    assert any(rec.exc_info for rec in caplog.records if "unhandled error" in rec.getMessage())
