"""The README's first command, as written, starts a server a client can chat with.

The command is read from the README (its first bash block): `python3 -m venv .venv &&
.venv/bin/pip install -e . && .venv/bin/lwm-serve`. The venv and install steps are what
the test run itself stands on (`.ci/run` does exactly them); the server step runs here as
a subprocess, with the embedded demo built in a fresh LWM_SERVE_HOME and the port moved off
8000 through its environment variable (the machine may be shared)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

README = Path(__file__).resolve().parents[2] / "README.md"


def first_command() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S)
    assert block, "the README has no bash block"
    steps = [s.strip() for s in block.group(1).strip().split("&&")]
    assert steps[0].startswith("python3 -m venv .venv") and ".venv/bin/pip install" in steps[1], steps
    return shlex.split(steps[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_readme_first_command_serves_the_demo(tmp_path):
    argv = first_command()
    assert argv[0] == ".venv/bin/lwm-serve"
    argv[0] = str(Path(sys.executable).parent / "lwm-serve")  # this test run's .venv
    port = _free_port()
    env = {**os.environ, "LWM_SERVE_HOME": str(tmp_path / "home"), "LWM_SERVE_PORT": str(port)}
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not become ready"
            try:
                if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused-without---api-key", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model, max_tokens=4, temperature=0,
                                               messages=[{"role": "user", "content": "Describe a sunset."}])
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
        assert isinstance(reply.choices[0].message.content, str)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    assert code == 0, (tmp_path / "server.log").read_text()[-3000:]
