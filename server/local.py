"""A real lwm-serve server inside this process, for code that talks to it over HTTP.

Tests, benchmarks and the LWM-Nano evaluation all need the same thing: the real
app under uvicorn on 127.0.0.1 at a free port, in a background thread, and a wait
until it says it is ready. `start_in_thread` does that for a built app;
`running_server` builds the app from `lwm-serve serve` flags, so every server
option works the same way as on the command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import tempfile
import threading
import time
from typing import Iterator, Sequence

import httpx
import uvicorn
from fastapi import FastAPI

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LocalServer:
    app: FastAPI
    base_url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)


def start_in_thread(app: FastAPI, *, ready_timeout_s: float = 300.0, wait_for: str = "/ready") -> LocalServer:
    """Serves `app` on 127.0.0.1:<free port> in a daemon thread; returns once `wait_for` answers 200.

    The socket is bound here, before uvicorn runs, so the port cannot be taken
    between choosing it and serving on it.

    Raises:
        RuntimeError: the server thread died while starting (its log says why).
        TimeoutError: not ready within `ready_timeout_s`.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    local = LocalServer(app, base, server, thread)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("the server stopped while starting (see its log above)")
        try:
            if httpx.get(f"{base}{wait_for}", timeout=5).status_code == 200:
                return local
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    local.stop(5)
    raise TimeoutError(f"the server at {base} was not ready after {ready_timeout_s:.0f} s")


def settings_from_flags(model: str, flags: Sequence[str] = ()):  # -> ServerSettings
    """ServerSettings from `lwm-serve serve` flags (`--host`/`--port` are ignored: the server
    binds 127.0.0.1 at a free port).

    Raises:
        SystemExit: an unknown or malformed flag (argparse's message on stderr).
        pydantic.ValidationError: settings that do not fit together.
    """
    from lwm_serve.server.cli import build_parser
    from lwm_serve.server.config import ServerSettings

    args = build_parser().parse_args(["serve", "--model", model, *flags])
    values = {k: v for k, v in vars(args).items() if k not in ("command", "host", "port")}
    return ServerSettings(**values)


@contextlib.contextmanager
def running_server(model: str = "demo", flags: Sequence[str] = (), ready_timeout_s: float = 1800.0
                   ) -> Iterator[str]:
    """Serves `model` (a `--model` spec) with `flags`; yields the base URL (http://127.0.0.1:PORT).

    Without `--data-dir`, uploads and the vision cache go to a temporary folder
    removed afterwards.
    """
    from lwm_serve.server.app import build_app

    with contextlib.ExitStack() as stack:
        settings = settings_from_flags(model, flags)
        if settings.data_dir is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="lwm-serve-local-"))
            settings = settings.model_copy(update={"data_dir": tmp})
        local = start_in_thread(build_app(settings), ready_timeout_s=ready_timeout_s)
        stack.callback(local.stop, 60)
        logger.info("serving %s at %s", model, local.base_url)
        yield local.base_url
