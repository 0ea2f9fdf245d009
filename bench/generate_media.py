"""Image and video generation over HTTP: seconds per image and per video frame, time to the
first partial image, and chat TTFT while a video job runs vs idle.

Starts the real app (uvicorn on 127.0.0.1, in-process thread) for each model given
(`demo`, or a preset served with `--load-format dummy`, e.g. `bench-150m`; both with
the demo's tiny VQGAN), then, after one warm-up image and video:

* image: POST /v1/images/generations (n=1), wall seconds per image (257 guided
  vision steps: 2 pool rows each), and the same streamed with partial_images=3:
  time to the first `image_generation.partial_image` (64 codes in);
* video: POST /v1/videos with the extra n_frames, polled until completed: seconds
  per frame (create -> completed, over all frames);
* fairness: TTFT of short streaming chat requests, idle, then while a long video
  job is in progress; the ratio is the price a chat pays for the job beside it.

The roof: one decode step must stream every weight once, so a frame (257 steps)
takes at least 257 x param bytes / memory bandwidth (bandwidth measured in this
run, bench/roofline.py). Prints a table per model and one JSON line.

    .venv/bin/python bench/generate_media.py [--models demo,bench-150m] [--video-frames 4]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import roofline  # noqa: E402
from load import start  # noqa: E402

from lwm_serve.model import config as model_config  # noqa: E402
from lwm_serve.server.config import ServerSettings  # noqa: E402
from lwm_serve.tokenizers.vision_layout import TOKENS_PER_FRAME  # noqa: E402


def draw_image(base: str, seed: int) -> float:
    t0 = time.perf_counter()
    r = httpx.post(f"{base}/v1/images/generations", json={"prompt": "a lighthouse at dusk", "seed": seed},
                   timeout=3600)
    r.raise_for_status()
    return time.perf_counter() - t0


def first_partial(base: str, seed: int) -> tuple[float, float]:
    """(seconds to the first partial image, seconds to the completed image)."""
    t0 = time.perf_counter()
    first = None
    body = {"prompt": "a lighthouse at dusk", "seed": seed, "stream": True, "partial_images": 3}
    with httpx.stream("POST", f"{base}/v1/images/generations", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and "partial_image" in line and first is None:
                first = time.perf_counter() - t0
    return first or float("nan"), time.perf_counter() - t0


def start_video(base: str, frames: int, seed: int) -> str:
    r = httpx.post(f"{base}/v1/videos", json={"prompt": "waves on a beach", "n_frames": frames, "seed": seed},
                   timeout=600)
    r.raise_for_status()
    return r.json()["id"]


def wait_video(base: str, video_id: str) -> dict:
    while True:
        body = httpx.get(f"{base}/v1/videos/{video_id}", timeout=60).json()
        if body["status"] in ("completed", "failed"):
            if body["status"] == "failed":
                raise RuntimeError(body["error"])
            return body
        time.sleep(0.05)


def chat_ttft(base: str) -> float:
    body = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 4, "stream": True,
            "temperature": 0}
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                return time.perf_counter() - t0
    return float("nan")


def bench_model(model: str, args: argparse.Namespace, bandwidth: float) -> dict[str, Any]:
    kw: dict[str, Any] = dict(max_num_seqs=8, data_dir=Path(tempfile.mkdtemp(prefix="lwm-media-")),
                              max_model_len=args.max_model_len, prefill_chunk=512, warmup=True)
    if model != "demo":
        kw.update(load_format="dummy", model_config_path=model)
    cfg = model_config.from_preset(model)
    param_bytes = cfg.num_params() * 4  # fp32
    frame_roof = TOKENS_PER_FRAME * param_bytes / bandwidth
    base, server, thread = start(ServerSettings(**kw))
    try:
        draw_image(base, 0)  # compile the vision shapes (a frame count compiles its own lengths)
        first_partial(base, 0)
        wait_video(base, start_video(base, max(args.video_frames, args.busy_frames), 0))
        images = [draw_image(base, s) for s in range(1, 1 + args.images)]
        partial, streamed = first_partial(base, 99)
        t0 = time.perf_counter()
        wait_video(base, start_video(base, args.video_frames, 1))
        per_frame = (time.perf_counter() - t0) / args.video_frames
        idle = [chat_ttft(base) for _ in range(args.chats)]
        video_id = start_video(base, args.busy_frames, 2)
        while httpx.get(f"{base}/v1/videos/{video_id}", timeout=60).json()["status"] != "in_progress":
            time.sleep(0.05)
        busy = [chat_ttft(base) for _ in range(args.chats)]
        still_running = httpx.get(f"{base}/v1/videos/{video_id}", timeout=60).json()["status"] == "in_progress"
        wait_video(base, video_id)
    finally:
        server.should_exit = True
        thread.join(60)
    image_s = statistics.median(images)
    out = {"image_s": image_s, "image_roof_s": frame_roof, "image_roof_ratio": frame_roof / image_s,
           "first_partial_s": partial, "streamed_image_s": streamed,
           "video_s_per_frame": per_frame, "frame_roof_s": frame_roof, "frame_roof_ratio": frame_roof / per_frame,
           "chat_ttft_idle_s": statistics.median(idle), "chat_ttft_busy_s": statistics.median(busy),
           "video_still_running_after_chats": still_running, "param_bytes": param_bytes}
    out["chat_ttft_ratio"] = out["chat_ttft_busy_s"] / out["chat_ttft_idle_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,bench-150m")
    ap.add_argument("--images", type=int, default=3, help="images timed (median)")
    ap.add_argument("--video-frames", type=int, default=4, help="frames of the timed video")
    ap.add_argument("--busy-frames", type=int, default=6, help="frames of the video running beside the chats")
    ap.add_argument("--chats", type=int, default=5, help="chat requests per TTFT median")
    ap.add_argument("--max-model-len", type=int, default=4096)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    bandwidth = roofline.memory_bandwidth()
    report: dict[str, Any] = {"bench": "generate_media", "device": roofline.device_description(),
                              "git": roofline.git_sha(), "mem_bw_gb_s": bandwidth / 1e9, "models": {}}
    print(f"memory bandwidth (roof): {bandwidth / 1e9:.1f} GB/s")
    for model in args.models.split(","):
        r = bench_model(model, args, bandwidth)
        report["models"][model] = r
        print(f"\n{model} ({r['param_bytes'] / 1e6:.0f} MB of fp32 weights per decode step)")
        print(f"  image (257 guided steps):     {r['image_s']:8.2f} s   roof {r['image_roof_s']:.2f} s "
              f"({r['image_roof_ratio']:.2f} of roof)")
        print(f"  first partial image (64 codes): {r['first_partial_s']:6.2f} s   (streamed image "
              f"{r['streamed_image_s']:.2f} s)")
        print(f"  video, per frame:              {r['video_s_per_frame']:8.2f} s   roof {r['frame_roof_s']:.2f} s "
              f"({r['frame_roof_ratio']:.2f} of roof)")
        print(f"  chat TTFT idle / beside a video job: {r['chat_ttft_idle_s']:.3f} s / {r['chat_ttft_busy_s']:.3f} s "
              f"= {r['chat_ttft_ratio']:.2f}x (job still running after the chats: "
              f"{r['video_still_running_after_chats']})")
    roofline.print_json_line(report)


if __name__ == "__main__":
    main()
