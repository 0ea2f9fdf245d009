"""SIGTERM on a real `lwm-serve` process: in-flight streams finish, new work is refused, the
process exits by itself (bounded)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_streams_and_exits(reference_dir: Path, tmp_path: Path):
    port = _free_port()
    exe = Path(sys.executable).parent / "lwm-serve"
    cmd = [str(exe), "serve", "--model", f"params::{reference_dir / 'model' / 'params_scan'}",
           "--model-config", str(reference_dir / "model" / "config.json"),
           "--tokenizer", str(reference_dir / "tokenizer"), "--max-model-len", "1024",
           "--prefill-chunk", "256", "--port", str(port), "--data-dir", str(tmp_path / "data"),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "LWM_SERVE_HOME": str(tmp_path / "home")})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 900,
                "ignore_eos": True, "stream": True, "temperature": 0, "stream_options": {"include_usage": True}}
        deltas, last, usage = 0, None, None
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=300) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                last = line
                if line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    deltas += bool(chunk["choices"])
                    usage = chunk.get("usage") or usage
                if deltas == 2:
                    proc.send_signal(signal.SIGTERM)
        assert last == "data: [DONE]"
        assert usage["completion_tokens"] == 900  # the stream in flight ran to its end
        # then the process left by itself (uvicorn re-raises the signal it handled once it is done)
        assert proc.wait(60) in (0, -signal.SIGTERM)
        try:
            refused = httpx.get(f"{base}/ready", timeout=2).status_code
        except httpx.TransportError:
            refused = "closed"
        assert refused in ("closed", 503)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
