"""A real lwm-serve server in this process, for evaluations that bring their own.

`running_server(model, flags)` parses `flags` exactly as `lwm-serve serve` does
(so every server option works: `--frame-layout vision_chat`, `--max-num-seqs 32`,
...), starts uvicorn on 127.0.0.1 at a free port in a background thread, waits for
/ready, yields the base URL, and stops the server on exit. Without `--data-dir`,
uploads and the vision cache go to a temporary folder removed afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import tempfile
import threading
import time
from typing import Iterator, Sequence

import httpx

logger = logging.getLogger(__name__)


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
    """Serves `model` (a `--model` spec) with `flags`; yields the base URL (http://127.0.0.1:PORT)."""
    import uvicorn

    from lwm_serve.server.app import build_app

    with contextlib.ExitStack() as stack:
        settings = settings_from_flags(model, flags)
        if settings.data_dir is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="lwm-nano-eval-"))
            settings = settings.model_copy(update={"data_dir": tmp})
        sock = stack.enter_context(socket.socket())
        sock.bind(("127.0.0.1", 0))
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        server = uvicorn.Server(uvicorn.Config(build_app(settings), log_level="warning",
                                               timeout_graceful_shutdown=5))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()

        def stop() -> None:
            server.should_exit = True
            thread.join(60)

        stack.callback(stop)
        _wait_ready(base, thread, ready_timeout_s)
        logger.info("serving %s at %s", model, base)
        yield base


def _wait_ready(base: str, thread: threading.Thread, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not thread.is_alive():
            raise RuntimeError("the server stopped while starting (see its log above)")
        try:
            if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the server at {base} was not ready after {timeout_s:.0f} s")
