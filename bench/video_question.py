"""A video question end to end on the real server, split into the stages the server reports.

Starts `lwm-serve serve` as a process (uvicorn on 127.0.0.1, a free port) on reference-shaped
random weights: `--load-format dummy --model-config bench-150m`, a real-size VQGAN
(`VQGANConfig()` defaults, random weights) pickled in a temp dir, `--frame-layout
vision_chat`, a fresh data dir (empty code cache) and an empty compilation cache (a first
launch, not a restart). Two 8-second 640x360 H.264 clips of different content are made with
PyAV and uploaded (/v1/files). Then, streamed chat
completions (greedy, `ignore_eos`, --max-tokens new tokens, the reference's 8 uniform frames):

  1. cold: clip A, sent the moment /ready says yes (launch -> answer counts from the
     process start, as the reference's one-shot script does);
  2. the same video and question again;
  3. a new video (clip B);
  4. a follow-up: the conversation of 3, its answer, and a new question (dummy weights answer
     with ids the demo tokenizer lacks, which read back as ` <id:N>` text: the answer turn is
     several times longer in tokens than a real model's would be).

Each ask is split with the server's own figures, not client guesses: video decode,
preprocess and VQGAN seconds from the ingest's `progress stage=ingested` comment (measured
by the pipeline; VQGAN calls overlap decoding, so "vqgan" is what did not overlap);
prefill = the request's time to first token and generation = e2e - TTFT, both from the
/metrics histogram sums (lwm:time_to_first_token_seconds, lwm:e2e_request_latency_seconds)
read before and after the ask; "other" is the rest of the client's wall time (upload,
planning, HTTP). The VQGAN batch the server measured at start-up is read from its log.
Printed next to the reference's figures measured on this machine and this run's fp32 matmul
roof (the VQGAN's FLOPs per frame from XLA's cost analysis).

    .venv/bin/python bench/video_question.py            # the real-size run (minutes)
    .venv/bin/python bench/video_question.py --quick    # the demo model, seconds (CI smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np

import roofline  # bench/ is the script's folder

# The reference (LWM's own vision_chat code, bench-150m-shaped params, the real-size VQGAN,
# an 8-frame 640x360 clip, 64 new tokens) measured on this machine (issue 16).
REFERENCE = {"cold_s": 77.9, "vqgan_s": 19.8, "prefill_s": 9.5, "generation_s": 32.8, "tok_s": 1.92,
             "vqgan_s_per_frame": (2.1, 2.2)}
TARGETS = {"new_video_s": REFERENCE["cold_s"] / 4, "same_video_s": REFERENCE["cold_s"] / 10}
QUESTION = "What happens in this video? Describe it step by step."
FOLLOW_UP = "What changes between the first and the last frame?"


def make_clip(path: Path, seconds: float, width: int, height: int, seed: int, fps: int = 30) -> None:
    """An H.264 clip of moving coloured squares over a gradient (content set by `seed`)."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1.0, 3)
    base = np.broadcast_to(base, (height, width, 3)).astype(np.uint8)
    squares = [(rng.integers(0, 255, 3), rng.uniform(-6, 6, 2), rng.integers(16, height // 3)) for _ in range(4)]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "23"}
        for i in range(int(seconds * fps)):
            img = base.copy()
            for k, (colour, (vx, vy), side) in enumerate(squares):
                x = int(abs((20 * k + vx * i) % (2 * (width - side)) - (width - side)))
                y = int(abs((15 * k + vy * i) % (2 * (height - side)) - (height - side)))
                img[y:y + side, x:x + side] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_vqgan(directory: Path, quick: bool) -> Path | None:
    """A real-size VQGAN pickle with random weights (the demo's own in --quick)."""
    if quick:
        return None
    from lwm_serve.tokenizers import vqgan as vq

    cfg = vq.VQGANConfig()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg.to_dict()))
    path = directory / "vqgan_params.pkl"
    with open(path, "wb") as f:
        pickle.dump(vq.init_params(cfg, seed=0), f, protocol=4)
    return path


def vqgan_gflop_per_frame(quick: bool) -> float:
    """XLA's cost analysis of encoding one frame (no weights needed: abstract shapes)."""
    import jax
    import jax.numpy as jnp

    from lwm_serve.server.runtime import DEMO_VQGAN
    from lwm_serve.tokenizers import vqgan as vq

    cfg = vq.VQGANConfig(**DEMO_VQGAN) if quick else vq.VQGANConfig()
    shapes = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), vq.param_shapes(cfg),
                                    is_leaf=vq._is_shape)
    frame = jax.ShapeDtypeStruct((1, cfg.resolution, cfg.resolution, cfg.num_channels), jnp.float32)
    cost = vq.encode.lower(shapes, cfg, frame).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / 1e9


def standalone_vqgan_s_per_frame(quick: bool, batch: int, repeats: int = 2) -> float:
    """Encode seconds per frame of the same VQGAN shape in THIS process, no server (the path
    bench/ingest.py measures), at the server's chosen batch: what the server path is compared with."""
    from lwm_serve.server.runtime import DEMO_VQGAN
    from lwm_serve.tokenizers import vqgan as vq

    cfg = vq.VQGANConfig(**DEMO_VQGAN) if quick else vq.VQGANConfig()
    model = vq.VQGAN(vq.init_params(cfg, seed=1), cfg, batch_size=batch)
    frames = np.random.default_rng(0).uniform(-1, 1, (batch, cfg.resolution, cfg.resolution, 3)).astype(np.float32)
    model.encode_batch(frames)  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.encode_batch(frames)
        best = min(best, time.perf_counter() - t0)
    return best / batch


def matmul_roof(n: int = 2048) -> float:
    """fp32 matmul GFLOP/s measured now (the roof of conv-heavy VQGAN work)."""
    return roofline.matmul_peak(n) / 1e9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(base: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}


def parse_comment(line: str) -> dict[str, Any]:
    """': progress stage=ingested done=8 ... vqgan_s=1.2' -> {stage: 'ingested', done: 8, ...}."""
    out: dict[str, Any] = {}
    for k, v in re.findall(r"(\w+)=(\S+)", line):
        try:
            out[k] = float(v)
        except ValueError:
            out[k] = v
    return out


def ask(base: str, model: str, messages: list, max_tokens: int, upload_s: float = 0.0) -> dict[str, Any]:
    """One streamed chat completion; the server's split of its time (module docstring).

    `upload_s`: the seconds its video's upload took just before (counted in its wall time)."""
    before = metrics(base)
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ingested: dict[str, Any] = {}
    cached = False
    text, usage = "", {}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=3600) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"chat completion failed: {r.status_code} {r.text[:500]}")
        for line in r.iter_lines():
            if line.startswith(": progress"):
                event = parse_comment(line[2:])
                if event.get("stage") == "ingested":
                    ingested = event
                cached = cached or event.get("stage") == "cached"
            elif line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    text += choice["delta"].get("content") or ""
    wall = time.perf_counter() - t0 + upload_s
    deadline = time.monotonic() + 30
    while True:  # the engine records the request's end just after it streams the last token
        after = metrics(base)
        if after.get("lwm:e2e_request_latency_seconds_count", 0) > before.get("lwm:e2e_request_latency_seconds_count", 0):
            break
        if time.monotonic() > deadline:
            raise RuntimeError("the server never recorded the request's end in /metrics")
        time.sleep(0.05)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("lwm:time_to_first_token_seconds_count") == 1, "another request ran during the ask"
    ttft = delta("lwm:time_to_first_token_seconds_sum")
    e2e = delta("lwm:e2e_request_latency_seconds_sum")
    tokens = int(usage.get("completion_tokens", 0))
    split = {"decode": ingested.get("decode_s", 0.0), "preprocess": ingested.get("preprocess_s", 0.0),
             "vqgan": ingested.get("vqgan_s", 0.0), "prefill": ttft, "generation": e2e - ttft}
    split["other"] = wall - sum(split.values())
    frames = int(ingested.get("total", 0))
    return {"wall_s": wall, "split_s": split, "ingest_s": ingested.get("total_s", 0.0), "frames": frames,
            "codes_cached": cached, "completion_tokens": tokens, "prompt_tokens": usage.get("prompt_tokens"),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0),
            "gen_tok_s": (tokens - 1) / split["generation"] if tokens > 1 and split["generation"] > 0 else None,
            "vqgan_s_per_frame": split["vqgan"] / frames if frames else None,
            "ingest_s_per_frame": ingested.get("total_s", 0.0) / frames if frames else None, "text": text}


def upload(base: str, path: Path) -> tuple[str, float]:
    """The file id and the seconds the upload took."""
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        r = httpx.post(f"{base}/v1/files", data={"purpose": "user_data"},
                       files={"file": (path.name, f, "video/mp4")}, timeout=600)
    r.raise_for_status()
    return r.json()["id"], time.perf_counter() - t0


def video_message(file_id: str, max_frames: int | None) -> dict:
    part: dict[str, Any] = {"url": file_id}
    if max_frames is not None:
        part["max_frames"] = max_frames
    return {"role": "user", "content": [{"type": "text", "text": QUESTION},
                                        {"type": "video_url", "video_url": part}]}


def start_server(argv: list[str], env: dict[str, str], log_path: Path, port: int,
                 timeout_s: float) -> tuple[subprocess.Popen, float]:
    """Starts the server; returns it and the seconds from launch to /ready."""
    log = log_path.open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        if time.perf_counter() - t0 > timeout_s:
            proc.kill()
            raise TimeoutError(f"the server was not ready in {timeout_s:.0f} s:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.2)  # a tighter poll costs the starting server CPU on a 2-core machine


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="the demo model and VQGAN, a 2-frame 160x96 clip, 4 new tokens (a smoke test)")
    ap.add_argument("--max-tokens", type=int, default=None, help="new tokens per answer (default 64; --quick 4)")
    ap.add_argument("--model-config", default="bench-150m", help="the dummy model's preset (default bench-150m)")
    ap.add_argument("--vqgan-batch", default=None, help="pass --vqgan-batch to the server (default: it measures)")
    ap.add_argument("--ready-timeout", type=float, default=1800.0)
    ap.add_argument("--server-log", type=Path, default=None, help="keep the server's log at this path")
    args = ap.parse_args(argv)
    quick = args.quick
    max_tokens = args.max_tokens or (4 if quick else 64)
    width, height, seconds, max_frames = (160, 96, 2.0, 2) if quick else (640, 360, 8.0, None)

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lwm-vq-bench-") as tmp:
        tmp = Path(tmp)
        clips = [tmp / "clip_a.mp4", tmp / "clip_b.mp4"]
        for seed, clip in enumerate(clips):
            make_clip(clip, seconds, width, height, seed)
        vqgan = write_vqgan(tmp / "vqgan", quick)
        port = free_port()
        cmd = [str(Path(sys.executable).parent / "lwm-serve"), "serve", "--host", "127.0.0.1", "--port", str(port),
               "--data-dir", str(tmp / "data"), "--compile-cache-dir", str(tmp / "compile-cache"),
               "--frame-layout", "vision_chat", "--no-playground",
               "--log-level", "info"]
        if quick:  # fewer decode shapes to precompile: one request runs at a time here
            cmd += ["--max-model-len", "1024", "--max-num-seqs", "1"]
        else:
            cmd += ["--load-format", "dummy", "--model-config", args.model_config, "--vqgan", str(vqgan),
                    "--max-model-len", "4096", "--max-num-seqs", "2"]
        if args.vqgan_batch:
            cmd += ["--vqgan-batch", args.vqgan_batch]
        env = dict(os.environ)
        log_path = tmp / "server.log"
        proc, ready_s = start_server(cmd, env, log_path, port, args.ready_timeout)
        base = f"http://127.0.0.1:{port}"
        try:
            model = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
            asks: dict[str, dict[str, Any]] = {}
            file_a, upload_a = upload(base, clips[0])
            first = [video_message(file_a, max_frames)]
            asks["cold"] = ask(base, model, first, max_tokens, upload_a)
            asks["same_video"] = ask(base, model, first, max_tokens)
            file_b, upload_b = upload(base, clips[1])
            ask_b = [video_message(file_b, max_frames)]
            asks["new_video"] = ask(base, model, ask_b, max_tokens, upload_b)
            follow = ask_b + [{"role": "assistant", "content": asks["new_video"]["text"]},
                              {"role": "user", "content": FOLLOW_UP}]
            asks["follow_up"] = ask(base, model, follow, max_tokens)
        finally:
            stop_server(proc)
        log = log_path.read_text()
        if args.server_log:
            args.server_log.write_text(log)
    # The server's own start-up measurement of the VQGAN batch (tokenizers/vqgan_batch.py).
    probe = re.findall(r"VQGAN encode batch (\d+): ([\d.]+) s per frame", log)
    chosen = re.findall(r"VQGAN encode batch (\d+) on (\w+)", log)
    roof_n = 1024 if quick else 2048
    roof = matmul_roof(roof_n)
    gflop = vqgan_gflop_per_frame(quick)
    batch = int(chosen[-1][0]) if chosen else 1
    standalone = standalone_vqgan_s_per_frame(quick, batch)
    roof = max(roof, matmul_roof(roof_n))  # best of before/after: the shared host is noisy

    import jax

    device = jax.devices()[0]
    cold_launch_s = ready_s + asks["cold"]["wall_s"]
    print(f"\nvideo question on {device.platform}:{device.device_kind} ({os.cpu_count()} CPUs), git {roofline.git_sha()}; "
          f"{'demo model + demo VQGAN' if quick else args.model_config + ' dummy weights + real-size VQGAN'}, "
          f"{width}x{height} clips, {max_frames or 8} frames, {max_tokens} new tokens, greedy, ignore_eos")
    print(f"  launch -> ready           {ready_s:8.2f} s")
    print(f"  cold launch -> answer     {cold_launch_s:8.2f} s   (reference {REFERENCE['cold_s']} s)")
    cols = ["decode", "preprocess", "vqgan", "prefill", "generation", "other"]
    print(f"\n  {'ask':<12}{'wall s':>8}" + "".join(f"{c:>11}" for c in cols)
          + f"{'frames':>7}{'vqgan s/fr':>11}{'gen tok/s':>10}{'cached tok':>11}")
    for name, a in asks.items():
        s = a["split_s"]
        print(f"  {name:<12}{a['wall_s']:>8.2f}" + "".join(f"{s[c]:>11.2f}" for c in cols)
              + f"{a['frames'] or ('cache' if a['codes_cached'] else 0):>7}{fmt(a['vqgan_s_per_frame']):>11}"
              + f"{fmt(a['gen_tok_s'], '.1f'):>10}{a['cached_tokens']:>11}")
    ref = REFERENCE
    print(f"  {'reference':<12}{ref['cold_s']:>8.2f}{'':>11}{'':>11}{ref['vqgan_s']:>11.2f}{ref['prefill_s']:>11.2f}"
          f"{ref['generation_s']:>11.2f}{'':>11}{8:>7}{'2.1-2.2':>11}{ref['tok_s']:>10.2f}   (cold, one process)")
    if probe:
        print("\n  server's start-up VQGAN probe: "
              + ", ".join(f"batch {b}: {float(s):.2f} s/frame" for b, s in probe)
              + (f"; chosen batch {chosen[-1][0]}" if chosen else ""))
    new = asks["new_video"]
    per_frame = new["ingest_s_per_frame"]
    achieved = gflop / per_frame if per_frame else None
    print(f"  VQGAN {gflop:.1f} GFLOP/frame; new video ingest {fmt(per_frame)} s/frame (decode + VQGAN) = "
          f"{fmt(achieved, '.0f')} GFLOP/s vs matmul roof {roof:.0f} GFLOP/s measured now")
    print(f"  the same VQGAN outside the server (this process, batch {batch}, after it stopped): "
          f"{standalone:.2f} s/frame = {gflop / standalone:.0f} GFLOP/s; in the server: cold "
          f"{fmt(asks['cold']['vqgan_s_per_frame'])}, new video {fmt(new['vqgan_s_per_frame'])} s/frame")
    checks = {
        "new video <= 1/4 of the reference's cold": (new["wall_s"], TARGETS["new_video_s"]),
        "same video <= 1/10 of the reference's cold": (asks["same_video"]["wall_s"], TARGETS["same_video_s"]),
        "VQGAN s/frame (new video, whole ingest) <= reference 2.1": (per_frame or 0.0, REFERENCE["vqgan_s_per_frame"][0]),
    }
    for label, (got, want) in checks.items():
        verdict = "(--quick: the targets are for the real-size run)" if quick else ("met" if got <= want else "NOT met")
        print(f"  {label:<58} {got:7.2f} vs {want:6.2f}  {verdict}")
    print(f"  host load (1-min average) {load_before:.2f} before the run on {os.cpu_count()} CPUs: "
          + ("quiet" if load_before < 0.5 else "shared with other work: figures are slower and noisier than on a quiet machine"))
    for a in asks.values():
        del a["text"]
    print(json.dumps({
        "bench": "video_question", "device": f"{device.platform}:{device.device_kind}", "git_sha": roofline.git_sha(),
        "config": {"quick": quick, "model": "demo" if quick else args.model_config, "frames": max_frames or 8,
                   "width": width, "height": height, "max_tokens": max_tokens, "frame_layout": "vision_chat",
                   "server_argv": cmd[1:]},
        "figures": {"launch_to_ready_s": ready_s, "cold_launch_to_answer_s": cold_launch_s, "asks": asks,
                    "vqgan_probe_s_per_frame": {b: float(s) for b, s in probe},
                    "vqgan_batch": int(chosen[-1][0]) if chosen else None,
                    "vqgan_gflop_per_frame": gflop, "matmul_roof_gflops": roof,
                    "standalone_vqgan_s_per_frame": standalone,
                    "new_video_vqgan_gflops": achieved},
        "reference": REFERENCE, "targets": TARGETS,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
