"""Load over HTTP: aggregate tokens/s, TTFT and inter-token latency vs concurrent clients,
and first-ask vs follow-up TTFT on one video.

Starts the real app (uvicorn on 127.0.0.1, in-process thread) for each model given
(`demo`, or a preset served with `--load-format dummy`, e.g. `bench-150m`), then:

* for each concurrency in --concurrency: that many streaming chat clients (httpx
  async), each asking for --max-tokens tokens (ignore_eos) on its own prompt;
  aggregate tokens/s over the wall time, p50/p99 TTFT and inter-token latency,
  and the ratio of the aggregate to one client's (the continuous-batching gain);
* video: an MP4 made here (PyAV), uploaded once; the same question asked twice
  (cold, then served from the prefix cache) and a follow-up turn in the same
  conversation; TTFT of each and `cached_tokens` from the usage. Twice: a short
  clip on the concurrency server (what its --max-model-len holds), and a long one
  (--video-frames, 60 by default: LWM's long-video workload in small) on a
  server of its own sized for it, timed once every shape is compiled. The ratio
  follow-up / first falls with the video's length: the follow-up's cost is its
  new tokens, the first ask's is the whole video.

Prints a table per model and one JSON line (device, git sha, figures).

    .venv/bin/python bench/load.py [--models demo,bench-150m] [--concurrency 1,4,16,64]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import av
import httpx
import jax
import numpy as np

from lwm_serve.model import config as model_config
from lwm_serve.server.config import ServerSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import git_sha, start  # noqa: E402  (the same in-process server as bench/serve.py)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


async def one_stream(client: httpx.AsyncClient, base: str, messages: list, max_tokens: int) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, text, usage = [], "", None
    async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for ch in chunk.get("choices", []):
                if ch["delta"].get("content"):
                    times.append(time.perf_counter())
                    text += ch["delta"]["content"]
    tokens = (usage or {}).get("completion_tokens", len(times))
    return {"ttft": times[0] - t0 if times else float("nan"), "itl": list(np.diff(times)),
            "tokens": tokens, "usage": usage, "text": text}


async def concurrency_run(base: str, clients: int, max_tokens: int, run: str) -> dict:
    """`clients` streams at once, each on a prompt no earlier request sent (`run` names the
    run), so that every prompt is prefilled, not found in the prefix cache."""
    async with httpx.AsyncClient(timeout=3600) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*[
            one_stream(client, base, [{"role": "user", "content": f"{run}, client {i}: tell me about the world."}],
                       max_tokens) for i in range(clients)])
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    itl = [x for r in results for x in r["itl"]]
    return {"clients": clients, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_p50": pct([r["ttft"] for r in results], 50), "ttft_p99": pct([r["ttft"] for r in results], 99),
            "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99)}


def make_video(path: Path, frames: int, size: int = 256, fps: int = 4) -> None:
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.zeros((size, size, 3), np.uint8)
            x = 20 + 10 * i
            img[60:120, x:x + 60] = rng.integers(0, 255, 3)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


async def video_run(base: str, frames: int, max_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip.mp4"
        make_video(path, frames)
        async with httpx.AsyncClient(timeout=3600) as client:
            with open(path, "rb") as f:
                r = await client.post(f"{base}/v1/files", data={"purpose": "user_data"},
                                      files={"file": ("clip.mp4", f, "video/mp4")})
            r.raise_for_status()
            file_id = r.json()["id"]
            ask = [{"role": "user", "content": [
                {"type": "text", "text": "What happens in this video?"},
                {"type": "video_url", "video_url": {"url": file_id, "fps": 4, "max_frames": frames}}]}]
            first = await one_stream(client, base, ask, max_tokens)
            again = await one_stream(client, base, ask, max_tokens)
            follow_msgs = ask + [{"role": "assistant", "content": first["text"]},
                                 {"role": "user", "content": "And what colour is it?"}]
            follow = await one_stream(client, base, follow_msgs, max_tokens)
    def cached(r: dict) -> tuple[int, int]:
        u = r["usage"] or {}
        return (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0), u.get("prompt_tokens", 0)
    return {"frames": frames, "first_ttft": first["ttft"], "same_again_ttft": again["ttft"],
            "follow_up_ttft": follow["ttft"], "same_again_cached": cached(again), "follow_up_cached": cached(follow),
            "follow_up_ratio": follow["ttft"] / first["ttft"]}


def print_video(label: str, video: dict) -> None:
    print(f"{label} ({video['frames']} frames): first ask TTFT {video['first_ttft']:.3f} s, same again "
          f"{video['same_again_ttft']:.3f} s (cached {video['same_again_cached'][0]}/"
          f"{video['same_again_cached'][1]}), follow-up {video['follow_up_ttft']:.3f} s (cached "
          f"{video['follow_up_cached'][0]}/{video['follow_up_cached'][1]}), follow-up / first = "
          f"{video['follow_up_ratio']:.3f}")


def long_video(model: str, kw: dict[str, Any], frames: int, ready_timeout: float) -> dict:
    """The video asks on a server of their own, its context sized for `frames`, once the
    warm-up has compiled every shape (also those it leaves for idle time after /ready),
    so that no ask waits for a compile."""
    length = -(-(frames * 257 + 512) // 512) * 512
    # the prefix cache must hold the video's prefill (bench-150m: 73.7 KiB per token, 1.1 GiB
    # for 60 frames, past the 1 GiB default) and the follow-up's next to it
    cfg = model_config.from_preset(model)  # the demo's checkpoint is its preset
    per_token = 2 * cfg.num_hidden_layers * cfg.kv_heads * cfg.head_dim * 4  # fp32
    kw = dict(kw, max_num_seqs=2, max_queue=8, data_dir=Path(tempfile.mkdtemp(prefix="lwm-load-video-")),
              max_model_len=length, prefix_cache_bytes=3 * length * per_token)
    base, server, thread = start(ServerSettings(**kw), ready_timeout_s=ready_timeout)
    try:
        engine = server.config.app.state.services.engine
        if not engine.warmed.wait(ready_timeout):
            raise SystemExit("the long-video server did not finish compiling in time")
        video = asyncio.run(video_run(base, frames, 8))
        print_video("long video", video)
        return video
    finally:
        server.should_exit = True
        thread.join(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,bench-150m")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--video-frames", type=int, default=60,
                    help="frames of the long video (its server's context is sized for it; 0: none)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--ready-timeout", type=float, default=3600,
                    help="seconds to wait for /ready (the warm-up compiles every shape; slow on a busy CPU)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    levels = [int(c) for c in args.concurrency.split(",")]
    report: dict[str, Any] = {"device": str(jax.devices()[0]), "git": git_sha(), "models": {}}
    for model in args.models.split(","):
        data = Path(args.data_dir or tempfile.mkdtemp(prefix="lwm-load-"))
        kw: dict[str, Any] = dict(max_num_seqs=max(levels), max_queue=4 * max(levels), data_dir=data,
                                  max_model_len=args.max_model_len, prefill_chunk=512, warmup=True)
        if model != "demo":
            kw.update(load_format="dummy", model_config_path=model)
        t_launch = time.perf_counter()
        base, server, thread = start(ServerSettings(**kw), ready_timeout_s=args.ready_timeout)
        ready_s = time.perf_counter() - t_launch  # load + compile every shape (warm-up) until /ready
        try:
            asyncio.run(concurrency_run(base, max(levels), 4, "Warm-up"))  # compile every batch shape once
            runs = [asyncio.run(concurrency_run(base, c, args.max_tokens, f"Run {c}")) for c in levels]
            one = runs[0]["tok_s"]
            print(f"\n{model}: launch -> /ready {ready_s:.1f} s; {args.max_tokens} tokens per client, "
                  "ignore_eos, greedy")
            print(f"{'clients':>8} {'tok/s':>9} {'x 1 client':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
                  f"{'ITL p50':>8} {'ITL p99':>8}")
            for r in runs:
                r["ratio"] = r["tok_s"] / one
                print(f"{r['clients']:>8} {r['tok_s']:>9.1f} {r['ratio']:>10.2f} {r['ttft_p50']:>9.3f} "
                      f"{r['ttft_p99']:>9.3f} {r['itl_p50']:>8.4f} {r['itl_p99']:>8.4f}")
            short = asyncio.run(video_run(base, min(8, (args.max_model_len - 256) // 257), 8))
            print_video("short video", short)
            report["models"][model] = {"ready_s": ready_s, "concurrency": runs, "short_video": short}
        finally:
            server.should_exit = True
            thread.join(60)
        del base, server, thread  # its pool (9.6 GiB for bench-150m at 64 x 2048) goes before the next
        gc.collect()
        if args.video_frames:
            report["models"][model]["video"] = long_video(model, kw, args.video_frames, args.ready_timeout)
    print(json.dumps(report, default=float))


if __name__ == "__main__":
    main()
