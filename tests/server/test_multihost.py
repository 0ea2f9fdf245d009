"""Multi-host serving: two real `lwm-serve` processes on 127.0.0.1 form one run.

Each process has 4 simulated CPU devices; the mesh `1,1,1,8` puts the sequence
axis `sp` across both processes, so every prefill chunk and decode step is one
program over 8 devices of 2 processes (ring attention passes K/V blocks between
them). Process 0 serves HTTP; process 1 replays its steps (server/engine/replica.py).
The answers must be the single-process answers; a follower that dies must turn
the server unready with 503s, not leave clients hanging.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

LWM_SERVE = Path(sys.executable).with_name("lwm-serve")
HEARTBEAT_TIMEOUT_S = 5
START_TIMEOUT_S = 300     # two loads + warm-up compiles on a shared 2-core machine
CHAT = [{"role": "user", "content": "Tell me what happens in the video, step by step."}]
QUESTION = "What is happening in this video?"
STOPPED_BY_SIGTERM = (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Run:
    leader: subprocess.Popen
    follower: subprocess.Popen
    base_url: str
    logs: Path

    def output(self, tail: int | None = 6000) -> str:
        """The processes' logs (each cut to its last `tail` characters; None: whole)."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-(tail or 0):]}"
                         for p in sorted(self.logs.glob("*.log")))

    def stop(self) -> None:
        for proc in (self.leader, self.follower):
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)


def _start(tmp_path: Path, reference_dir: Path, *extra: str, follower_by_env: bool = False) -> Run:
    """Process 0 gets the multi-host flags; process 1 the same, or JAX's standard
    environment variables (auto-detection) with `follower_by_env`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "LWM_SERVE_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               LWM_SERVE_HOME=str(tmp_path / "home"))
    port, coordinator = _free_port(), f"127.0.0.1:{_free_port()}"
    common = ["serve", "--model", f"params::{reference_dir / 'model' / 'params_scan'}",
              "--model-config", str(reference_dir / "model" / "config.json"),
              "--tokenizer", str(reference_dir / "tokenizer"), "--served-model-name", "lwm-fixture",
              "--max-model-len", "1024", "--prefill-chunk", "256", "--mesh", "1,1,1,8",
              "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S), "--log-level", "info", *extra]
    procs = []
    for index in (1, 0):
        by_env = follower_by_env and index == 1
        join = ["--coordinator", coordinator, "--num-processes", "2", "--process-id", str(index)]
        proc_env = {**env, "JAX_COORDINATOR_ADDRESS": coordinator, "JAX_NUM_PROCESSES": "2",
                    "JAX_PROCESS_ID": str(index)} if by_env else env
        log = open(tmp_path / f"process{index}.log", "w")
        procs.append(subprocess.Popen(
            [str(LWM_SERVE), *common, *([] if by_env else join), "--port", str(port),
             "--data-dir", str(tmp_path / f"data{index}")],
            env=proc_env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    run = Run(leader=procs[1], follower=procs[0], base_url=f"http://127.0.0.1:{port}", logs=tmp_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                run.stop()
                pytest.fail(f"a process exited at start ({proc.returncode}):\n{run.output()}")
        try:
            if httpx.get(f"{run.base_url}/ready", timeout=5).status_code == 200:
                return run
        except httpx.TransportError:
            pass
        time.sleep(1)
    run.stop()
    pytest.fail(f"the run was not ready within {START_TIMEOUT_S} s:\n{run.output()}")


def _chat_tokens(base_url: str, api_key: str = "unused") -> list[str]:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=api_key, timeout=120, max_retries=0)
    r = client.chat.completions.create(model="lwm-fixture", messages=CHAT, max_tokens=12, temperature=0,
                                       logprobs=True)
    return [t.token for t in r.choices[0].logprobs.content]


def _video_answer(base_url: str, clip: Path, headers: dict[str, str] | None = None) -> str:
    r = httpx.post(f"{base_url}/v1/video/questions", headers=headers, timeout=120,
                   data={"question": QUESTION, "max_frames": "2", "max_tokens": "6", "temperature": "0"},
                   files={"file": ("clip.mp4", clip.read_bytes(), "video/mp4")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["frames"] == 2
    return body["answer"]


def _wait_unready(run: Run, bound: float) -> None:
    deadline = time.monotonic() + bound
    status = 200
    while time.monotonic() < deadline:
        status = httpx.get(f"{run.base_url}/ready", timeout=10).status_code
        if status == 503:
            return
        time.sleep(0.5)
    pytest.fail(f"/ready still {status} {bound} s after the follower died:\n{run.output()}")


def _assert_refused_not_hung(run: Run) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        _chat_tokens(run.base_url)  # 120 s client timeout: a hang fails as a timeout instead
    assert info.value.status_code == 503
    assert "multi-host run broken" in info.value.response.json()["error"]["message"]
    assert httpx.get(f"{run.base_url}/health", timeout=10).status_code == 200  # up, and saying why
    assert run.leader.poll() is None


# Noticed at the leader's next broadcast (the current step, or the idle heartbeat a second
# later), at the latest after the distributed runtime's heartbeat timeout: bounded either way.
NOTICE_BOUND_S = HEARTBEAT_TIMEOUT_S + 30


def test_two_processes_answer_like_one_and_a_follower_dying_mid_stream_fails_cleanly(
        tmp_path, reference_dir, vision_runtime, make_server, auth_headers, server_media):
    clip = server_media / "h264.mp4"
    one = make_server(vision_runtime)  # the single-process answers
    expected_chat = _chat_tokens(one.base_url, auth_headers["Authorization"].split()[-1])
    expected_video = _video_answer(one.base_url, clip, auth_headers)
    one.stop()

    run = _start(tmp_path, reference_dir, "--vqgan", str(reference_dir / "vqgan" / "vqgan_params.pkl"))
    try:
        out = run.output(tail=None)  # the start-up lines, however long the warm-up logged after them
        assert "process 0 of 2 (8 devices in all, 4 here)" in out and "process 1 of 2" in out, run.output()
        assert "mesh {'dp': 1, 'fsdp': 1, 'tp': 1, 'sp': 8} over 8 cpu devices" in out, run.output()
        assert _chat_tokens(run.base_url) == expected_chat
        assert _video_answer(run.base_url, clip) == expected_video

        # A long stream in flight when the follower dies ends with an error event, not a hang.
        body = {"model": "lwm-fixture", "messages": CHAT, "max_tokens": 900, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        events: list[str] = []
        with httpx.stream("POST", f"{run.base_url}/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            tokens = 0
            for line in lines:
                tokens += line.startswith("data: ")
                if tokens == 4:
                    break  # the role chunk, then tokens: generating
            run.follower.kill()
            deadline = time.monotonic() + NOTICE_BOUND_S
            for line in lines:  # keep-alive comments come every few seconds: the deadline is checked
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                assert time.monotonic() < deadline, f"the stream still runs:\n{run.output()}"
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "multi-host run broken" in error["message"], error
        _wait_unready(run, NOTICE_BOUND_S)
        _assert_refused_not_hung(run)
        run.leader.send_signal(signal.SIGTERM)
        assert run.leader.wait(60) in STOPPED_BY_SIGTERM, run.output()
    finally:
        run.stop()


def test_an_idle_server_notices_a_dead_follower(tmp_path, reference_dir):
    run = _start(tmp_path, reference_dir, "--no-warmup")
    try:
        run.follower.kill()
        run.follower.wait(30)
        _wait_unready(run, NOTICE_BOUND_S)
        _assert_refused_not_hung(run)
    finally:
        run.stop()


def test_a_follower_joins_from_the_environment_and_stops_with_process_0(tmp_path, reference_dir):
    run = _start(tmp_path, reference_dir, "--no-warmup", follower_by_env=True)
    try:
        assert "process 1 of 2 (8 devices in all, 4 here)" in run.output(tail=None)  # JAX_* variables only
        run.leader.send_signal(signal.SIGTERM)
        assert run.leader.wait(60) in STOPPED_BY_SIGTERM, run.output()
        assert run.follower.wait(60) == 0, run.output()  # process 0 told it to stop
        assert "process 0 said stop" in run.output()
    finally:
        run.stop()
