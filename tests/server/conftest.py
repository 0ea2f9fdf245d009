"""Server test setup: the fixture checkpoint as a runtime, a real uvicorn server, schemas.

One runtime for the whole session (its compiled shapes are shared); one live
server (uvicorn on 127.0.0.1, a free port, in a background thread) per need:
`live` is the shared API-key-protected server most tests use.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import jsonschema
import pytest
import uvicorn
from fastapi import FastAPI

from lwm_serve.server.app import build_app
from lwm_serve.server.config import ServerSettings
from lwm_serve.server.runtime import Runtime, load_runtime

SCHEMAS = Path(__file__).resolve().parents[1] / "fixtures" / "openai" / "schemas.json"
API_KEY = "test-key-123"
# Small enough that a too-long prompt is cheap to build, large enough for the tests.
MAX_MODEL_LEN = 1024


@pytest.fixture(scope="session")
def fixture_runtime(reference_dir: Path) -> Runtime:
    """The reference fixture model (tiny random LWM) with its tokenizer."""
    return load_runtime(f"params::{reference_dir / 'model' / 'params_scan'}",
                        model_config_spec=str(reference_dir / "model" / "config.json"),
                        tokenizer=str(reference_dir / "tokenizer"), served_model_name="lwm-fixture",
                        max_model_len=MAX_MODEL_LEN, prefill_chunk=256, progress=False)


@dataclass
class LiveServer:
    app: FastAPI
    base_url: str
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def engine(self):  # noqa: ANN201 - the Engine of the running app
        return self.app.state.services.engine

    @property
    def model(self) -> str:
        return self.app.state.services.model_name

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_server(app: FastAPI, *, ready_timeout: float = 300.0, wait_for: str = "/ready") -> LiveServer:
    """Runs `app` under uvicorn on 127.0.0.1:<free port> in a thread; waits for `wait_for` (200)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("the server thread died during startup")
        try:
            if httpx.get(f"{base}{wait_for}", timeout=5).status_code == 200:
                return LiveServer(app, base, server, thread)
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    server.should_exit = True
    raise TimeoutError("the server did not become ready")


def settings_for(**overrides: Any) -> ServerSettings:
    base = dict(api_keys=[API_KEY], max_queue=8, max_batch=8, default_max_tokens=16)
    return ServerSettings(**{**base, **overrides})


@pytest.fixture(scope="session")
def live(fixture_runtime: Runtime) -> Iterator[LiveServer]:
    """The shared server: fixture model, API key required."""
    server = start_server(build_app(settings_for(), fixture_runtime))
    yield server
    server.stop()


@pytest.fixture
def make_server() -> Iterator[Callable[..., LiveServer]]:
    """make_server(runtime, wait_for="/ready", **settings): an extra live server, stopped after the test."""
    started: list[LiveServer] = []

    def make(runtime: Any, *, wait_for: str = "/ready", **overrides: Any) -> LiveServer:
        server = start_server(build_app(settings_for(**overrides), runtime), wait_for=wait_for)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="session")
def openai_schemas() -> dict[str, Any]:
    return json.loads(SCHEMAS.read_text())


@pytest.fixture(scope="session")
def validate(openai_schemas: dict[str, Any]) -> Callable[[str, Any], None]:
    """validate(schema_name, body): raises jsonschema.ValidationError on mismatch."""
    validators: dict[str, jsonschema.protocols.Validator] = {}

    def check(name: str, body: Any) -> None:
        if name not in validators:
            schema = {**openai_schemas, "$ref": f"#/$defs/{name}"}
            cls = jsonschema.validators.validator_for(schema)
            cls.check_schema(schema)
            validators[name] = cls(schema)
        validators[name].validate(body)

    return check


def sse_events(lines: Iterator[str]) -> list[str]:
    """The `data:` payloads of an SSE body, in order (asserting the framing)."""
    out = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), f"unexpected SSE line {line!r}"
        out.append(line[len("data: "):])
    return out


@pytest.fixture(scope="session")
def parse_sse() -> Callable[[Iterator[str]], list[str]]:
    return sse_events
